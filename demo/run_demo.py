"""The whole EDGE pipeline offline, stage by stage, each through the script a user would run by hand.

Stages: data -> full-real-set evaluation (its model is the scorer) -> base model (shipped checkpoint, or built
from scratch) -> EDGE fine-tuning
-> sampling before/after -> caption synthesis (cpi 2) -> evaluation of five training sets -> report.
Each stage runs as a subprocess with a recipe from configs/ plus path flags; a stage is skipped on a
rerun when its recorded command is unchanged and its own manifest says it finished.

Usage:
    python -m demo.run_demo --output_dir outputs/demo
    python -m demo.run_demo --output_dir outputs/mydata --data path/to/annotations --images path/to/images
    python -m demo.run_demo --output_dir outputs/demo --from_scratch     # do not start from the shipped model
"""
import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from utils.common.atomic_io import atomic_write_json
from utils.common.config import parse_args_with_recipe, save_run_config
from utils.common.errors import fail, run_cli

ROOT = Path(__file__).resolve().parent.parent
SHIPPED_MODEL = ROOT / "assets" / "demo_sd"
# Training stages continue from their checkpoints after a stop, and start over when their command changed.
TRAIN_RERUN = {"resume_flags": ["--resume_from_checkpoint", "latest"], "fresh_flags": ["--overwrite_output_dir"]}


def parse_args(argv=None):
    """Command-line flags of the demo driver."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", default="outputs/demo")
    p.add_argument("--data", default=None, help="Karpathy annotation folder of your own data (default: procedural)")
    p.add_argument("--images", default=None, help="Image root of --data")
    p.add_argument("--from_scratch", action="store_true",
                   help="Build and pre-train the small SD here instead of starting from assets/demo_sd")
    p.add_argument("--num_images", type=int, default=100, help="Size of the distilled set")
    p.add_argument("--seeds", type=int, default=3, help="Evaluation seeds per training set")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--full_epochs", type=int, default=None,
                   help="Epochs of the full-real-set evaluation (whose seed-0 model is also the EDGE scorer); default: "
                        "enough that it sees at least as many images as the --num_images rows (full_set_epochs)")
    p.add_argument("--quick", action="store_true",
                   help="A much smaller configuration of the same pipeline (the end-to-end test)")
    p.add_argument("--vae_config", default="configs/demo_vae.yaml")
    p.add_argument("--pretrain_config", default="configs/demo_pretrain.yaml")
    add_stage_recipes(p)
    args = parse_args_with_recipe(p, argv)
    check_data_flags(args)
    return args


def add_stage_recipes(p) -> None:
    """The recipe flags of the stages the demo and the ablation share."""
    p.add_argument("--data_config", default="configs/demo_data.yaml")
    p.add_argument("--edge_config", default="configs/demo_edge.yaml")
    p.add_argument("--sample_config", default="configs/sample_demo.yaml")
    p.add_argument("--caption_config", default="configs/caption_retrieval.yaml")
    p.add_argument("--eval_config", default="configs/demo_eval.yaml")


def check_data_flags(args) -> None:
    """--data with --images, and a distilled set of at least 2 images (one line each)."""
    if bool(args.data) != bool(args.images):
        raise fail("--data and --images go together (annotation folder and image root of your data)")
    if args.num_images < 2:
        raise fail(f"--num_images must be at least 2, got {args.num_images}")


# ---------------------------------------------------------------- stage bookkeeping

class StageFailed(RuntimeError):
    """A stage command exited non-zero or left incomplete outputs (the message quotes its log)."""


class StageRunner:
    """Runs stage commands, records them in demo_state.json, and skips finished ones on a rerun."""

    def __init__(self, output_dir: Path):
        self.output_dir = output_dir
        self.state_path = output_dir / "demo_state.json"
        self.state = json.loads(self.state_path.read_text()) if self.state_path.exists() else {}
        self.log_dir = output_dir / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.ran = set()  # the stages that ran in this invocation (their readers see new inputs and run again)
        self.seen = []  # the stages asked for in this invocation, in order (the inputs of a stage without `after`)

    def run(self, name: str, cmd: list, done_check, resume_flags=(), fresh_flags=(), fresh_clear=None,
            after=None) -> float:
        """Run `cmd` unless the same command already finished and `done_check()` confirms its outputs.

        A stage that was started with the same command but did not finish gets `resume_flags` (it
        continues from its checkpoints); a stage whose command changed gets `fresh_flags` (it replaces
        the old outputs, or has the folder `fresh_clear` removed first), as does every stage whose inputs
        are new: with `after` (the names of the stages it reads), one of those ran; without it, any
        earlier stage ran (a pipeline where each stage reads the ones before it). An input also counts as
        new when it finished after this stage last started (it was redone in a run stopped before this stage).
        """
        cmd = [str(c) for c in cmd]
        prev = self.state.get(name)
        inputs = list(self.seen) if after is None else list(after)
        self.seen.append(name)
        same = bool(prev) and prev.get("command") == cmd[1:] and not self._inputs_new(inputs, prev)
        if same and prev.get("status") == "done" and done_check():
            print(f"[demo] {name}: finished earlier ({prev['wall_time_s']:.0f} s), skipped")
            return prev["wall_time_s"]
        extra = [str(f) for f in (resume_flags if same else fresh_flags)]
        if not same and fresh_clear is not None and Path(fresh_clear).exists():
            shutil.rmtree(fresh_clear)
        print(f"[demo] {name}: {' '.join(cmd[1:] + extra)}", flush=True)
        self.ran.add(name)
        start = time.time()
        self.state[name] = {"command": cmd[1:], "status": "started", "started_at": start}
        atomic_write_json(self.state_path, self.state)
        log = self.log_dir / f"{name}.log"
        env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(ROOT))
        with open(log, "a") as f:
            proc = subprocess.run(cmd + extra, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
        wall = time.time() - start
        if proc.returncode != 0:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
            raise StageFailed(f"stage {name} failed (exit {proc.returncode}); last lines of {log}:\n{tail}")
        if not done_check():
            raise StageFailed(f"stage {name} exited 0 but its outputs are incomplete; see {log}")
        self.state[name] = {"command": cmd[1:], "status": "done", "wall_time_s": wall,
                            "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "started_at": start,
                            "finished_at": time.time()}
        atomic_write_json(self.state_path, self.state)
        print(f"[demo] {name}: done in {wall:.0f} s", flush=True)
        return wall

    def _inputs_new(self, inputs, prev) -> bool:
        """Whether one of `inputs` ran in this invocation, or finished after the stage recorded in `prev` started."""
        started = prev.get("started_at", float("inf")) if prev else float("inf")  # older state files: no times
        return any(d in self.ran or self.state.get(d, {}).get("finished_at", 0.0) > started for d in inputs)


def _read_json(path: Path) -> dict:
    """The JSON object in `path`, or {} when it is missing or unreadable (an unfinished stage)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _manifest_complete(folder: Path) -> bool:
    return _read_json(folder / "manifest.json").get("status") == "complete"


def _is_pipeline(folder: Path) -> bool:
    return (folder / "model_index.json").is_file() and (folder / "unet").is_dir()


def _has_results(folder: Path) -> bool:
    return "summary" in _read_json(folder / "results.json")


def _python(module_or_script: str) -> list:
    if module_or_script.endswith(".py"):
        return [sys.executable, module_or_script]
    return [sys.executable, "-m", module_or_script]


# ---------------------------------------------------------------- the pipeline

def data_flags(args, data_dir: Path) -> list:
    """The data set flags every stage gets."""
    if args.data:
        return ["--dataset", "karpathy", "--ann_root", args.data, "--image_root", args.images]
    return ["--dataset", "procedural", "--ann_root", data_dir]


def quick_overrides(args, stage: str) -> list:
    """Flags that shrink a stage for the end-to-end test (--quick); the recipes stay as they are."""
    if not args.quick:
        return []
    return {
        "data": ["--n_train", "200", "--n_val", "20", "--n_test", "50"],
        "vae": ["--max_train_steps", "20"],
        "pretrain": ["--max_train_steps", "20", "--checkpointing_steps", "10", "--validation_steps", "10"],
        "edge": ["--max_train_steps", "10", "--checkpointing_steps", "5", "--validation_steps", "10"],
        "sample": ["--num_inference_steps", "4"],
        "eval": ["--epochs", "2", "--eval_every", "1"],
    }[stage]


def full_set_epochs(n_train: int, n_small: int, small_epochs: int, minimum: int = 2) -> int:
    """Epochs for the full real set so that it trains on at least as many images as a small row.

    The full row is the ceiling of every comparison: with fewer image steps than the n_small-image rows
    (n_small x small_epochs) it is no ceiling (on a 1,000-image set, 2 epochs gave it 2,000 image steps
    against 3,000, and r_mean below the random rows).
    """
    return max(minimum, math.ceil(n_small * small_epochs / max(1, n_train)))


def _full_epochs(args, dflags) -> int:
    """--full_epochs, or full_set_epochs from the training split's size and the eval recipe's epochs."""
    if args.full_epochs:
        return args.full_epochs
    from dataset.karpathy import group_by_image
    from dataset.registry import load_split
    from utils.common.config import load_recipe

    dataset, ann_root = dflags[1], dflags[3]
    n_train = len(group_by_image(load_split(dataset, "train", ann_root, args.images, check_images=False)))
    small_epochs = int(load_recipe(args.eval_config).get("epochs", 30))
    if args.quick:
        small_epochs = 2
    return full_set_epochs(n_train, args.num_images, small_epochs)


def run_pipeline(args) -> dict:
    """Run (or resume) every stage; returns paths and wall times for the report."""
    out = Path(args.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    save_run_config(args, out, name="demo_config.json")
    runner = StageRunner(out)
    times = {}
    data_dir = out / "data"
    dflags = data_flags(args, data_dir)

    if not args.data:
        times["data"] = runner.run("data", _python("dataset.procedural") + [
            "--config", args.data_config, "--output_dir", data_dir, "--seed", args.seed]
            + quick_overrides(args, "data"),
            lambda: (data_dir / "spec.json").is_file(), fresh_flags=["--overwrite"])

    # The full real training set is evaluated first: its first seed's model is the scorer of EDGE
    # fine-tuning and of the retrieval caption backend (no CLIP weights offline).
    results_table = out / "results.md"
    scorer_root = out / "scorer"
    scorer_dir = scorer_root / f"seed_{args.seed}" if args.seeds > 1 else scorer_root
    times["evaluation (full_real) + scorer"] = run_eval(
        runner, args, dflags, "full_real", ["--baseline", "full", "--epochs", _full_epochs(args, dflags),
                                            "--save_model_dir", scorer_root], out, results_table,
        extra_check=lambda: (scorer_dir / "retrieval_model.safetensors").is_file())

    use_shipped = not args.from_scratch and not args.data and _is_pipeline(SHIPPED_MODEL)
    if use_shipped:
        base = SHIPPED_MODEL
        times["base model"] = 0.0
    else:
        tiny = out / "models" / "init"
        times["build small SD"] = runner.run("init_model", _python("demo.build_demo_model") + [
            "--init_only", "--data", args.data or data_dir, "--work_dir", out / "models", "--seed", args.seed],
            lambda: _is_pipeline(tiny))
        vae_dir = out / "models" / "vae"
        # VAE pre-training keeps no checkpoints: an unfinished run starts over
        times["VAE pre-training"] = runner.run("vae", _python("demo.pretrain_vae") + [
            "--config", args.vae_config, *dflags, "--pretrained_model_name_or_path", tiny, "--output_dir", vae_dir,
            "--seed", args.seed] + quick_overrides(args, "vae"), lambda: _is_pipeline(vae_dir),
            resume_flags=["--overwrite_output_dir"], fresh_flags=["--overwrite_output_dir"])
        base = out / "models" / "pretrained"
        times["SD pre-training"] = runner.run("pretrain", _python("edge_diffusion_train.py") + [
            "--config", args.pretrain_config, *dflags, "--pretrained_model_name_or_path", vae_dir,
            "--output_dir", base, "--seed", args.seed] + quick_overrides(args, "pretrain"), lambda: _is_pipeline(base),
            **TRAIN_RERUN)

    edge_dir = out / "models" / "edge"
    times["EDGE fine-tuning"] = runner.run("edge", _python("edge_diffusion_train.py") + [
        "--config", args.edge_config, *dflags, "--pretrained_model_name_or_path", base, "--output_dir", edge_dir,
        "--scorer", f"retrieval:{scorer_dir}", "--seed", args.seed] + quick_overrides(args, "edge"),
        lambda: _is_pipeline(edge_dir), **TRAIN_RERUN)

    sets = out / "sets"
    for name, model in (("sd_before_edge", base), ("edge_cpi1", edge_dir)):
        times[f"sampling ({name})"] = runner.run(f"sample_{name}", _python("edge_diffusion_sampling.py") + [
            "--config", args.sample_config, *dflags, "--pretrained_model_name_or_path", model,
            "--num_queries", args.num_images, "--output_dir", sets / name, "--seed", args.seed]
            + quick_overrides(args, "sample"), lambda n=name: _manifest_complete(sets / n), fresh_flags=["--overwrite"])

    times["caption synthesis (cpi 2)"] = runner.run("caption", _python("caption_synthesis_retrieval.py") + [
        "--config", args.caption_config, *dflags, "--input_dir", sets / "edge_cpi1", "--output_dir", sets / "edge_cpi2",
        "--cpi", "2", "--scorer", f"retrieval:{scorer_dir}", "--seed", args.seed],
        lambda: _caption_done(sets / "edge_cpi2"), fresh_clear=sets / "edge_cpi2")

    eval_inputs = {
        "random_100": ["--baseline", "random", "--n", args.num_images],
        "sd_before_edge": ["--distill_dir", sets / "sd_before_edge"],
        "edge_cpi1": ["--distill_dir", sets / "edge_cpi1"],
        "edge_cpi2": ["--distill_dir", sets / "edge_cpi2"],
    }
    for name, inputs in eval_inputs.items():
        times[f"evaluation ({name})"] = run_eval(runner, args, dflags, name, inputs, out, results_table)
    return {"output_dir": out, "data_dir": None if args.data else data_dir, "base_model": base,
            "judge_model": scorer_root / f"seed_{args.seed + 1}" if args.seeds > 1 else None,
            "used_shipped_model": use_shipped, "edge_model": edge_dir, "sets": sets, "times": times}


MAX_EVAL_SIZE = 64  # own data is evaluated at its own size up to this (the encoder's 224 px is ~12x slower)


def eval_image_size(args) -> int:
    """Evaluation input size of the demo: own data at its test images' size, capped at MAX_EVAL_SIZE.

    None for the procedural set (the evaluator already uses its native size).
    """
    if not args.data:
        return None
    from dataset.images import load_image
    from dataset.registry import read_split

    entries, _, root = read_split("karpathy", "test", args.data, args.images, check_images=False)
    return min(max(load_image(Path(root) / entries[0]["image"]).size), MAX_EVAL_SIZE)


def run_eval(runner, args, dflags, name, inputs, out, results_table, extra_check=lambda: True,
             after=None) -> float:
    """One stage-4 evaluation (all seeds) of a training set into out/eval/<name> (`after`: StageRunner.run's)."""
    folder = out / "eval" / name
    size = eval_image_size(args)
    return runner.run(f"eval_{name}", _python("evaluation.evaluation") + [
        "--config", args.eval_config, *dflags, *inputs, "--seeds", args.seeds, "--seed", args.seed,
        *(["--image_size", size] if size else []),
        "--run_name", name, "--output_dir", folder, "--results_table", results_table, "--overwrite",
        "--no_progress"] + quick_overrides(args, "eval"), lambda: _has_results(folder) and extra_check(), after=after)


def _caption_done(folder: Path) -> bool:
    return "captions" in _read_json(folder / "manifest.json") and (folder / "annotations" / "train.json").is_file()


def main(args) -> Path:
    """Run the pipeline and write the report; returns the report path."""
    from demo.report import write_report

    info = run_pipeline(args)
    report = write_report(args, info)
    print(f"[demo] report: {report}")
    return report


if __name__ == "__main__":
    sys.exit(run_cli(main, parse_args, errors=(StageFailed,)))
