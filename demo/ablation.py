"""The paper's ablation on the offline demo: which EDGE term does what, against a control and real pairs.

Rows (each a training set of --num_images images, evaluated with --seeds seeds):
  random real pairs; the generator before fine-tuning; fine-tuned with the noise MSE only (the control:
  same steps, learning rate and trainable set as EDGE); + contrastive; + contrastive + diversity (EDGE);
  EDGE with cpi 2; EDGE variants (terms at t >= 500 only, an ensemble scorer (--seeds >= 3), shifted scorer
  inputs, terms on the guided prediction, one-step or of a 4-step chain); beyond-the-paper sampling (coverage prompts, best of 4, cpi 5);
  the full real set (the ceiling, whose seed-0 model is the EDGE scorer). A row twin_<set>
  trains on the real images that set's prompts were drawn from, with the set's captions (evaluation
  --real_twin): generated against real images with everything else equal (by default for the EDGE set and
  the scorer-space coverage set).
Every generator also draws --follow_samples prompts for prompt following (per attribute on the
procedural set) and own-prompt rank by an independent retrieval model (seed 1's full-set model).
Each fine-tuning run records how far its weights moved (edge_diffusion_train's run summary).

Every stage goes through the script a user would run, with demo/run_demo.py's stage runner, so an
interrupted ablation resumes; each stage names the stages it reads, so a row added to a finished ablation
runs only its own stages. Results: <output_dir>/ablation.md and ablation.json.

A recipe sweep adds fine-tuning rows with --variant NAME="flags" (flags on top of the EDGE recipe) and
keeps only the rows it names with --rows (the full real set always runs: it is the scorer and the judge).

Usage:
    python -m demo.ablation --output_dir outputs/ablation                      # shipped model, procedural data
    python -m demo.ablation --output_dir outputs/ablation_holdout --data_config configs/demo_data_holdout.yaml \
        --base_model runs/holdout_sd     # held-out variant, its own generator (configs/demo_data_holdout.yaml)
    python -m demo.ablation --output_dir outputs/sweep --seeds 3 --rows random,before \
        --variant "lora_mse=--trainable lora --lambda_contrastive 0 --lambda_diversity 0" \
        --variant "lora_edge=--trainable lora"     # a control/EDGE pair under another recipe
"""
import argparse
import json
import sys
from pathlib import Path

from demo.report import image_steps, still_climbing_note, still_climbing_rows
from demo.run_demo import (TRAIN_RERUN, StageRunner, _caption_done, _full_epochs, _is_pipeline, _manifest_complete,
                           _python, _read_json, add_stage_recipes, check_data_flags, data_flags, quick_overrides,
                           run_eval)
from utils.common.atomic_io import atomic_write_json, atomic_write_text
from utils.common.config import load_recipe, parse_args_with_recipe, save_run_config
from utils.common.errors import fail, run_cli
from utils.stages.train_run import has_final_model

ROOT = Path(__file__).resolve().parent.parent
# fine-tuning variants: flags added to the EDGE recipe
VARIANTS = {
    "mse_only": ["--lambda_contrastive", "0", "--lambda_diversity", "0"],
    "contrastive": ["--lambda_diversity", "0"],
    "edge": [],
    "edge_tmin500": ["--edge_t_min", "500"],
    "edge_ensemble": ["--scorer", "{ensemble}"],
    "edge_shift": ["--scorer_shift", "0.0625"],
    "edge_guided": ["--edge_guidance_scale", "{guidance}"],
    "edge_guided_unroll4": ["--edge_guidance_scale", "{guidance}", "--x0_unroll_steps", "4"],
}
# placeholders a variant's flags may hold, filled in once known ({ensemble}: the edge_ensemble scorer;
# {guidance}: the guidance scale the sets are sampled at)
FLAG_PLACEHOLDERS = ("ensemble", "guidance")
# beyond the paper, on top of the EDGE generator: sampling flags of each set
# ({scorer} is the EDGE scorer's folder, known once the full real row has run)
SAMPLING_OPTIONS = {
    "edge_coverage": ["--prompt_selection", "coverage"],
    "edge_coverage_scorer": ["--prompt_selection", "coverage", "--coverage_text_encoder", "scorer:retrieval:{scorer}"],
    "edge_best4": ["--best_of", "4", "--best_of_scorer", "retrieval:{scorer}"],
}
# captioned sets: row -> (the set it captions, captions per image)
CAPTIONED = {"edge_cpi2": ("edge", 2), "edge_cpi5": ("edge", 5),
             "edge_coverage_scorer_cpi5": ("edge_coverage_scorer", 5)}
ROW_LABELS = {
    "random": "random real pairs",
    "random_cpi5": "random real images, 5 real captions each (control of cpi 5)",
    "before": "generator before fine-tuning",
    "mse_only": "fine-tuned, MSE only (control)",
    "contrastive": "fine-tuned, MSE + contrastive",
    "edge": "EDGE (MSE + contrastive + diversity)",
    "edge_tmin500": "EDGE, contrastive/diversity at t >= 500 only",
    "edge_ensemble": "EDGE, scorer = ensemble of the full-set models of every seed but the judge's",
    "edge_shift": "EDGE, the scorer reads each image at a random shift of up to 1/16 of its side",
    "edge_guided": "EDGE, contrastive/diversity on the guided prediction (at the sampling guidance scale)",
    "edge_guided_unroll4": "EDGE, contrastive/diversity on the guided x0 of a 4-step chain from noise",
    "edge_cpi2": "EDGE, cpi 2 (retrieval captions)",
    "edge_cpi5": "EDGE, cpi 5 (retrieval captions)",
    "edge_coverage": "EDGE, prompts chosen by coverage (k-means on MiniLM features)",
    "edge_coverage_scorer": "EDGE, prompts chosen by coverage (k-means on the scorer's text features)",
    "edge_best4": "EDGE, best of 4 candidates by the scorer",
    "edge_coverage_scorer_cpi5": "EDGE, prompts chosen by coverage in the scorer's space, cpi 5 (retrieval captions)",
    "full_real": "full real training set",
}
# twin_<set row>: the real train images that set's prompts were drawn from, with the set's captions
# (evaluation --real_twin): the control that changes only the images; run by default for these sets
TWIN = "twin_"
DEFAULT_TWINS = ("twin_edge", "twin_edge_coverage_scorer")


def parse_args(argv=None):
    """Flags of the ablation driver (a --config recipe sets defaults; flags win)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", default="outputs/ablation")
    p.add_argument("--base_model", default=str(ROOT / "assets" / "demo_sd"), help="the generator to fine-tune")
    p.add_argument("--data", default=None, help="Karpathy annotation folder of your own data (default: procedural)")
    p.add_argument("--images", default=None, help="image root of --data")
    p.add_argument("--num_images", type=int, default=100)
    p.add_argument("--follow_samples", type=int, default=300, help="samples per generator for prompt following")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--full_epochs", type=int, default=None)
    p.add_argument("--edge_flags", default="", help="extra flags for every fine-tuning run (quoted string)")
    p.add_argument("--variant", action="append", default=[], metavar='NAME="FLAGS"',
                   help="an extra fine-tuning row: NAME and the flags it adds to the EDGE recipe (repeatable)")
    p.add_argument("--rows", default=None,
                   help="comma-separated rows to run (default: all, and every --variant); full_real always runs")
    p.add_argument("--quick", action="store_true", help="tiny configuration (the test)")
    add_stage_recipes(p)
    args = parse_args_with_recipe(p, argv)
    check_data_flags(args)
    if args.seeds < 2:
        raise fail("--seeds must be at least 2 (seed 1's full-set model is the independent judge)")
    if not _is_pipeline(Path(args.base_model)):
        raise fail(f"--base_model {args.base_model} is not a diffusers pipeline folder (model_index.json, unet/)")
    args.variants = parse_variants(args.variant)
    asked = args.rows
    args.rows = selected_rows(args.rows, args.variants)
    if asked is None and args.seeds < 3:  # the default rows leave out what too few seeds cannot build
        args.rows = [r for r in args.rows if r != "edge_ensemble"]
    if "edge_ensemble" in args.rows and args.seeds < 3:
        raise fail("--rows edge_ensemble: its scorer is the full-set models of every seed but the judge's; "
                   "it needs --seeds 3 or more")
    return args


def parse_variants(specs) -> dict:
    """--variant NAME="FLAGS" entries as {name: [flags]} after the built-in VARIANTS (one-line error if malformed)."""
    variants = dict(VARIANTS)
    for spec in specs:
        name, sep, flags = spec.partition("=")
        name = name.strip()
        if not sep or not name.isidentifier() or not flags.strip():
            raise fail(f'--variant {spec!r}: expected NAME="FLAGS", e.g. lora_edge="--trainable lora"')
        if name in ROW_LABELS or name in variants:
            raise fail(f"--variant {name}: the name is taken by a built-in row")
        variants[name] = flags.split()
        try:
            [f.format(**dict.fromkeys(FLAG_PLACEHOLDERS, "")) for f in variants[name]]
        except (KeyError, IndexError, ValueError) as e:
            raise fail(f"--variant {name}: braces in its flags name a placeholder; known: "
                       f"{', '.join('{' + k + '}' for k in FLAG_PLACEHOLDERS)} ({type(e).__name__}: {e})")
    return variants


def selected_rows(rows, variants: dict) -> list:
    """The rows to run, in table order: --rows (or all but the twins not in DEFAULT_TWINS), plus the sets that
    twin_* rows and the EDGE model that edge_* rows build on."""
    sets = {"before", *variants, *SAMPLING_OPTIONS, *CAPTIONED}
    known = []
    for row in list(ROW_LABELS)[:-1] + [v for v in variants if v not in ROW_LABELS]:
        known += [row, TWIN + row] if row in sets else [row]  # a set's real twin right after it
    known.append("full_real")
    if rows is None:
        chosen = {r for r in known if not r.startswith(TWIN)} | set(DEFAULT_TWINS)
    else:
        chosen = {r.strip() for r in rows.split(",") if r.strip()}
        unknown = sorted(chosen - set(known))
        if unknown:
            raise fail(f"--rows: unknown row(s) {', '.join(unknown)}; known: {', '.join(known)}")
    chosen |= {r[len(TWIN):] for r in chosen if r.startswith(TWIN)}
    chosen |= {CAPTIONED[r][0] for r in chosen if r in CAPTIONED}
    if any(r.startswith("edge_") and r not in variants for r in chosen):
        chosen.add("edge")
    chosen.add("full_real")
    return [r for r in known if r in chosen]


def row_label(args, name: str) -> str:
    """The table label of a row: the built-in one, or the flags of a --variant."""
    if name in ROW_LABELS:
        return ROW_LABELS[name]
    if name.startswith(TWIN):
        return f"real images behind the prompts of: {row_label(args, name[len(TWIN):])} (same captions)"
    flags = " ".join(f.replace(f"{ROOT}/", "") for f in args.variants[name])  # repo paths shown relative
    return f"{name}: fine-tuned with {flags}"


def ensemble_seeds(args) -> list:
    """The full-set models of the edge_ensemble scorer: every evaluation seed but the judge's (seed + 1)."""
    return [s for s in range(args.seed, args.seed + args.seeds) if s != args.seed + 1]


def sampling_guidance(args) -> float:
    """The classifier-free guidance scale the rows' sets are sampled at (--sample_config, else the script's default)."""
    from utils.stages.sampling import DEFAULT_GUIDANCE_SCALE

    recipe = load_recipe(args.sample_config) if args.sample_config else {}
    return float(recipe.get("guidance_scale", DEFAULT_GUIDANCE_SCALE))


def sampling_source(base_model, folder) -> tuple:
    """The model and extra sampling flags for a fine-tuned folder: a pipeline, or LoRA weights on the base model."""
    folder = Path(folder)
    if not (folder / "model_index.json").is_file() and (folder / "pytorch_lora_weights.safetensors").is_file():
        return Path(base_model), ["--lora_weights", folder]
    return folder, []


def _sample(runner, args, dflags, name, model, folder, n, extra=(), after=(), stage="sample") -> float:
    return runner.run(f"{stage}_{name}_{n}", _python("edge_diffusion_sampling.py") + [
        "--config", args.sample_config, *dflags, "--pretrained_model_name_or_path", model, "--num_queries", n,
        "--output_dir", folder, "--seed", args.seed, *extra] + quick_overrides(args, "sample"),
        lambda: _manifest_complete(folder), fresh_flags=["--overwrite"], after=("data", *after))


def run_ablation(args) -> dict:
    """Run (or resume) every stage; returns the folders the table is read from."""
    out = Path(args.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    save_run_config(args, out, name="ablation_config.json")
    runner = StageRunner(out)
    data_dir = out / "data"
    dflags = data_flags(args, data_dir)
    if not args.data:
        runner.run("data", _python("dataset.procedural") + [
            "--config", args.data_config, "--output_dir", data_dir, "--seed", args.seed]
            + quick_overrides(args, "data"), lambda: (data_dir / "spec.json").is_file(), fresh_flags=["--overwrite"],
            after=())
    results_table = out / "results.md"
    scorer_root = out / "scorer"
    run_eval(runner, args, dflags, "full_real", ["--baseline", "full", "--epochs", _full_epochs(args, dflags),
                                                 "--save_model_dir", scorer_root], out, results_table,
             extra_check=lambda: (scorer_root / f"seed_{args.seed}" / "retrieval_model.safetensors").is_file(),
             after=["data"])
    scorer = scorer_root / f"seed_{args.seed}"
    ensemble = "+".join(f"retrieval:{scorer_root / f'seed_{s}'}" for s in ensemble_seeds(args))
    guidance = sampling_guidance(args)
    models = {"before": Path(args.base_model)}
    for name, flags in args.variants.items():
        if name not in args.rows:
            continue
        folder = out / "models" / name
        runner.run(f"train_{name}", _python("edge_diffusion_train.py") + [
            "--config", args.edge_config, *dflags, "--pretrained_model_name_or_path", args.base_model,
            "--output_dir", folder, "--scorer", f"retrieval:{scorer}", "--seed", args.seed,
            *[f.format(ensemble=ensemble, guidance=guidance) for f in flags],
            *args.edge_flags.split()] + quick_overrides(args, "edge"), lambda f=folder: has_final_model(f),
            after=["data", "eval_full_real"], **TRAIN_RERUN)
        models[name] = folder
    sets, follow, made_by = {}, {}, {}  # made_by: the stage that wrote each set (its evaluation's input)
    for name, model in models.items():
        if name not in args.rows:
            continue
        sets[name] = out / "sets" / name
        model, extra = sampling_source(args.base_model, model)
        trained = [f"train_{name}"] if name in args.variants else []  # "before" is the base model
        _sample(runner, args, dflags, name, model, sets[name], args.num_images, extra, after=trained)
        made_by[name] = f"sample_{name}_{args.num_images}"
        follow[name] = out / "follow" / name
        _sample(runner, args, dflags, name, model, follow[name], args.follow_samples, extra, after=trained,
                stage="follow")  # its own stage name: --follow_samples may equal --num_images
    for name, flags in SAMPLING_OPTIONS.items():
        if name not in args.rows:
            continue
        sets[name] = out / "sets" / name
        extra = [f.format(scorer=scorer) for f in flags]
        _sample(runner, args, dflags, name, models["edge"], sets[name], args.num_images, extra,
                after=["train_edge", "eval_full_real"])
        made_by[name] = f"sample_{name}_{args.num_images}"
    for name, (source, cpi) in CAPTIONED.items():
        if name not in args.rows:
            continue
        sets[name] = out / "sets" / name
        runner.run(f"caption_{name}", _python("caption_synthesis_retrieval.py") + [
            "--config", args.caption_config, *dflags, "--input_dir", sets[source], "--output_dir", sets[name],
            "--cpi", cpi, "--scorer", f"retrieval:{scorer}", "--seed", args.seed],
            lambda f=sets[name]: _caption_done(f), fresh_clear=sets[name],
            after=["data", "eval_full_real", made_by[source]])
        made_by[name] = f"caption_{name}"
    baselines = {"random": ["--baseline", "random", "--n", args.num_images],
                 "random_cpi5": ["--baseline", "random", "--n", args.num_images, "--captions_per_image", "5"]}
    for name, inputs in baselines.items():
        if name in args.rows:
            run_eval(runner, args, dflags, name, inputs, out, results_table, after=["data"])
    # every generator row samples the same prompts (same seed, plain selection): their twins are one real set,
    # evaluated once and read by each of those rows
    same_prompts, shared_twin, aliases = {"before", *args.variants}, None, {}
    for name, folder in sets.items():
        run_eval(runner, args, dflags, name, ["--distill_dir", folder], out, results_table,
                 after=["data", made_by[name]])
        if TWIN + name not in args.rows:
            continue
        if name in same_prompts and shared_twin:
            aliases[TWIN + name] = shared_twin
            continue
        run_eval(runner, args, dflags, TWIN + name, ["--distill_dir", folder, "--real_twin"], out,
                 results_table, after=["data", made_by[name]])
        aliases[TWIN + name] = TWIN + name
        if name in same_prompts:
            shared_twin = TWIN + name
    return {"out": out, "data_dir": None if args.data else data_dir, "models": models, "follow": follow,
            "judge": scorer_root / f"seed_{args.seed + 1}", "scorer": scorer, "evaluated_as": aliases}


def collect(args, info) -> dict:
    """The ablation's numbers: retrieval per row, prompt following and rank per generator, weight movement."""
    from demo.measure_prompt_following import measure
    from demo.prompt_rank import measure_prompt_ranks, real_test_items

    out = info["out"]
    evaluated_as = info.get("evaluated_as", {})
    rows = {k: _read_json(out / "eval" / evaluated_as.get(k, k) / "results.json") for k in args.rows}
    labels = {name: row_label(args, name) for name in info["follow"]}
    follow = {}
    if info["data_dir"]:
        named = {labels[k]: v for k, v in info["follow"].items()}
        follow = measure(info["data_dir"], named, real=args.follow_samples, seed=args.seed,
                         vae_model=info["models"]["before"])
    dataset, ann_root = ("karpathy", args.data) if args.data else ("procedural", info["data_dir"])
    real = real_test_items(dataset, ann_root, args.images, n=args.follow_samples)
    named = {labels[k]: v for k, v in info["follow"].items()}
    block = min(100, args.follow_samples)
    # the same share read by the EDGE scorer too: a gain it sees and the judge does not is a fit to the scorer
    ranks = measure_prompt_ranks({"judge": f"retrieval:{info['judge']}", "scorer": f"retrieval:{info['scorer']}"},
                                 named, real, block=block)
    rank, scorer_rank = ranks["judge"], ranks["scorer"]
    moved = {}
    for name in args.variants:
        if name not in info["models"]:
            continue
        summary = _read_json(info["models"][name] / "logs" / "run_summary.json")
        if summary:
            moved[row_label(args, name)] = {k: summary.get(k) for k in ("param_change", "pixel_change")}
    return {"retrieval": {k: v.get("summary") for k, v in rows.items() if v},
            "still_climbing": still_climbing_rows(rows),
            "image_steps": {k: image_steps(v) for k, v in rows.items() if v},
            "prompt_following": follow, "prompt_rank": rank, "scorer_rank": scorer_rank, "moved": moved}


def write_samples(args, info):
    """samples.png: the real image behind each of the first prompts, then every generator's sample of it (the
    sets share prompts and per-image seeds); None when no generator row ran."""
    from dataset.distilled import read_distilled_set
    from dataset.registry import resolve_split
    from demo.report import samples_grid
    from utils.common.atomic_io import atomic_save_image

    names = [k for k in info["follow"] if (info["out"] / "sets" / k).is_dir()]
    if not names:
        return None
    dataset, ann_root = ("karpathy", args.data) if args.data else ("procedural", info["data_dir"])
    _, image_root = resolve_split(dataset, "train", ann_root, args.images)
    grid = samples_grid([read_distilled_set(info["out"] / "sets" / k) for k in names],
                        [row_label(args, k) for k in names], image_root)
    path = info["out"] / "samples.png"
    atomic_save_image(path, grid)
    return path


def markdown(args, numbers: dict) -> str:
    """ablation.md: the retrieval table, prompt following, rank and weight movement, with their noise."""
    from demo.prompt_following import format_share, markdown_table, misread_lines

    L = ["# Ablation of the EDGE terms", "",
         f"Base generator {args.base_model}; fine-tuning recipe {args.edge_config} {args.edge_flags}; "
         f"{args.num_images}-image sets; retrieval mean ± std over {args.seeds} seeds (from {args.seed}); prompt "
         f"following over {args.follow_samples} samples per generator with 95 % Wilson intervals.", "",
         "| training set | image steps | r_mean | IR@1 | TR@1 |", "|---|---|---|---|---|"]
    for k in args.rows:
        label, s = row_label(args, k), numbers["retrieval"].get(k)
        if s:
            cell = lambda m: f"{s[m]['mean']:.1f} ± {s[m]['std']:.1f}"  # noqa: E731
            L.append(f"| {label} | {numbers['image_steps'].get(k)} | {cell('r_mean')} | {cell('img_r1')} | "
                     f"{cell('txt_r1')} |")
    climbing = numbers.get("still_climbing") or {}
    if climbing:
        L += ["", still_climbing_note({row_label(args, k): v for k, v in climbing.items()})]
    if numbers.get("samples"):
        L += ["", "Samples (first row: the real image each prompt was drawn from; then each generator, same seeds):",
              "", f"![samples]({numbers['samples']})"]
    if numbers["prompt_following"]:
        L += ["", "## Prompt following per attribute", "", markdown_table(numbers["prompt_following"])]
        misread = misread_lines(numbers["prompt_following"])
        if misread:
            L += ["", "Most frequent misreadings (named -> read by the attribute classifier, count):", "", *misread]
    if numbers["prompt_rank"]:
        by_scorer = numbers.get("scorer_rank") or {}
        L += ["", "## Own prompt ranked first among 100", "",
              "By an independent retrieval model (the judge, seed 1's full-set model) and by the EDGE scorer "
              "(seed 0's): a gain the scorer sees and the judge does not is a fit to the scorer, not a better image.",
              "", "| images | judge: share % [95 % CI] | EDGE scorer: share % [95 % CI] | n |", "|---|---|---|---|"]
        L += [f"| {k} | {format_share(v)} | {format_share(by_scorer[k]) if k in by_scorer else '–'} | {v['n']} |"
              for k, v in numbers["prompt_rank"].items()]
    if numbers["moved"]:
        L += ["", "## How far fine-tuning moved the generator", "",
              "| run | relative weight change of the trainable set "
              "| mean abs pixel change of validation samples (/255) |",
              "|---|---|---|"]
        for k, v in numbers["moved"].items():
            pc = v.get("param_change")
            px = v.get("pixel_change")
            L.append(f"| {k} | {'–' if pc is None else f'{pc:.4f}'} | {'–' if px is None else f'{px:.2f}'} |")
    return "\n".join(L) + "\n"


def main(args) -> Path:
    """Run the ablation, write ablation.md/json; returns the Markdown path."""
    info = run_ablation(args)
    numbers = collect(args, info)
    grid = write_samples(args, info)
    numbers["samples"] = grid.name if grid else None
    atomic_write_json(info["out"] / "ablation.json", numbers)
    path = info["out"] / "ablation.md"
    atomic_write_text(path, markdown(args, numbers))
    print(path.read_text())
    return path


if __name__ == "__main__":
    sys.exit(run_cli(main, parse_args))
