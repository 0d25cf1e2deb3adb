"""The speed-up benchmarks run end to end on tiny settings and report consistent ratios."""
import os

import pytest

from utils.common.errors import InputError

os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.mark.slow
def test_train_step_benchmark_tiny(tmp_path, capsys):
    from benchmarks import train_step

    summary = train_step.main(train_step.parse_args([
        "--resolution", "32", "--scorer_size", "16", "--batch_size", "2", "--steps", "1", "--rounds", "1",
        "--threads", "1", "--variants", "edge_full", "edge_reduced", "edge_tiny",
        "--json_out", str(tmp_path / "r.json")]))
    assert set(summary) == {"plain", "plain_cached", "edge_full", "edge_reduced", "edge_tiny"}
    assert summary["plain"]["time_ratio"] == pytest.approx(1.0) == summary["plain"]["time_ratio_paired"]
    for s in summary.values():
        assert s["best_s"] > 0 and s["time_ratio"] == pytest.approx(s["best_s"] / summary["plain"]["best_s"])
        assert s["time_ratio_paired"] > 0
    out = capsys.readouterr().out
    assert "| edge_reduced |" in out and "decode error, reduced vs full" in out and "decode error, tiny" in out
    assert (tmp_path / "r.json").is_file()


@pytest.mark.slow
def test_evaluation_benchmark_tiny(capsys):
    from benchmarks import evaluation

    r = evaluation.main(evaluation.parse_args(["--n_images", "8", "--batch_size", "4", "--rounds", "1",
                                               "--image_size", "32", "--threads", "1"]))
    assert r["cached_s"] > 0 and r["uncached_s"] > 0
    assert r["ratio"] == pytest.approx(r["cached_s"] / r["uncached_s"])
    assert "cached / uncached epoch" in capsys.readouterr().out


def test_benchmark_flags_are_checked():
    from benchmarks import evaluation, train_step

    with pytest.raises(InputError):
        train_step.parse_args(["--batch_size", "1"])
    with pytest.raises(InputError):
        evaluation.parse_args(["--batch_size", "1"])
    assert len(evaluation.synthetic_captions(3, 2)) == 6
