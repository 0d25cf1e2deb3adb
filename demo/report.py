"""The demo report: sample grids, loss curves, prompt following, the retrieval table and stage times."""
import json
import shutil
from pathlib import Path

from PIL import Image

from dataset.distilled import read_distilled_set
from dataset.images import load_image
from dataset.registry import resolve_split
from evaluation.report import final_rise, still_rising
from utils.common.atomic_io import atomic_save_image, atomic_write_json, atomic_write_text
from utils.common.config import code_version

ROW_LABELS = {
    "random_100": "random real pairs",
    "sd_before_edge": "small SD without EDGE fine-tuning (cpi 1)",
    "edge_cpi1": "EDGE, cpi 1",
    "edge_cpi2": "EDGE, cpi 2 (retrieval captions)",
    "full_real": "full real training set",
}
METRICS = ("img_r1", "img_r5", "img_r10", "txt_r1", "txt_r5", "txt_r10", "r_mean")


def fmt(summary: dict, key: str) -> str:
    """'mean ± std' of one metric in a results summary."""
    v = summary.get(key)
    return "–" if v is None else f"{v['mean']:.1f} ± {v['std']:.1f}"


def samples_grid(sets: list, labels: list, image_root, n_show: int = 8, cell: int = 96) -> Image.Image:
    """A grid with one column per prompt of the first `n_show` images of `sets` (distilled sets sharing prompts
    and per-image seeds, one row each, labelled by `labels`), under a first row of the real image each prompt
    was drawn from (its manifest's prompt_source.source_images under `image_root`) when the set records it."""
    from utils.stages.sampled_set import labelled_grid

    n = min(n_show, len(sets[0].records))
    rows = [[load_image(d.folder / r["image"]) for r in d.records[:n]] for d in sets]
    sources = (sets[0].manifest.get("prompt_source") or {}).get("source_images") or []
    labels = list(labels)
    if sources:
        rows.insert(0, [load_image(Path(image_root) / p) for p in sources[:n]])
        labels.insert(0, "real image of the prompt")
    prompts = [r["captions"][0] for r in sets[0].records[:n]]
    images = [im for row in rows for im in row]
    names = [f"{label}: {p}" for label in labels for p in prompts]
    return labelled_grid(images, names, cell=cell, cols=n)


def _load_results(folder: Path):
    path = folder / "results.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _prompt_following(args, info) -> dict:
    """Per-attribute prompt following: real test images, their VAE round trip, samples before/after EDGE."""
    from demo.measure_prompt_following import measure

    sets = {"samples before EDGE": info["sets"] / "sd_before_edge", "samples after EDGE": info["sets"] / "edge_cpi1"}
    return measure(info["data_dir"], sets, real=300, classifier_epochs=2 if args.quick else 6, seed=args.seed,
                   vae_model=info["base_model"])


def _eval_size(results: dict) -> str:
    """The evaluation input size recorded in the results (all rows use the same)."""
    sizes = {v.get("image_size") for v in results.values() if v}
    return "/".join(str(x) for x in sorted(sizes, key=str)) or "?"


def _prompt_rank(args, info) -> dict:
    """Share of images whose own prompt an independent retrieval model (not the EDGE scorer) ranks first of 100."""
    from demo.prompt_rank import measure_prompt_rank, real_test_items

    judge = info.get("judge_model")
    if not judge or not (Path(judge) / "retrieval_model.safetensors").is_file():
        return {}
    dataset, ann_root = ("karpathy", args.data) if args.data else ("procedural", info["data_dir"])
    real = real_test_items(dataset, ann_root, args.images, n=300)
    sets = {"samples before EDGE": info["sets"] / "sd_before_edge", "samples after EDGE": info["sets"] / "edge_cpi1"}
    return measure_prompt_rank(f"retrieval:{judge}", sets, real, block=min(100, args.num_images))


def image_steps(result: dict) -> str:
    """Training images seen per seed (epochs x images of the training set), '?' when not recorded."""
    n = (result.get("train_set") or {}).get("n_images")
    return "?" if n is None else str(int(n) * int(result["config"]["epochs"]))


def _why_not_above_real(follow: dict) -> str:
    """What the prompt-following measurements say about a generated set that does not beat real pairs."""
    before, real = follow.get("samples before EDGE", {}), follow.get("real test images", {})
    if not (before and real):
        return ("No attribute labels here: compare the samples with the real images in the grid above; a generator "
                "that draws far from the real images gives a set a model learns less from.")
    short = [k for k in ("colour", "shape", "size", "position", "background")
             if k in before and k in real and before[k]["hi"] < real[k]["lo"]]
    if short:
        return (f"The generator falls short of real images in {', '.join(short)} (non-overlapping 95 % intervals in "
                "the prompt-following table), so a model trained on its samples learns less than one trained on "
                "real images.")
    return ("The generator draws every attribute about as often as real images show it (prompt-following table), "
            "so the gap is not the generator's drawing: 100 faithfully drawn images with one caption each carry "
            "about the information of 100 real pairs, and the EDGE terms add nothing measurable on top (the "
            "ablation against the MSE-only control is in docs/ablation_demo.md).")


def still_climbing_rows(results: dict) -> dict:
    """{row: final_rise} of the evaluation results whose test r_mean was still rising at the last evaluation."""
    out = {}
    for k, v in results.items():
        rise = final_rise(v.get("history") or {}) if v else None
        if still_rising(rise):
            out[k] = rise
    return out


def still_climbing_note(climbing: dict) -> str:
    """The STILL CLIMBING line for {row label: final_rise} (the demo report and the ablation table)."""
    return ("STILL CLIMBING: " + "; ".join(f"{label} rose by {v['mean']:.1f} r_mean ({100 * v['relative']:.0f} % "
                                           f"of its final value)" for label, v in climbing.items())
            + " over the last evaluation interval: these students had not levelled off, so differences between "
            "such rows are partly where each seed stopped (configs/ablation_eval.yaml trains 100-image sets for "
            "the protocol's 100 epochs).")


def reading(results: dict, follow: dict, seeds: int = 3) -> list:
    """Short plain statements derived from the measured numbers (no number is invented here)."""
    r = {k: v["summary"]["r_mean"]["mean"] for k, v in results.items() if v}
    s = {k: v["summary"]["r_mean"]["std"] for k, v in results.items() if v}
    lines = [] if seeds > 1 else ["One seed per training set: no spread was measured, so no difference below "
                                  "is known to exceed seed noise."]

    def cmp(a, b):
        if a not in r or b not in r:
            return None
        d = r[a] - r[b]
        sig = seeds > 1 and abs(d) > (s[a] + s[b])
        word = "ahead of" if d > 0 else "behind"
        return f"{ROW_LABELS[a]} is {word} {ROW_LABELS[b]} by {abs(d):.1f} r_mean points" + \
            ("" if sig or seeds == 1 else " (within one std of each other: not a clear difference)")

    if "full_real" in r and "random_100" in r and r["full_real"] <= r["random_100"]:
        lines.append("FAILED MEASUREMENT: the full real set, the ceiling of this table and the EDGE scorer, scores "
                     f"{r['full_real']:.1f} r_mean, not above the {r['random_100']:.1f} of the random pairs. It was "
                     "not trained long enough (see its image steps), so neither the ceiling nor the EDGE rows, "
                     "whose scorer it is, can be read; rerun with a larger --full_epochs.")
    elif "full_real" in r and "random_100" in r and seeds > 1 and \
            r["full_real"] - r["random_100"] <= s["full_real"] + s["random_100"]:
        lines.append("WEAK CEILING: the full real set, the ceiling of this table and the EDGE scorer, scores "
                     f"{r['full_real']:.1f} ± {s['full_real']:.1f} r_mean, within noise of the "
                     f"{r['random_100']:.1f} ± {s['random_100']:.1f} of the random pairs: at its image steps it is "
                     "no clear ceiling, and EDGE follows a scorer no better than 100 real pairs; rerun with a larger "
                     "--full_epochs.")
    climbing = still_climbing_rows(results)
    if climbing:
        lines.append(still_climbing_note({ROW_LABELS.get(k, k): v for k, v in climbing.items()}))
    for a, b in (("full_real", "random_100"), ("edge_cpi1", "sd_before_edge"), ("edge_cpi2", "edge_cpi1"),
                 ("edge_cpi2", "random_100")):
        c = cmp(a, b)
        if c:
            lines.append(c + ".")
    if "edge_cpi2" in r and "random_100" in r and r["edge_cpi2"] < r["random_100"]:
        beyond = seeds > 1 and r["random_100"] - r["edge_cpi2"] > s["random_100"] + s["edge_cpi2"]
        lines.append(("The EDGE set loses to the same number of random real pairs. " if beyond else
                      "The EDGE set is level with (not above) the same number of random real pairs. ")
                     + _why_not_above_real(follow))
    if follow:
        before = follow.get("samples before EDGE", {})
        after = follow.get("samples after EDGE", {})
        real = follow.get("real test images", {})
        if before and after and real:
            for k in ("shape", "all"):
                b, a = before[k], after[k]
                overlap = not (a["lo"] > b["hi"] or b["lo"] > a["hi"])
                lines.append(f"Prompt following, {k if k != 'all' else 'every named attribute right'}: "
                             f"{b['share']:.0f} % before and {a['share']:.0f} % after EDGE fine-tuning"
                             f"{' (95 % intervals overlap: no clear change)' if overlap else ''}, against "
                             f"{real[k]['share']:.0f} % for real images.")
    return lines


def _save_samples(args, info: dict, path: Path) -> None:
    """The sample grid: the real image behind each prompt (when recorded), the samples before and after EDGE."""
    dataset = "karpathy" if args.data else "procedural"
    _, image_root = resolve_split(dataset, "train", args.data or info["data_dir"], args.images)
    sets = [read_distilled_set(info["sets"] / "sd_before_edge"), read_distilled_set(info["sets"] / "edge_cpi2")]
    grid = samples_grid(sets, ["small SD, before EDGE", "after EDGE fine-tuning"], image_root)
    atomic_save_image(path, grid)


def _copy_loss_curves(info: dict, assets: Path) -> list:
    """[(stage name, file name in `assets`)] of the training runs' loss-curve PNGs that exist."""
    curves = []
    for name, folder in (("pre-training", info["base_model"]), ("EDGE fine-tuning", info["edge_model"])):
        png = Path(folder) / "logs" / "loss_curves.png"
        if png.is_file():
            dst = assets / f"loss_{name.split()[0].lower()}.png"
            shutil.copyfile(png, dst)
            curves.append((name, dst.name))
    return curves


def _following_lines(args, follow: dict, rank: dict) -> list:
    """The report's prompt-following and own-prompt-rank sections (empty when not measured)."""
    L = []
    if follow:
        from demo.prompt_following import markdown_table

        L += ["## Prompt following", "",
              "Share of images whose attribute a classifier trained on real images reads as the prompt names it, "
              "with its 95 % Wilson interval; each attribute is scored on the prompts that name it (not every "
              "caption names the background). The VAE round trip (encode, decode) of real images is the ceiling "
              "of any sample of this latent generator. The classifier is independent of the EDGE scorer.", "",
              markdown_table(follow), ""]
    if rank:
        from demo.prompt_following import format_share

        block = min(100, args.num_images)
        L += ["## Own prompt ranked first", "",
              f"Share of images whose own prompt a retrieval model ranks first among the prompts of {block} images "
              f"(chance {100 / block:.0f} %), with its 95 % Wilson interval. The judge is the full-set model of seed "
              f"{args.seed + 1}, trained independently of the EDGE scorer (seed {args.seed}).", "",
              "| images | own prompt first % | n |", "|---|---|---|"]
        L += [f"| {k} | {format_share(v)} | {v['n']} |" for k, v in rank.items()] + [""]
    return L


def _retrieval_lines(args, results: dict) -> list:
    """The report's retrieval table (one row per evaluated training set) and its note."""
    sel = next((v["selection"] for v in results.values() if v and "selection" in v), "last epoch")
    sel = sel.get("label", sel.get("rule")) if isinstance(sel, dict) else sel
    L = ["## Retrieval on the real test split", "",
         f"Retrieval model trained only on each set, mean ± std over {args.seeds} seeds; model selection: "
         f"{sel}; images at {_eval_size(results)} px (the data's own size, at most 64 px).", "",
         "| training set | epochs | image steps | IR@1 | IR@5 | IR@10 | TR@1 | TR@5 | TR@10 | r_mean |",
         "|---|---|---|---|---|---|---|---|---|---|"]
    for k, label in ROW_LABELS.items():
        v = results.get(k)
        if v:
            L.append(f"| {label if k != 'random_100' else f'{args.num_images} {label}'} | {v['config']['epochs']} | "
                     f"{image_steps(v)} | "
                     + " | ".join(fmt(v["summary"], m) for m in METRICS) + " |")
    return L + ["", "The full real set is trained for fewer epochs (it has many more images per epoch); its first "
                "seed's model is also the scorer that EDGE fine-tuning and the retrieval caption backend use.", ""]


def write_report(args, info: dict) -> Path:
    """Write report.md and its PNGs into the demo output folder; returns the report path."""
    out = Path(info["output_dir"])
    assets = out / "report_assets"
    assets.mkdir(parents=True, exist_ok=True)
    _save_samples(args, info, assets / "samples.png")
    curves = _copy_loss_curves(info, assets)
    follow = _prompt_following(args, info) if info["data_dir"] else {}
    rank = _prompt_rank(args, info)
    results = {k: _load_results(out / "eval" / k) for k in ROW_LABELS}
    for k, v in results.items():
        if v and (out / "eval" / k / "r_mean.png").is_file():
            shutil.copyfile(out / "eval" / k / "r_mean.png", assets / f"r_mean_{k}.png")

    L = ["# EDGE offline demo: report", ""]
    L += [f"Data: {'your Karpathy data at ' + args.data if args.data else 'the built-in procedural data set'}; "
          f"distilled set of {args.num_images} images; evaluation seeds {args.seed}..{args.seed + args.seeds - 1}; "
          f"code {code_version()}; {'quick test configuration; ' if args.quick else ''}"
          "base model: " + ("shipped checkpoint assets/demo_sd" if info["used_shipped_model"]
                            else "built and pre-trained in this run") + ".",
          "Every number below was measured by this run; the configuration is in `demo_config.json` and each stage's "
          "command and log are in `demo_state.json` and `logs/`.", ""]
    L += ["## Samples", "", "Same prompts, same seeds: real image behind the prompt, the small SD before EDGE "
          "fine-tuning, and after it.", "", "![samples](report_assets/samples.png)", ""]
    if curves:
        L += ["## Loss curves", ""] + [f"**{n}**\n\n![{n}](report_assets/{f})\n" for n, f in curves]
    L += _following_lines(args, follow, rank)
    L += _retrieval_lines(args, results)
    L += ["## What the numbers say", ""] + [f"- {x}" for x in reading(results, follow, args.seeds)] + [""]
    L += ["## Wall time per stage", "", "| stage | wall time |", "|---|---|"]
    for stage, t in info["times"].items():
        L.append(f"| {stage} | {t / 60:.1f} min |")
    L.append(f"| total | {sum(info['times'].values()) / 60:.1f} min |")
    L.append("")
    report = out / "report.md"
    atomic_write_text(report, "\n".join(L))
    atomic_write_json(out / "report.json", {"prompt_following": follow, "prompt_rank": rank, "times_s": info["times"],
                                            "r_mean": {k: v["summary"]["r_mean"] for k, v in results.items() if v}})
    return report
