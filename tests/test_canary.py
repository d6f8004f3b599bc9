"""The canary's verdict (core/canary.py) and reading the gateway's per-version series (tools/gateway_metrics.py)."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from adaptive_quant.core.canary import CanaryCounts, CanaryThresholds, counts_since, decide, wilson
from adaptive_quant.tools.gateway_metrics import GatewayUnreachable, parse_counts, parse_workers, scrape

T = CanaryThresholds()  # agreement ≥ 0.85 on ≥ 100 mirrored, errors ≤ 1 %, budget ≤ 2 points below, ≥ 100 requests


def counts(ok=0, error=0, met=0, missed=0, agree=0, disagree=0, failed=0) -> CanaryCounts:
    return CanaryCounts(
        requests={"ok": ok, "error": error},
        budget_met=met,
        budget_missed=missed,
        mirror_agree=agree,
        mirror_disagree=disagree,
        mirror_failed=failed,
    )


SERVING = counts(ok=5000, met=4980, missed=20)  # 99.6 % within budget
HEALTHY = counts(ok=600, met=597, missed=3, agree=400, disagree=4)


def test_a_healthy_canary_waits_then_is_promoted():
    early = decide(SERVING, HEALTHY, T, elapsed_s=30, canary_seconds=60)
    assert early.action == "wait"
    done = decide(SERVING, HEALTHY, T, elapsed_s=60, canary_seconds=60)
    assert done.action == "promote"
    assert "600 requests" in done.reason and "99.01%" in done.reason  # the figures, in words
    assert done.figures["agreement"] == pytest.approx(400 / 404)


def test_a_network_that_answers_wrongly_is_rolled_back_early_on_agreement():
    # a permuted class order: no errors, every budget met, but it agrees with the serving version at chance
    wrong = counts(ok=150, met=150, agree=12, disagree=108)
    v = decide(SERVING, wrong, T, elapsed_s=10, canary_seconds=60)
    assert v.action == "rollback"
    assert "agreement with the serving version 10.00% on 120 mirrored samples" in v.reason


def test_agreement_is_not_judged_early_before_min_mirrored():
    v = decide(SERVING, counts(ok=150, met=150, agree=5, disagree=45), T, elapsed_s=10, canary_seconds=60)
    assert v.action == "wait"


def test_agreement_a_little_low_waits_then_rolls_back_at_the_end():
    slightly = counts(ok=600, met=600, agree=330, disagree=70)  # 82.5 %: not clearly below 85 % yet
    assert decide(SERVING, slightly, T, elapsed_s=30, canary_seconds=60).action == "wait"
    v = decide(SERVING, slightly, T, elapsed_s=60, canary_seconds=60)
    assert v.action == "rollback" and "82.50%" in v.reason and "below the minimum 85.00%" in v.reason


def test_errors_far_beyond_the_limit_roll_back_early():
    v = decide(SERVING, counts(ok=120, error=30, met=120, agree=50), T, elapsed_s=5, canary_seconds=60)
    assert v.action == "rollback"
    assert "30 of 150 canary requests failed (20.00%)" in v.reason


def test_errors_just_above_the_limit_roll_back_at_the_end():
    v = decide(SERVING, counts(ok=594, error=6, met=600, agree=300), T, elapsed_s=60, canary_seconds=60)
    assert v.action == "promote"  # 1.00 % is within the limit
    v = decide(SERVING, counts(ok=590, error=10, met=600, agree=300), T, elapsed_s=60, canary_seconds=60)
    assert v.action == "rollback" and "10 of 600 canary requests failed" in v.reason


def test_a_canary_slower_than_the_serving_version_rolls_back():
    slow = counts(ok=600, met=582, missed=18, agree=300)  # 97 % within budget against serving's 99.6 %
    assert decide(SERVING, slow, T, elapsed_s=30, canary_seconds=60).action == "wait"  # not clear yet
    v = decide(SERVING, slow, T, elapsed_s=60, canary_seconds=60)
    assert v.action == "rollback" and "97.00% against the serving version's 99.60%: 2.6 points below" in v.reason
    very_slow = counts(ok=200, met=100, missed=100, agree=150)  # 50 %: clear long before the end
    assert decide(SERVING, very_slow, T, elapsed_s=10, canary_seconds=60).action == "rollback"


def test_too_little_traffic_at_the_end_rolls_back_saying_so():
    v = decide(SERVING, counts(ok=40, met=40, agree=30), T, elapsed_s=60, canary_seconds=60)
    assert v.action == "rollback"
    assert "too little traffic to judge: 40 canary requests" in v.reason
    assert "30 mirrored comparisons, at least 100 needed" in v.reason


def test_failing_mirrors_roll_back():
    v = decide(SERVING, counts(ok=600, met=600, agree=300, failed=20), T, elapsed_s=60, canary_seconds=60)
    assert v.action == "rollback" and "20 of 320 mirrored runs failed" in v.reason


def test_without_mirroring_agreement_can_be_waived():
    t = CanaryThresholds(min_mirrored=0)
    assert decide(SERVING, counts(ok=600, met=600), t, elapsed_s=60, canary_seconds=60).action == "promote"


def test_thresholds_refuse_nonsense():
    with pytest.raises(ValueError, match="min_agreement"):
        CanaryThresholds(min_agreement=85)


def test_counts_since_a_snapshot():
    before = {2: counts(ok=10, agree=3), 1: counts(ok=100)}
    now = {2: counts(ok=25, error=1, agree=9), 1: counts(ok=180)}
    d = counts_since(now, before, 2)
    assert (d.total, d.errors, d.mirrored) == (16, 1, 6)
    assert counts_since(now, {}, 3).total == 0  # a version nobody served
    assert counts(ok=5).since(counts(ok=9)).total == 0  # a restarted worker's counters never count negative


def test_wilson_interval():
    lo, hi = wilson(50, 100, 3.0)
    assert lo < 0.5 < hi and lo > 0.3 and hi < 0.7
    assert wilson(0, 0, 3.0) == (0.0, 1.0)


def _metrics_text() -> str:
    r = CollectorRegistry()
    req = Counter("aq_version_requests", "", ["version", "outcome"], registry=r)
    budget = Counter("aq_version_budget", "", ["version", "result"], registry=r)
    mirror = Counter("aq_mirror_comparisons", "", ["version", "result"], registry=r)
    workers = Gauge("aq_model_version_workers", "", ["version", "state"], registry=r)
    other = Counter("aq_requests", "", ["outcome"], registry=r)
    req.labels("1", "ok").inc(90)
    req.labels("2", "ok").inc(9)
    req.labels("2", "error").inc(1)
    budget.labels("2", "met").inc(8)
    budget.labels("2", "missed").inc(2)
    mirror.labels("2", "agree").inc(30)
    mirror.labels("2", "disagree").inc(3)
    mirror.labels("2", "failed").inc(1)
    workers.labels("1", "serving").set(2)
    workers.labels("2", "canary").set(1)
    workers.labels("2", "loading").set(1)
    other.labels("ok").inc(100)
    return generate_latest(r).decode()


def test_parse_the_per_version_series():
    text = _metrics_text()
    c = parse_counts(text)
    assert set(c) == {1, 2}
    assert c[1].total == 90 and c[2].total == 10 and c[2].errors == 1
    assert (c[2].budget_met, c[2].budget_missed) == (8, 2)
    assert (c[2].mirror_agree, c[2].mirror_disagree, c[2].mirror_failed) == (30, 3, 1)
    w = parse_workers(text)
    assert w[1]["serving"] == 2 and w[2] == {"loading": 1, "serving": 0, "canary": 1, "failed": 0}


def test_an_unreachable_gateway_is_a_clear_error():
    with pytest.raises(GatewayUnreachable, match="cannot reach the gateway at http://127.0.0.1:9/metrics"):
        scrape("http://127.0.0.1:9", timeout_s=1)
