"""The goodput search (pure, against a simulated server) and side-by-side runs over real HTTP:
the gateway against the plain baseline server (scripts/baseline_server.py) in one invocation."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from adaptive_quant.tools.loadtest.config import LoadTestConfig, LoadTestConfigError
from adaptive_quant.tools.loadtest.goodput import GoodputSpec, RateSearch, good_share, search_goodput
from adaptive_quant.tools.loadtest.stats import RequestRecord

ROOT = Path(__file__).resolve().parents[1]


def records(rate: float, capacity: float, n: int = 200) -> list[RequestRecord]:
    """A simulated probe: below `capacity` everything is fast; above it, the excess share is late."""
    late = max(0.0, 1 - capacity / rate)
    k = round(late * n)
    return [RequestRecord(0.0, 1, 50.0, latency_ms=200.0 if i < k else 5.0) for i in range(n)]


def run_search(capacity: float, **spec) -> dict:
    s = GoodputSpec(settle_s=0, **spec)
    return search_goodput(LoadTestConfig(), {"sim": "http://127.0.0.1:1"}, s, lambda c: records(c.rate, capacity))[
        "sim"
    ]


@pytest.mark.parametrize("capacity", [90.0, 437.0, 1234.0])
def test_search_finds_the_highest_passing_rate_within_the_resolution(capacity):
    found = run_search(capacity, share=0.99, start_rps=100, resolution=0.05)
    g, fail = found["goodput_rps"], found["lowest_failing_rps"]
    # the simulated server's true goodput: 200 requests per probe, at most 2 late (round(200 ·
    # (1 - capacity / rate)) <= 2) up to rate = capacity / 0.9875
    true = capacity / 0.9875
    assert g <= true <= fail and fail / g <= 1.05 + 1e-9
    assert all(p["passed"] == (p["good_share"] >= 0.99) for p in found["probes"])


def test_search_stops_at_the_cap_and_says_so():
    found = run_search(1e9, start_rps=100, max_rps=400)
    assert found["goodput_rps"] == 400 and found["capped"] and found["lowest_failing_rps"] is None


def stalled_once(calls: list):
    """A simulated server whose first probe at 400 req/s hits a host stall (3 of 200 late)."""

    def run_probe(cfg):
        calls.append(cfg.rate)
        late = 3 if len(calls) == 2 else 0
        return [RequestRecord(0, 1, 50.0, latency_ms=200.0 if i < late else 5.0) for i in range(200)]

    return run_probe


def test_a_near_miss_is_extended_and_judged_on_both_probes():
    calls = []
    spec = GoodputSpec(start_rps=200, max_rps=400, settle_s=0)
    found = search_goodput(LoadTestConfig(), {"sim": "http://127.0.0.1:1"}, spec, stalled_once(calls))["sim"]
    assert calls == [200, 400, 400]  # 98.5 % at 400: extended by a second probe
    assert found["probes"][1]["requests"] == 400 and found["probes"][1]["good_share"] == 0.9925
    assert found["goodput_rps"] == 400
    strict = GoodputSpec(start_rps=200, max_rps=400, settle_s=0, extend_failures=False)
    found = search_goodput(LoadTestConfig(), {"sim": "http://127.0.0.1:1"}, strict, stalled_once([]))["sim"]
    assert found["probes"][1]["good_share"] == 0.985 and not found["probes"][1]["passed"]


def test_errors_and_missing_answers_count_as_misses():
    recs = [RequestRecord(0, 1, 50.0, latency_ms=5.0), RequestRecord(0, 1, 50.0, error_kind="503")]
    assert good_share(recs, 50.0) == 0.5
    assert good_share([], 50.0) == 0.0


def test_search_is_pure_and_converges():
    s = RateSearch(GoodputSpec(start_rps=50, resolution=0.1))
    rates = []
    while (r := s.next_rate()) is not None:
        rates.append(r)
        s.record(type("P", (), {"rate_rps": r, "passed": r <= 333})())  # duck-typed probe
    assert rates[:4] == [50, 100, 200, 400]
    assert s.best_pass <= 333 < s.lowest_fail and s.lowest_fail / s.best_pass <= 1.1


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"share": 1.5}, "--goodput-share"),
        ({"budget_ms": 0}, "--goodput-budget"),
        ({"start_rps": 10, "max_rps": 5}, "--goodput-start"),
        ({"resolution": 0}, "--goodput-resolution"),
    ],
)
def test_bad_goodput_settings_are_refused_with_the_flag_named(kw, message):
    with pytest.raises(LoadTestConfigError, match=message):
        GoodputSpec(**kw)


# ----------------------------------------------------------------------------- over real HTTP


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """The gateway (aq-serve) and the baseline server, as separate processes on the test repository."""
    from gateway_repo import build_repo

    repo = build_repo(tmp_path_factory.mktemp("repo"))
    gw_port, base_port = free_port(), free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "adaptive_quant.cli.serve", "--repository", str(repo), "--port", str(gw_port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        ),
        subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "scripts" / "baseline_server.py"),
                "--repository",
                str(repo),
                "--port",
                str(base_port),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        ),
    ]
    urls = [f"http://127.0.0.1:{gw_port}", f"http://127.0.0.1:{base_port}"]
    deadline = time.monotonic() + 60
    for url in urls:
        while True:
            try:
                if httpx.get(url + "/v1/models", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"{url} did not start"
            time.sleep(0.2)
    yield urls
    for p in procs:
        p.terminate()
        p.wait(20)


def test_baseline_server_answers_the_classify_shape(servers):
    from adaptive_quant.core.v1_wire import request_body
    from gateway_repo import images

    r = httpx.post(servers[1] + "/v1/classify", json=request_body(images(3, seed=1)), timeout=10)
    assert r.status_code == 200
    preds = r.json()["predictions"]
    assert len(preds) == 3 and all(p["variant"] == "int8" and 0 <= p["class_id"] < 10 for p in preds)
    assert float(r.headers["x-server-time-ms"]) > 0


def test_loadtest_compares_gateway_and_baseline_in_one_run(servers, tmp_path):
    from adaptive_quant.cli import loadtest

    out = tmp_path / "cmp.json"
    args = ["--url", servers[0], "--compare", f"baseline={servers[1]}", "--synthetic", "--images", "16"]
    args += ["--concurrency", "2", "--duration", "1", "--warmup", "0.2", "--out", str(out), "--no-plot"]
    assert loadtest.main([*args, "--progress", "0", "--log-level", "WARNING"]) == 0
    res = json.loads(out.read_text())
    base = res["compare"]["baseline"]["phases"]["adaptive"]
    gw = res["phases"]["adaptive"]
    for s in (gw, base):
        assert s["answered"] == s["requests"] > 5
        assert s["cpu_ms_per_request"]["server"] > 0 and s["cpu_ms_per_request"]["client"] > 0
    assert res["compare"]["baseline"]["service"]["backend"] == "baseline"


def test_goodput_for_both_servers_in_one_run(servers, tmp_path):
    from adaptive_quant.cli import loadtest

    out = tmp_path / "goodput.json"
    args = ["--url", servers[0], "--compare", f"baseline={servers[1]}", "--synthetic", "--images", "16", "--goodput"]
    args += ["--goodput-start", "10", "--goodput-max", "20", "--probe-duration", "0.5", "--probe-warmup", "0"]
    args += ["--goodput-budget", "2000", "--out", str(out)]
    assert loadtest.main([*args, "--progress", "0", "--log-level", "WARNING"]) == 0
    res = json.loads(out.read_text())
    assert set(res["goodput"]) == {"gateway", "baseline"}
    for name, g in res["goodput"].items():
        # a 2 s budget at 10-20 req/s: every probe passes, the search stops at the cap
        assert g["goodput_rps"] == 20 and g["capped"], name
        assert [p["rate_rps"] for p in g["probes"]] == [10, 20]
        assert all(p["requests"] > 0 and p["good_share"] >= 0.99 for p in g["probes"])


def test_compare_with_a_bad_target_is_refused(tmp_path, capsys):
    from adaptive_quant.cli import loadtest

    rc = loadtest.main(["--synthetic", "--compare", "nourl", "--out", str(tmp_path / "x.json")])
    assert rc == 2 and "expected NAME=URL" in capsys.readouterr().err
    rc = loadtest.main(["--synthetic", "--compare", "b=http://example.com:80", "--out", str(tmp_path / "x.json")])
    assert rc == 2 and "not this machine" in capsys.readouterr().err
