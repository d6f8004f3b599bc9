"""`aq-rollout`: the checks refuse bad copies before any traffic, a good copy is promoted, a canary is
watched through the gateway's /metrics, --rollback brings the old version back, MLflow's alias follows.

Repositories are the tiny ONNX ones of tests/gateway_repo.py (no torch); the gateway is a stand-in
that serves /metrics as the real one sums them (the canary against the real gateway is the lead's test).
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from adaptive_quant.cli import rollout
from adaptive_quant.core.manifest import load_manifest, save_manifest, sha256_file
from adaptive_quant.core.versions import VersionState, read_index
from adaptive_quant.export.rollout_checks import check_staged
from gateway_process import Traffic, free_port, stop_process, wait_ready
from gateway_repo import b64_instance, build_repo, images


@pytest.fixture(autouse=True)
def _no_real_mlflow(tmp_path, monkeypatch):
    """Never the developer's mlruns.db: a store that does not exist unless a test makes it."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'none' / 'mlflow.db'}")


@pytest.fixture
def serving(tmp_path) -> Path:
    return build_repo(tmp_path / "serving")


def snapshot(repo: Path) -> dict[str, str]:
    """Every file of the repository → its sha256."""
    return {str(p.relative_to(repo)): sha256_file(p) for p in sorted(repo.rglob("*")) if p.is_file()}


def change_network(repo: Path, key: str, change: Callable[[onnx.ModelProto], None]) -> None:
    """Rewrite variant `key`'s network with `change` and record its new sha256 and size."""
    manifest = load_manifest(repo)
    v = manifest.variants[key]
    path = repo / v.path
    model = onnx.load(str(path))
    change(model)
    onnx.save(model, str(path))
    manifest.variants[key] = dataclasses.replace(v, sha256=sha256_file(path), size_bytes=path.stat().st_size)
    save_manifest(repo, manifest)


def _set_init(model: onnx.ModelProto, name: str, fn: Callable[[np.ndarray], np.ndarray]) -> None:
    for i, init in enumerate(model.graph.initializer):
        if init.name == name:
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(fn(numpy_helper.to_array(init)), name))
            return
    raise KeyError(name)


def resaved(model):  # new bytes, the same network
    model.doc_string = "re-saved by the roll-out test"


PERM = np.roll(np.arange(10), 1)  # every class answered as its neighbour


def permuted(model):  # the rows of the last Gemm swapped: runs fine, answers a permuted class
    weight = "w2_q" if any(i.name == "w2_q" for i in model.graph.initializer) else "w2"
    _set_init(model, weight, lambda a: a[PERM])
    _set_init(model, "b2", lambda a: a[PERM])


def nan_output(model):
    _set_init(model, "b2", lambda a: np.full_like(a, np.nan))


def fails_warm_up(model):  # loads, but the Reshape cannot be done at any batch size
    node = next(n for n in model.graph.node if n.op_type == "Flatten")
    node.CopyFrom(helper.make_node("Reshape", [node.input[0], "bad_shape"], list(node.output)))
    model.graph.initializer.append(numpy_helper.from_array(np.array([3, -1], dtype=np.int64), "bad_shape"))


def staged_copy(tmp_path: Path, kind: str) -> Path:
    repo = build_repo(tmp_path / f"staged_{kind}")
    manifest = load_manifest(repo)
    if kind in ("good", "permuted"):
        for key in manifest.variants:
            change_network(repo, key, resaved if kind == "good" else permuted)
    elif kind == "nan":
        change_network(repo, "fp32", nan_output)
    elif kind == "warm_up":
        change_network(repo, "fp32", fails_warm_up)
    elif kind == "corrupt":  # garbage bytes whose sha256 the manifest carries: only loading it finds out
        path = repo / manifest.variants["int8"].path
        path.write_bytes(b"\x08\x07 not an onnx file" * 50)
        manifest.variants["int8"].sha256 = sha256_file(path)
        save_manifest(repo, manifest)
    elif kind == "wrong_sha":
        manifest.variants["fp16"].sha256 = "0" * 64
        save_manifest(repo, manifest)
    elif kind == "gate":
        manifest.variants["int8"].val_accuracy = 0.80  # 12 points below FP32's 0.92
        save_manifest(repo, manifest)
    elif kind == "classes":
        manifest.classes = list(reversed(manifest.classes))
        save_manifest(repo, manifest)
    else:
        raise ValueError(kind)
    return repo


def test_good_and_permuted_copies_pass_the_checks(tmp_path, serving):
    for kind in ("good", "permuted"):  # a permuted network runs fine: only the canary's agreement catches it
        report = check_staged(staged_copy(tmp_path, kind), load_manifest(serving))
        assert report.passed, report.failures


BAD = {
    "corrupt": "variant int8: ",
    "wrong_sha": "variant fp16: ",
    "nan": "variant fp32: 80 of 80 logits are NaN/Inf on seeded probe images",
    "warm_up": "variant fp32: fails warm-up on 8 probe image(s)",
    "gate": "variant int8: validation accuracy 80.00% is 12.00 points below fp32's 92.00%",
    "classes": "classes differs from the serving version's",
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_a_bad_copy_is_refused_before_any_traffic(tmp_path, serving, kind, caplog):
    staged = staged_copy(tmp_path, kind)
    before = snapshot(serving)
    assert rollout.main([str(staged), "--repository", str(serving), "--no-mlflow"]) == 2
    assert snapshot(serving) == before  # nothing added: no version 2, no versions.json, the same manifest
    assert BAD[kind] in caplog.text
    assert "refused" in caplog.text and "version 1 keeps serving" in caplog.text
    if kind == "corrupt":
        assert "does not load in ONNX Runtime" in caplog.text
    if kind == "wrong_sha":
        assert "the manifest says 000000000000" in caplog.text


def test_the_shift_check_compares_with_the_serving_version(tmp_path, serving, caplog):
    staged = staged_copy(tmp_path, "good")
    for repo, noise in ((serving, 0.80), (staged, 0.55)):
        m = load_manifest(repo)
        m.shift = {"int8": {"noise": noise, "blur": 0.7}, "replaced_int8": {}}
        save_manifest(repo, m)
    before = snapshot(serving)
    assert rollout.main([str(staged), "--repository", str(serving), "--no-mlflow"]) == 2
    assert snapshot(serving) == before
    assert "under noise the new INT8 answers 55.00%" in caplog.text


def test_without_a_gateway_a_good_copy_is_promoted_and_rolled_back_by_hand(tmp_path, serving, capsys):
    staged = staged_copy(tmp_path, "good")
    assert rollout.main([str(staged), "--repository", str(serving), "--no-mlflow"]) == 0
    assert load_manifest(serving).version == 2
    index = read_index(serving)
    assert index.serving == 2 and index.canary is None
    assert index.versions[1].state == VersionState.RETIRED
    assert "checks alone" in index.history[-1]["detail"]
    assert (serving / "tiny_int8" / "2" / "model.onnx").is_file()
    # Triton keeps version 1 loadable while the gateways switch; the next roll-out lets it go
    assert "versions: [ 1, 2 ]" in (serving / "tiny_int8" / "config.pbtxt").read_text()
    assert load_manifest(serving, verify_files=True).variants["int8"].path == "tiny_int8/2/model.onnx"
    assert "promoted: version 2 serves" in capsys.readouterr().out
    before = snapshot(serving)  # a versioned repository now: a bad copy leaves versions.json as it is too
    assert rollout.main([str(staged_copy(tmp_path, "nan")), "--repository", str(serving), "--no-mlflow"]) == 2
    assert snapshot(serving) == before

    assert rollout.main(["--repository", str(serving), "--rollback", "--no-mlflow"]) == 1
    assert load_manifest(serving).version == 1
    index = read_index(serving)
    assert index.serving == 1 and index.versions[2].state == VersionState.RETIRED
    assert "versions: [ 1, 2 ]" in (serving / "tiny_int8" / "config.pbtxt").read_text()  # both, while switching
    # nothing left to roll back to, and no canary to promote: refused, nothing changed
    before = snapshot(serving)
    assert rollout.main(["--repository", str(serving), "--rollback", "--no-mlflow"]) == 2
    assert rollout.main(["--repository", str(serving), "--promote", "--no-mlflow"]) == 2
    assert snapshot(serving) == before


def test_usage_errors(serving):
    with pytest.raises(SystemExit):
        rollout.main(["--repository", str(serving)])  # neither STAGED nor --promote/--rollback
    with pytest.raises(SystemExit):
        rollout.main(["x", "--repository", str(serving), "--rollback"])
    with pytest.raises(SystemExit):
        rollout.main(["x", "--repository", str(serving), "--min-agreement", "85"])  # a share, not a percentage


# ---- the canary, watched through a stand-in gateway's /metrics -------------------------------


class FakeGateway:
    """/metrics as a 2-worker gateway that follows versions.json sums them: once a canary is in the
    index it is held by both workers, and every scrape adds traffic to both versions."""

    def __init__(self, repo: Path, agreement: float, canary_state: str = "canary") -> None:
        self.repo, self.agreement, self.canary_state = repo, agreement, canary_state
        self.ticks = 0

    def metrics(self) -> bytes:
        r = CollectorRegistry()
        req = Counter("aq_version_requests", "", ["version", "outcome"], registry=r)
        budget = Counter("aq_version_budget", "", ["version", "result"], registry=r)
        mirror = Counter("aq_mirror_comparisons", "", ["version", "result"], registry=r)
        workers = Gauge("aq_model_version_workers", "", ["version", "state"], registry=r)
        index = read_index(self.repo)
        workers.labels(str(index.serving), "serving").set(2)
        req.labels(str(index.serving), "ok").inc(1000 + 90 * self.ticks)
        budget.labels(str(index.serving), "met").inc(1000 + 90 * self.ticks)
        if index.canary is not None:
            v = str(index.canary.version)
            workers.labels(v, self.canary_state).set(2)
            self.ticks += 1
            req.labels(v, "ok").inc(10 * self.ticks)
            budget.labels(v, "met").inc(10 * self.ticks)
            mirror.labels(v, "agree").inc(round(20 * self.ticks * self.agreement))
            mirror.labels(v, "disagree").inc(round(20 * self.ticks * (1 - self.agreement)))
        return generate_latest(r)


@contextmanager
def fake_gateway(gateway: FakeGateway) -> Iterator[str]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            body = gateway.metrics() if self.path == "/metrics" else b""
            self.send_response(200 if body else 404)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


CANARY_ARGS = ["--canary-seconds", "1", "--min-requests", "20", "--min-mirrored", "20", "--no-mlflow"]


@pytest.fixture
def fast_ticks(monkeypatch):
    monkeypatch.setattr(rollout, "TICK_S", 0.1)


def test_a_faithful_canary_is_promoted(tmp_path, serving, fast_ticks, capsys):
    staged = staged_copy(tmp_path, "good")
    with fake_gateway(FakeGateway(serving, agreement=1.0)) as url:
        code = rollout.main([str(staged), "--repository", str(serving), "--gateway", url, *CANARY_ARGS])
    assert code == 0
    index = read_index(serving)
    assert index.serving == 2 and load_manifest(serving).version == 2
    events = [h["event"] for h in index.history]
    assert events[-3:] == ["added", "canary", "promoted"]
    assert "every signal held" in index.history[-1]["detail"]
    out = capsys.readouterr().out
    assert "agreement 100.00%" in out and "s left" in out  # the per-second progress line


def test_a_canary_that_answers_wrongly_is_rolled_back(tmp_path, serving, fast_ticks, caplog):
    staged = staged_copy(tmp_path, "permuted")
    with fake_gateway(FakeGateway(serving, agreement=0.1)) as url:
        code = rollout.main([str(staged), "--repository", str(serving), "--gateway", url, *CANARY_ARGS])
    assert code == 1
    index = read_index(serving)
    assert index.serving == 1 and index.canary is None and load_manifest(serving).version == 1
    assert index.versions[2].state == VersionState.FAILED
    assert "agreement with the serving version 10.00%" in index.versions[2].detail
    assert "versions: [ 1 ]" in (serving / "tiny_int8" / "config.pbtxt").read_text()
    assert "rolled back version 2" in caplog.text


def test_a_canary_the_gateway_fails_to_load_is_rolled_back(tmp_path, serving, fast_ticks):
    staged = staged_copy(tmp_path, "good")
    with fake_gateway(FakeGateway(serving, agreement=1.0, canary_state="failed")) as url:
        code = rollout.main([str(staged), "--repository", str(serving), "--gateway", url, *CANARY_ARGS])
    assert code == 1
    assert "failed to load version 2" in read_index(serving).versions[2].detail


def test_an_unreachable_gateway_refuses_before_anything_is_added(tmp_path, serving):
    staged = staged_copy(tmp_path, "good")
    before = snapshot(serving)
    code = rollout.main([str(staged), "--repository", str(serving), "--gateway", "http://127.0.0.1:9", "--no-mlflow"])
    assert code == 2 and snapshot(serving) == before


# ---- MLflow's champion alias -----------------------------------------------------------------


def test_the_champion_alias_follows_promotion_and_rollback(tmp_path, serving, monkeypatch):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = MlflowClient(tracking_uri=uri)
    manifest = load_manifest(serving)
    for v in manifest.served_variants():  # as the first export registered them: champion = model version 1
        client.create_registered_model(v.triton_name)
        mv = client.create_model_version(v.triton_name, source=str(serving / v.triton_name / "1"))
        client.set_registered_model_alias(v.triton_name, "champion", mv.version)

    staged = staged_copy(tmp_path, "good")
    assert rollout.main([str(staged), "--repository", str(serving)]) == 0
    for v in manifest.served_variants():
        champion = client.get_model_version_by_alias(v.triton_name, "champion")
        assert str(champion.version) == "2"
        assert champion.tags["repository_version"] == "2"
        assert champion.tags["sha256"] == load_manifest(serving).variants[v.key].sha256
    event = read_index(serving).history[-1]
    assert event["event"] == "champion" and event["previous"] == {
        v.triton_name: "1" for v in manifest.served_variants()
    }

    assert rollout.main(["--repository", str(serving), "--rollback"]) == 1
    for v in manifest.served_variants():
        assert str(client.get_model_version_by_alias(v.triton_name, "champion").version) == "1"
    assert json.loads((serving / "versions.json").read_text())["serving"] == 1


# ---- the real gateway: 2 workers following versions.json, under load --------------------------


def test_over_a_real_gateway_a_copy_is_promoted_and_a_permuted_one_rolled_back(tmp_path, serving):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "adaptive_quant.cli.serve", "--repository", str(serving), "--port", str(port)]
    proc = subprocess.Popen(
        [*cmd, "--workers", "2", "--set", "rollout.poll_s=0.2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    args = ["--gateway", url, "--canary-share", "0.3", "--mirror-share", "0.5", "--canary-seconds", "5"]
    args += ["--min-requests", "10", "--min-mirrored", "10", "--no-mlflow"]
    try:
        wait_ready(proc, url)
        with Traffic(url, {"instances": [b64_instance(images(1, seed=3)[0])]}) as traffic:
            time.sleep(1)
            assert rollout.main([str(staged_copy(tmp_path, "good")), "--repository", str(serving), *args]) == 0
            time.sleep(1.5)  # every worker switches within rollout.poll_s
            promoted_at = len(traffic.seen)
            assert rollout.main([str(staged_copy(tmp_path, "permuted")), "--repository", str(serving), *args]) == 1
            time.sleep(1.5)
        statuses = {s for s, _ in traffic.seen}
        assert statuses == {200}, statuses
        assert {v for _, v in traffic.seen[:10]} == {"1"}
        assert {v for _, v in traffic.seen[-10:]} == {"2"}  # the permuted version 3 is gone again
        assert "3" in {v for _, v in traffic.seen[promoted_at:]}  # it did take its share while it was the canary
        index = read_index(serving)
        assert index.serving == 2 and index.versions[3].state == VersionState.FAILED
        assert "agreement" in index.versions[3].detail
    finally:
        stop_process(proc)
