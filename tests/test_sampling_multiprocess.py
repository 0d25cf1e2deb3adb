"""Two CPU processes under `accelerate launch` make exactly the set one process makes."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dataset.distilled import read_distilled_set
from edge_diffusion_sampling import main, parse_args
from utils.models.tiny import build_tiny_sd

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _files(folder):
    """Every file's bytes; the manifest without code_version (the tree may change while tests run)."""
    files = {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
    manifest = json.loads(files.pop("manifest.json"))
    manifest.pop("code_version")
    return files, manifest


@pytest.mark.slow
def test_two_processes_make_the_same_set_as_one(tmp_path, monkeypatch):
    accelerate = Path(sys.executable).parent / "accelerate"
    if not accelerate.exists():
        pytest.skip("accelerate CLI not installed beside this python")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model = build_tiny_sd(tmp_path / "tiny", resolution=32)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"a {c} {s}" for c in ("red", "green", "blue") for s in ("circle", "star")) + "\n")
    common = ["--pretrained_model_name_or_path", str(model), "--prompts_file", str(prompts), "--num_inference_steps",
              "2", "--batch_size", "2", "--seed", "3", "--preview_n", "4", "--no_progress"]
    try:
        one = main(parse_args(common + ["--output_dir", str(tmp_path / "one")]))
    finally:
        torch.set_num_threads(threads)

    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(ROOT)}
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           str(ROOT / "edge_diffusion_sampling.py"), *common, "--output_dir", str(tmp_path / "two")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = tmp_path / "two"
    assert len(read_distilled_set(two)) == 6
    assert sorted(p.name for p in (two / "images").glob("*.png")) == [f"{i:06d}.png" for i in range(6)]
    assert _files(two) == _files(one)  # images, annotations, metadata, manifest and preview, byte for byte
