"""The ablation table: rows in the paper's order, noise printed, movement shown."""
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from demo.ablation import ROOT, ROW_LABELS, VARIANTS, markdown, parse_variants, row_label, sampling_source, selected_rows
from utils.common.errors import InputError


def test_markdown_lists_rows_with_their_noise_and_movement():
    s = lambda m, sd: {k: {"mean": m, "std": sd} for k in ("r_mean", "img_r1", "txt_r1")}  # noqa: E731
    numbers = {"retrieval": {"random": s(10.0, 0.5), "mse_only": s(9.0, 1.0), "edge": s(12.0, 0.4)},
               "image_steps": {"random": 3000, "mse_only": 3000, "edge": 3000},
               "prompt_following": {}, "prompt_rank": {"real test images": {"share": 75.0, "lo": 70.0, "hi": 79.0,
                                                                             "n": 300}},
               "scorer_rank": {"real test images": {"share": 77.3, "lo": 72.3, "hi": 81.7, "n": 300}},
               "moved": {ROW_LABELS["edge"]: {"param_change": 0.0123, "pixel_change": 4.5}}}
    args = SimpleNamespace(base_model="assets/demo_sd", edge_config="configs/demo_edge.yaml", edge_flags="",
                           num_images=100, seeds=5, seed=0, follow_samples=300, rows=list(ROW_LABELS),
                           variants=dict(VARIANTS))
    md = markdown(args, numbers)
    lines = md.splitlines()
    rows = [line for line in lines if line.startswith("| ") and "±" in line]
    assert [r.split(" | ")[0][2:] for r in rows] == [ROW_LABELS[k] for k in ("random", "mse_only", "edge")]
    assert "12.0 ± 0.4" in md and "| 0.0123 | 4.50 |" in md
    assert "| real test images | 75.0 [70.0, 79.0] | 77.3 [72.3, 81.7] | 300 |" in md
    assert "STILL CLIMBING" not in md
    numbers["still_climbing"] = {"mse_only": {"mean": 4.0, "relative": 0.44}}
    flagged = [line for line in markdown(args, numbers).splitlines() if line.startswith("STILL CLIMBING")]
    assert flagged == [flagged[0]] and f"{ROW_LABELS['mse_only']} rose by 4.0 r_mean (44 % of its" in flagged[0]
    # the control, the two EDGE steps, EDGE with its terms at high noise only, with an ensemble scorer and with
    # shifted scorer inputs, on the guided prediction
    assert set(VARIANTS) == {"mse_only", "contrastive", "edge", "edge_tmin500", "edge_ensemble", "edge_shift",
                             "edge_guided", "edge_guided_unroll4"}
    assert list(ROW_LABELS)[:2] == ["random", "random_cpi5"] and list(ROW_LABELS)[-1] == "full_real"


def test_variants_add_rows_before_the_full_set_and_rows_pull_in_what_they_build_on():
    variants = parse_variants(["lora_edge=--trainable lora --learning_rate 1e-4"])
    assert variants["lora_edge"] == ["--trainable", "lora", "--learning_rate", "1e-4"]
    assert selected_rows(None, variants)[-2:] == ["lora_edge", "full_real"]
    # cpi 2 captions the EDGE set, so the EDGE row comes with it; the full set is always there
    assert selected_rows("random,edge_cpi2", variants) == ["random", "edge", "edge_cpi2", "full_real"]
    assert selected_rows("lora_edge", variants) == ["lora_edge", "full_real"]
    args = SimpleNamespace(variants=variants)
    assert row_label(args, "lora_edge") == "lora_edge: fine-tuned with --trainable lora --learning_rate 1e-4"
    assert row_label(args, "edge") == ROW_LABELS["edge"]
    args.variants["h"] = ["--pretrained_model_name_or_path", str(ROOT / "runs" / "h_sd"), "--seed", "1"]
    assert row_label(args, "h") == "h: fine-tuned with --pretrained_model_name_or_path runs/h_sd --seed 1"


def test_twin_rows_pull_in_their_set_and_run_by_default_for_edge_and_coverage():
    variants = dict(VARIANTS)
    assert selected_rows("twin_before", variants) == ["before", "twin_before", "full_real"]
    assert selected_rows("twin_edge_cpi5", variants) == ["edge", "edge_cpi5", "twin_edge_cpi5", "full_real"]
    assert selected_rows("twin_edge_coverage_scorer_cpi5", variants) == [
        "edge", "edge_coverage_scorer", "edge_coverage_scorer_cpi5", "twin_edge_coverage_scorer_cpi5", "full_real"]
    default = selected_rows(None, variants)
    assert [r for r in default if r.startswith("twin_")] == ["twin_edge", "twin_edge_coverage_scorer"]
    args = SimpleNamespace(variants=variants)
    assert row_label(args, "twin_edge") == f"real images behind the prompts of: {ROW_LABELS['edge']} (same captions)"


@pytest.mark.parametrize("spec", ["no_flags=", "=--trainable lora", "bad name=--x 1", "edge=--x 1", "plain",
                                  "braces=--x {nope}", "brace=--x {"])
def test_malformed_or_taken_variant_is_refused(spec):
    with pytest.raises(InputError, match="--variant"):
        parse_variants([spec])


def test_guided_row_reads_the_sampling_guidance_scale(tmp_path):
    from demo.ablation import sampling_guidance
    from utils.stages.sampling import DEFAULT_GUIDANCE_SCALE

    recipe = tmp_path / "sample.yaml"
    recipe.write_text("guidance_scale: 3.0\nnum_inference_steps: 10\n")
    assert sampling_guidance(SimpleNamespace(sample_config=str(recipe))) == 3.0
    recipe.write_text("num_inference_steps: 10\n")
    assert sampling_guidance(SimpleNamespace(sample_config=str(recipe))) == DEFAULT_GUIDANCE_SCALE
    assert VARIANTS["edge_guided"] == ["--edge_guidance_scale", "{guidance}"]
    assert parse_variants(["g5=--edge_guidance_scale {guidance} --seed 1"])["g5"][1] == "{guidance}"


def test_unknown_row_is_refused_with_the_known_ones():
    with pytest.raises(InputError, match="unknown row.*ranodm.*known: random"):
        selected_rows("ranodm", dict(VARIANTS))


def test_lora_run_is_sampled_as_base_model_plus_its_weights(tmp_path):
    lora, full = tmp_path / "lora", tmp_path / "full"
    lora.mkdir(), full.mkdir()
    (lora / "pytorch_lora_weights.safetensors").write_bytes(b"")
    (full / "model_index.json").write_text("{}")
    assert sampling_source("base", lora) == (Path("base"), ["--lora_weights", lora])
    assert sampling_source("base", full) == (full, [])


def test_each_row_reruns_only_when_what_it_reads_ran(tmp_path, monkeypatch):
    # a recording runner: which stage reads which (the ablation's rows are independent of each other)
    import demo.ablation as ablation

    calls, cmds = {}, {}

    class Recorder:
        def __init__(self, out):
            pass

        def run(self, name, cmd, done_check, after=None, **kw):
            calls[name], cmds[name] = after, [str(c) for c in cmd]
            return 0.0

    monkeypatch.setattr(ablation, "StageRunner", Recorder)
    args = ablation.parse_args(["--output_dir", str(tmp_path), "--full_epochs", "1", "--rows",
                                "random,before,mse_only,edge,edge_cpi2,edge_best4,edge_coverage_scorer,lora_edge,"
                                "twin_edge_coverage_scorer,edge_coverage_scorer_cpi5,edge_ensemble,edge_guided",
                                "--variant", "lora_edge=--trainable lora"])
    ablation.run_ablation(args)
    assert all(after is not None for after in calls.values()), calls  # no stage falls back to "all before me"
    assert calls["train_lora_edge"] == ["data", "eval_full_real"]
    assert set(calls["sample_lora_edge_100"]) == {"data", "train_lora_edge"}
    assert set(calls["sample_before_100"]) == {"data"}
    assert set(calls["eval_lora_edge"]) == {"data", "sample_lora_edge_100"}
    assert set(calls["caption_edge_cpi2"]) == {"data", "eval_full_real", "sample_edge_100"}
    assert set(calls["eval_edge_cpi2"]) == {"data", "caption_edge_cpi2"}
    assert set(calls["sample_edge_best4_100"]) == {"data", "train_edge", "eval_full_real"}
    assert calls["eval_random"] == ["data"]
    scorer = str(tmp_path / "scorer" / "seed_0")
    assert cmds["sample_edge_best4_100"][-2:] == ["--best_of_scorer", f"retrieval:{scorer}"]
    cov = cmds["sample_edge_coverage_scorer_100"]
    assert cov[cov.index("--coverage_text_encoder") + 1] == f"scorer:retrieval:{scorer}"
    assert set(calls["sample_edge_coverage_scorer_100"]) == {"data", "train_edge", "eval_full_real"}
    assert set(calls["caption_edge_coverage_scorer_cpi5"]) == {"data", "eval_full_real",
                                                               "sample_edge_coverage_scorer_100"}
    cap = cmds["caption_edge_coverage_scorer_cpi5"]
    assert cap[cap.index("--input_dir") + 1] == str(tmp_path / "sets" / "edge_coverage_scorer")
    twin = cmds["eval_twin_edge_coverage_scorer"]
    assert twin[twin.index("--distill_dir") + 1] == str(tmp_path / "sets" / "edge_coverage_scorer")
    assert "--real_twin" in twin and "eval_twin_edge" not in calls
    assert set(calls["eval_twin_edge_coverage_scorer"]) == {"data", "sample_edge_coverage_scorer_100"}
    calls.clear()
    twins = ablation.parse_args(["--output_dir", str(tmp_path), "--full_epochs", "1",
                                 "--rows", "twin_before,twin_edge,twin_edge_coverage"])
    info = ablation.run_ablation(twins)  # before and EDGE sample the same prompts: one real twin, evaluated once
    assert "eval_twin_before" in calls and "eval_twin_edge" not in calls and "eval_twin_edge_coverage" in calls
    assert info["evaluated_as"] == {"twin_before": "twin_before", "twin_edge": "twin_before",
                                    "twin_edge_coverage": "twin_edge_coverage"}
    ens = cmds["train_edge_ensemble"]  # the last --scorer wins: every seed's full-set model but the judge's
    members = [str(tmp_path / "scorer" / f"seed_{s}") for s in (0, 2, 3, 4)]
    assert ens[len(ens) - 1 - ens[::-1].index("--scorer") + 1] == "+".join(f"retrieval:{m}" for m in members)
    guided = cmds["train_edge_guided"]  # the scale the demo's sets are drawn at (configs/sample_demo.yaml)
    assert guided[guided.index("--edge_guidance_scale") + 1] == "3.0"
    with pytest.raises(InputError, match="--seeds 3 or more"):
        ablation.parse_args(["--output_dir", str(tmp_path), "--seeds", "2", "--rows", "edge_ensemble"])
    two = ablation.parse_args(["--output_dir", str(tmp_path), "--seeds", "2"])  # the default rows drop it instead
    assert "edge_ensemble" not in two.rows and "edge_guided" in two.rows


def test_stage_runner_redoes_a_stage_only_after_what_it_reads(tmp_path):
    import sys

    from demo.run_demo import StageRunner

    marker = tmp_path / "ran.txt"
    cmd = [sys.executable, "-c", f"import sys; open(r'{marker}', 'a').write(' '.join(sys.argv[1:]) + ';')"]
    runner = StageRunner(tmp_path)
    for name in ("b", "c"):  # finished earlier with the same command
        runner.state[name] = {"command": cmd[1:], "status": "done", "wall_time_s": 1.0}
    runner.run("a", cmd, marker.exists, fresh_flags=["--a"])
    runner.run("b", cmd, marker.exists, fresh_flags=["--b"], after=["x"])  # x did not run: b is kept
    runner.run("c", cmd, marker.exists, fresh_flags=["--c"], after=["a"])  # a ran: c starts over
    assert marker.read_text() == "--a;--c;"


@pytest.mark.parametrize("after", [None, ["a"]])
def test_stage_runner_redoes_a_stage_whose_input_was_redone_in_a_stopped_run(tmp_path, after):
    import sys

    from demo.run_demo import StageRunner

    marker = tmp_path / "ran.txt"
    cmd = [sys.executable, "-c", f"import sys; open(r'{marker}', 'a').write(' '.join(sys.argv[1:]) + ';')"]
    marker.write_text("")  # both stages' outputs exist
    runner = StageRunner(tmp_path)
    # a was redone (finished at 5) in a run stopped before b started again; c started after that
    runner.state["a"] = {"command": cmd[1:], "status": "done", "wall_time_s": 1.0, "started_at": 4.0,
                         "finished_at": 5.0}
    runner.state["b"] = {"command": cmd[1:], "status": "done", "wall_time_s": 1.0, "started_at": 3.0,
                         "finished_at": 3.5}
    runner.run("a", cmd, marker.exists, fresh_flags=["--a"])
    runner.run("b", cmd, marker.exists, fresh_flags=["--b"], after=after)
    assert marker.read_text() == "--b;"
    b = runner.state["b"]
    assert b["started_at"] > 5.0 and b["finished_at"] >= b["started_at"]


def test_quick_ablation_runs_a_set_and_its_real_twin_writes_the_grid_and_resumes(tmp_path, capsys):
    import demo.ablation as ablation

    out = tmp_path / "abl"
    argv = ["--output_dir", str(out), "--quick", "--seeds", "2", "--num_images", "8", "--follow_samples", "8",
            "--rows", "before,twin_before"]
    md = ablation.main(ablation.parse_args(argv)).read_text()
    numbers = json.loads((out / "ablation.json").read_text())
    assert set(numbers["retrieval"]) == {"before", "twin_before", "full_real"}
    assert f"| {row_label(SimpleNamespace(), 'twin_before')} |" in md and "![samples](samples.png)" in md
    assert Image.open(out / "samples.png").size[0] > 8 * 32
    twin = json.loads((out / "eval" / "twin_before" / "results.json").read_text())
    made = json.loads((out / "sets" / "before" / "manifest.json").read_text())
    assert twin["train_set"]["images"] == made["prompt_source"]["source_images"]  # the prompts' own real images
    capsys.readouterr()
    ablation.main(ablation.parse_args(argv))  # a rerun finds every stage finished
    ran = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[demo]")]
    assert ran and all(line.endswith("skipped") for line in ran)
