"""GPT backend through the real openai client on a mocked HTTP transport (no network)."""
import json
import threading
from pathlib import Path

import httpx
import pytest
from PIL import Image

import caption_synthesis_gpt as gpt_script
from dataset.distilled import read_distilled_set, write_distilled_set
from utils.common.errors import InputError

KEY = "sk-test-SECRET-0123456789"


def make_set(folder, n=4, corrupt=()):
    (folder / "images").mkdir(parents=True)
    records = []
    for i in range(n):
        rel = f"images/{i:06d}.png"
        if i in corrupt:
            (folder / rel).write_bytes(b"not a png")
        else:
            Image.new("RGB", (16, 16), (40 * i, 100, 200)).save(folder / rel)
        records.append({"image": rel, "captions": [f"a photo of object {i}"]})
    write_distilled_set(folder, records, {"sampling": {"seed": 7, "steps": 3}})
    return folder


def reply(body, texts):
    return httpx.Response(200, json={
        "id": "c", "object": "chat.completion", "created": 0, "model": body["model"],
        "choices": [{"index": j, "finish_reason": "stop", "message": {"role": "assistant", "content": t}}
                    for j, t in enumerate(texts)]})


class MockServer:
    """Answers chat completions; `plan(call_number, body)` may return a non-200 httpx.Response."""

    def __init__(self, plan=None, honour_n=True):
        self.plan, self.honour_n = plan, honour_n
        self.calls, self.lock = [], threading.Lock()

    def __call__(self, request):
        body = json.loads(request.content)
        with self.lock:
            self.calls.append({"body": body, "auth": request.headers.get("authorization")})
            k = len(self.calls)
        special = self.plan(k, body) if self.plan else None
        if special is not None:
            return special
        image_url = body["messages"][0]["content"][1]["image_url"]["url"]
        assert image_url.startswith("data:image/png;base64,")
        n = body.get("n", 1) if self.honour_n else 1
        return reply(body, [f'"The image shows picture number {k} variant {j}."' for j in range(n)])

    def client(self):
        return httpx.Client(transport=httpx.MockTransport(self))


def run(argv, server):
    return gpt_script.main(gpt_script.parse_args(argv), http_client=server.client())


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_gpt_captions_cleaned_manifest_and_key_never_written(tmp_path, key, capsys):
    src = make_set(tmp_path / "set")
    out = tmp_path / "out"
    server = MockServer()
    summary = run(["--input_dir", str(src), "--output_dir", str(out), "--cpi", "3", "--max_retries", "0"], server)
    assert len(server.calls) == 4 and all(c["body"]["n"] == 2 for c in server.calls)
    assert all(c["auth"] == f"Bearer {KEY}" for c in server.calls)
    assert server.calls[0]["body"]["model"] == "gpt-4o-mini"
    ds = read_distilled_set(out)
    for i, r in enumerate(ds.records):
        assert len(r["captions"]) == 3 and r["captions"][0] == f"a photo of object {i}"
        for c in r["captions"][1:]:
            assert c.startswith("Picture number ") and '"' not in c  # quotes and boilerplate removed
    m = ds.manifest
    assert m["sampling"] == {"seed": 7, "steps": 3}
    assert m["captions"]["backend"] == "gpt" and m["captions"]["model"] == "gpt-4o-mini"
    assert m["captions"]["cpi"] == 3 and "one brief sentence" in m["captions"]["instruction"]
    assert summary["failed"]["count"] == 0 and summary["short"]["count"] == 0
    logs = capsys.readouterr()
    assert KEY not in logs.out + logs.err
    for f in list(out.rglob("*")) + list(src.rglob("*")):
        if f.is_file():
            assert KEY.encode() not in f.read_bytes(), f


def test_gpt_429_then_success_is_retried_by_client(tmp_path, key):
    src = make_set(tmp_path / "set", n=1)
    server = MockServer(plan=lambda k, b: httpx.Response(429, headers={"retry-after-ms": "1"},
                                                         json={"error": {"message": "slow down"}}) if k == 1 else None)
    summary = run(["--input_dir", str(src), "--inplace", "--max_retries", "2"], server)
    assert len(server.calls) == 2
    assert summary["failed"]["count"] == 0
    assert len(read_distilled_set(src).records[0]["captions"]) == 2


def test_gpt_500_until_failure_is_reported_not_cached_and_retried_on_rerun(tmp_path, key, capsys):
    src = make_set(tmp_path / "set", n=2)
    bad = src / "images" / "000001.png"
    bad_url_tail = None

    def plan(k, body):
        url = body["messages"][0]["content"][1]["image_url"]["url"]
        if url.endswith(bad_url_tail):
            return httpx.Response(500, headers={"retry-after-ms": "1"}, json={"error": {"message": "boom"}})
        return None

    import base64
    bad_url_tail = base64.b64encode(bad.read_bytes()).decode()[-40:]
    server = MockServer(plan=plan)
    argv = ["--input_dir", str(src), "--output_dir", str(tmp_path / "out"), "--max_retries", "2"]
    summary = run(argv, server)
    assert len(server.calls) == 1 + 3  # one good image, the bad one tried 1 + 2 retries
    assert summary["failed"]["count"] == 1
    assert summary["failed"]["images"][0]["image"] == "images/000001.png"
    assert "500" in summary["failed"]["images"][0]["error"]
    ds = read_distilled_set(tmp_path / "out")
    assert [len(r["captions"]) for r in ds.records] == [2, 1]
    assert ds.manifest["captions"]["failed"]["count"] == 1
    assert "failed after retries" in capsys.readouterr().err
    # a rerun asks only for the failed image
    server2 = MockServer()
    summary2 = run(argv, server2)
    assert len(server2.calls) == 1 and summary2["failed"]["count"] == 0
    assert [len(r["captions"]) for r in read_distilled_set(tmp_path / "out").records] == [2, 2]


def test_gpt_malformed_reply_is_a_per_image_failure(tmp_path, key):
    src = make_set(tmp_path / "set", n=2)
    server = MockServer(plan=lambda k, b: httpx.Response(200, json={"unexpected": True}) if k == 1 else None)
    summary = run(["--input_dir", str(src), "--inplace", "--max_retries", "0", "--max_concurrency", "1"], server)
    assert summary["failed"]["count"] == 1 and "MalformedReply" in summary["failed"]["images"][0]["error"]
    assert sorted(len(r["captions"]) for r in read_distilled_set(src).records) == [1, 2]


def test_gpt_server_ignoring_n_gets_k_minus_1_requests(tmp_path, key):
    src = make_set(tmp_path / "set", n=2)
    server = MockServer(honour_n=False)
    run(["--input_dir", str(src), "--inplace", "--cpi", "4", "--max_retries", "0"], server)
    assert len(server.calls) == 2 * 3
    assert all(len(r["captions"]) == 4 for r in read_distilled_set(src).records)


def test_gpt_duplicates_are_topped_up_then_reported_short(tmp_path, key):
    src = make_set(tmp_path / "set", n=1)

    def same(k, body):  # always the prompt itself or one fixed sentence
        return reply(body, ["A photo of object 0!", "A red square."][: body["n"]] + ["a red  square"] * (body["n"] - 2))

    server = MockServer(plan=same)
    summary = run(["--input_dir", str(src), "--inplace", "--cpi", "3", "--max_retries", "0", "--rounds", "2"], server)
    assert len(server.calls) == 2  # first request + one top-up round
    assert summary["short"]["count"] == 1 and summary["short"]["images"] == ["images/000000.png"]
    assert read_distilled_set(src).records[0]["captions"] == ["a photo of object 0", "A red square."]
    assert read_distilled_set(src).manifest["captions"]["short"]["count"] == 1


def test_gpt_interrupted_run_resumes_without_new_requests(tmp_path, key, monkeypatch):
    import utils.stages.captioning.cache as cache_mod

    src = make_set(tmp_path / "set", n=6)
    out = tmp_path / "out"
    argv = ["--input_dir", str(src), "--output_dir", str(out), "--max_concurrency", "2", "--max_retries", "0"]
    real_append, written = cache_mod.append_jsonl, []

    def append_then_ctrl_c(path, record):  # Ctrl-C arrives while the 4th finished image is being saved
        if len(written) == 3:
            raise KeyboardInterrupt
        real_append(path, record)
        written.append(record["image"])

    monkeypatch.setattr(cache_mod, "append_jsonl", append_then_ctrl_c)
    server = MockServer()
    with pytest.raises(KeyboardInterrupt):
        run(argv, server)
    monkeypatch.setattr(cache_mod, "append_jsonl", real_append)
    assert len(server.calls) >= 4 and len(written) == 3
    assert not (out / "annotations" / "train.json").exists()
    server2 = MockServer()
    summary = run(argv, server2)
    asked = {c["body"]["messages"][0]["content"][1]["image_url"]["url"] for c in server2.calls}
    assert len(server2.calls) == 3 and summary["resumed_from_cache"] == 3
    assert len(asked) == 3
    assert all(len(r["captions"]) == 2 for r in read_distilled_set(out).records)
    server3 = MockServer()
    run(argv, server3)
    assert server3.calls == []


def test_gpt_missing_key_fails_before_any_request(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    src = make_set(tmp_path / "set", n=1)
    server = MockServer()
    with pytest.raises(InputError, match="OPENAI_API_KEY"):
        run(["--input_dir", str(src), "--inplace"], server)
    assert server.calls == []


def test_gpt_bad_inputs(tmp_path, key, capsys):
    src = make_set(tmp_path / "set", n=3, corrupt=(1,))
    server = MockServer()
    with pytest.raises(InputError, match="--cpi"):
        run(["--input_dir", str(src), "--inplace", "--cpi", "0"], server)
    with pytest.raises(InputError, match="not a distilled set"):
        run(["--input_dir", str(tmp_path), "--inplace"], server)
    with pytest.raises(InputError, match="000001.png"):
        run(["--input_dir", str(src), "--inplace", "--strict"], server)
    assert server.calls == []
    summary = run(["--input_dir", str(src), "--output_dir", str(tmp_path / "o")], server)
    assert summary["unreadable"] == {"count": 1, "images": ["images/000001.png"]}
    assert len(server.calls) == 2
    # the script's entry point: one-line error and exit code 2
    capsys.readouterr()
    code = gpt_script.script_entry(gpt_script.main, gpt_script.parse_args,
                                   ["--input_dir", str(tmp_path / "nope"), "--inplace"])
    err = capsys.readouterr().err
    assert code == 2 and "error: distilled set folder not found" in err and len(err.strip().splitlines()) == 1


def test_gpt_auth_error_stops_the_run_with_a_clear_message(tmp_path, key):
    src = make_set(tmp_path / "set", n=3)
    server = MockServer(plan=lambda k, b: httpx.Response(401, json={"error": {"message": f"bad key {KEY}"}}))
    with pytest.raises(InputError, match="refused") as e:
        run(["--input_dir", str(src), "--inplace", "--max_concurrency", "1"], server)
    assert KEY not in str(e.value)
    assert len(server.calls) <= 2


def test_gpt_cpi_1_and_recipe_defaults_with_flags_winning(tmp_path, key):
    src = make_set(tmp_path / "set", n=2)
    server = MockServer()
    recipe = Path(__file__).resolve().parent.parent / "configs" / "caption_gpt.yaml"
    summary = run(["--config", str(recipe), "--input_dir", str(src), "--output_dir", str(tmp_path / "o"),
                   "--cpi", "1"], server)
    assert server.calls == [] and summary["cpi"] == 1 and summary["model"] == "gpt-4o-mini"
    assert [r["captions"] for r in read_distilled_set(tmp_path / "o").records] == [["a photo of object 0"],
                                                                                   ["a photo of object 1"]]
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("x")
    with pytest.raises(InputError, match="not empty"):
        run(["--input_dir", str(src), "--output_dir", str(tmp_path / "busy")], server)
    with pytest.raises(InputError, match="exactly one"):
        run(["--input_dir", str(src)], server)


def test_gpt_base_url_credentials_are_never_written_or_printed(tmp_path, key, capsys):
    secret_url = "http://alice:pa55word@localhost:9/v1?api_key=QUERYSECRET"
    src = make_set(tmp_path / "set", n=2)
    out = tmp_path / "out"
    run(["--input_dir", str(src), "--output_dir", str(out), "--base_url", secret_url, "--max_retries", "0"],
        MockServer())
    written = "".join(p.read_text(errors="replace") for p in out.rglob("*") if p.is_file() and p.suffix != ".png")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["captions"]["settings"]["base_url"] == "http://***@localhost:9/v1?api_key=***"
    # a refused request: the one-line error names the server without its credentials
    server = MockServer(plan=lambda k, b: httpx.Response(401, json={"error": {"message": "no"}}))
    code = gpt_script.script_entry(lambda a: gpt_script.main(a, http_client=server.client()), gpt_script.parse_args,
                                   ["--input_dir", str(src), "--output_dir", str(tmp_path / "o2"),
                                    "--base_url", secret_url])
    err = capsys.readouterr().err
    assert code == 2 and "refused" in err and "localhost:9" in err
    for secret in ("pa55word", "alice", "QUERYSECRET", KEY):
        assert secret not in written and secret not in err


def test_run_config_and_redaction_helper_mask_credentials(tmp_path, monkeypatch, key):
    import argparse

    from utils.common.config import save_run_config
    from utils.common.errors import redact_secrets

    assert redact_secrets("see https://u:p@host/x and sk-abcdefghijkl") == "see https://***@host/x and ***"
    assert redact_secrets("http://host/v1") == "http://host/v1" and redact_secrets(None) is None
    monkeypatch.setattr("sys.argv", ["x.py", "--base_url", "http://bob:hunter2@h/v1"])
    path = save_run_config(argparse.Namespace(base_url="http://bob:hunter2@h/v1", prompts=[f"key {KEY}"]), tmp_path)
    text = path.read_text()
    assert "hunter2" not in text and "bob" not in text and KEY not in text and "http://***@h/v1" in text
