"""`aq-bench` on the tiny repository: the routing and overhead parts run and report what they say,
and the throughput part's closed loop (the load tester's) reads back samples/s and the mix.
Timings are not asserted beyond being positive: these are benchmarks, run here for a few calls."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adaptive_quant.cli import bench as cli_bench
from adaptive_quant.serving.settings import load_settings
from adaptive_quant.tools import bench
from adaptive_quant.tools.loadtest.runner import Workload
from gateway_repo import build_repo
from http_server import serve_in_thread  # tests/http_server.py

SERVE_CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "serve.yaml")


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return build_repo(tmp_path_factory.mktemp("repo"))  # no router: single-stage


def _settings(repo, **overrides):
    return load_settings(overrides={"repository": str(repo), **overrides}, environ={})


def test_routing_part_times_the_gateways_decision(repo):
    r = cli_bench.bench_routing(_settings(repo), iterations=80)
    assert r["router"]["kind"] == "single-stage on the manifest's validation accuracies"
    for key, calls in (("per_sample_us_at_n1", 80), ("per_sample_us_at_n32", 10)):
        assert 0 < r[key]["p50"] <= r[key]["p99"]
        assert r[key]["n"] == calls - calls // 10  # the first tenth warms up
    assert r["host_stalls"]["per_s"] >= 0 and r["host_stalls"]["threshold_us"] == 5.0


def test_stages_part_times_each_step_of_the_classify_route(repo):
    st = cli_bench.bench_stages(_settings(repo), iterations=40)
    assert list(st) == [*cli_bench.STAGES, "request"]
    for k, v in st.items():
        assert 0 < v["p50"] <= v["p99"] and v["n"] == 36, k  # the first tenth warms up
    # the whole request holds every step: at least as long as its longest one
    assert st["request"]["p50"] >= max(st[k]["p50"] for k in cli_bench.STAGES)


def test_host_stalls_sees_the_cpu_taken_away():
    """A busy Python thread takes the GIL for its switch interval (5 ms) at a time: the clock loop
    must see those gaps, as it sees a hypervisor's."""
    import threading

    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            sum(range(1000))

    t = threading.Thread(target=spin)
    t.start()
    try:
        h = bench.host_stalls(0.3)
    finally:
        stop.set()
        t.join()
    # the spinner's turns, ~5 ms each, take about half the window; the host alone takes a few %
    assert h["max_us"] >= 2000 and h["lost_share"] >= 0.25


def test_overhead_part_compares_the_backend_with_the_whole_gateway(repo):
    o = cli_bench.bench_overhead(_settings(repo), _settings(repo, variants=["int8"]), "int8", iterations=20)
    for key in ("backend_direct_ms", "gateway_server_time_ms", "gateway_in_process_client_ms"):
        assert 0 < o[key]["p50"] <= o[key]["p99"] and o[key]["n"] == 18
    d, c = o["backend_direct_ms"]["p50"], o["gateway_in_process_client_ms"]["p50"]
    assert o["overhead_p50_ms"]["client_minus_direct"] == pytest.approx(c - d)


def test_cli_writes_routing_and_overhead_json(repo, tmp_path, capsys):
    out = tmp_path / "bench.json"
    args = ["--repository", str(repo), "--config", SERVE_CONFIG, "--parts", "routing", "overhead", "--iterations", "20"]
    assert cli_bench.main([*args, "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert {"host", "routing", "overhead"} <= set(data) and "throughput" not in data
    assert "µs per sample" in capsys.readouterr().out


def test_throughput_closed_loop_goes_through_the_load_tester(repo):
    from adaptive_quant.serving.app import create_app

    workload = Workload.from_images(bench.sample_images(1, seed=11), [0], [[0]])
    with serve_in_thread(create_app(_settings(repo, variants=["int8"]))) as url:
        r = bench.closed_loop(url, workload, 1000.0, concurrency=2, duration_s=0.4, warmup_s=0.1)
    assert r["samples_per_s"] > 0 and r["errors"] == 0
    assert 0 < r["p50_ms"] <= r["p99_ms"]
    assert set(r["precisions"]) == {"int8"}  # a gateway pinned to int8 answers with int8 only
