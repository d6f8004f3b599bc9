"""Several gateway processes on one port (serving/workers.py), as real processes over real HTTP:
the port is shared, /metrics adds the workers up, worker 0's start-up profile is the others',
a killed worker is started again, SIGTERM drains every worker, and start-up failures are clear."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from adaptive_quant.serving.settings import AUTO_WORKERS_MAX, SettingsError, load_settings, usable_cores
from gateway_process import free_port, wait_ready
from gateway_repo import b64_instance, build_repo, images

ROOT = Path(__file__).resolve().parents[1]


def body(n: int = 1, seed: int = 0) -> dict:
    return {"instances": [b64_instance(img) for img in images(n, seed=seed)]}


def wait_workers(url: str, want: int, timeout_s: float = 90) -> None:
    """Until `want` workers answer: /readyz answers as soon as worker 0 serves."""
    deadline = time.monotonic() + timeout_s
    while len(statuses_by_worker(url, want, tries=20)) < want:
        assert time.monotonic() < deadline, f"{want} workers never served"
        time.sleep(0.2)


def status_fresh(url: str) -> dict:
    """/v1/status on a new connection (so the kernel picks the worker anew)."""
    return httpx.get(f"{url}/v1/status", timeout=5, headers={"Connection": "close"}).json()


def statuses_by_worker(url: str, want: int, tries: int = 200) -> dict[int, dict]:
    seen: dict[int, dict] = {}
    for _ in range(tries):
        s = status_fresh(url)
        seen[s["process"]["worker"]] = s
        if len(seen) == want:
            break
    return seen


def metric(url: str, name: str, **labels: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    total = 0.0
    for line in text.splitlines():
        m = re.match(r"^(\w+)(?:\{(.*)\})? (\S+)$", line)
        if m and m.group(1) == name and ",".join(sorted((m.group(2) or "").split(","))) == want:
            total += float(m.group(3))
    return total


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return build_repo(tmp_path_factory.mktemp("repo"))


@pytest.fixture(scope="module")
def two_workers(repo):
    """`aq-serve --workers 2` on the test repository, gRPC front on: (process, url, grpc address)."""
    port, grpc_port = free_port(), free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "adaptive_quant.cli.serve", "--repository", str(repo), "--port", str(port)]
        + ["--workers", "2", "--grpc-port", str(grpc_port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    wait_ready(proc, url)
    wait_workers(url, 2)
    yield proc, url, f"127.0.0.1:{grpc_port}"
    proc.terminate()
    try:
        proc.wait(40)
    finally:
        proc.kill()


# ----------------------------------------------------------------------------- settings


def test_workers_setting_is_checked_and_auto_is_one_per_core():
    with pytest.raises(SettingsError, match=r"server\.workers.*1\.\.64 or auto"):
        load_settings(overrides={"server.workers": "0"}, environ={})
    auto = load_settings(environ={})
    assert auto.server.resolved_workers() == min(usable_cores(), AUTO_WORKERS_MAX)
    assert load_settings(overrides={"server.workers": "3"}, environ={}).server.resolved_workers() == 3
    # instances: auto shares the cores among the workers, at least one call per variant each
    assert auto.backend.resolved_instances(workers=usable_cores()) == 1
    assert auto.backend.resolved_instances(workers=1) == usable_cores()


# ----------------------------------------------------------------------------- two workers, one port


def test_both_workers_answer_on_one_port_and_share_worker_0s_profile(two_workers):
    _, url, _ = two_workers
    seen = statuses_by_worker(url, 2)
    assert sorted(seen) == [0, 1], "new connections never reached one of the workers"
    assert seen[0]["process"]["pid"] != seen[1]["process"]["pid"]
    assert {s["process"]["workers"] for s in seen.values()} == {2}
    # memory and CPU of the whole gateway (supervisor and workers), whichever worker answers
    whole = seen[0]["gateway"]
    assert {seen[0]["process"]["pid"], seen[1]["process"]["pid"]} <= set(whole["pids"])
    assert whole["rss_bytes"] > seen[0]["process"]["rss_bytes"] + seen[1]["process"]["rss_bytes"] * 0.9
    # worker 1 planned with the figures worker 0 measured, not with a profile of its own
    assert seen[0]["profile"]["batch1_p95_ms"] == seen[1]["profile"]["batch1_p95_ms"]
    assert seen[0]["profile"]["source"] == seen[1]["profile"]["source"]
    if seen[0]["profile"]["source"] == "measured at start-up":
        assert "measured by worker 0" in seen[1]["profile"]["reason"]


def test_metrics_add_up_over_the_workers(two_workers):
    _, url, _ = two_workers
    before = metric(url, "aq_requests_total", outcome="ok")
    n = 24
    for i in range(n):  # each on a new connection: both workers serve some
        r = httpx.post(f"{url}/v1/classify", json=body(seed=i), headers={"Connection": "close"}, timeout=10)
        assert r.status_code == 200, r.text
    served = {w: s["routing"]["requests"]["ok"] for w, s in statuses_by_worker(url, 2).items()}
    assert metric(url, "aq_requests_total", outcome="ok") - before == n
    assert sum(served.values()) >= n  # each worker's own count; /metrics is their sum
    assert metric(url, "aq_in_flight_requests") == 0


def test_a_killed_worker_is_started_again_and_the_port_keeps_serving(two_workers):
    proc, url, _ = two_workers
    victim = statuses_by_worker(url, 2)[1]["process"]["pid"]
    ok_before = metric(url, "aq_requests_total", outcome="ok")
    os.kill(victim, signal.SIGKILL)
    answered = 0
    deadline = time.monotonic() + 60
    while True:  # the other worker answers meanwhile; the restarted one joins it
        r = httpx.post(f"{url}/v1/classify", json=body(), headers={"Connection": "close"}, timeout=10)
        assert r.status_code == 200, r.text
        answered += 1
        seen = statuses_by_worker(url, 2, tries=10)
        if 1 in seen and seen[1]["process"]["pid"] != victim:
            break
        assert time.monotonic() < deadline, "worker 1 was not started again"
        time.sleep(0.2)
    assert proc.poll() is None
    # the dead worker's counts stay in the sum: a counter never goes back
    assert metric(url, "aq_requests_total", outcome="ok") >= ok_before + answered


def test_the_grpc_front_is_shared_by_the_workers_too(two_workers):
    import numpy as np
    import tritonclient.grpc as triton_grpc

    _, _, address = two_workers
    x = np.zeros((1, 3, 32, 32), np.float32)
    for _ in range(6):  # a new channel each time: whichever worker the kernel picks answers
        client = triton_grpc.InferenceServerClient(address)
        try:
            inp = triton_grpc.InferInput("images", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            out = client.infer("tiny", [inp]).as_numpy("logits")
            assert out.shape == (1, 10)
        finally:
            client.close()


# ----------------------------------------------------------------------------- drain and failures


def start_slow(repo: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "slow_gateway.py"), "--repository", str(repo), "--port", str(port)]
        + list(extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    )
    return proc, f"http://127.0.0.1:{port}"


def test_sigterm_drains_every_worker_and_answers_every_request_in_flight(repo):
    proc, url = start_slow(repo, "--delay-s", "2.0", "--workers", "2")
    try:
        wait_ready(proc, url)
        wait_workers(url, 2)
        results: list[object] = []

        def call(i: int) -> None:
            try:
                r = httpx.post(f"{url}/v1/classify", json=body(seed=i), headers={"Connection": "close"}, timeout=30)
                results.append(r.status_code)
            except Exception as exc:  # recorded: the assertion below shows it
                results.append(exc)

        callers = [threading.Thread(target=call, args=(i,)) for i in range(6)]
        for t in callers:
            t.start()
        deadline = time.monotonic() + 20
        while metric(url, "aq_in_flight_requests") < 6:  # summed over both workers
            assert time.monotonic() < deadline, "6 requests never got in flight"
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        for t in callers:
            t.join(30)
        assert proc.wait(40) == 0
        log = proc.stdout.read()
        assert results == [200] * 6, log
        assert log.count("every request in flight was answered") == 2, log  # one line per worker
        assert "all workers stopped" in log
    finally:
        proc.kill()
        proc.wait()


def test_a_worker_that_cannot_start_stops_the_gateway_with_its_error(repo):
    proc, url = start_slow(repo, "--delay-s", "0", "--workers", "2", "--fail-worker", "1")
    try:
        assert proc.wait(90) == 1
        log = proc.stdout.read()
        assert "injected start-up failure of worker 1" in log
        assert re.search(r"worker 1 \(pid \d+\) exited with status 1 before serving", log), log
        with pytest.raises(httpx.TransportError):  # worker 0 was stopped too: nothing listens
            httpx.get(f"{url}/healthz", timeout=1)
    finally:
        proc.kill()
        proc.wait()


def test_a_taken_port_is_a_clear_error(repo):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        r = subprocess.run(
            [sys.executable, "-m", "adaptive_quant.cli.serve", "--repository", str(repo), "--port", str(port)]
            + ["--workers", "2"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert r.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in r.stderr
