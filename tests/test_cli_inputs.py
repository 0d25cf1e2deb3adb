"""Bad input and interruptions at the command line (issue 15): unusable output folders, Ctrl-C."""
import os

import pytest
from PIL import Image

from utils.common.errors import InputError, run_cli


# ----------------------------------------------------------------------------- Ctrl-C


def test_ctrl_c_is_one_line_and_exit_130(capsys):
    def main(args):
        raise KeyboardInterrupt

    code = run_cli(main, lambda argv: None, [])
    err = capsys.readouterr().err
    assert code == 130
    assert err.strip() == "interrupted; rerun the same command to resume"
    assert "Traceback" not in err


def test_ctrl_c_in_a_stage_script_is_one_line(tmp_path, monkeypatch, capsys):
    import caption_synthesis_gpt as gpt_script
    from dataset.distilled import write_distilled_set
    from utils.stages.captioning.gpt import GPTBackend

    (tmp_path / "set" / "images").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "set" / "images" / "000000.png")
    write_distilled_set(tmp_path / "set", [{"image": "images/000000.png", "captions": ["a"]}], {})
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-0123456789")

    def interrupted(self, requests):
        raise KeyboardInterrupt
        yield

    monkeypatch.setattr(GPTBackend, "generate", interrupted)
    code = gpt_script.script_entry(gpt_script.main, gpt_script.parse_args,
                                   ["--input_dir", str(tmp_path / "set"), "--output_dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 130 and "interrupted; rerun the same command to resume" in err and "Traceback" not in err


# ----------------------------------------------------------------------------- output folders


def _bad_output(tmp_path, monkeypatch, kind):
    """An output path that is a file, lies below a file, or lies in a folder that is not writable."""
    import utils.common.atomic_io as atomic_io

    (tmp_path / "f").write_text("x")
    if kind == "read_only":
        (tmp_path / "ro").mkdir()
        real = os.access
        monkeypatch.setattr(atomic_io.os, "access",
                            lambda p, mode, **k: False if str(p) == str(tmp_path / "ro") else real(p, mode))
        return tmp_path / "ro" / "out", "not writable"
    return {"file": (tmp_path / "f", "is a file"), "below_file": (tmp_path / "f" / "out", "is a file")}[kind]


KINDS = ["file", "below_file", "read_only"]


def _forbid(monkeypatch, target, name):
    def forbidden(*a, **k):
        raise AssertionError(f"{name} ran before the output folder was checked")

    monkeypatch.setattr(target, forbidden)


@pytest.mark.parametrize("kind", KINDS)
def test_check_output_dir_helper(tmp_path, monkeypatch, kind):
    from utils.common.atomic_io import check_output_dir

    out, expect = _bad_output(tmp_path, monkeypatch, kind)
    with pytest.raises(InputError, match=expect) as e:
        check_output_dir(out)
    assert "\n" not in str(e.value) and str(out) in str(e.value)
    check_output_dir(tmp_path / "new" / "deeper")  # a creatable path passes and is not created
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("kind", KINDS)
def test_train_output_dir_checked_before_models_load(tmp_path, monkeypatch, kind):
    import edge_diffusion_train as script

    out, expect = _bad_output(tmp_path, monkeypatch, kind)
    _forbid(monkeypatch, "utils.stages.training.train", "training")
    args = script.parse_args(["--output_dir", str(out), "--ann_root", str(tmp_path), "--dataset", "procedural"])
    with pytest.raises(InputError, match=rf"--output_dir .*{expect}"):
        script.main(args)


@pytest.mark.parametrize("kind", KINDS)
def test_evaluation_output_dir_checked_before_models_load(tmp_path, monkeypatch, kind):
    from evaluation import evaluation as script

    out, expect = _bad_output(tmp_path, monkeypatch, kind)
    _forbid(monkeypatch, "evaluation.evaluation._probe_image_encoder", "the image encoder")
    _forbid(monkeypatch, "utils.models.encoders.build_text_encoder", "the text encoder")
    args = script.parse_args(["--dataset", "procedural", "--ann_root", str(tmp_path), "--baseline", "random",
                              "--n", "2", "--output_dir", str(out), "--cpu", "--no_feature_cache"])
    with pytest.raises(InputError, match=rf"--output_dir .*{expect}"):
        script.main(args)


@pytest.mark.parametrize("script_name", ["caption_synthesis_gpt", "caption_synthesis_llava", "caption_synthesis_llama",
                                         "caption_synthesis_retrieval"])
@pytest.mark.parametrize("kind", ["below_file", "read_only"])
def test_caption_output_dir_checked_before_models_load(tmp_path, monkeypatch, kind, script_name):
    import importlib

    from utils.stages.captioning import runner

    script = importlib.import_module(script_name)
    out, expect = _bad_output(tmp_path, monkeypatch, kind)
    _forbid(monkeypatch, "utils.stages.captioning.runner.run_captioning", "captioning")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-0123456789")
    argv = ["--input_dir", str(tmp_path / "set"), "--output_dir", str(out)]
    if script_name == "caption_synthesis_retrieval":
        argv += ["--dataset", "procedural", "--ann_root", str(tmp_path)]
    with pytest.raises(InputError, match=rf"--output_dir .*{expect}"):
        script.main(script.parse_args(argv))
    assert runner  # the shared runner is not reached
