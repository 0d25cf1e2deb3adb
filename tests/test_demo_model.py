"""The shipped demo model (assets/demo_sd) and the tools that build and measure it."""
import json
from pathlib import Path

import pytest
import torch

from demo.build_demo_model import drop_vae_attention, shrink_text_encoder
from demo.measure_prompt_following import main as measure_main
from demo.measure_prompt_following import parse_args as measure_args
from demo.prompt_following import markdown_table
from utils.common.errors import InputError

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "assets" / "demo_sd"
MAX_BYTES = 40 * 2**20  # issue 13: one fp16 checkpoint of at most 40 MB


def test_shipped_model_is_small_fp16_safetensors():
    files = [f for f in SHIPPED.rglob("*") if f.is_file()]
    assert (SHIPPED / "model_index.json").is_file(), "assets/demo_sd is missing: run `make demo-model`"
    assert sum(f.stat().st_size for f in files) < MAX_BYTES
    from safetensors import safe_open

    for comp in ("unet", "vae", "text_encoder"):
        weights = list((SHIPPED / comp).glob("*.safetensors"))
        assert len(weights) == 1, comp
        with safe_open(weights[0], "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}, comp


def test_shipped_model_loads_through_the_real_loader_and_generates_32px():
    from utils.models.sd_models import load_sd_components, load_sd_pipeline

    torch.set_num_threads(1)
    pipe = load_sd_pipeline(str(SHIPPED))
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.scheduler.config.rescale_betas_zero_snr and pipe.scheduler.config.timestep_spacing == "trailing"
    out = pipe("a red circle", num_inference_steps=2, guidance_scale=2.0, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 32, 32, 3) and 0.0 <= out.min() and out.max() <= 1.0
    comps = load_sd_components(str(SHIPPED))  # what EDGE fine-tuning starts from
    # 32 px images through a factor-2 VAE: 16x16 latents
    assert comps.unet.config.sample_size == 16 and 2 ** (len(comps.vae.config.block_out_channels) - 1) == 2


@pytest.fixture(scope="module")
def tiny_minilm_sd(tmp_path_factory):
    from utils.models.tiny import build_tiny_sd

    root = tmp_path_factory.mktemp("shrink")
    data = root / "data"
    (data / "annotations").mkdir(parents=True)
    entries = [{"image": "images/train/0.png", "caption": "a big orange circle on the right", "image_id": "0"},
               {"image": "images/train/1.png", "caption": "one shape: a purple square (small, top)", "image_id": "1"}]
    (data / "annotations" / "procedural_train.json").write_text(json.dumps(entries))
    model = build_tiny_sd(root / "sd", text_encoder="minilm", prediction_type="v_prediction", zero_snr=True)
    return model, data


def test_shrunk_text_encoder_keeps_caption_tokens_and_early_layer_states(tiny_minilm_sd):
    from transformers import AutoModel, AutoTokenizer

    model, data = tiny_minilm_sd
    full_tok = AutoTokenizer.from_pretrained(model / "tokenizer")
    full = AutoModel.from_pretrained(model / "text_encoder")
    info = shrink_text_encoder(model, data, num_layers=2, keep_vocab_below=1996)
    tok = AutoTokenizer.from_pretrained(model / "tokenizer")
    small = AutoModel.from_pretrained(model / "text_encoder")
    assert small.config.num_hidden_layers == 2 and info["vocab"] == small.config.vocab_size < 2100
    caption = "a big orange circle on the right"
    assert tok.tokenize(caption) == full_tok.tokenize(caption)
    assert tok.model_max_length == full_tok.model_max_length
    with torch.no_grad():
        want = full(full_tok(caption, return_tensors="pt").input_ids, output_hidden_states=True).hidden_states[2]
        got = small(tok(caption, return_tensors="pt").input_ids)[0]
    torch.testing.assert_close(got, want)
    assert tok.tokenize("zebra") and "[UNK]" not in tok.tokenize("zebra")  # unknown words fall back to pieces


def test_caption_tokens_need_annotation_files(tmp_path):
    from transformers import AutoTokenizer

    from demo.build_demo_model import caption_token_ids
    from utils.models.encoders import minilm_path

    tok = AutoTokenizer.from_pretrained(minilm_path())
    with pytest.raises(InputError, match="no annotation files"):
        caption_token_ids(tok, tmp_path)
    # side files (dicts keyed by image) are not annotation lists and are not read
    (tmp_path / "procedural_noisy_captions.json").write_text(json.dumps({"images/0.png": {"0": "a blue star"}}))
    with pytest.raises(InputError, match="no annotation files"):
        caption_token_ids(tok, tmp_path)
    (tmp_path / "test.json").write_text(json.dumps([{"image": "a.png", "caption": ["a red star"]}]))
    assert set(tok("a red star").input_ids) <= caption_token_ids(tok, tmp_path)
    assert tok.convert_tokens_to_ids("blue") not in caption_token_ids(tok, tmp_path)
    (tmp_path / "test.json").write_text(json.dumps([{"image": "a.png", "caption": ["a red star"]}, {"image": "b.png"}]))
    with pytest.raises(InputError, match="entry 1 has no 'caption'"):
        caption_token_ids(tok, tmp_path)


def test_vae_without_attention_keeps_other_weights(tiny_minilm_sd):
    from diffusers import AutoencoderKL

    model, _ = tiny_minilm_sd
    before = AutoencoderKL.from_pretrained(model / "vae").state_dict()
    drop_vae_attention(model)
    after = AutoencoderKL.from_pretrained(model / "vae")
    assert after.config.mid_block_add_attention is False
    state = after.state_dict()
    assert not any("attentions" in k for k in state)
    for k, v in state.items():
        torch.testing.assert_close(v, before[k])


def test_measure_prompt_following_on_real_images_only(tmp_path):
    from dataset.procedural import main as make_data, parse_args as data_args

    torch.set_num_threads(1)
    data = make_data(data_args(["--output_dir", str(tmp_path / "d"), "--resolution", "32", "--min_shapes", "1",
                                "--max_shapes", "1", "--n_train", "300", "--n_val", "5", "--n_test", "40"]))
    rows = measure_main(measure_args(["--data", str(data), "--real", "30", "--classifier_epochs", "12"]))
    assert list(rows) == ["real test images"] and rows["real test images"]["colour"]["n"] == 30
    # colour is easy for the classifier on real images; chance is 1/6
    assert rows["real test images"]["colour"]["share"] > 60.0
    assert "| real test images |" in markdown_table(rows)
    with pytest.raises(InputError, match="--name"):
        measure_args(["--data", str(data), "--set", "a", "--name", "x", "--name", "y"])


@pytest.mark.slow
def test_build_command_runs_every_step_and_exports_a_loadable_fp16_folder(tmp_path, capsys):
    from dataset.procedural import main as make_data, parse_args as data_args
    from demo.build_demo_model import main as build_main, parse_args as build_args
    from utils.models.sd_models import load_sd_pipeline

    data = make_data(data_args(["--output_dir", str(tmp_path / "d"), "--resolution", "32", "--min_shapes", "1",
                                "--max_shapes", "1", "--n_train", "40", "--n_val", "4", "--n_test", "4"]))
    out = build_main(build_args(["--data", str(data), "--work_dir", str(tmp_path / "work"),
                                 "--output_dir", str(tmp_path / "shipped"), "--unet_channels", "8", "16",
                                 "--text_encoder_layers", "1", "--vae_steps", "2", "--pretrain_steps", "2",
                                 "--continue_steps", "3"]))
    pretrained = json.loads((tmp_path / "work" / "pretrained" / "run_config.json").read_text())["args"]
    assert pretrained["max_train_steps"] == 2
    continued = json.loads((tmp_path / "work" / "continued" / "run_config.json").read_text())["args"]
    assert continued["max_train_steps"] == 3 and continued["lr_warmup_steps"] == 0
    assert continued["pretrained_model_name_or_path"] == str(tmp_path / "work" / "pretrained")
    pipe = load_sd_pipeline(str(out))
    assert pipe.unet.config.block_out_channels == [8, 16] and pipe.text_encoder.config.num_hidden_layers == 1
    assert pipe.vae.config.mid_block_add_attention is False
    assert not (tmp_path / "shipped.tmp").exists()
    # an interrupted build resumes: the same command again keeps every finished training step
    stamps = {d: (tmp_path / "work" / d / "run_config.json").stat().st_mtime_ns for d in ("pretrained", "continued")}
    capsys.readouterr()
    same_build = build_args(["--data", str(data), "--work_dir", str(tmp_path / "work"),
                             "--output_dir", str(tmp_path / "shipped"), "--unet_channels", "8", "16",
                             "--text_encoder_layers", "1", "--vae_steps", "2", "--pretrain_steps", "2",
                             "--continue_steps", "3"])
    build_main(same_build)
    assert capsys.readouterr().out.count("finished by an earlier run with the same options, kept") == 3
    assert stamps == {d: (tmp_path / "work" / d / "run_config.json").stat().st_mtime_ns for d in stamps}
    # a step that did not finish runs again, and so does every step after it (its input was remade)
    (tmp_path / "work" / "pretrained" / ".build_step.json").unlink()
    build_main(same_build)
    assert capsys.readouterr().out.count("finished by an earlier run with the same options, kept") == 1  # the VAE
    assert all(stamps[d] != (tmp_path / "work" / d / "run_config.json").stat().st_mtime_ns for d in stamps)
    # --vae_from: the same build on that folder's VAE, no VAE training (its weights arrive unchanged)
    rebuilt = build_main(build_args(["--data", str(data), "--work_dir", str(tmp_path / "work2"),
                                     "--output_dir", str(tmp_path / "rebuilt"), "--unet_channels", "8", "16",
                                     "--text_encoder_layers", "1", "--vae_from", str(out), "--pretrain_steps", "2"]))
    assert not (tmp_path / "work2" / "vae" / "logs").exists()  # pretrain_vae did not run
    again = load_sd_pipeline(str(rebuilt))
    for a, b in zip(pipe.vae.state_dict().values(), again.vae.state_dict().values()):
        assert torch.equal(a.float(), b.float())
    with pytest.raises(InputError, match="--vae_from"):
        build_args(["--data", str(data), "--vae_from", str(tmp_path / "nowhere")])
