"""core/stats.py: the percentiles, softmax confidence and timing loop every stage measures with."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from adaptive_quant.core.stats import max_softmax, percentile, percentiles, softmax, time_calls, time_calls_async


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
