"""Stage 2 (sampling) on a tiny random-init Stable Diffusion: determinism, resume, refusals, formats."""
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import utils.stages.sampled_set as sampled_set  # noqa: E402
import utils.stages.sampling as sampling  # noqa: E402
import utils.stages.sampling_prompts as sampling_prompts  # noqa: E402
from dataset.distilled import read_distilled_set  # noqa: E402
from edge_diffusion_sampling import main, parse_args  # noqa: E402
from utils.common.errors import InputError  # noqa: E402
from utils.common.seeding import item_generator  # noqa: E402
from utils.models.tiny import build_tiny_sd

STEPS = "3"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    old, old_env = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"  # set_cpu_threads inside the stage reads it
    yield
    torch.set_num_threads(old)
    if old_env is None:
        os.environ.pop("OMP_NUM_THREADS")
    else:
        os.environ["OMP_NUM_THREADS"] = old_env


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    return build_tiny_sd(tmp_path_factory.mktemp("sd") / "tiny", resolution=32)


@pytest.fixture(scope="module")
def procedural(tmp_path_factory):
    from dataset.procedural import ProceduralSpec, generate_procedural_dataset

    out = tmp_path_factory.mktemp("data") / "procedural"
    return generate_procedural_dataset(out, ProceduralSpec(n_train=10, n_val=2, n_test=2, resolution=32),
                                       progress=False)


def run(tiny_sd, procedural, out, *extra):
    argv = ["--pretrained_model_name_or_path", str(tiny_sd), "--dataset", "procedural", "--ann_root",
            str(procedural), "--num_queries", "5", "--num_inference_steps", STEPS, "--output_dir", str(out),
            "--seed", "7", "--preview_n", "3", "--no_progress", *extra]
    return main(parse_args(argv))


def set_bytes(folder):
    """Every file of a distilled set (relative path -> bytes); the manifest's code_version is left out
    because the tree may change while the tests run."""
    files = {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
    manifest = json.loads(files.pop("manifest.json"))
    assert manifest.pop("code_version")
    return files, manifest


# ----------------------------------------------------------------------------- prompts


def _entries(n_images, per_image=3):
    return [{"image": f"im{i}.jpg", "caption": f"caption {c} of image {i}", "image_id": str(i)}
            for i in range(n_images) for c in range(per_image)]


def test_draw_prompts_one_caption_per_distinct_image_deterministic():
    a = sampling_prompts.draw_prompts(_entries(20), 12, seed=3)
    assert a == sampling_prompts.draw_prompts(_entries(20), 12, seed=3)
    assert len({d["image"] for d in a}) == 12
    for d in a:  # each prompt is a caption of its own source image
        assert d["prompt"].endswith(f"of image {d['image_id']}")
    assert [d["prompt"] for d in a] != [d["prompt"] for d in sampling_prompts.draw_prompts(_entries(20), 12, seed=4)]


def test_draw_prompts_rejects_too_many_and_non_positive():
    with pytest.raises(InputError, match="exceeds the 4 distinct images"):
        sampling_prompts.draw_prompts(_entries(4), 5, seed=0)
    with pytest.raises(InputError, match="must be positive"):
        sampling_prompts.draw_prompts(_entries(4), 0, seed=0)


def test_prompts_file_empty_line_names_the_line(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("a red circle\n\na blue square\n")
    with pytest.raises(InputError, match=r"p.txt line 2: empty prompt"):
        sampling_prompts.read_prompts_file(path)
    path.write_text("a red circle\na blue square\n")
    assert sampling_prompts.read_prompts_file(path) == ["a red circle", "a blue square"]
    assert sampling_prompts.read_prompts_file(path, 1) == ["a red circle"]
    with pytest.raises(InputError, match="exceeds the 2 prompts"):
        sampling_prompts.read_prompts_file(path, 3)


def test_bad_flags_are_one_line_input_errors(tmp_path):
    with pytest.raises(InputError, match="--num_queries must be positive"):
        parse_args(["--pretrained_model_name_or_path", "m", "--dataset", "procedural", "--num_queries", "0",
                    "--output_dir", str(tmp_path)])
    with pytest.raises(InputError, match=r"give --dataset \(with --ann_root\) or --prompts_file"):
        parse_args(["--pretrained_model_name_or_path", "m", "--output_dir", str(tmp_path)])


def test_blocks_cover_every_index_once_for_any_process_count():
    for k in (1, 2, 3):
        for b in (1, 2, 4):
            got = [i for r in range(k) for block in sampled_set.blocks_for_process(11, b, r, k) for i in block]
            assert sorted(got) == list(range(11))
    assert sampled_set.blocks_for_process(5, 1, 1, 2) == [[1], [3]]  # batch 1: process r renders i % K == r


# ----------------------------------------------------------------------------- end to end


def test_same_seed_gives_identical_set_and_it_loads(tiny_sd, procedural, tmp_path):
    a = run(tiny_sd, procedural, tmp_path / "a", "--batch_size", "2")
    b = run(tiny_sd, procedural, tmp_path / "b", "--batch_size", "2")
    assert set_bytes(a) == set_bytes(b)
    ds = read_distilled_set(a)
    assert len(ds) == 5 and [r["image"] for r in ds.records] == [f"images/{i:06d}.png" for i in range(5)]
    manifest = ds.manifest
    assert manifest["status"] == "complete" and manifest["num_inference_steps"] == 3
    assert manifest["seed"] == 7 and (manifest["height"], manifest["width"]) == (32, 32)
    assert manifest["code_version"] and manifest["prompt_source"]["dataset"] == "procedural"
    assert len(set(manifest["prompt_source"]["source_images"])) == 5
    assert (a / "images" / "metadata.jsonl").is_file() and Image.open(a / "preview.png").width > 32
    c = run(tiny_sd, procedural, tmp_path / "c", "--batch_size", "2", "--seed", "8")
    assert (c / "images/000000.png").read_bytes() != (a / "images/000000.png").read_bytes()


def test_matches_stock_pipeline_loop_with_per_image_generators(tiny_sd, tmp_path):
    prompts = ["a red circle", "a green star at the top", "two blue squares"]
    (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n")
    out = main(parse_args(["--pretrained_model_name_or_path", str(tiny_sd), "--prompts_file", str(tmp_path / "p.txt"),
                           "--num_inference_steps", STEPS, "--seed", "5", "--output_dir", str(tmp_path / "o"),
                           "--scheduler", "dpmsolver++", "--preview_n", "0", "--no_progress"]))
    pipe = sampling.load_sampling_pipeline(tiny_sd, scheduler="dpmsolver++")
    for i, prompt in enumerate(prompts):
        stock = pipe(prompt, num_inference_steps=int(STEPS), guidance_scale=7.5,
                     generator=item_generator(5, i), output_type="np").images[0]
        ours = np.asarray(Image.open(out / f"images/{i:06d}.png"))
        assert np.array_equal(ours, (stock * 255).round().astype(np.uint8)), i


def test_batch_size_changes_only_float_rounding(tiny_sd):
    """Batch 1 vs 3: CPU kernels reorder float sums for other batch shapes (~1e-6), nothing more."""
    pipe = sampling.load_sampling_pipeline(tiny_sd)
    encoder = sampling.PromptEncoder(pipe)
    prompts = ["a red circle", "a green star", "a blue square"]
    pipe_np = dict(num_inference_steps=int(STEPS), guidance_scale=7.5, height=32, width=32)
    one = [_np(sampling.render_images(pipe, encoder, [p], [i], 1, **pipe_np)[0]) for i, p in enumerate(prompts)]
    three = [_np(im) for im in sampling.render_images(pipe, encoder, prompts, [0, 1, 2], 1, **pipe_np)]
    for a, b in zip(one, three):
        diff = np.abs(a.astype(int) - b.astype(int))
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01
    # the same seed and batch give the same images again (prompts are encoded anew for every batch)
    again = [_np(im) for im in sampling.render_images(pipe, encoder, prompts, [0, 1, 2], 1, **pipe_np)]
    assert all(np.array_equal(a, b) for a, b in zip(three, again))


def _np(image):
    return np.asarray(image)


def test_speed_options_keep_results_within_tolerance(tiny_sd):
    prompts = ["a red circle", "a red circle", "a blue square"]
    kw = dict(num_inference_steps=int(STEPS), guidance_scale=7.5, height=32, width=32)
    base = sampling.load_sampling_pipeline(tiny_sd)
    fast = sampling.load_sampling_pipeline(tiny_sd, channels_last=True, attention="eager")

    def latents(pipe):
        encoder = sampling.PromptEncoder(pipe, negative_prompt="blurry")
        return pipe(prompt_embeds=encoder.encode(prompts), negative_prompt_embeds=encoder.negative(3),
                    output_type="np", generator=[item_generator(0, i) for i in range(3)], **kw).images

    a = latents(base)
    b = latents(fast)
    assert np.array_equal(a, latents(base))  # same seeds, same images
    assert np.abs(a - b).max() < 1e-4
    # per-prompt embeddings give what the stock pipeline gives from the raw prompts
    stock = base(prompts, negative_prompt=["blurry"] * 3, output_type="np",
                 generator=[item_generator(0, i) for i in range(3)], **kw).images
    assert np.abs(a - stock).max() < 1e-5


def test_interrupted_run_resumes_to_the_same_set(tiny_sd, procedural, tmp_path, monkeypatch):
    ref = run(tiny_sd, procedural, tmp_path / "ref", "--batch_size", "2")
    calls = {"n": 0}
    real = sampling.render_images

    def dies_after_one_block(*a, **k):
        if calls["n"] == 1:
            raise KeyboardInterrupt
        calls["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(sampling, "render_images", dies_after_one_block)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_sd, procedural, tmp_path / "x", "--batch_size", "2")
    monkeypatch.undo()
    part = tmp_path / "x"
    assert sorted(p.name for p in (part / "images").glob("*.png")) == ["000000.png", "000001.png"]
    assert json.loads((part / "manifest.json").read_text())["status"] == "in_progress"
    assert not (part / "annotations/train.json").exists()
    run(tiny_sd, procedural, part, "--batch_size", "2")
    assert set_bytes(part) == set_bytes(ref)
    # a lost image is re-rendered, the rest kept
    (part / "images/000003.png").unlink()
    run(tiny_sd, procedural, part, "--batch_size", "2")
    assert set_bytes(part) == set_bytes(ref)


def test_other_settings_are_refused_unless_overwrite(tiny_sd, procedural, tmp_path):
    out = run(tiny_sd, procedural, tmp_path / "o")
    with pytest.raises(InputError, match=r"other settings \(num_inference_steps: 3 -> 2\).*--overwrite"):
        run(tiny_sd, procedural, out, "--num_inference_steps", "2")
    run(tiny_sd, procedural, out, "--num_inference_steps", "2", "--overwrite")
    assert read_distilled_set(out).manifest["num_inference_steps"] == 2


def test_foreign_folder_and_non_pipeline_model_are_clear(tiny_sd, procedural, tmp_path):
    (tmp_path / "foreign" / "images").mkdir(parents=True)
    with pytest.raises(InputError, match="without a manifest.json"):
        run(tiny_sd, procedural, tmp_path / "foreign")
    (tmp_path / "notsd").mkdir()
    with pytest.raises(InputError, match="not a diffusers pipeline folder"):
        run(tmp_path / "notsd", procedural, tmp_path / "o2")


def test_convert_from_legacy_layout(tmp_path):
    legacy = tmp_path / "legacy"
    (legacy / "images").mkdir(parents=True)
    (legacy / "prompts").mkdir()
    for i, colour in [(0, "red"), (2, "blue"), (10, "green")]:
        Image.new("RGB", (8, 8), colour).save(legacy / "images" / f"{i}.png")
        (legacy / "prompts" / f"{i}.txt").write_text(f"a {colour} square\n")
    out = main(parse_args(["--convert_from_legacy", str(legacy), "--output_dir", str(tmp_path / "new")]))
    ds = read_distilled_set(out)
    assert [r["captions"] for r in ds.records] == [["a red square"], ["a blue square"], ["a green square"]]
    assert Image.open(out / "images/000002.png").getpixel((0, 0)) == (0, 128, 0)
    assert ds.manifest["legacy_indices"] == [0, 2, 10]
    (legacy / "prompts" / "2.txt").unlink()
    with pytest.raises(InputError, match="2.png has no prompt file"):
        main(parse_args(["--convert_from_legacy", str(legacy), "--output_dir", str(tmp_path / "n2")]))


def test_lora_run_folder_is_sampled_as_base_plus_lora(tiny_sd, tmp_path):
    from diffusers import StableDiffusionPipeline

    from utils.method.trainable_params import configure_trainable, lora_state_dict
    from utils.models.sd_models import load_sd_components

    unet = load_sd_components(tiny_sd).unet
    configure_trainable(unet, "lora", lora_rank=2)
    with torch.no_grad():  # peft starts LoRA B at zero (a no-op); make it act
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    run_dir = tmp_path / "lora_run"
    StableDiffusionPipeline.save_lora_weights(run_dir, unet_lora_layers=lora_state_dict(unet))
    (tmp_path / "p.txt").write_text("a red circle\n")
    common = ["--prompts_file", str(tmp_path / "p.txt"), "--num_inference_steps", "2", "--preview_n", "0",
              "--no_progress"]
    with pytest.raises(InputError, match="holds LoRA weights.*--lora_weights"):
        main(parse_args(["--pretrained_model_name_or_path", str(run_dir), "--output_dir", str(tmp_path / "x"),
                         *common]))
    base = main(parse_args(["--pretrained_model_name_or_path", str(tiny_sd), "--output_dir", str(tmp_path / "b"),
                            *common]))
    lora = main(parse_args(["--pretrained_model_name_or_path", str(tiny_sd), "--lora_weights", str(run_dir),
                            "--output_dir", str(tmp_path / "l"), *common]))
    assert read_distilled_set(lora).manifest["lora_weights"] == str(run_dir.resolve())
    assert (lora / "images/000000.png").read_bytes() != (base / "images/000000.png").read_bytes()


def test_broken_images_of_an_interrupted_run_are_rendered_again(tiny_sd, procedural, tmp_path):
    ref = run(tiny_sd, procedural, tmp_path / "ref")
    part = tmp_path / "x"
    run(tiny_sd, procedural, part)
    (part / "annotations/train.json").unlink()  # as if killed before the end
    (part / "images/000001.png").write_bytes(b"")  # a 0-byte file
    data = (part / "images/000003.png").read_bytes()
    (part / "images/000003.png").write_bytes(data[: len(data) // 2])  # a truncated one
    assert sampled_set.missing_indices(part, 5) == [1, 3]
    run(tiny_sd, procedural, part)
    assert set_bytes(part) == set_bytes(ref)


@pytest.mark.parametrize("kind", ["file", "below_file", "read_only"])
def test_unusable_output_dir_is_one_line_before_the_model_loads(tiny_sd, procedural, tmp_path, monkeypatch, kind):
    import utils.common.atomic_io as atomic_io

    (tmp_path / "f").write_text("x")
    out = {"file": tmp_path / "f", "below_file": tmp_path / "f" / "out", "read_only": tmp_path / "ro" / "out"}[kind]
    if kind == "read_only":
        (tmp_path / "ro").mkdir()
        real_access = os.access
        monkeypatch.setattr(atomic_io.os, "access",
                            lambda p, mode, **k: False if str(p) == str(tmp_path / "ro") else real_access(p, mode))

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the output folder was checked")

    monkeypatch.setattr(sampling, "load_sampling_pipeline", no_model)
    expect = {"file": "is a file", "below_file": "is a file", "read_only": "not writable"}[kind]
    with pytest.raises(InputError, match=rf"--output_dir .*{expect}") as e:
        run(tiny_sd, procedural, out)
    assert "\n" not in str(e.value)
