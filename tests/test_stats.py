"""core/stats.py: the percentiles, softmax confidence and timing loop every stage measures with."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from adaptive_quant.core.stats import (
    max_softmax,
    paired_difference,
    percentile,
    percentiles,
    softmax,
    time_calls,
    time_calls_async,
)


@pytest.mark.parametrize("n", [1, 2, 7, 200, 10_001])
def test_percentiles_match_numpy(n):
    values = np.random.default_rng(n).gamma(2.0, 0.3, size=n)  # ms, skewed like latencies
    got = percentiles(values)
    assert list(got) == ["p50", "p95", "p99"]
    for q in (50, 95, 99):
        assert got[f"p{q}"] == float(np.percentile(values, q))  # the same method, to the bit
        assert percentile(list(values), q) == got[f"p{q}"]
    assert percentiles(values, (50, 99.9)) == {"p50": got["p50"], "p99.9": float(np.percentile(values, 99.9))}


def test_percentiles_of_nothing_say_so():
    with pytest.raises(ValueError, match="empty"):
        percentiles([])


def test_softmax_rows_sum_to_one_and_large_logits_do_not_overflow():
    logits = np.random.default_rng(0).normal(0, 5, size=(64, 10)).astype(np.float32)
    p = softmax(logits)
    assert p.shape == logits.shape and p.dtype == np.float32  # the logits' own dtype
    assert np.allclose(p.sum(axis=1), 1.0, atol=1e-6) and (p >= 0).all()
    assert np.array_equal(p.argmax(axis=1), logits.argmax(axis=1))
    huge = np.array([[1e4, 1e4 - 1.0, -1e4], [800.0, 0.0, 0.0]])  # exp(800) alone overflows float64
    with np.errstate(over="raise", invalid="raise"):
        q = softmax(huge)
    assert np.isfinite(q).all() and np.allclose(q.sum(axis=1), 1.0)
    assert q[0, 0] == pytest.approx(1 / (1 + np.exp(-1.0)))  # only the difference of logits matters
    assert np.allclose(softmax(huge + 123.0), q)
    assert np.allclose(max_softmax(huge), q.max(axis=1))


def test_timing_loop_honours_min_iterations_and_warmup():
    seen = []
    ms = time_calls(seen.append, min_iters=7, warmup=3)
    assert ms.shape == (7,) and (ms >= 0).all()
    assert seen == [0, 1, 2, 0, 1, 2, 3, 4, 5, 6]  # warm-up indices first, then the timed ones from 0


def test_timing_loop_runs_for_at_least_min_seconds_and_reports_ms():
    t = time.perf_counter()
    ms = time_calls(lambda _: time.sleep(0.002), min_iters=1, min_seconds=0.05)
    assert time.perf_counter() - t >= 0.05 and len(ms) >= 2
    assert ms.min() >= 2.0  # each call slept 2 ms
    with pytest.raises(ValueError, match="min_iters"):
        time_calls(lambda _: None, min_iters=0)


def test_async_timing_loop():
    seen = []

    async def call(i):
        seen.append(i)
        await asyncio.sleep(0.001)

    ms = asyncio.run(time_calls_async(call, min_iters=4, warmup=1))
    assert ms.shape == (4,) and ms.min() >= 1.0 and seen == [0, 0, 1, 2, 3]


# ----------------------------------------------------------------------------- paired_difference


def test_paired_difference_of_one_model_with_itself_is_exactly_zero():
    right = np.arange(1000) % 10 != 0  # 90 % right
    assert paired_difference(right, right) == (0.0, 0.0, 0.0)


def test_paired_difference_gives_the_points_and_an_interval_as_wide_as_the_discordant_images_allow():
    # b is right on 9,000 of 10,000 images; a on those and 100 more: one point better, and on every
    # image where they differ a is the one that is right
    b = np.arange(10_000) < 9_000
    a = np.arange(10_000) < 9_100
    diff, low, high = paired_difference(a, b)
    assert diff == pytest.approx(1.0)
    # per-image differences: 100 ones, the rest 0 → standard error √(0.01 · 0.99 / 10⁴) = 0.0995 points
    assert low == pytest.approx(1.0 - 1.96 * 0.0995, abs=0.03)
    assert high == pytest.approx(1.0 + 1.96 * 0.0995, abs=0.03)
    assert 0.0 < low < diff < high  # a user reads: better, and not by chance


def test_paired_difference_straddles_zero_when_the_models_trade_as_many_images_as_they_differ_by():
    # 300 images only a gets right, 295 only b: +0.05 points over 10,000, well inside the noise
    a = np.zeros(10_000, bool)
    b = np.zeros(10_000, bool)
    a[:9_000], b[:9_000] = True, True
    a[9_000:9_300] = True
    b[9_300:9_595] = True
    diff, low, high = paired_difference(a, b)
    assert diff == pytest.approx(0.05)
    assert low < 0.0 < high
    assert high - low == pytest.approx(
        2 * 1.96 * np.sqrt(595 / 10_000 - 0.0005**2), rel=0.1
    )  # points: 100·√(var/N), N = 10⁴
    # the same samples the other way round: the negated difference, and the negated interval to the
    # resampling's resolution (the draws differ, one image is 0.01 points)
    back = paired_difference(b, a)
    assert back[0] == pytest.approx(-diff)
    assert back[1] == pytest.approx(-high, abs=0.03) and back[2] == pytest.approx(-low, abs=0.03)


def test_paired_difference_is_reproducible_for_a_seed_and_rejects_unpaired_input():
    a = np.arange(500) % 7 != 0
    b = np.arange(500) % 5 != 0
    assert paired_difference(a, b, seed=3) == paired_difference(a, b, seed=3)
    with pytest.raises(ValueError, match="one length"):
        paired_difference(a, b[:-1])
    with pytest.raises(ValueError, match="level"):
        paired_difference(a, b, level=1.5)
