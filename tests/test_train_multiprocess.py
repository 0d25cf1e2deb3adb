"""A 2-process CPU run through `accelerate launch` finishes, with features gathered across processes."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from dataset.procedural import ProceduralSpec, generate_procedural_dataset
    from utils.scorers import build_tiny_hf_clip
    from utils.sd_models import build_tiny_sd

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("mp_assets")
    spec = ProceduralSpec(resolution=32, n_train=8, n_val=1, n_test=1, captions_per_image=1)
    return {"sd": str(build_tiny_sd(root / "sd")), "data": str(generate_procedural_dataset(root / "proc", spec,
                                                                                           progress=False)),
            "clip": str(build_tiny_hf_clip(root / "clip"))}


def test_two_process_cpu_run(assets, tmp_path):
    out = tmp_path / "mp"
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(ROOT / "edge_diffusion_train.py"), "--pretrained_model_name_or_path", assets["sd"],
           "--dataset", "procedural", "--ann_root", assets["data"], "--output_dir", str(out), "--resolution", "32",
           "--scorer", f"hf_clip:{assets['clip']}", "--train_batch_size", "2", "--max_train_steps", "3",
           "--checkpointing_steps", "2", "--gather_features", "--lambda_mse", "1", "--report_to", "none"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 processes" in proc.stdout
    log = [json.loads(line) for line in (out / "logs" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]
    assert all(r["scored_batch"] == 4 for r in log)  # losses over the gathered global batch (2 x 2)
    assert (out / "checkpoint-2" / "random_states_1.pkl").is_file()
    assert (out / "model_index.json").is_file()
