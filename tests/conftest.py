"""Fixtures that several test modules share."""
import pytest


@pytest.fixture(scope="session")
def tiny_eval_env(tmp_path_factory):
    """make(name, n_train, n_val, n_test) -> a fresh 32 px procedural set with saved tiny NFNet and BERT encoders.

    Returns {"base", "data", "nf", "bert", "argv"}; "argv" holds the evaluation flags every such test passes
    (data set, encoders, one evaluation per epoch, batch 8, no workers, no progress bar).
    """
    from dataset.procedural import ProceduralSpec, generate_procedural_dataset
    from utils.models.tiny import save_tiny_bert, save_tiny_nfnet

    def make(name: str, n_train: int, n_val: int, n_test: int) -> dict:
        base = tmp_path_factory.mktemp(name)
        spec = ProceduralSpec(resolution=32, n_train=n_train, n_val=n_val, n_test=n_test)
        data = generate_procedural_dataset(base / "proc", spec, seed=0, progress=False)
        env = {"base": base, "data": data, "nf": save_tiny_nfnet(base / "nf"), "bert": save_tiny_bert(base / "bert")}
        env["argv"] = ["--dataset", "procedural", "--ann_root", str(data), "--image_encoder", f"local-dir:{env['nf']}",
                       "--text_encoder", f"bert:{env['bert']}", "--eval_every", "1", "--batch_size_train", "8",
                       "--num_workers", "0", "--no_progress"]
        return env

    return make


@pytest.fixture(scope="session")
def tiny_train_assets(tmp_path_factory):
    """make(name, clip=False, five_captions=False) -> {"sd", "data"[, "clip"][, "data5"]} (paths as strings).

    A tiny random-init SD and an 8-image 32 px procedural set with one caption per image; with `clip` a tiny
    transformers CLIP scorer, with `five_captions` the same set with five captions per image.
    """
    import torch

    from dataset.procedural import ProceduralSpec, generate_procedural_dataset
    from utils.models.tiny import build_tiny_hf_clip, build_tiny_sd

    def data(folder, captions_per_image: int) -> str:
        spec = ProceduralSpec(resolution=32, n_train=8, n_val=1, n_test=1, captions_per_image=captions_per_image)
        return str(generate_procedural_dataset(folder, spec, progress=False))

    def make(name: str, clip: bool = False, five_captions: bool = False) -> dict:
        torch.set_num_threads(1)
        root = tmp_path_factory.mktemp(name)
        assets = {"sd": str(build_tiny_sd(root / "sd")), "data": data(root / "proc", 1)}
        if five_captions:
            assets["data5"] = data(root / "proc5", 5)
        if clip:
            assets["clip"] = str(build_tiny_hf_clip(root / "clip"))
        return assets

    return make
