"""2-process CPU runs through `accelerate launch`: a training run with features gathered across processes
finishes, and one EDGE step's gradient over 2 processes x B equals the one-process gradient of the 2B batch."""
import json
import os
import subprocess
import sys
from pathlib import Path

import importlib.util

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def assets(tiny_train_assets):
    return tiny_train_assets("mp_assets", clip=True)


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


# One EDGE step (contrastive + diversity + MSE) on a fixed global batch. Run by `accelerate launch` on 2
# processes (each takes its half; DDP averages the gradients) and imported by the test for the 1-process
# reference on the whole batch.
GRAD_WORKER = r'''
import sys

import torch

CAPTIONS = ["a red circle on the left", "a blue square at the top", "a green star on the right",
            "a yellow triangle at the bottom"]
TIMESTEPS = [50, 300, 600, 900]


def global_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(4, 4, 32, 32, generator=g)
    noise = torch.randn(4, 4, 32, 32, generator=g)
    return mean, noise, torch.tensor(TIMESTEPS)


def load(sd, clip):
    from utils.models.scorers import build_scorer
    from utils.models.sd_models import load_sd_components

    torch.manual_seed(0)
    comps = load_sd_components(sd)
    comps.unet.requires_grad_(True)
    return comps, build_scorer(f"hf_clip:{clip}", "cpu", torch.float32)


def step_grads(comps, scorer, rows, unet=None, gatherer=None, lambdas=(1.0, 1.0, 1.0)):
    """Parameter gradients of one step on the global-batch rows `rows` (a slice)."""
    from utils.method.edge_step import EDGELossConfig, edge_losses
    from utils.models.sd_models import encode_prompts

    mean, noise, timesteps = global_batch()
    cfg = EDGELossConfig(lambdas[0], lambdas[1], lambdas[2], 0.1, "image_text")
    unet = unet or comps.unet
    captions = CAPTIONS[rows]
    with torch.no_grad():
        hidden = encode_prompts(comps.text_encoder, comps.tokenizer, captions)
    out = edge_losses(unet, comps.vae, comps.noise_scheduler, scorer, None, captions, hidden, cfg,
                      torch.Generator().manual_seed(0), gatherer=gatherer,
                      latent_dist=(mean[rows], torch.zeros_like(mean[rows])), noise=noise[rows],
                      timesteps=timesteps[rows])
    out["loss"].backward() if unet is comps.unet else None
    return out


def main(sd, clip, out_path):
    from accelerate import Accelerator

    from utils.method.losses import GatheredEDGELosses

    torch.set_num_threads(1)
    acc = Accelerator(cpu=True)
    rank, world = acc.process_index, acc.num_processes
    assert world == 2, world
    comps, scorer = load(sd, clip)
    unet = acc.prepare(comps.unet)
    b = len(CAPTIONS) // world
    out = step_grads(comps, scorer, slice(rank * b, (rank + 1) * b), unet=unet,
                     gatherer=GatheredEDGELosses(0.1, rank, world, "image_text"))
    acc.backward(out["loss"])
    # masked rows (dropped captions) across processes: rank 0 keeps rows 0 and 1, rank 1 keeps row 1 only
    g = torch.Generator().manual_seed(1)
    u, v = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    keep = torch.tensor([True, True, False, True])
    masked = GatheredEDGELosses(0.1, rank, world, "image_text")(u[rank * b:(rank + 1) * b], v[rank * b:(rank + 1) * b],
                                                                keep[rank * b:(rank + 1) * b])
    if rank == 0:
        grads = {n: p.grad.detach().clone() for n, p in acc.unwrap_model(unet).named_parameters()}
        torch.save({"grads": grads, "scored_batch": float(out["scored_batch"]),
                    "masked": [float(masked["contrastive"]), float(masked["diversity"])],
                    "masked_ref": (u[keep], v[keep])}, out_path)
    acc.wait_for_everyone()


if __name__ == "__main__":
    main(*sys.argv[1:4])
'''


def _worker(tmp_path):
    path = tmp_path / "grad_worker.py"
    path.write_text(GRAD_WORKER)
    spec = importlib.util.spec_from_file_location("grad_worker", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return path, module


def _flat(grads):
    return torch.cat([g.flatten() for _, g in sorted(grads.items())])


def test_two_process_gradient_equals_one_process_global_batch(assets, tmp_path):
    path, worker = _worker(tmp_path)
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(path),
           assets["sd"], assets["clip"], str(tmp_path / "grads.pt")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = torch.load(tmp_path / "grads.pt")
    assert two["scored_batch"] == 4  # the EDGE terms ran over the gathered 2 x 2 batch
    from utils.method.losses import contrastive_loss, diversity_loss

    ref_u, ref_v = two["masked_ref"]
    assert two["masked"] == pytest.approx([contrastive_loss(ref_u, ref_v, 0.1).item(),
                                           diversity_loss(ref_u, ref_v).item()], rel=1e-5)

    comps, scorer = worker.load(assets["sd"], assets["clip"])
    worker.step_grads(comps, scorer, slice(0, 4))
    one = _flat({n: p.grad for n, p in comps.unet.named_parameters()})
    comps.unet.zero_grad(set_to_none=True)
    worker.step_grads(comps, scorer, slice(0, 4), lambdas=(0.0, 0.0, 1.0))
    mse_only = _flat({n: p.grad for n, p in comps.unet.named_parameters()})
    got = _flat(two["grads"])
    err = (got - one).norm() / one.norm()
    edge_part = (one - mse_only).norm() / one.norm()
    # the EDGE terms carry a sizeable share of the gradient, so a W-fold error in them could not hide
    assert edge_part > 0.05, edge_part.item()
    assert err < 1e-4, (err.item(), edge_part.item())
