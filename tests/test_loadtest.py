"""The load generator: its pure schedule and statistics, its refusals, and short runs over
real HTTP against the tiny torch-free model repository."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import httpx
import numpy as np
import pytest

from adaptive_quant.serving.app import create_app
from adaptive_quant.serving.settings import load_settings
from adaptive_quant.tools.loadtest.config import (
    LoadTestConfig,
    LoadTestConfigError,
    check_loopback,
)
from adaptive_quant.tools.loadtest.schedule import (
    ArrivalSpec,
    BudgetSpec,
    BudgetStream,
    arrival_times,
    in_burst,
    parse_budget,
    parse_phases,
)
from adaptive_quant.tools.loadtest.stats import RequestRecord, summarize
from gateway_repo import build_repo
from http_server import serve_in_thread

ROOT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def load_script():
    """The `aq-loadtest` command (scripts/loadtest.py wraps it)."""
    from adaptive_quant.cli import loadtest

    return loadtest


# ----------------------------------------------------------------------------- arrivals


def test_poisson_arrivals_have_the_asked_rate_and_exponential_gaps():
    spec = ArrivalSpec("poisson", rate=200.0)
    t = arrival_times(spec, duration_s=50.0, seed=3)
    expected = 200 * 50
    # a Poisson count has sd = sqrt(mean)
    assert abs(len(t) - expected) < 4 * math.sqrt(expected)
    gaps = np.diff(t)
    assert abs(gaps.mean() - 1 / 200) < 0.05 / 200
    # exponential gaps: coefficient of variation 1
    assert abs(gaps.std() / gaps.mean() - 1.0) < 0.05
    assert np.all(gaps >= 0) and t[0] >= 0 and t[-1] < 50.0
    assert np.array_equal(t, arrival_times(spec, 50.0, seed=3))  # seeded


def test_bursty_arrivals_are_denser_inside_bursts_by_the_burst_factor():
    spec = ArrivalSpec("bursty", rate=50.0, burst_factor=5.0, burst_s=1.0, period_s=5.0)
    t = arrival_times(spec, duration_s=100.0, seed=1)
    inside = in_burst(spec, t)
    rate_in = inside.sum() / 20.0  # 20 s of bursts in 100 s
    rate_out = (~inside).sum() / 80.0
    assert rate_in / rate_out == pytest.approx(5.0, rel=0.15)
    assert rate_out == pytest.approx(50.0, rel=0.1)
    # mean rate: 50 × (0.8 + 0.2 × 5) = 90 req/s
    assert len(t) / 100.0 == pytest.approx(spec.mean_rate, rel=0.08)
    # the burst is the last second of each 5 s window
    flags = in_burst(spec, np.array([0.5, 3.9, 4.1, 9.5])).tolist()
    assert flags == [False, False, True, True]


def test_max_requests_cuts_the_schedule_to_a_prefix():
    spec = ArrivalSpec("bursty", rate=1000.0, burst_factor=3.0)
    full = arrival_times(spec, 10.0, seed=0)
    cut = arrival_times(spec, 10.0, seed=0, max_requests=17)
    assert len(cut) == 17 and np.array_equal(cut, full[:17])


def test_bad_burst_shapes_are_refused():
    with pytest.raises(ValueError, match="shorter than the period"):
        ArrivalSpec("bursty", rate=10, burst_s=5, period_s=5)
    with pytest.raises(ValueError, match="rate"):
        ArrivalSpec("poisson", rate=0)


# ----------------------------------------------------------------------------- budgets, phases


@pytest.mark.parametrize(
    "text, kind, params",
    [
        ("none", "none", ()),
        ("fixed:50", "fixed", (50.0,)),
        ("uniform:20,80", "uniform", (20.0, 80.0)),
        ("choice:10,50,200", "choice", (10.0, 50.0, 200.0)),
        ("lognormal:40,0.5", "lognormal", (40.0, 0.5)),
        ("calibrated", "calibrated", ()),
        ("Calibrated:1.25", "calibrated", (1.25,)),
    ],
)
def test_budget_specs_parse(text, kind, params):
    spec = parse_budget(text)
    assert (spec.kind, spec.params) == (kind, params)
    assert parse_budget(str(spec)) == spec  # the text in results.json reads back


@pytest.mark.parametrize(
    "text, why",
    [
        ("50", "unknown kind '50'"),
        ("fixed", "fixed takes 1 parameter"),
        ("uniform:80,20", "LO < HI"),
        ("uniform:20", "uniform takes 2 parameter"),
        ("fixed:-5", "positive"),
        ("fixed:abc", "numbers"),
        ("gamma:2,3", "unknown kind 'gamma'"),
    ],
)
def test_bad_budget_specs_name_the_accepted_forms(text, why):
    with pytest.raises(ValueError) as err:
        parse_budget(text)
    msg = str(err.value)
    assert why in msg and "uniform:LO,HI" in msg and "lognormal:MEDIAN,SIGMA" in msg


def test_budgets_are_drawn_identically_in_every_phase_and_follow_the_spec():
    spec = parse_budget("uniform:20,80")
    a, b = BudgetStream(spec, seed=5), BudgetStream(spec, seed=5)
    first = [a[i] for i in range(10_000)]
    backwards = [b[i] for i in reversed(range(10_000))]
    assert backwards[::-1] == first  # the order of access does not matter
    assert min(first) >= 20 and max(first) <= 80 and abs(np.mean(first) - 50) < 1
    lognormal = BudgetStream(parse_budget("lognormal:40,0.5"), seed=1)
    assert np.median([lognormal[i] for i in range(5000)]) == pytest.approx(40, rel=0.05)
    choice = BudgetStream(parse_budget("choice:10,50"), seed=0)
    assert {choice[i] for i in range(200)} == {10.0, 50.0}
    assert BudgetStream(parse_budget("none"), seed=0)[3] is None
    resolved = parse_budget("calibrated:1.25").resolved(40.0)
    assert resolved == BudgetSpec("fixed", (50.0,))


def test_phases_parse_into_headers_and_refuse_unknown_or_repeated_names():
    adaptive, fp32, speed = parse_phases("adaptive, fp32,speed")
    assert adaptive.headers() == {}
    assert fp32.headers() == {"X-Min-Precision": "fp32"}
    assert speed.headers() == {"X-Priority": "speed"}
    with pytest.raises(ValueError, match="unknown phase 'fp64'.*adaptive"):
        parse_phases("adaptive,fp64")
    with pytest.raises(ValueError, match="given twice"):
        parse_phases("fp32,fp32")


# ----------------------------------------------------------------------------- statistics


def rec(t, latency, budget=None, correct=1, variant="int8", met=True, error=None, n=1):
    if error is not None:
        return RequestRecord(t_s=t, n_samples=n, budget_ms=budget, error_kind=error)
    return RequestRecord(
        t_s=t,
        n_samples=n,
        budget_ms=budget,
        latency_ms=latency,
        correct=correct,
        variants=(variant,) * n,
        precision=variant,
        server_budget_met=met,
        server_time_ms=latency / 2,
    )


def test_summary_scores_late_right_answers_as_not_effective():
    records = [
        # right and in time: the only effective answers
        rec(0.1, 10, budget=50, correct=1),
        rec(1.4, 30, budget=50, correct=1, met=False),  # the server said "missed"
        # wrong, in time
        rec(0.2, 40, budget=50, correct=0),
        # right but late
        rec(0.3, 90, budget=50, correct=1, variant="fp32", met=False),
        rec(1.5, None, budget=50, error="503"),
        rec(1.6, None, budget=50, error="client_overload"),
    ]
    s = summarize(records, duration_s=2.0, bin_s=1.0)
    assert (s["requests"], s["answered"]) == (6, 4)
    assert s["errors_by_kind"] == {"503": 1, "client_overload": 1}
    assert s["accuracy"] == pytest.approx(3 / 4)  # over answered images
    # right AND in time, over every offered image: late and failed ones count against
    assert s["effective_accuracy"] == pytest.approx(2 / 6)
    assert s["within_budget_share"] == pytest.approx(3 / 6)  # errors are misses
    # the server's own claim, over its answers
    assert s["server_budget_met_share"] == pytest.approx(2 / 4)
    lat = s["latency_ms"]  # over answered: 10, 30, 40, 90
    assert lat["p50"] == pytest.approx(35.0)
    assert lat["max"] == 90 and lat["mean"] == pytest.approx(42.5)
    assert s["throughput_rps"] == pytest.approx(2.0)
    assert s["samples_per_s"] == pytest.approx(2.0)
    assert s["variant_mix"] == {"fp32": 0.25, "int8": 0.75}
    assert s["variant_mix_over_time"] == [
        {"t_s": 0.0, "counts": {"fp32": 1, "int8": 2}},
        {"t_s": 1.0, "counts": {"int8": 1}},
    ]


def test_summary_percentiles_and_no_budget():
    records = [rec(i / 100, float(i + 1)) for i in range(100)]  # 1..100 ms, no budget
    s = summarize(records, duration_s=1.0)
    assert s["latency_ms"]["p50"] == pytest.approx(50.5)
    assert s["latency_ms"]["p95"] == pytest.approx(95.05)
    assert s["latency_ms"]["p99"] == pytest.approx(99.01)
    assert s["within_budget_share"] is None and s["server_budget_met_share"] is None
    # no budget: every right answer counts
    assert s["effective_accuracy"] == s["accuracy"] == 1.0
    empty = summarize([], duration_s=1.0)
    assert empty["latency_ms"]["p50"] is None and empty["effective_accuracy"] is None


def test_batched_requests_count_images_not_requests():
    records = [
        rec(0.0, 5, budget=10, correct=3, n=4),
        rec(0.5, 50, budget=10, correct=4, n=4),
    ]
    s = summarize(records, duration_s=1.0)
    assert s["accuracy"] == pytest.approx(7 / 8)
    assert s["effective_accuracy"] == pytest.approx(3 / 8)
    assert s["samples_per_s"] == 8.0 and s["throughput_rps"] == 2.0


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "url",
    [
        "http://10.0.0.1:8000",
        "http://example.com",
        "http://[2001:db8::1]:80",
        "http://127.0.0.1.example.com:8000",
        "ftp://127.0.0.1/",
    ],
)
def test_non_loopback_urls_are_refused(url):
    with pytest.raises(LoadTestConfigError):
        check_loopback(url)


def test_loopback_urls_are_accepted():
    for url in ("http://127.0.0.1:8000/", "http://localhost:9000", "http://[::1]:8000"):
        assert check_loopback(url) == url.rstrip("/")


def test_script_refuses_a_foreign_host_before_any_request(monkeypatch, tmp_path, capsys):
    def no_network(*args, **kwargs):
        raise AssertionError("a request was attempted")

    monkeypatch.setattr(asyncio, "open_connection", no_network)  # what wire.WirePool connects with
    monkeypatch.setattr(httpx.AsyncClient, "send", no_network)
    monkeypatch.setattr(httpx.Client, "send", no_network)
    out = tmp_path / "r.json"
    argv = ["--url", "http://10.0.0.1:8000", "--synthetic", "--images", "4"]
    rc = load_script().main(argv + ["--timeout", "1", "--out", str(out)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "10.0.0.1" in err and "loopback" in err
    assert not out.exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--duration", "7200"], "--duration must be"),
        (["--budget", "uniform:9"], "accepted forms"),
        (["--budget", "calibrated"], "needs --calibrate"),
        (["--phases", "fp64"], "unknown phase"),
        (["--data", "/nonexistent/cifar"], "--synthetic"),
        (
            ["--mode", "poisson", "--rate", "100000", "--duration", "3600"],
            "--max-requests",
        ),
    ],
)
def test_script_exits_2_with_a_clear_message_on_bad_arguments(args, message, tmp_path, capsys):
    rc = load_script().main(args + ["--out", str(tmp_path / "r.json")])
    assert rc == 2
    assert message in capsys.readouterr().err


def test_config_does_not_leak_the_api_key():
    cfg = LoadTestConfig(api_key="s3cret")
    assert "s3cret" not in repr(cfg) and "s3cret" not in json.dumps(cfg.to_json())
    assert cfg.to_json()["api_key_given"] is True


# ----------------------------------------------------------------------------- over real HTTP


@pytest.fixture(scope="module")
def gateway_url(tmp_path_factory):
    repo = build_repo(tmp_path_factory.mktemp("repo"))
    # ewma_alpha 0: routing follows the manifest's profiles (30 ms int8, 80 ms fp32), not
    # the busy test machine's jitter
    overrides = {"repository": str(repo), "latency.ewma_alpha": 0.0}
    settings = load_settings(overrides=overrides, environ={})
    with serve_in_thread(create_app(settings)) as url:
        yield url


def run_script(url, tmp_path, *args):
    out, png = tmp_path / "results.json", tmp_path / "results.png"
    common = ["--url", url, "--synthetic", "--out", str(out), "--plot", str(png)]
    rc = load_script().main([*common, "--progress", "0", "--log-level", "WARNING", *args])
    results = json.loads(out.read_text()) if out.exists() else None
    return rc, results, png


def test_closed_loop_run_over_http_with_two_phases(gateway_url, tmp_path):
    rc, results, png = run_script(
        gateway_url,
        tmp_path,
        "--mode",
        "closed",
        "--concurrency",
        "4",
        "--duration",
        "1",
        "--warmup",
        "0.2",
        "--phases",
        "adaptive,fp32",
        "--budget",
        "choice:40,200",
        "--images",
        "32",
    )
    assert rc == 0
    assert set(results["phases"]) == {"adaptive", "fp32"}
    assert results["calibration"] is None
    assert results["config"]["url"] == gateway_url
    assert results["config"]["machine"]["cpu_count"] >= 1 and results["config"]["machine"]["cpu"]
    for name, s in results["phases"].items():
        assert s["requests"] > 10, name
        assert s["errors_by_kind"] == {} and s["answered"] == s["requests"], name
        assert s["latency_ms"]["p50"] > 0
        assert 0 <= s["effective_accuracy"] <= s["accuracy"] <= 1
        mem = s["memory"]
        assert mem["rss_before_bytes"] > 0 and mem["rss_after_bytes"] > 0
        assert mem["growth_pct"] is not None
        # the gateway's own counters saw exactly the recorded images
        routed = s["server_routing"]["samples_by_variant"]
        assert sum(routed.values()) == s["answered_samples"]
        binned = sum(sum(b["counts"].values()) for b in s["variant_mix_over_time"])
        assert binned == s["answered_samples"]
    assert results["phases"]["fp32"]["variant_mix"] == {"fp32": 1.0}  # the floor
    # a 40 ms budget fits only int8 (30 ms profiled), so adaptive uses it
    assert results["phases"]["adaptive"]["variant_mix"].get("int8", 0) > 0
    assert png.read_bytes()[:8] == PNG_SIGNATURE


def test_the_fronts_bench_counts_through_the_load_testers_loop_and_stays_on_loopback():
    """scripts/bench_oip.py's measurement: any client's call becomes a record of the load tester's
    closed loop, an exception an error of its type, and only this machine may be the target."""
    import time

    from adaptive_quant.tools.loadtest.fronts import FrontsConfig, as_send
    from adaptive_quant.tools.loadtest.loop import closed_loop

    sent = []

    async def answer(i: int) -> list[int]:
        sent.append(i)
        await asyncio.sleep(0)
        if i % 4 == 3:
            raise RuntimeError("refused")
        return [0, 0]

    t0 = time.perf_counter()
    records = asyncio.run(closed_loop(as_send(answer, 2, t0), concurrency=3, stop_at=t0 + 60, max_requests=8))
    s = summarize(records, 1.0)
    assert sorted(sent) == list(range(8)) and s["requests"] == 8 and s["answered"] == 6
    assert s["errors_by_kind"] == {"RuntimeError": 2} and s["answered_samples"] == 12
    assert s["latency_ms"]["p50"] >= 0
    with pytest.raises(LoadTestConfigError, match="not this machine"):
        FrontsConfig(url="http://192.0.2.1:8000")
    with pytest.raises(LoadTestConfigError, match="loopback"):
        FrontsConfig(grpc="192.0.2.1:8081")
    with pytest.raises(LoadTestConfigError, match="choose from v1, http, grpc"):
        FrontsConfig(fronts=("v3",))


def test_the_fronts_bench_runs_v1_and_v2_http_against_a_real_gateway(gateway_url):
    """bench_oip's two HTTP fronts through their stock clients: they agree, and the server's CPU per
    request comes from its /v1/status, as aq-loadtest reads it."""
    from adaptive_quant.tools.loadtest.fronts import FrontsConfig, run_fronts

    cfg = FrontsConfig(
        url=gateway_url,
        model="tiny",
        fronts=("v1", "http"),
        distinct=4,
        concurrency=2,
        seconds=0.3,
        warmup=0.1,
        rounds=1,
    )
    images = np.random.default_rng(0).integers(0, 256, size=(4, 32, 32, 3), dtype=np.uint8)
    result = run_fronts(cfg, images)
    assert set(result["fronts"]) == {"v1", "http"} and result["answers_agree"] and result["cpu"]
    for name, f in result["fronts"].items():
        assert f["rps_median"] > 0 and f["errors"] == 0 and f["p50_ms"] > 0, name
        assert f["server_cpu_ms"] > 0 and f["client_cpu_ms"] > 0, name


def test_the_v2_protocol_front_is_driven_side_by_side_with_v1(gateway_url, tmp_path):
    # each of the 32 images once per target: the same images through both fronts of one gateway
    rc, results, _ = run_script(
        gateway_url,
        tmp_path,
        *("--name", "v1", "--compare", f"v2=v2+{gateway_url}", "--concurrency", "2", "--duration", "30"),
        *("--max-requests", "32", "--images", "32", "--warmup", "0", "--no-plot"),
    )
    assert rc == 0
    v1, v2 = results["phases"]["adaptive"], results["compare"]["v2"]["phases"]["adaptive"]
    assert results["compare"]["v2"]["service"]["protocol"] == "v2"
    for s in (v1, v2):
        assert s["requests"] == s["answered"] == 32 and s["errors_by_kind"] == {}
        assert sum(s["server_routing"]["samples_by_variant"].values()) == 32
    # the labels came back through the binary logits tensor and scored the same
    assert v2["accuracy"] == v1["accuracy"] and v2["variant_mix"] == v1["variant_mix"]


def test_a_calibrated_budget_is_sent_to_every_compare_target(gateway_url, tmp_path):
    rc, results, _ = run_script(
        gateway_url,
        tmp_path,
        *("--compare", f"other={gateway_url}", "--calibrate", "--budget", "calibrated:2", "--concurrency", "2"),
        *("--duration", "0.5", "--warmup", "0", "--max-requests", "8", "--images", "8", "--no-plot"),
    )
    assert rc == 0
    resolved = results["calibration"]["resolved_budget"]
    assert results["phases"]["adaptive"]["budget_spec"] == resolved
    assert results["compare"]["other"]["phases"]["adaptive"]["budget_spec"] == resolved


def test_a_v2_calibrate_url_is_refused():
    with pytest.raises(LoadTestConfigError, match="calibrate-url"):
        LoadTestConfig(calibrate=True, calibrate_url="v2+http://127.0.0.1:8000")
    assert check_loopback("v2+http://127.0.0.1:8000/") == "v2+http://127.0.0.1:8000"
    with pytest.raises(LoadTestConfigError, match="not this machine"):
        check_loopback("v2+http://10.0.0.1:8000")


def test_open_loop_counts_overload_and_calibrates_the_budget(gateway_url, tmp_path):
    # one request in flight at most, 400 req/s offered: most arrivals find the cap reached
    rc, results, png = run_script(
        gateway_url,
        tmp_path,
        "--mode",
        "poisson",
        "--rate",
        "400",
        "--max-in-flight",
        "1",
        "--duration",
        "0.5",
        "--warmup",
        "0",
        "--calibrate",
        "--budget",
        "calibrated:2",
        "--phases",
        "adaptive",
    )
    assert rc == 0
    s = results["phases"]["adaptive"]
    overload = s["errors_by_kind"].get("client_overload", 0)
    assert overload > 0 and s["answered"] > 0
    assert s["answered"] + overload == s["requests"]  # counted, never dropped
    cal = results["calibration"]
    assert cal["int8_requests"] > 0 and cal["int8_p95_ms"] > 0
    assert cal["budget_ms"] == pytest.approx(2 * cal["int8_p95_ms"], abs=1e-3)
    assert s["budget_spec"] == cal["resolved_budget"]
    assert s["budget_ms"]["p50"] == pytest.approx(cal["budget_ms"])
    assert png.read_bytes()[:8] == PNG_SIGNATURE
