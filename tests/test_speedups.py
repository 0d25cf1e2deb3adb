"""Training speed-ups: cheap scorer decodes, cached VAE latents, checkpointing, channels-last, compile."""
import copy
import json
import os

import pytest
import torch

from utils.common.errors import InputError
from utils.method.edge_step import EDGELossConfig, edge_losses
from utils.method.vae_latents import posterior_mean_std, sample_cached_latents, vae_decode, vae_encode
from utils.models.cheap_decode import (ScorerDecoder, build_scorer_decoder, decode_error, load_tiny_vae,
                                       reduced_latent_size, vae_upsampling_factor)
from utils.models.tiny import build_tiny_autoencoder
from utils.stages.latent_cache import CaptionOnlyDataset, LatentCache, build_latent_cache

os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from utils.models.scorers import build_scorer
    from utils.models.sd_models import encode_prompts, load_sd_components
    from utils.models.tiny import build_tiny_hf_clip
    from utils.models.tiny import build_tiny_sd

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("speedups")
    # 32 px images, a 2x-downsampling VAE (16x16 latents), a 16 px scorer: "reduced" decodes 8x8 latents
    sd = build_tiny_sd(root / "sd", resolution=32, vae_channels=(32, 32))
    comps = load_sd_components(str(sd))
    for m in (comps.vae, comps.text_encoder):
        m.requires_grad_(False)
        m.eval()
    clip = build_tiny_hf_clip(root / "clip", image_size=16, patch_size=8)
    scorer = build_scorer(f"hf_clip:{clip}")
    captions = ["a red circle", "a blue square", "a green star", "a small triangle"]
    with torch.no_grad():
        hidden = encode_prompts(comps.text_encoder, comps.tokenizer, captions)
    pixels = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return {"root": root, "sd": str(sd), "clip": str(clip), "comps": comps, "scorer": scorer,
            "captions": captions, "hidden": hidden, "pixels": pixels}


def _cfg(comps, **kw):
    cfg = EDGELossConfig(**kw)
    cfg.t_max = comps.noise_scheduler.config.num_train_timesteps - 1
    return cfg


def _loss_and_grads(models, unet=None, **kw):
    c = models["comps"]
    unet = unet or c.unet
    unet.zero_grad(set_to_none=True)
    out = edge_losses(unet, c.vae, c.noise_scheduler, models["scorer"], kw.pop("pixels", models["pixels"]),
                      models["captions"], models["hidden"], _cfg(c, lambda_mse=0.5), torch.Generator().manual_seed(7),
                      **kw)
    out["loss"].backward()
    grads = {n: p.grad.clone() for n, p in unet.named_parameters() if p.grad is not None}
    return out, grads


def _close(a, b, rtol=1e-4, atol=1e-6):
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=k)


# ------------------------------------------------------------------ cheap decode

def test_reduced_latent_size_hand_values():
    assert reduced_latent_size((64, 64), 8, (224, 224)) == (28, 28)  # SD 512 px, CLIP 224 px
    assert reduced_latent_size((28, 28), 8, (224, 224)) == (28, 28)  # public code: 224 px training
    assert reduced_latent_size((32, 32), 4, (56, 56)) == (14, 14)
    assert reduced_latent_size((16, 16), 4, (96, 96)) == (16, 16)  # never upsample
    assert reduced_latent_size((64, 64), 8, (225, 100)) == (29, 13)  # ceil: the decode covers the scorer


def test_full_mode_is_the_plain_decode(models):
    vae = models["comps"].vae
    assert vae_upsampling_factor(vae) == 2
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    dec = ScorerDecoder(vae, "full", (16, 16))
    assert torch.equal(dec(z), vae_decode(vae, z))


def test_reduced_decode_size_gradients_and_measured_error(models):
    vae, scorer = models["comps"].vae, models["scorer"]
    dec = ScorerDecoder(vae, "reduced", scorer.image_size)
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1), requires_grad=True)
    img = dec(z)
    assert img.shape[-2:] == (16, 16)  # 8x8 latents x 2 = the scorer's 16 px
    img.square().mean().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    err = decode_error(dec, z.detach(), scorer)
    assert 0 < err["pixel_rmse"] and 0 < err["pixel_rel"] < 10
    assert -1 <= err["feature_cos"] <= 1
    assert decode_error(ScorerDecoder(vae, "full", (16, 16)), z.detach())["pixel_rmse"] == 0


def test_tiny_decoder_saved_loaded_and_checked(models, tmp_path):
    vae = models["comps"].vae
    path = build_tiny_autoencoder(tmp_path / "taesd", latent_channels=4, upsamplings=1, channels=8)
    tiny = load_tiny_vae(path)
    assert vae_upsampling_factor(tiny) == 2 and not any(p.requires_grad for p in tiny.parameters())
    dec = build_scorer_decoder("tiny", vae, (16, 16), path)
    z = torch.randn(2, 4, 16, 16, requires_grad=True)
    img = dec(z)
    assert img.shape == (2, 3, 32, 32)
    img.sum().backward()
    assert z.grad.abs().sum() > 0
    out, grads = _loss_and_grads(models, decoder=dec)
    assert torch.isfinite(out["loss"]) and any(g.abs().sum() > 0 for g in grads.values())
    wrong = build_tiny_autoencoder(tmp_path / "wrong", latent_channels=3, upsamplings=1, channels=8)
    with pytest.raises(InputError, match="latent channels"):
        build_scorer_decoder("tiny", vae, (16, 16), wrong)
    with pytest.raises(InputError, match="not found"):
        build_scorer_decoder("tiny", vae, (16, 16), tmp_path / "missing")
    with pytest.raises(InputError, match="needs --tiny_vae"):
        build_scorer_decoder("tiny", vae, (16, 16))
    with pytest.raises(InputError, match="unknown --scorer_decode"):
        ScorerDecoder(vae, "half")


# ------------------------------------------------------------------ cached latents

class _Items(torch.utils.data.Dataset):
    def __init__(self, pixels):
        self.pixels = pixels

    def __len__(self):
        return self.pixels.shape[0]

    def __getitem__(self, i):
        return {"pixel_values": self.pixels[i], "index": i}


def test_cached_sample_is_the_encoders_sample(models):
    vae, pixels = models["comps"].vae, models["pixels"]
    mean, std = posterior_mean_std(vae, pixels)
    a = vae_encode(vae, pixels, torch.Generator().manual_seed(3))
    b = sample_cached_latents(vae, mean, std, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    # and it is a sample, not the mean: another seed gives another latent
    c = sample_cached_latents(vae, mean, std, torch.Generator().manual_seed(4))
    assert (b - c).abs().max() > 1e-3


def test_cached_edge_step_matches_uncached(models):
    vae, pixels = models["comps"].vae, models["pixels"]
    cache = build_latent_cache(vae, _Items(pixels), batch_size=3, progress=False)  # other batches than the step
    assert cache.mean.shape == (4, 4, 16, 16) and cache.nbytes() == 2 * 4 * 4 * 16 * 16 * 4
    order = [2, 0, 3, 1]
    ref_out, ref_grads = _loss_and_grads(models, pixels=pixels[order])
    out, grads = _loss_and_grads(models, pixels=None, latent_dist=cache.lookup(order))
    torch.testing.assert_close(out["loss"], ref_out["loss"], rtol=1e-5, atol=1e-6)
    _close(grads, ref_grads)


def test_flip_cache_holds_the_mirror_encodes(models):
    vae, pixels = models["comps"].vae, models["pixels"]
    cache = build_latent_cache(vae, _Items(pixels), batch_size=4, flips=True, seed=5, progress=False)
    mirror_mean, mirror_std = posterior_mean_std(vae, torch.flip(pixels, dims=[-1]))
    torch.testing.assert_close(cache.mean_flip, mirror_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cache.std_flip, mirror_std, rtol=1e-5, atol=1e-6)
    assert (cache.mean_flip - cache.mean).abs().max() > 1e-3  # a flipped latent is not the latent of the flip
    many = LatentCache(torch.zeros(64, 1, 1, 1), torch.zeros(64, 1, 1, 1), torch.ones(64, 1, 1, 1),
                       torch.ones(64, 1, 1, 1), seed=5)
    m0, m1 = many.flip_mask(range(64), 0), many.flip_mask(range(64), 1)
    assert torch.equal(m0, many.flip_mask(range(64), 0))  # reproducible
    assert 16 < int(m0.sum()) < 48 and not torch.equal(m0, m1)  # about half, and changes with the epoch
    mean, _ = many.lookup(range(64), epoch=1)
    assert torch.equal(mean.flatten().bool(), m1)


def test_caption_only_dataset_keeps_the_caption_draw():
    from dataset.torch_datasets import ImageCaptionTrainDataset

    groups = [{"image": f"{i}.png", "captions": [f"c{i}a", f"c{i}b", f"c{i}c"]} for i in range(6)]
    base = ImageCaptionTrainDataset(groups, "/nowhere", seed=2)
    wrapped = CaptionOnlyDataset(base)
    for epoch in (0, 3):
        wrapped.use_epoch(epoch)
        assert [wrapped[i]["caption"] for i in range(6)] == [
            groups[i]["captions"][base.caption_index(i)] for i in range(6)]
    assert wrapped[4]["index"] == 4 and "pixel_values" not in wrapped[4]


# ------------------------------------------------------------------ checkpointing, channels-last, SDPA, compile

def test_gradient_checkpointing_and_channels_last_keep_the_step(models):
    c = models["comps"]
    ref_out, ref_grads = _loss_and_grads(models)
    unet, vae = copy.deepcopy(c.unet), copy.deepcopy(c.vae)
    unet.enable_gradient_checkpointing()
    vae.enable_gradient_checkpointing()
    assert vae.decoder.gradient_checkpointing
    c2 = copy.copy(c)
    c2.vae = vae
    out, grads = _loss_and_grads({**models, "comps": c2}, unet=unet)
    torch.testing.assert_close(out["loss"], ref_out["loss"], rtol=1e-5, atol=1e-6)
    _close(grads, ref_grads)
    unet_cl, vae_cl = copy.deepcopy(c.unet), copy.deepcopy(c.vae)
    unet_cl.to(memory_format=torch.channels_last)
    vae_cl.to(memory_format=torch.channels_last)
    c3 = copy.copy(c)
    c3.vae = vae_cl
    out, grads = _loss_and_grads({**models, "comps": c3}, unet=unet_cl)
    torch.testing.assert_close(out["loss"], ref_out["loss"], rtol=1e-4, atol=1e-5)
    _close(grads, ref_grads, rtol=1e-3, atol=1e-5)


def test_attention_uses_sdpa(models):
    from diffusers.models.attention_processor import AttnProcessor2_0

    procs = models["comps"].unet.attn_processors
    assert procs and all(isinstance(p, AttnProcessor2_0) for p in procs.values())


# ------------------------------------------------------------------ the training script

def _argv(models, data, out, *extra):
    return ["--pretrained_model_name_or_path", models["sd"], "--dataset", "procedural", "--ann_root", data,
            "--output_dir", str(out), "--resolution", "32", "--scorer", f"hf_clip:{models['clip']}",
            "--report_to", "none", "--seed", "3", "--train_batch_size", "2", "--max_train_samples", "4",
            "--checkpointing_steps", "0", "--lambda_mse", "1", *extra]


@pytest.fixture(scope="module")
def data(models):
    from dataset.procedural import ProceduralSpec, generate_procedural_dataset

    spec = ProceduralSpec(resolution=32, n_train=4, n_val=1, n_test=1, captions_per_image=2)
    return str(generate_procedural_dataset(models["root"] / "proc", spec, progress=False))


def _log(out):
    return [json.loads(line) for line in (out / "logs" / "train_log.jsonl").read_text().splitlines()]


def test_train_with_cached_latents_repeats_the_uncached_run(models, data, tmp_path):
    import edge_diffusion_train as script

    script.main(script.parse_args(_argv(models, data, tmp_path / "plain", "--max_train_steps", "3")))
    script.main(script.parse_args(_argv(models, data, tmp_path / "cached", "--max_train_steps", "3",
                                        "--cache_latents")))
    a, b = _log(tmp_path / "plain"), _log(tmp_path / "cached")
    assert len(a) == len(b) == 3
    for ra, rb in zip(a, b):
        for k in ("loss", "contrastive", "diversity", "mse"):
            assert rb[k] == pytest.approx(ra[k], rel=1e-4, abs=1e-6), (k, ra, rb)


def test_train_with_every_option_runs(models, data, tmp_path):
    import edge_diffusion_train as script

    tiny = build_tiny_autoencoder(tmp_path / "taesd", latent_channels=4, upsamplings=1, channels=8)
    for name, extra in {"reduced": ("--scorer_decode", "reduced", "--gradient_checkpointing", "--channels_last",
                                    "--cache_latents", "--random_flip"),
                        "tiny": ("--scorer_decode", "tiny", "--tiny_vae", str(tiny), "--gradient_checkpointing")
                        }.items():
        out = tmp_path / name
        script.main(script.parse_args(_argv(models, data, out, "--max_train_steps", "2", *extra)))
        log = _log(out)
        assert len(log) == 2 and all(r["loss"] == r["loss"] for r in log)
        assert (out / "model_index.json").is_file()


def test_bad_speedup_flags(models, data, tmp_path):
    import edge_diffusion_train as script

    with pytest.raises(InputError, match="needs --tiny_vae"):
        script.parse_args(_argv(models, data, tmp_path / "a", "--scorer_decode", "tiny"))
    with pytest.raises(InputError, match="only used with --scorer_decode tiny"):
        script.parse_args(_argv(models, data, tmp_path / "b", "--tiny_vae", str(tmp_path)))
    with pytest.raises(InputError, match="--random_crop"):
        script.parse_args(_argv(models, data, tmp_path / "c", "--cache_latents", "--random_crop"))
    with pytest.raises(InputError, match="not found"):
        script.main(script.parse_args(_argv(models, data, tmp_path / "d", "--scorer_decode", "tiny",
                                            "--tiny_vae", str(tmp_path / "missing"))))


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("EDGE_TEST_COMPILE") != "1",
                    reason="torch.compile's first step takes ~150 s on a 2-core CPU (inductor C++ build); "
                           "set EDGE_TEST_COMPILE=1 to run")
def test_train_with_compile_runs(models, data, tmp_path):
    import edge_diffusion_train as script

    out = tmp_path / "compiled"
    script.main(script.parse_args(_argv(models, data, out, "--max_train_steps", "2", "--compile")))
    assert len(_log(out)) == 2 and (out / "model_index.json").is_file()


def test_scorer_shift_changes_what_the_scorer_reads_and_nothing_else(models):
    c = models["comps"]
    run = lambda **kw: edge_losses(c.unet, c.vae, c.noise_scheduler, models["scorer"], models["pixels"],  # noqa: E731
                                   models["captions"], models["hidden"], _cfg(c, lambda_mse=0.5, **kw),
                                   torch.Generator().manual_seed(7))
    with torch.no_grad():
        plain, zero, shifted = run(), run(scorer_shift=0.0), run(scorer_shift=0.25)
    assert all(torch.equal(plain[k], zero[k]) for k in plain)
    assert torch.equal(plain["mse"], shifted["mse"])
    assert not torch.allclose(plain["contrastive"], shifted["contrastive"])


def test_edge_guidance_scores_the_guided_prediction(models):
    """w with the conditional states as 'unconditional' is the plain loss; with the empty caption only EDGE moves."""
    from utils.models.sd_models import encode_prompts

    c = models["comps"]
    run = lambda uncond=None, **kw: edge_losses(  # noqa: E731
        c.unet, c.vae, c.noise_scheduler, models["scorer"], models["pixels"], models["captions"], models["hidden"],
        _cfg(c, lambda_mse=0.5, **kw), torch.Generator().manual_seed(7), uncond_hidden_states=uncond)
    with torch.no_grad():
        empty = encode_prompts(c.text_encoder, c.tokenizer, [""])
        plain = run()
        same = run(models["hidden"], edge_guidance_scale=3.0)
        guided = run(empty, edge_guidance_scale=3.0)
    for k in ("loss", "contrastive", "diversity", "mse"):
        assert torch.allclose(plain[k], same[k], atol=1e-5), k
    assert torch.equal(plain["mse"], guided["mse"])
    assert not torch.allclose(plain["contrastive"], guided["contrastive"])
    with pytest.raises(ValueError, match="uncond_hidden_states"):
        run(None, edge_guidance_scale=3.0)
    with torch.no_grad():  # freezing the unconditional branch changes the gradients only, not the loss
        frozen = run(empty, edge_guidance_scale=3.0, edge_guidance_frozen_uncond=True)
    assert torch.allclose(frozen["loss"], guided["loss"])
    grads = []
    for freeze in (False, True):
        c.unet.zero_grad(set_to_none=True)
        run(empty, edge_guidance_scale=3.0, edge_guidance_frozen_uncond=freeze)["loss"].backward()
        grads.append(torch.cat([p.grad.flatten() for p in c.unet.parameters() if p.grad is not None]))
    c.unet.zero_grad(set_to_none=True)
    assert grads[1].abs().sum() > 0 and not torch.allclose(grads[0], grads[1])
