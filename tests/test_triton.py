"""The gateway against a REAL Triton server: the tritonserver binary nvidia-pytriton ships, on the
Python-backend flavour of the tiny test repository. One server for the whole module (explicit
model control, 1 s exit timeout); the kill/restart test runs last and leaves it running.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

pytest.importorskip("pytriton", reason="needs nvidia-pytriton (pinned in requirements.txt)")

from adaptive_quant.core.manifest import load_manifest, sha256_file  # noqa: E402
from adaptive_quant.core.memory_policy import MemorySample  # noqa: E402
from adaptive_quant.export.triton_python import served_model_names, write_python_flavor  # noqa: E402
from adaptive_quant.serving.app import create_app  # noqa: E402
from adaptive_quant.serving.backends.embedded import EmbeddedBackend  # noqa: E402
from adaptive_quant.serving.backends.triton import TritonBackend  # noqa: E402
from adaptive_quant.serving.settings import load_settings  # noqa: E402
from adaptive_quant.tools.triton_server import LocalTriton, TritonServerConfig  # noqa: E402
from gateway_repo import b64_instance, build_repo, images  # noqa: E402
from http_server import serve_in_thread  # tests/http_server.py

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return build_repo(tmp_path_factory.mktemp("repo"))


@pytest.fixture(scope="module")
def pyrepo(repo, tmp_path_factory):
    return write_python_flavor(repo, tmp_path_factory.mktemp("pyrepo") / "repo")


@pytest.fixture(scope="module")
def triton(pyrepo, tmp_path_factory):
    cfg = TritonServerConfig.explicit(pyrepo, served_model_names(pyrepo), exit_timeout_s=1)
    server = LocalTriton(cfg, workdir=tmp_path_factory.mktemp("triton"))
    server.start(timeout_s=60)
    yield server
    server.stop()


def settings_for(repo, triton, **overrides):
    tree = {
        "repository": str(repo),
        "latency.ewma_alpha": 0.0,  # routing follows the profiles exactly
        "backend.kind": "triton",
        "backend.triton_url": triton.grpc_url,
        "backend.health_interval_s": 0.2,
        "breaker.cooldown_s": 0.5,
        **overrides,
    }
    return load_settings(overrides=tree, environ={})


@contextmanager
def http_gateway(settings, **app_kwargs):
    """The gateway app on a real socket (uvicorn in a thread); yields its base URL."""
    with serve_in_thread(create_app(settings, **app_kwargs)) as url:
        yield url


def triton_counts(triton) -> dict[tuple[str, str], float]:
    """{(metric, model): value} for nv_inference_count / nv_inference_exec_count from Triton's /metrics."""
    text = urllib.request.urlopen(triton.metrics_url, timeout=5).read().decode()
    out = {}
    for line in text.splitlines():
        for name in ("nv_inference_count", "nv_inference_exec_count"):
            if line.startswith(name + "{"):
                model = line.split('model="', 1)[1].split('"', 1)[0]
                out[(name, model)] = float(line.rsplit(" ", 1)[1])
    return out


def wait_for(predicate, timeout_s: float, what: str, step_s: float = 0.1):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def post(url, imgs, **headers):
    h = {k.replace("_", "-"): str(v) for k, v in headers.items()}
    return httpx.post(f"{url}/v1/classify", json={"instances": [b64_instance(i) for i in imgs]}, headers=h, timeout=30)


# ----------------------------------------------------------------------------- the repository flavour


def test_python_flavour_serves_the_same_onnx_files(repo, pyrepo):
    src, dst = load_manifest(repo), load_manifest(pyrepo, verify_files=True)  # sha256 still true
    assert sorted(dst.variants) == sorted(v.key for v in src.served_variants())
    for v in dst.variants.values():
        config = (pyrepo / v.triton_name / "config.pbtxt").read_text()
        assert 'backend: "python"' in config and "KIND_CPU" in config and "max_batch_size: 64" in config
        assert (pyrepo / v.triton_name / "1" / "model.py").is_file()
        assert sha256_file(pyrepo / v.path) == src.variants[v.key].sha256


# ----------------------------------------------------------------------------- serving


def test_backend_logits_equal_embedded_for_every_variant_over_grpc_and_http(repo, triton):
    manifest = load_manifest(repo)
    x = np.random.default_rng(0).normal(size=(70, 3, 32, 32)).astype(np.float32)  # > max_batch_size 64: split

    async def go():
        embedded = EmbeddedBackend(repo, manifest)
        grpc_b = TritonBackend(manifest, url=triton.grpc_url, protocol="grpc", health_interval_s=0)
        http_b = TritonBackend(manifest, url=triton.http_url, protocol="http", health_interval_s=0)
        for b in (embedded, grpc_b, http_b):
            await b.start()
        try:
            assert grpc_b.ready() and http_b.ready(), (grpc_b.variants(), http_b.variants())
            return {k: [await b.infer(k, x) for b in (embedded, grpc_b, http_b)] for k in ("fp32", "fp16", "int8")}
        finally:
            for b in (embedded, grpc_b, http_b):
                await b.close()

    for key, (ref, by_grpc, by_http) in asyncio.run(go()).items():
        np.testing.assert_allclose(by_grpc, ref, rtol=1e-5, atol=1e-5, err_msg=key)
        np.testing.assert_allclose(by_http, ref, rtol=1e-5, atol=1e-5, err_msg=key)


def test_gateway_on_triton_answers_like_embedded_and_triton_counts_the_inferences(repo, triton):
    imgs = images(12, seed=3)
    cases = [
        ({"X_Priority": "quality"}, imgs[:6]),
        ({"X_Priority": "speed"}, imgs[6:]),
        ({"X_Latency_Budget_Ms": "40"}, imgs[:3]),
    ]
    with TestClient(
        create_app(load_settings(overrides={"repository": str(repo), "latency.ewma_alpha": 0.0}, environ={}))
    ) as embedded:
        expected = [
            embedded.post(
                "/v1/classify",
                json={"instances": [b64_instance(i) for i in im]},
                headers={k.replace("_", "-"): v for k, v in h.items()},
            ).json()["predictions"]
            for h, im in cases
        ]
    with http_gateway(settings_for(repo, triton)) as url:
        status = httpx.get(f"{url}/v1/status").json()
        assert status["backend"] == "triton" and status["ready"], status
        before = triton_counts(triton)  # after the gateway's warm-up calls
        got = []
        for h, im in cases:
            r = post(url, im, **h)
            assert r.status_code == 200, r.text
            got.append(r.json()["predictions"])
        routed = httpx.get(f"{url}/v1/status").json()["routing"]["samples_by_variant"]
    for exp, g in zip(expected, got):
        assert [(p["class_id"], p["variant"]) for p in g] == [(p["class_id"], p["variant"]) for p in exp]
        np.testing.assert_allclose([p["confidence"] for p in g], [p["confidence"] for p in exp], atol=1e-5)
    served = [p["variant"] for g in got for p in g]
    assert {"fp32", "int8"} <= set(served)  # quality → fp32, speed and the 40 ms budget → int8
    assert routed == {k: served.count(k) for k in ("fp32", "fp16", "int8")}

    def counted():
        after = triton_counts(triton)
        delta = {
            k: after.get(("nv_inference_count", f"tiny_{k}"), 0) - before.get(("nv_inference_count", f"tiny_{k}"), 0)
            for k in ("fp32", "fp16", "int8")
        }
        return delta if delta == routed else None

    assert wait_for(counted, 5, f"Triton's nv_inference_count to match {routed}")
    after = triton_counts(triton)
    execs = after[("nv_inference_exec_count", "tiny_int8")] - before.get(("nv_inference_exec_count", "tiny_int8"), 0)
    assert 1 <= execs <= routed["int8"]  # batched executions: never more than samples


# ----------------------------------------------------------------------------- explicit model control


class FakeMemory:
    """The memory policy's measurement, set by the test (system memory %, the rest low)."""

    def __init__(self) -> None:
        self.system_pct = 50.0

    def __call__(self) -> MemorySample:
        return MemorySample(system_pct=self.system_pct, process_pct=1.0, server_pct=None)


def test_memory_policy_unloads_the_least_useful_variants_and_loads_them_back(repo, triton):
    probe = FakeMemory()
    settings = settings_for(
        repo,
        triton,
        **{
            "backend.model_control": "explicit",
            "memory.enabled": True,
            "memory.interval_s": 0.1,
            "memory.cooldown_s": 0.0,
            "memory.min_loaded": 1,
        },
    )
    with http_gateway(settings, memory_probe=probe) as url:
        img = images(1, seed=9)
        for _ in range(3):  # callers mostly want quality (fp32), a few want speed (int8); nobody needs fp16
            assert post(url, img, X_Priority="quality").status_code == 200
        assert post(url, img, X_Priority="speed").json()["predictions"][0]["variant"] == "int8"

        probe.system_pct = 95.0  # above system_high_pct (90)

        def loaded():
            return {v["key"] for v in httpx.get(f"{url}/v1/status").json()["variants"] if v["loaded"]}

        wait_for(lambda: loaded() == {"fp32"}, 20, "the policy to unload fp16 and int8")
        status = wait_for(
            lambda: (s := httpx.get(f"{url}/v1/status").json())["memory"]["last_decision"]["action"] == "hold" and s,
            5,
            "the policy to hold at min_loaded",
        )
        memory = status["memory"]
        assert [(a["action"], a["variant"]) for a in memory["history"]] == [("unload", "fp16"), ("unload", "int8")]
        assert (
            "dominated by fp32" in memory["history"][0]["reason"]
            and "system memory 95.0% > 90%" in memory["history"][0]["reason"]
        )
        assert memory["last_decision"]["action"] == "hold" and "min_loaded" in memory["last_decision"]["reason"]
        int8 = next(v for v in status["variants"] if v["key"] == "int8")
        assert not int8["routable"] and "memory policy" in int8["loaded_reason"]
        index = {
            m["name"]: m.get("state")
            for m in json.loads(
                urllib.request.urlopen(f"http://{triton.http_url}/v2/repository/index", data=b"{}", timeout=5).read()
            )
        }
        assert index["tiny_int8"] != "READY" and index["tiny_fp16"] != "READY" and index["tiny_fp32"] == "READY"
        r = post(url, img, X_Priority="speed")  # the router no longer sends anything to int8
        assert r.status_code == 200 and r.json()["predictions"][0]["variant"] == "fp32" and r.json()["fallbacks"] == 0
        assert 'aq_variant_loaded{variant="int8"} 0.0' in httpx.get(f"{url}/metrics").text

        probe.system_pct = 50.0  # below system_low_pct (80): memory eased
        wait_for(lambda: loaded() == {"fp32", "fp16", "int8"}, 30, "the policy to load int8 and fp16 back")
        history = httpx.get(f"{url}/v1/status").json()["memory"]["history"]
        assert [(a["action"], a["variant"]) for a in history[2:]] == [("load", "int8"), ("load", "fp16")]
        r = post(url, img, X_Priority="speed")
        assert r.status_code == 200 and r.json()["predictions"][0]["variant"] == "int8"  # used again


# ----------------------------------------------------------------------------- outage (keep last: restarts Triton)


def test_triton_killed_mid_traffic_then_restarted(repo, triton):
    with http_gateway(settings_for(repo, triton)) as url:
        stop = threading.Event()
        results: list[tuple[int, float]] = []  # (status, seconds)

        def caller(seed: int) -> None:
            imgs = images(2, seed=seed)
            with httpx.Client(base_url=url, timeout=30) as client:
                while not stop.is_set():
                    t = time.perf_counter()
                    r = client.post("/v1/classify", json={"instances": [b64_instance(i) for i in imgs]})
                    results.append((r.status_code, time.perf_counter() - t))

        threads = [threading.Thread(target=caller, args=(s,), daemon=True) for s in range(3)]
        for th in threads:
            th.start()
        wait_for(lambda: sum(s == 200 for s, _ in results) >= 6, 10, "traffic to flow")
        n_before = len(results)
        triton.kill()  # SIGKILL: no goodbye to in-flight requests
        wait_for(lambda: httpx.get(f"{url}/readyz").status_code == 503, 5, "/readyz to turn false")
        wait_for(lambda: len(results) >= n_before + 6, 10, "traffic to go on while Triton is down")
        stop.set()
        for th in threads:
            th.join(35)
        assert not any(th.is_alive() for th in threads), "a caller hangs"
        during = results[n_before:]
        assert {s for s, _ in during} <= {200, 503}, during  # fallback or 503; never a 500
        assert any(s == 503 for s, _ in during)
        assert max(t for _, t in during) < 5.0  # no hang: failures are fast
        body = httpx.post(f"{url}/v1/classify", json={"instances": [b64_instance(images(1)[0])]}).json()
        assert "unreachable" in body["error"]["message"] or "cannot serve" in body["error"]["message"]

        t0 = time.monotonic()
        triton.start(timeout_s=60)  # same ports; the gateway is not restarted
        wait_for(lambda: httpx.get(f"{url}/readyz").status_code == 200, 10, "/readyz to turn true again")
        r = wait_for(
            lambda: (r := post(url, images(2, seed=1), X_Priority="speed")).status_code == 200 and r,
            10,
            "classify to answer again",
        )
        assert r.json()["fallbacks"] == 0 and r.json()["predictions"][0]["variant"] == "int8"
        assert time.monotonic() - t0 < 30


def test_triton_local_script_says_how_to_install_when_pytriton_is_missing(tmp_path):
    code = (
        "import runpy, sys; sys.modules['pytriton'] = None; "
        f"sys.argv = ['triton_local.py', '--repository', {str(build_repo(tmp_path / 'r'))!r}, '--python-repository', "
        f"{str(tmp_path / 'py')!r}]; runpy.run_path({str(ROOT / 'scripts' / 'triton_local.py')!r}, run_name='__main__')"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "pip install nvidia-pytriton==0.7.0" in r.stderr
