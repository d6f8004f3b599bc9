"""`aq-serve --engine ray` as a user runs it: a real local Ray cluster started by the process, the
gateway as a Ray Serve application (an ingress over one deployment per variant), reached over HTTP.

In order, on one running service: /v1 with the routing headers and a clear 4xx for bad input,
tritonclient over /v2, the replicas in /v1/status, a roll-out as an application update under
traffic (no request lost), and SIGTERM (everything stops within 60 s, no Ray process left)."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
import tritonclient.http as triton_http

from adaptive_quant.core.images import to_model_input
from adaptive_quant.data import CIFAR10_MEAN, CIFAR10_STD
from adaptive_quant.export.versions import add_serving_version
from gateway_process import Traffic, free_port
from gateway_repo import MODEL, b64_instance, build_repo, images, pixels_instance
from test_rollout_gateway import start_canary

START_TIMEOUT_S = 240  # the bound for a start on 2 cores


class RayService:
    def __init__(self, root: Path, extra: list[str] | None = None, env: dict[str, str] | None = None) -> None:
        self.repo = build_repo(root / "repo")
        self.staged = build_repo(root / "staged")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = root / "serve.log"
        cmd = [
            sys.executable,
            "-m",
            "adaptive_quant.cli.serve",
            "--config",
            "",
            "--repository",
            str(self.repo),
            "--engine",
            "ray",
            "--port",
            str(self.port),
            "--set",
            "variants=[int8,fp32]",  # two deployments: fewer processes on 2 cores
            "--set",
            "rollout.poll_s=0.2",
            "--set",
            "profiling.budget_s=0.5",
            *(extra or []),
        ]
        clean = {k: v for k, v in os.environ.items() if not k.startswith(("AQ_", "RAY_"))}
        self.started = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdout=self.log.open("w"), stderr=subprocess.STDOUT, env=clean | (env or {}))

    def output(self) -> str:
        return self.log.read_text()

    def wait_ready(self) -> float:
        deadline = self.started + START_TIMEOUT_S
        while "ready in" not in self.output():
            assert self.proc.poll() is None, f"aq-serve --engine ray exited ({self.proc.returncode}):\n{self.output()}"
            assert time.monotonic() < deadline, f"not ready within {START_TIMEOUT_S} s:\n{self.output()[-3000:]}"
            time.sleep(0.2)
        return time.monotonic() - self.started

    def processes(self) -> list[psutil.Process]:
        return psutil.Process(self.proc.pid).children(recursive=True)


def _body(n: int = 1, seed: int = 0) -> dict:
    return {"instances": [b64_instance(img) for img in images(n, seed=seed)]}


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    svc = RayService(tmp_path_factory.mktemp("ray_engine"))
    try:
        svc.took = svc.wait_ready()
        yield svc
    finally:
        if svc.proc.poll() is None:  # a test failed before the SIGTERM test: leave nothing behind
            for p in svc.processes():
                p.kill()
            svc.proc.kill()


def test_v1_answers_with_the_routing_headers_and_bad_input_gets_a_clear_4xx(service):
    assert service.took < START_TIMEOUT_S
    r = httpx.post(
        f"{service.url}/v1/classify",
        json=_body(3),
        headers={"X-Latency-Budget-Ms": "5000", "X-Priority": "quality", "X-Request-Id": "ray-req-1"},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert len(preds) == 3 and all(p["label"] and p["passes"] for p in preds)
    assert r.headers["X-Precision"] in {"int8", "fp32"}
    assert r.headers["X-Budget-Met"] in {"true", "false"}
    assert r.headers["X-Model-Version"] == "1"
    assert r.headers["X-Request-Id"] == "ray-req-1"  # the caller's id, once
    bad = httpx.post(f"{service.url}/v1/classify", json={"instances": [{"pixels": [[1, 2]]}]}, timeout=30)
    assert bad.status_code == 422 and "pixels" in bad.json()["error"]["message"]  # what was wrong, and what is accepted
    pinned = httpx.post(f"{service.url}/v1/classify", json=_body(1), headers={"X-Min-Precision": "fp32"}, timeout=30)
    assert pinned.status_code == 200 and pinned.headers["X-Precision"] == "fp32"  # still serving


def test_tritonclient_infers_over_v2_and_agrees_with_v1(service):
    imgs = images(4, seed=3)
    x = to_model_input(imgs, CIFAR10_MEAN, CIFAR10_STD)
    client = triton_http.InferenceServerClient(service.url.removeprefix("http://"))
    try:
        assert client.is_server_ready() and client.is_model_ready(MODEL)
        t = triton_http.InferInput("images", list(x.shape), "FP32")
        t.set_data_from_numpy(x)
        result = client.infer(f"{MODEL}_int8", [t])  # one variant by its Triton name: deterministic passes
    finally:
        client.close()
    v1 = httpx.post(
        f"{service.url}/v1/classify",
        json={"instances": [pixels_instance(i) for i in imgs]},
        headers={"X-Min-Precision": "int8"},
        params={},
        timeout=30,
    )
    logits = result.as_numpy("logits")
    assert logits.shape == (4, 10) and np.isfinite(logits).all()
    pinned = httpx.post(
        f"{service.url}/v2/models/{MODEL}_int8/infer",
        json={"inputs": [{"name": "images", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]},
        timeout=30,
    )
    assert pinned.status_code == 200 and v1.status_code == 200
    again = np.array(pinned.json()["outputs"][0]["data"], np.float32).reshape(4, 10)
    assert np.allclose(again, logits, atol=1e-4)  # the same deployment answers the same logits


def test_status_shows_the_variants_replicas_on_ray(service):
    status = httpx.get(f"{service.url}/v1/status", timeout=30).json()
    assert status["backend"] == "ray" and status["ready"]
    by_key = {v["key"]: v for v in status["variants"]}
    assert set(by_key) == {"int8", "fp32"}
    int8 = by_key["int8"]["batching"]
    assert int8["replicas"] >= 1 and int8["calls"] >= 1 and int8["samples"] >= int8["calls"]
    assert len(int8["replicas_seen"]) >= 1  # replica id → node id
    assert by_key["int8"]["latency"]["replicas"] >= 1


def test_a_roll_out_is_an_application_update_and_loses_no_request(service):
    with Traffic(service.url, _body(2, seed=5), budget_ms=5000, pause_s=0.02) as traffic:
        deadline = time.monotonic() + 30
        while len(traffic.seen) < 10:
            assert time.monotonic() < deadline, "no traffic"
            time.sleep(0.1)
        n, _ = add_serving_version(service.staged, service.repo)  # what aq-export into a serving repository does
        assert n == 2
        deadline = time.monotonic() + 180
        while "RUNNING with versions [2]" not in service.output():
            assert time.monotonic() < deadline, f"no application update:\n{service.output()[-3000:]}"
            time.sleep(0.2)
        after = len(traffic.seen)
        deadline = time.monotonic() + 30
        while len(traffic.seen) < after + 10:
            assert time.monotonic() < deadline, "no answers after the update"
            time.sleep(0.1)
    statuses = [code for code, _ in traffic.seen]
    versions = [v for _, v in traffic.seen]
    assert set(statuses) == {200}, f"lost: {len(statuses) - statuses.count(200)} of {len(statuses)}"
    assert versions[0] == "1" and set(versions[after:]) == {"2"}  # once updated, only the new version answers
    assert "(roll-out" in service.output()


def test_a_canary_is_deployed_by_the_same_update_and_answers_its_share(service):
    third = build_repo(service.log.parent / "third")
    n = start_canary(service.repo, third, share=0.5, mirror_share=0.0)  # what aq-rollout does first
    assert n == 3
    deadline = time.monotonic() + 180
    while "RUNNING with versions [2, 3]" not in service.output():
        assert time.monotonic() < deadline, f"no application update:\n{service.output()[-3000:]}"
        time.sleep(0.2)
    seen = [
        httpx.post(f"{service.url}/v1/classify", json=_body(1, seed=i), timeout=30).headers.get("X-Model-Version")
        for i in range(40)
    ]
    assert set(seen) == {"2", "3"}  # both versions answer: the serving one and the canary, by its share
    assert 5 <= seen.count("3") <= 35


def test_sigterm_drains_deletes_the_application_and_leaves_no_ray_process(service):
    children = service.processes()
    names = " ".join(p.name() for p in children)
    assert "raylet" in names and "gcs_server" in names  # the local cluster is this process's own
    t = time.monotonic()
    service.proc.send_signal(signal.SIGTERM)
    code = service.proc.wait(90)
    took = time.monotonic() - t
    assert code == 0, service.output()[-3000:]
    assert took < 60, f"stopping took {took:.0f} s"
    time.sleep(1)
    left = [p for p in children if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not left, f"left behind: {[p.cmdline()[:2] for p in left]}"
    assert "the local Ray cluster is down" in service.output()


def test_joining_a_running_cluster_serves_and_sigterm_deletes_the_application_but_leaves_the_cluster(tmp_path):
    """A cluster someone else started (`ray start --head`): aq-serve joins it, serves, and on SIGTERM
    deletes its application and leaves the cluster running."""
    gcs = free_port()
    # token authentication, as Ray 2.60 sets up a cluster by default; a client joining by address must
    # say so itself (RAY_AUTH_MODE) and hold the token
    token = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AQ_", "RAY_"))} | token
    head = subprocess.Popen(
        [str(Path(sys.executable).with_name("ray")), "start", "--head", f"--port={gcs}", "--num-cpus=2"]
        + ["--include-dashboard=false", "--object-store-memory=100000000", "--disable-usage-stats", "--block"],
        stdout=(tmp_path / "head.log").open("w"),
        stderr=subprocess.STDOUT,
        env=env,
    )
    try:
        deadline = time.monotonic() + 60
        while "Ray runtime started" not in (tmp_path / "head.log").read_text():
            assert head.poll() is None and time.monotonic() < deadline, (tmp_path / "head.log").read_text()
            time.sleep(0.2)
        key = {"AQ_SERVER__API_KEY": "ray-s3cret"}  # the API key guards /v1 on Ray as on uvicorn
        svc = RayService(tmp_path, ["--ray-address", f"127.0.0.1:{gcs}"], env=token | key)
        try:
            svc.wait_ready()
            r = httpx.post(f"{svc.url}/v1/classify", json=_body(2), headers={"X-API-Key": "ray-s3cret"}, timeout=30)
            assert r.status_code == 200 and len(r.json()["predictions"]) == 2
            refused = httpx.post(f"{svc.url}/v1/classify", json=_body(1), timeout=30)
            assert refused.status_code == 401
            assert httpx.get(f"{svc.url}/metrics", timeout=30).status_code == 200  # left open, as on uvicorn
            assert "joining the Ray cluster" in svc.output()
            svc.proc.send_signal(signal.SIGTERM)
            assert svc.proc.wait(90) == 0, svc.output()[-3000:]
        finally:
            if svc.proc.poll() is None:
                svc.proc.kill()
        assert head.poll() is None  # the cluster was not this process's own: still running
        with pytest.raises(httpx.HTTPError):  # ...but the application and its proxy are gone
            httpx.post(f"{svc.url}/v1/classify", json=_body(1), timeout=5).raise_for_status()
    finally:
        head.send_signal(signal.SIGTERM)  # --block: the head's processes go with it
        try:
            head.wait(60)
        except subprocess.TimeoutExpired:
            head.kill()
