"""edge_diffusion_train.py on a tiny model: losses fall, resume repeats, bad input, NaN stop, LoRA."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

import edge_diffusion_train as script
from utils.common.errors import InputError
from utils.stages.training import TrainingDiverged

os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(scope="module")
def assets(tiny_train_assets):
    return tiny_train_assets("train_assets", clip=True, five_captions=True)


def _argv(assets, out, *extra):
    return ["--pretrained_model_name_or_path", assets["sd"], "--dataset", "procedural", "--ann_root", assets["data"],
            "--output_dir", str(out), "--resolution", "32", "--scorer", f"hf_clip:{assets['clip']}",
            "--report_to", "none", "--seed", "3", *extra]


def _log(out):
    return [json.loads(line) for line in (out / "logs" / "train_log.jsonl").read_text().splitlines()]


def test_losses_go_down(assets, tmp_path):
    out = tmp_path / "run"
    script.main(script.parse_args(_argv(assets, out, "--train_batch_size", "4", "--max_train_samples", "4",
                                        "--max_train_steps", "30", "--checkpointing_steps", "0", "--trainable", "full",
                                        "--optimizer", "adamw", "--learning_rate", "1e-3", "--t_min", "400",
                                        "--t_max", "600")))
    log = _log(out)
    assert [r["step"] for r in log] == list(range(1, 31))
    first = sum(r["loss"] for r in log[:5]) / 5
    last = sum(r["loss"] for r in log[-5:]) / 5
    assert last < first - 0.03, (first, last)
    assert all({"contrastive", "diversity", "top1_i2t", "top1_t2i"} <= set(r) for r in log)
    assert (out / "logs" / "loss_curves.png").stat().st_size > 1000
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(out)
    base = load_file(os.path.join(assets["sd"], "unet", "diffusion_pytorch_model.safetensors"))
    trained = pipe.unet.state_dict()
    assert any(not torch.equal(trained[k], base[k]) for k in base)


def test_resume_repeats_uninterrupted_run(assets, tmp_path):
    common = ("--train_batch_size", "2", "--max_train_steps", "6", "--checkpointing_steps", "2",
              "--trainable", "difffit", "--optimizer", "adamw", "--learning_rate", "1e-2", "--lambda_mse", "1",
              "--checkpoints_total_limit", "2")
    full = tmp_path / "full"
    script.main(script.parse_args(_argv(assets, full, *common)))
    assert sorted(p.name for p in full.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
    resumed = tmp_path / "resumed"
    _interrupted_copy(full, resumed, 4)
    with pytest.raises(InputError, match="already holds a run"):
        script.main(script.parse_args(_argv(assets, resumed, *common)))
    script.main(script.parse_args(_argv(assets, resumed, *common, "--resume_from_checkpoint", "latest")))
    # equal up to rounding (~1e-7): the scorer caches each caption's text features from the batch it first
    # came in, and a batch's other rows change the last bit, so captions first met after the resume point are
    # encoded with other batch-mates than in the uninterrupted run (Scorer.encode_text); the two steps after the
    # checkpoint moved the weights by orders of magnitude more
    assert _max_diff(full, resumed) < 1e-6
    assert _max_diff(full, full / "checkpoint-4") > 1e-3
    log = _log(resumed)
    assert [r["step"] for r in log] == list(range(1, 7))
    assert log[-1]["loss"] == pytest.approx(_log(full)[-1]["loss"], rel=1e-6)


def _interrupted_copy(full, dst, step):
    """A run killed after its checkpoint at `step`, with log records written past it."""
    dst.mkdir()
    shutil.copytree(full / f"checkpoint-{step}", dst / f"checkpoint-{step}")
    shutil.copy(full / "run_config.json", dst / "run_config.json")
    (dst / "logs").mkdir()
    (dst / "logs" / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _log(full)[:step + 1]))


def _max_diff(a_dir, b_dir):
    a = load_file(a_dir / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(b_dir / "unet" / "diffusion_pytorch_model.safetensors")
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _full_and_resumed(assets, tmp_path, common, step):
    """Run `common` to its end, and again killed after its checkpoint at `step` and resumed: (full, resumed).

    The two final UNets agree up to rounding (the scorer's per-caption text-feature cache depends on the batch
    a caption first came in; see test_resume_repeats_uninterrupted_run).
    """
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    script.main(script.parse_args(_argv(assets, full, *common)))
    _interrupted_copy(full, resumed, step)
    script.main(script.parse_args(_argv(assets, resumed, *common, "--resume_from_checkpoint", "latest")))
    assert _max_diff(full, resumed) < 1e-6
    return full, resumed


def test_resume_with_five_captions_per_image(assets, tmp_path):
    # 8 images, batch 2: 4 steps per epoch; killed at step 6 (mid epoch 1), resumed to step 10 (epoch 2).
    # Each epoch draws other captions, so a resume that redraws epoch-0 captions ends elsewhere.
    common = ("--ann_root", assets["data5"], "--train_batch_size", "2", "--max_train_steps", "10",
              "--checkpointing_steps", "3", "--trainable", "difffit", "--optimizer", "adamw", "--learning_rate", "1e-2",
              "--lambda_mse", "1", "--epoch_unit", "images")
    full, resumed = _full_and_resumed(assets, tmp_path, common, 6)
    assert _max_diff(full, full / "checkpoint-6") > 1e-3
    assert [r["loss"] for r in _log(resumed)] == pytest.approx([r["loss"] for r in _log(full)], rel=1e-5)


@pytest.mark.parametrize("unit,steps", [("pairs", 10), ("images", 2)])
def test_epoch_unit_sets_the_step_count(assets, tmp_path, unit, steps):
    # 8 images x 5 captions, batch 4, one epoch: 40 pairs -> 10 steps, 8 images -> 2 steps
    from utils.stages.train_data import total_train_steps

    out = tmp_path / unit
    script.main(script.parse_args(_argv(assets, out, "--ann_root", assets["data5"], "--train_batch_size", "4",
                                        "--num_train_epochs", "1", "--checkpointing_steps", "0",
                                        "--epoch_unit", unit)))
    log = _log(out)
    assert [r["step"] for r in log] == list(range(1, steps + 1))
    assert total_train_steps(40 if unit == "pairs" else 8, 4, 1) == steps
    if unit == "pairs":
        assert json.loads((out / "run_config.json").read_text())["args"]["epoch_unit"] == "pairs"


def test_total_train_steps_of_the_paper_recipes():
    from utils.stages.train_data import total_train_steps

    # the numbers stated in configs/train_{flickr30k,coco,cc3m}.yaml: 10 epochs, batch 128, full batches only
    assert total_train_steps(145_000, 128, 10) == 11_320  # Flickr30K pairs (29,000 images x 5)
    assert total_train_steps(29_000, 128, 10) == 2_260  # Flickr30K images
    assert total_train_steps(566_747, 128, 10) == 44_270  # COCO pairs (113,287 images)
    assert total_train_steps(113_287, 128, 10) == 8_850  # COCO images
    assert total_train_steps(3_318_333, 128, 10) == 259_240  # CC3M, one caption per image
    assert total_train_steps(145_000, 64, 10, num_processes=2) == 11_330  # 2 GPUs x 64: the same pairs per step
    assert total_train_steps(10, 4, 1, drop_last=False) == 3


def test_caption_dropout_leaves_dropped_items_out_of_the_edge_terms(assets, tmp_path, monkeypatch):
    import utils.models.sd_models as sd_models
    import utils.stages.training as training

    real_encode, real_losses, dropped, seen = sd_models.encode_prompts, training.edge_losses, [], []

    def encode(text_encoder, tokenizer, captions, device):
        dropped.append(sum(c == "" for c in captions))
        return real_encode(text_encoder, tokenizer, captions, device)

    def losses(*a, **k):
        out = real_losses(*a, **k)
        seen.append(float(out["scored_batch"]))
        return out

    monkeypatch.setattr(sd_models, "encode_prompts", encode)
    monkeypatch.setattr(training, "edge_losses", losses)
    out = tmp_path / "dropout"
    script.main(script.parse_args(_argv(assets, out, "--train_batch_size", "4", "--max_train_steps", "6",
                                        "--checkpointing_steps", "0", "--caption_dropout", "0.5", "--lambda_mse", "1")))
    assert 0 < sum(dropped) < 24, dropped  # some items dropped, not all
    assert seen == [4.0 - d for d in dropped]  # the scorer's terms cover exactly the kept items
    assert all(r["scored_batch"] == 4 - d for r, d in zip(_log(out), dropped))
    assert "left out of the contrastive" in script.build_parser().format_help().replace("\n", " ").replace("  ", " ")


def _snapshot(folder):
    """path -> (bytes, mtime) of every file under `folder`."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("steps,every", [(4, 2), (3, 2)])  # last checkpoint at the final step, and before it
def test_resume_latest_leaves_a_finished_run_as_it_is(assets, tmp_path, capsys, steps, every):
    common = ("--train_batch_size", "2", "--max_train_steps", str(steps), "--checkpointing_steps", str(every),
              "--optimizer", "adamw", "--learning_rate", "1e-2", "--lambda_mse", "1")
    out = tmp_path / "done"
    script.main(script.parse_args(_argv(assets, out, *common)))
    before = _snapshot(out)
    capsys.readouterr()
    assert script.main(script.parse_args(_argv(assets, out, *common, "--resume_from_checkpoint", "latest"))) == out
    said = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert len(said) == 1 and "already finished" in said[0], said
    assert _snapshot(out) == before


def test_resume_past_the_last_step_writes_the_final_model_without_training(assets, tmp_path):
    # killed after the checkpoint of the last step, before the final model was written
    common = ("--train_batch_size", "2", "--max_train_steps", "4", "--checkpointing_steps", "2",
              "--optimizer", "adamw", "--learning_rate", "1e-2", "--lambda_mse", "1")
    _, cut = _full_and_resumed(assets, tmp_path, common, 4)
    assert [r["step"] for r in _log(cut)] == [1, 2, 3, 4]


def test_folder_of_a_failed_start_is_accepted(assets, tmp_path):
    # a start that failed after writing run_config.json (and its TensorBoard folder) holds no run
    out = tmp_path / "failed_start"
    (out / "logs" / "edge_train").mkdir(parents=True)
    (out / "run_config.json").write_text(json.dumps({"args": {"seed": 3}}))
    script.main(script.parse_args(_argv(assets, out, "--train_batch_size", "2", "--max_train_steps", "1")))
    assert [r["step"] for r in _log(out)] == [1] and (out / "model_index.json").is_file()
    # ...but a folder with logged steps does hold one
    with pytest.raises(InputError, match="already holds a run"):
        script.main(script.parse_args(_argv(assets, out, "--train_batch_size", "2", "--max_train_steps", "1")))


def test_bad_inputs(assets, tmp_path):
    with pytest.raises(InputError, match="at least 2 captions"):
        script.main(script.parse_args(_argv(assets, tmp_path / "a", "--train_batch_size", "1")))
    with pytest.raises(InputError, match="could not load|model_index"):
        argv = _argv(assets, tmp_path / "b", "--train_batch_size", "2")
        argv[1] = str(tmp_path / "no_model")
        script.main(script.parse_args(argv))
    with pytest.raises(InputError, match="not found"):
        script.main(script.parse_args(_argv(assets, tmp_path / "c", "--train_batch_size", "2",
                                            "--scorer", f"hf_clip:{tmp_path}/no_clip")))
    with pytest.raises(InputError, match="loss weights"):
        script.parse_args(_argv(assets, tmp_path / "d", "--lambda_contrastive", "0", "--lambda_diversity", "0"))
    with pytest.raises(InputError, match="unknown option"):
        script.parse_args(["--config", str(_recipe(tmp_path, {"lambda_contrastiv": 1}))])


def _recipe(tmp_path, data):
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(data))
    return path


def test_nan_loss_stops_at_step_and_keeps_checkpoint(assets, tmp_path, monkeypatch):
    import utils.stages.training as training

    real, calls = training.edge_losses, []

    def poisoned(*a, **k):
        out = real(*a, **k)
        calls.append(1)
        if len(calls) == 3:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(training, "edge_losses", poisoned)
    out = tmp_path / "nan"
    with pytest.raises(TrainingDiverged, match=r"step 3 .*checkpoint-2"):
        script.main(script.parse_args(_argv(assets, out, "--train_batch_size", "2", "--max_train_steps", "5",
                                            "--checkpointing_steps", "2")))
    assert (out / "checkpoint-2" / "unet").is_dir()
    assert not (out / "model_index.json").exists()


def test_lora_output_loads_on_base(assets, tmp_path):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "lora"
    script.main(script.parse_args(_argv(assets, out, "--train_batch_size", "2", "--max_train_steps", "2",
                                        "--checkpointing_steps", "2", "--trainable", "lora", "--lora_rank", "2",
                                        "--optimizer", "adamw", "--learning_rate", "1e-2")))
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    assert (out / "checkpoint-2" / "pytorch_lora_weights.safetensors").is_file()
    pipe = StableDiffusionPipeline.from_pretrained(assets["sd"], safety_checker=None)
    pipe.load_lora_weights(out)
    assert any("lora" in n for n, _ in pipe.unet.named_parameters())


def test_moving_average_is_trailing_mean():
    from utils.stages.train_plots import moving_average

    assert moving_average([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert moving_average([2.0, 4.0], 1) == [2.0, 4.0]


def test_epsilon_zero_snr_model_is_refused_before_training(assets, tmp_path):
    from utils.models.tiny import build_tiny_sd

    sd = build_tiny_sd(tmp_path / "sd_zero_snr", prediction_type="epsilon", zero_snr=True)
    argv = _argv(assets, tmp_path / "out", "--train_batch_size", "2", "--max_train_steps", "2")
    argv[1] = str(sd)
    with pytest.raises(InputError, match="rescale_betas_zero_snr=True"):
        script.main(script.parse_args(argv))
    assert not (tmp_path / "out" / "logs" / "train_log.jsonl").exists()
    # MSE-only training never forms the x0 estimate: accepted
    script.main(script.parse_args(argv + ["--lambda_contrastive", "0", "--lambda_diversity", "0", "--lambda_mse", "1",
                                          "--output_dir", str(tmp_path / "mse")]))


def test_demo_edge_recipe_moves_the_trainable_weights(assets, tmp_path):
    """The no-op guard: a few steps of the demo's EDGE recipe move the trainable set by more than 1e-3 of its norm.

    (The recipe before this test, SGD 1e-3 with clipping, moved DiffFit weights by about 1e-5 per step.) The
    movement is logged at each validation and in logs/run_summary.json, with the validation samples' change.
    """
    out = tmp_path / "run"
    script.main(script.parse_args(["--config", "configs/demo_edge.yaml", *_argv(assets, out),
                                   "--max_train_steps", "4", "--train_batch_size", "4", "--checkpointing_steps", "0",
                                   "--validation_steps", "2", "--validation_inference_steps", "2",
                                   "--mixed_precision", "no"]))
    summary = json.loads((out / "logs" / "run_summary.json").read_text())
    assert summary["steps"] == 4 and summary["trainable"] == "difffit"
    assert summary["param_change"] > 1e-3
    assert summary["pixel_change"] is not None and summary["pixel_change"] >= 0.0
    steps = [json.loads(line)["step"] for line in (out / "logs" / "movement.jsonl").read_text().splitlines()]
    assert steps == [2, 4]


def test_edge_timestep_range_draws_a_second_forward(assets, tmp_path, monkeypatch):
    """--edge_t_min: the UNet runs twice per step, the second time at timesteps of the EDGE range only."""
    from diffusers import UNet2DConditionModel

    seen = []
    original = UNet2DConditionModel.forward

    def spy(self, sample, timestep, *a, **k):
        seen.append(torch.as_tensor(timestep).flatten().tolist())
        return original(self, sample, timestep, *a, **k)

    monkeypatch.setattr(UNet2DConditionModel, "forward", spy)
    out = tmp_path / "run"
    script.main(script.parse_args(_argv(assets, out, "--max_train_steps", "2", "--train_batch_size", "4",
                                        "--lambda_mse", "1", "--edge_t_min", "900", "--validation_steps", "0",
                                        "--checkpointing_steps", "0")))
    train_calls = seen[:4]  # two steps x (MSE forward, EDGE forward)
    assert all(min(t) >= 900 for t in train_calls[1::2])
    assert any(min(t) < 900 for t in train_calls[0::2])
    with pytest.raises(InputError, match="--edge_t_min"):
        script.main(script.parse_args(_argv(assets, tmp_path / "bad", "--edge_t_min", "5000")))


def test_unrolled_x0_runs_the_chain_from_noise_and_refuses_a_timestep_range(assets, tmp_path, monkeypatch):
    """--x0_unroll_steps 2: per step one MSE forward at random t, then the chain at 999 and 499 (trailing)."""
    from diffusers import UNet2DConditionModel

    seen = []
    original = UNet2DConditionModel.forward

    def spy(self, sample, timestep, *a, **k):
        seen.append(sorted(set(torch.as_tensor(timestep).flatten().tolist())))
        return original(self, sample, timestep, *a, **k)

    monkeypatch.setattr(UNet2DConditionModel, "forward", spy)
    out = tmp_path / "run"
    script.main(script.parse_args(_argv(assets, out, "--max_train_steps", "2", "--train_batch_size", "4",
                                        "--lambda_mse", "1", "--x0_unroll_steps", "2", "--validation_steps", "0",
                                        "--checkpointing_steps", "0")))
    assert seen[1:3] == [[999], [499]] and seen[4:6] == [[999], [499]]
    assert _log(out)[-1]["contrastive"] > 0
    with pytest.raises(InputError, match="--x0_unroll_steps"):
        script.main(script.parse_args(_argv(assets, tmp_path / "bad", "--x0_unroll_steps", "2",
                                            "--edge_t_min", "500")))


def test_edge_guidance_adds_an_empty_caption_forward_and_refuses_a_scale_below_one(assets, tmp_path, monkeypatch):
    """--edge_guidance_scale 3: per step the MSE/conditional forward, then one on the empty caption's states."""
    from diffusers import UNet2DConditionModel

    from utils.models.sd_models import encode_prompts, load_sd_components

    conds = []
    original = UNet2DConditionModel.forward

    def spy(self, sample, timestep, encoder_hidden_states=None, *a, **k):
        conds.append(encoder_hidden_states.detach().clone())
        return original(self, sample, timestep, encoder_hidden_states, *a, **k)

    monkeypatch.setattr(UNet2DConditionModel, "forward", spy)
    out = tmp_path / "run"
    args = script.parse_args(_argv(assets, out, "--max_train_steps", "2", "--train_batch_size", "2",
                                   "--lambda_mse", "1", "--edge_guidance_scale", "3", "--validation_steps", "0",
                                   "--checkpointing_steps", "0"))
    script.main(args)
    assert len(conds) == 4
    comps = load_sd_components(args.pretrained_model_name_or_path)
    with torch.no_grad():
        empty = encode_prompts(comps.text_encoder, comps.tokenizer, [""])[0]
    for step in (0, 1):
        cond, uncond = conds[2 * step], conds[2 * step + 1]
        assert all(torch.allclose(u, empty, atol=1e-5) for u in uncond)
        assert not any(torch.allclose(c, empty, atol=1e-5) for c in cond)
    assert _log(out)[-1]["contrastive"] > 0
    with pytest.raises(InputError, match="--edge_guidance_scale"):
        script.main(script.parse_args(_argv(assets, tmp_path / "bad", "--edge_guidance_scale", "0.5")))
    with pytest.raises(InputError, match="--edge_guidance_frozen_uncond needs --edge_guidance_scale"):
        script.main(script.parse_args(_argv(assets, tmp_path / "bad", "--edge_guidance_frozen_uncond")))


def test_hard_negative_batches_come_from_one_cluster_and_need_the_scorer(assets, tmp_path, monkeypatch):
    """--hard_negative_batches: the batches seen in training are the sampler's cluster-cut runs."""
    import utils.stages.hard_negatives as hn

    orders = []
    original = hn.similar_caption_order

    def spy(*a, **k):
        orders.append(original(*a, **k))
        return orders[-1]

    monkeypatch.setattr(hn, "similar_caption_order", spy)
    out = tmp_path / "run"
    script.main(script.parse_args(_argv(assets, out, "--max_train_steps", "2", "--train_batch_size", "4",
                                        "--hard_negative_batches", "--validation_steps", "0",
                                        "--checkpointing_steps", "0")))
    assert orders and _log(out)[-1]["contrastive"] > 0
    with pytest.raises(InputError, match="--hard_negative_batches"):
        script.main(script.parse_args(_argv(assets, tmp_path / "bad", "--hard_negative_batches",
                                            "--lambda_contrastive", "0", "--lambda_diversity", "0",
                                            "--lambda_mse", "1")))


def test_same_caption_positives_reach_the_contrastive_term(assets, tmp_path, monkeypatch):
    """--same_caption_positives: the contrastive term gets the identical-caption mask of the batch's captions."""
    import utils.method.edge_step as edge_step

    seen = []
    original = edge_step.contrastive_loss

    def spy(u, v, temperature, **k):
        seen.append((k.get("positives"), edge_step.same_caption_positives(v)))
        return original(u, v, temperature, **k)

    monkeypatch.setattr(edge_step, "contrastive_loss", spy)
    common = ("--max_train_steps", "2", "--train_batch_size", "4", "--validation_steps", "0",
              "--checkpointing_steps", "0")
    script.main(script.parse_args(_argv(assets, tmp_path / "run", *common, "--same_caption_positives")))
    assert len(seen) == 2 and all(p is not None and p.equal(expected) and p.diagonal().all() for p, expected in seen)
    assert _log(tmp_path / "run")[-1]["contrastive"] > 0
    seen.clear()
    script.main(script.parse_args(_argv(assets, tmp_path / "plain", *common)))
    assert len(seen) == 2 and all(p is None for p, _ in seen)
