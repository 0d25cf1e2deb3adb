"""Same-seed outputs of the three stage scripts on tiny models, as hashes, to check a refactoring changes nothing.

Builds (once) a tiny procedural set, a tiny SD, a tiny transformers CLIP scorer and tiny retrieval encoders
in --assets, then runs, each in a fresh process with one thread:
  * edge_diffusion_sampling.py (4 images, 3 steps, seed 7): sha256 of every file of the set (the manifest
    without code_version and the seed rule's prose, which names a module path);
  * python -m evaluation.evaluation on the real procedural split (random baseline) and on that sampled set:
    the recalls of results.json (every per-seed history and the summary);
  * edge_diffusion_train.py for 4 EDGE steps (difffit, adamw): sha256 of the final UNet weights file.
Writes them as JSON to --out; with --compare REF, prints which entries differ and exits 1 if any do.

Usage:
    python -m benchmarks.same_seed_outputs --assets /tmp/ss_assets --work /tmp/ss_before --out /tmp/before.json
    python -m benchmarks.same_seed_outputs --assets /tmp/ss_assets --work /tmp/ss_after --out /tmp/after.json \\
        --compare /tmp/before.json
"""
import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def build_assets(folder: Path) -> dict:
    """Tiny models and data, built once (their paths are what the stage commands get)."""
    paths = {"data": folder / "proc", "sd": folder / "sd", "clip": folder / "clip", "nf": folder / "nf",
             "bert": folder / "bert"}
    if (folder / "done").is_file():
        return {k: str(v) for k, v in paths.items()}
    import torch

    from dataset.procedural import ProceduralSpec, generate_procedural_dataset
    from utils.models.tiny import build_tiny_hf_clip, build_tiny_sd, save_tiny_bert, save_tiny_nfnet

    torch.set_num_threads(1)
    generate_procedural_dataset(paths["data"], ProceduralSpec(resolution=32, n_train=16, n_val=6, n_test=8),
                                seed=0, progress=False)
    build_tiny_sd(paths["sd"], resolution=32)
    build_tiny_hf_clip(paths["clip"])
    save_tiny_nfnet(paths["nf"])
    save_tiny_bert(paths["bert"])
    (folder / "done").write_text("ok")
    return {k: str(v) for k, v in paths.items()}


def _run(argv: list) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def sampled_set(a: dict, work: Path) -> dict:
    out = work / "sampled"
    _run(["edge_diffusion_sampling.py", "--pretrained_model_name_or_path", a["sd"], "--dataset", "procedural",
          "--ann_root", a["data"], "--num_queries", "4", "--num_inference_steps", "3", "--seed", "7",
          "--preview_n", "2", "--batch_size", "2", "--output_dir", str(out), "--no_progress"])
    files = {str(p.relative_to(out)): _sha(p) for p in sorted(out.rglob("*")) if p.is_file()}
    manifest = json.loads((out / "manifest.json").read_text())
    manifest.pop("code_version", None)
    manifest.pop("seed_rule", None)
    files["manifest.json"] = manifest
    return files


def evaluation(a: dict, work: Path, name: str, *extra) -> dict:
    out = work / name
    _run(["-m", "evaluation.evaluation", "--dataset", "procedural", "--ann_root", a["data"], "--image_encoder",
          f"local-dir:{a['nf']}", "--text_encoder", f"bert:{a['bert']}", "--epochs", "2", "--eval_every", "1",
          "--batch_size_train", "8", "--num_workers", "0", "--output_dir", str(out), "--no_feature_cache",
          "--no_progress", *extra])
    res = json.loads((out / "results.json").read_text())
    keep = ("per_seed", "summary", "history", "train_set", "test_split", "preprocess", "selection", "image_size")
    return {k: res.get(k) for k in keep}


def training(a: dict, work: Path) -> dict:
    out = work / "train"
    _run(["edge_diffusion_train.py", "--pretrained_model_name_or_path", a["sd"], "--dataset", "procedural",
          "--ann_root", a["data"], "--output_dir", str(out), "--resolution", "32", "--scorer",
          f"hf_clip:{a['clip']}", "--report_to", "none", "--seed", "3", "--train_batch_size", "2",
          "--max_train_steps", "4", "--checkpointing_steps", "0", "--trainable", "difffit", "--optimizer", "adamw",
          "--learning_rate", "1e-2", "--lambda_mse", "1"])
    log = [json.loads(x) for x in (out / "logs" / "train_log.jsonl").read_text().splitlines()]
    losses = [{k: v for k, v in r.items() if "time" not in k and "sec" not in k} for r in log]
    return {"unet": _sha(out / "unet" / "diffusion_pytorch_model.safetensors"), "log": losses}


def main(args) -> int:
    assets = build_assets(Path(args.assets))
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    result = {"sampling": sampled_set(assets, work)}
    result["eval_random"] = evaluation(assets, work, "eval_random", "--baseline", "random", "--n", "6")
    result["eval_sampled"] = evaluation(assets, work, "eval_sampled", "--distill_dir", str(work / "sampled"))
    result["training"] = training(assets, work)
    # Paths inside the work and assets folders differ between runs; the seed rule names a module path
    # (prose, not output).
    text = json.dumps(result, indent=1, sort_keys=True).replace(str(work), "<work>").replace(args.assets, "<assets>")
    result = json.loads(text)
    Path(args.out).write_text(text)
    if not args.compare:
        print(f"wrote {args.out}")
        return 0
    ref = json.loads(Path(args.compare).read_text())
    differ = [k for k in sorted(set(ref) | set(result)) if ref.get(k) != result.get(k)]
    print("identical: " + ", ".join(k for k in sorted(result) if k not in differ))
    print("DIFFERENT: " + (", ".join(differ) if differ else "none"))
    return 1 if differ else 0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--assets", required=True, help="folder of the tiny models and data (built when empty)")
    p.add_argument("--work", required=True, help="folder for this run's outputs (emptied first)")
    p.add_argument("--out", required=True, help="JSON file of hashes and recalls")
    p.add_argument("--compare", default=None, help="a reference JSON to compare with")
    return p.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main(parse_args()))
