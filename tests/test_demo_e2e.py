"""End to end: the demo driver runs every stage (quick configuration), writes the report, and resumes."""
import json
import re
import sys

import pytest

from demo import run_demo
from demo.report import ROW_LABELS


@pytest.mark.slow
def test_quick_demo_runs_every_stage_writes_report_and_skips_on_rerun(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["--output_dir", str(out), "--quick", "--num_images", "8", "--seeds", "1"]
    report = run_demo.main(run_demo.parse_args(argv))

    state = json.loads((out / "demo_state.json").read_text())
    assert all(v["status"] == "done" for v in state.values()), state
    for name in ("data", "eval_full_real", "edge", "sample_sd_before_edge", "sample_edge_cpi1", "caption"):
        assert name in state
    for name in ROW_LABELS:
        results = json.loads((out / "eval" / name / "results.json").read_text())
        assert set(results["summary"]) >= {"img_r1", "txt_r1", "r_mean"}
    # the EDGE set after caption synthesis holds 8 images with 2 captions each
    ann = json.loads((out / "sets" / "edge_cpi2" / "annotations" / "train.json").read_text())
    assert len({e["image"] for e in ann}) == 8
    text = report.read_text()
    for png in re.findall(r"\((report_assets/[^)]+\.png)\)", text):
        assert (out / png).is_file(), png
    assert "samples.png" in text and "| full real training set |" in text
    assert text.count("± ") >= 5 * 7  # five rows of seven metrics

    # a rerun with the same flags runs nothing again (each stage checked by its outputs)
    capsys.readouterr()
    run_demo.main(run_demo.parse_args(argv))
    printed = capsys.readouterr().out
    assert "done in" not in printed
    assert printed.count("skipped") == len(state)


def test_stage_runner_resumes_an_unfinished_stage_and_redoes_later_ones(tmp_path):
    runner = run_demo.StageRunner(tmp_path)
    marker = tmp_path / "ran.txt"
    cmd = [sys.executable, "-c", f"import sys; open(r'{marker}', 'a').write(' '.join(sys.argv[1:]) + ';')"]
    runner.state["a"] = {"command": cmd[1:], "status": "started"}  # as a stopped run leaves it
    runner.run("a", cmd, marker.exists, resume_flags=["--resume"], fresh_flags=["--fresh"])
    assert marker.read_text() == "--resume;"
    # b finished earlier with the same command, but a (upstream) ran now, so b starts over
    runner.state["b"] = {"command": cmd[1:], "status": "done", "wall_time_s": 1.0}
    runner.run("b", cmd, marker.exists, resume_flags=["--resume"], fresh_flags=["--fresh"])
    assert marker.read_text() == "--resume;--fresh;"
    # a new runner over the saved state skips both
    again = run_demo.StageRunner(tmp_path)
    again.run("a", cmd, marker.exists)
    again.run("b", cmd, marker.exists)
    assert marker.read_text() == "--resume;--fresh;"


def test_report_reading_follows_the_numbers():
    from demo.report import reading

    def res(mean, std):
        return {"summary": {"r_mean": {"mean": mean, "std": std}}}

    lines = reading({"random_100": res(10.0, 1.0), "edge_cpi2": res(5.0, 1.0), "full_real": res(60.0, 1.0)}, {}, 3)
    assert any("behind random real pairs by 5.0" in x for x in lines)
    assert any("loses to the same number of random real pairs" in x for x in lines)
    close = reading({"random_100": res(10.0, 1.0), "edge_cpi2": res(11.0, 1.0)}, {}, 3)
    assert any("within one std" in x for x in close) and not any("loses" in x for x in close)
    single = reading({"random_100": res(10.0, 0.0), "edge_cpi2": res(11.0, 0.0)}, {}, 1)
    assert single[0].startswith("One seed") and not any("within one std" in x for x in single)
    level = reading({"random_100": res(10.0, 1.0), "edge_cpi2": res(9.5, 1.0)}, {}, 3)
    assert any("level with (not above)" in x for x in level) and not any("loses" in x for x in level)


def test_report_reading_names_the_attributes_the_generator_misses():
    from demo.report import reading

    def res(mean, std):
        return {"summary": {"r_mean": {"mean": mean, "std": std}}}

    def share(p, lo, hi):
        return {"share": p, "lo": lo, "hi": hi}

    real = {k: share(100, 98, 100) for k in ("colour", "shape", "size", "position", "background", "all")}
    good = dict(real)
    weak = {**real, "shape": share(40, 35, 45), "all": share(40, 35, 45)}
    rows = {"random_100": res(10.0, 0.5), "edge_cpi2": res(5.0, 0.5)}
    missed = reading(rows, {"real test images": real, "samples before EDGE": weak, "samples after EDGE": weak}, 3)
    assert any("falls short of real images in shape" in x for x in missed)
    faithful = reading(rows, {"real test images": real, "samples before EDGE": good, "samples after EDGE": good}, 3)
    assert any("not the generator's drawing" in x for x in faithful)


def test_full_set_epochs_make_the_ceiling_see_at_least_the_small_rows_images():
    from demo.run_demo import full_set_epochs

    assert full_set_epochs(4000, 100, 30) == 2          # 8,000 image steps >= 3,000 (the minimum of 2 holds)
    assert full_set_epochs(1000, 100, 30) == 3          # 2 epochs would be 2,000 < 3,000
    assert full_set_epochs(700, 100, 30) == 5           # ceil(3000 / 700)
    assert full_set_epochs(0, 100, 30) == 3000          # an empty split does not divide by zero


def test_report_flags_a_ceiling_below_its_floor_and_prints_image_steps():
    from demo.report import image_steps, reading

    def res(mean, std):
        return {"summary": {"r_mean": {"mean": mean, "std": std}}}

    lines = reading({"random_100": res(10.3, 0.5), "full_real": res(5.2, 2.1)}, {}, 3)
    assert lines[0].startswith("FAILED MEASUREMENT") and "5.2" in lines[0] and "10.3" in lines[0]
    ok = reading({"random_100": res(10.3, 0.5), "full_real": res(60.0, 2.1)}, {}, 3)
    assert not any("FAILED" in x or "WEAK" in x for x in ok)
    # above its floor but within noise of it (a 1,000-image set at 3,000 image steps: 23.7 +- 7.3 vs 23.2 +- 1.1)
    weak = reading({"random_100": res(23.2, 1.1), "full_real": res(23.7, 7.3)}, {}, 3)
    assert weak[0].startswith("WEAK CEILING") and "23.7 ± 7.3" in weak[0] and "23.2 ± 1.1" in weak[0]
    assert image_steps({"train_set": {"n_images": 1012}, "config": {"epochs": 2}}) == "2024"
    assert image_steps({"config": {"epochs": 2}}) == "?"


def test_report_flags_students_still_climbing_at_their_last_evaluation():
    from demo.report import reading

    def res(mean, curves):
        return {"summary": {"r_mean": {"mean": mean, "std": 1.0}},
                "history": {str(i): [{"epoch": 10 * (j + 1), "test": {"r_mean": v}} for j, v in enumerate(c)]
                            for i, c in enumerate(curves)}}

    rising = reading({"random_100": res(13.0, [[2.0, 12.0], [3.0, 14.0]]),
                      "full_real": res(60.0, [[59.0, 60.0], [60.5, 60.0]])}, {}, 2)
    flagged = [x for x in rising if x.startswith("STILL CLIMBING")]
    assert len(flagged) == 1 and "random real pairs rose by 10.5" in flagged[0] and "full real" not in flagged[0]
    flat = reading({"random_100": res(18.0, [[17.8, 17.9], [18.3, 18.3]])}, {}, 2)
    assert not any(x.startswith("STILL CLIMBING") for x in flat)
