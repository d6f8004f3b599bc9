"""Safety and faults a deployment meets: API key, default limits and bind address, graceful
drain on SIGTERM, and files that would run code when loaded."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from adaptive_quant.core.net import is_loopback
from adaptive_quant.data import DataError, read_cifar_split
from adaptive_quant.serving.app import create_app
from adaptive_quant.serving.settings import ServeSettings, SettingsError, load_settings
from gateway_process import free_port, wait_ready
from gateway_repo import b64_instance, build_repo, images
from http_server import serve_in_thread

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return build_repo(tmp_path_factory.mktemp("repo"))


def body(n: int = 1) -> dict:
    return {"instances": [b64_instance(im) for im in images(n)]}


# ----------------------------------------------------------------------------- API key


def test_with_an_api_key_a_missing_or_wrong_key_gets_401_and_the_right_one_is_served(repo):
    settings = load_settings(overrides={"repository": str(repo)}, environ={"AQ_SERVER__API_KEY": "0x1F"})
    assert settings.server.api_key == "0x1F"  # typed text stays text (YAML would read 31)
    with serve_in_thread(create_app(settings)) as url, httpx.Client(base_url=url) as c:
        for headers in (
            {},
            {"X-API-Key": "0x1E"},
            {"X-API-Key": ""},
            {"Authorization": "Bearer nope"},
            {"Authorization": "Basic MHgxRg=="},
        ):
            r = c.post("/v1/classify", json=body(), headers=headers)
            assert r.status_code == 401, (headers, r.text)
            assert "X-API-Key" in r.json()["error"]["message"] and r.json()["error"]["type"] == "unauthorized"
            assert r.headers["WWW-Authenticate"].startswith("Bearer")
        assert c.get("/v1/status").status_code == 401
        assert c.get("/openapi.json").status_code == 401  # the whole API, not only classify
        r = c.post("/v1/classify", json=body(), headers={"X-API-Key": "0x1F"})
        assert r.status_code == 200 and len(r.json()["predictions"]) == 1
        r = c.post("/v1/classify", json=body(), headers={"Authorization": "Bearer 0x1F"})
        assert r.status_code == 200
        # probes and the scrape stay open: orchestrators and Prometheus carry no secret
        assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200
        scrape = c.get("/metrics").text
        assert "aq_unauthorized_total 7.0" in scrape  # 5 classify + status + openapi
        assert 'aq_requests_total{outcome="ok"} 2.0' in scrape  # refused requests never reached classify


def test_without_a_key_configured_no_key_is_asked_for(repo):
    with serve_in_thread(create_app(ServeSettings(repository=str(repo)))) as url:
        assert httpx.post(f"{url}/v1/classify", json=body()).status_code == 200


def test_the_key_can_come_from_a_file_and_bad_key_settings_are_refused(tmp_path, repo):
    key_file = tmp_path / "key"
    key_file.write_text("  s3cret\n")
    s = load_settings(overrides={"repository": str(repo), "server.api_key_file": str(key_file)}, environ={})
    assert s.server.api_key == "s3cret"
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings(overrides={"server.api_key_file": str(tmp_path / "none")}, environ={})
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(SettingsError, match="is empty"):
        load_settings(overrides={"server.api_key_file": str(tmp_path / "empty")}, environ={})
    with pytest.raises(SettingsError, match="both set"):
        load_settings(overrides={"server.api_key": "a", "server.api_key_file": str(key_file)}, environ={})


# ----------------------------------------------------------------------------- defaults


def test_defaults_bind_loopback_and_limit_request_size(repo):
    s = load_settings(ROOT / "configs" / "serve.yaml", environ={})
    assert s.server.host == "127.0.0.1" and ServeSettings().server.host == "127.0.0.1"
    assert is_loopback(s.server.host) and is_loopback("::1") and not is_loopback("0.0.0.0")
    assert s.limits.max_request_bytes == 2 * 1024 * 1024 and s.server.api_key == ""
    with serve_in_thread(create_app(ServeSettings(repository=str(repo)))) as url, httpx.Client(base_url=url) as c:
        big = b'{"instances": [' + b" " * (3 * 1024 * 1024) + b"]}"
        r = c.post("/v1/classify", content=big, headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and "at most 2097152" in r.json()["error"]["message"]

        def chunks():  # no Content-Length: the limit must hold while streaming
            yield b'{"instances": ['
            for _ in range(48):
                yield b" " * 65536

        r = c.post("/v1/classify", content=chunks(), headers={"Content-Type": "application/json"})
        assert r.status_code == 413
        assert c.post("/v1/classify", json=body()).status_code == 200  # and it keeps serving


# ----------------------------------------------------------------------------- SIGTERM drain


def _start_slow_gateway(repo: Path, delay_s: float, drain_timeout_s: float) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "tests" / "slow_gateway.py"),
            "--repository",
            str(repo),
            "--port",
            str(port),
            "--delay-s",
            str(delay_s),
            "--drain-timeout-s",
            str(drain_timeout_s),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    wait_ready(proc, url, timeout_s=60)
    return proc, url


def _in_flight(url: str, want: int, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while httpx.get(f"{url}/v1/status", timeout=2).json()["in_flight_requests"] < want:
        assert time.monotonic() < deadline, f"{want} requests never got in flight"
        time.sleep(0.02)


def test_sigterm_lets_requests_in_flight_finish_then_exits(repo):
    proc, url = _start_slow_gateway(repo, delay_s=2.0, drain_timeout_s=30)
    try:
        results: list[httpx.Response | Exception] = []

        def call() -> None:
            try:
                results.append(httpx.post(f"{url}/v1/classify", json=body(), timeout=30))
            except Exception as exc:  # recorded: the assertion below shows it
                results.append(exc)

        callers = [threading.Thread(target=call) for _ in range(3)]
        for t in callers:
            t.start()
        _in_flight(url, 3)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        with pytest.raises(httpx.TransportError):  # no new connections while draining
            httpx.get(f"{url}/healthz", timeout=1)
        for t in callers:
            t.join(30)
        # after the drain uvicorn re-raises the signal, so the exit status says "ended by SIGTERM"
        assert proc.wait(30) == -signal.SIGTERM
        log = proc.stdout.read()
        assert [getattr(r, "status_code", r) for r in results] == [200, 200, 200], log
        assert all(len(r.json()["predictions"]) == 1 for r in results)
        assert "draining 3 in-flight" in log and "every request in flight was answered" in log
    finally:
        proc.kill()
        proc.wait()


def test_the_drain_is_bounded_by_its_timeout(repo):
    proc, url = _start_slow_gateway(repo, delay_s=60.0, drain_timeout_s=1.0)
    try:
        caller = threading.Thread(
            target=lambda: _swallow(lambda: httpx.post(f"{url}/v1/classify", json=body(), timeout=90))
        )
        caller.start()
        _in_flight(url, 1)
        t = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == -signal.SIGTERM
        assert time.monotonic() - t < 10  # not the 60 s the stuck call would take
        assert "cut by the drain timeout" in proc.stdout.read()
        caller.join(10)
    finally:
        proc.kill()
        proc.wait()


def _swallow(fn) -> None:
    try:
        fn()
    except httpx.TransportError:  # the cut request's connection closes without an answer
        pass


# ----------------------------------------------------------------------------- files that run code


class _RunsCode:
    """Unpickling this calls os.system: what a crafted data or checkpoint file would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_cifar_batch_cannot_run_code(tmp_path):
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    marker = tmp_path / "pwned"
    good = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [1, 2]}
    for name in [f"data_batch_{i}" for i in range(1, 6)]:
        (base / name).write_bytes(pickle.dumps(good, protocol=2))
    (base / "test_batch").write_bytes(pickle.dumps({b"data": _RunsCode(marker), b"labels": [0]}))
    assert read_cifar_split(tmp_path, "train").images.shape == (10, 32, 32, 3)  # arrays still load
    with pytest.raises(DataError, match="refusing to load posix.system"):
        read_cifar_split(tmp_path, "test")
    assert not marker.exists()


def test_a_crafted_checkpoint_cannot_run_code(tmp_path):
    import torch

    from adaptive_quant.training.checkpoint import CheckpointError, load_checkpoint

    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"format_version": 1, "float_state": _RunsCode(marker)}, path)
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(path)
    assert not marker.exists()
