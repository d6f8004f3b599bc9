"""Numeric helpers every stage measures with: percentiles, softmax confidence, sigmoid, a timing loop.

Stdlib and NumPy only, so the evaluation, the export's latency profiles, the router's fit report
and the tools all compute a p99 or a confidence the same way.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterator, Sequence

import numpy as np

PERCENTILES = (50, 95, 99)


def percentiles(values: Sequence[float] | np.ndarray, qs: Sequence[float] = PERCENTILES) -> dict[str, float]:
    """{"p50": …, "p95": …, "p99": …} of `values` (ms, usually), keyed f"p{q:g}".

    np.percentile's default method (linear interpolation between the closest ranks), the one
    every figure in this project has been computed with. ValueError when there are no values.
    """
    a = np.asarray(values, dtype=np.float64)
    if a.size == 0:
        raise ValueError("percentiles of an empty list: at least one value is needed")
    return {f"p{q:g}": float(v) for q, v in zip(qs, np.percentile(a, list(qs)))}


def percentile(values: Sequence[float] | np.ndarray, q: float) -> float:
    """The q-th percentile of `values` (np.percentile's default, linear interpolation)."""
    return percentiles(values, (q,))[f"p{q:g}"]


def softmax(logits: np.ndarray) -> np.ndarray:
    """(N, C) logits → (N, C) probabilities, rows summing to 1, in the logits' own dtype.

    The row maximum is subtracted first, so large logits cannot overflow exp.
    """
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def max_softmax(logits: np.ndarray) -> np.ndarray:
    """(N, C) logits → (N,) top-1 softmax probability: how sure the model is of its answer."""
    return softmax(logits).max(axis=1)


def paired_difference(
    a_right: np.ndarray, b_right: np.ndarray, level: float = 0.95, resamples: int = 10_000, seed: int = 0
) -> tuple[float, float, float]:
    """How many points a is more accurate than b on the same samples, with a paired bootstrap interval:
    (difference, low, high), in points (0.5 = half a point).

    a_right, b_right: (N,) bool, whether a and b were right on sample i (the same N samples, in the
    same order). Paired, because two answers to one image are not independent: a router and the
    fixed model it escalates from agree on ~97 % of images, and only the images where they differ
    carry the uncertainty (an unpaired interval would be ~5× too wide). The bootstrap resamples the N
    per-image differences (+1, −1 or 0); their resampled mean depends only on how many +1 and −1 a
    resample draws, so the counts are drawn from the multinomial directly: exact, and O(resamples)
    instead of O(resamples × N). Percentile interval; deterministic for a seed."""
    a = np.asarray(a_right, dtype=bool)
    b = np.asarray(b_right, dtype=bool)
    if a.ndim != 1 or a.shape != b.shape or a.size == 0:
        raise ValueError(f"a_right and b_right must be (N,) bool of one length N ≥ 1; got {a.shape} and {b.shape}")
    if not 0.0 < level < 1.0 or resamples < 1:
        raise ValueError(f"level must be in (0, 1) and resamples ≥ 1; got {level} and {resamples}")
    n = a.size
    wins, losses = int((a & ~b).sum()), int((~a & b).sum())
    counts = np.random.default_rng(seed).multinomial(n, [wins / n, losses / n, 1.0 - (wins + losses) / n], resamples)
    diffs = 100.0 * (counts[:, 0] - counts[:, 1]) / n
    tail = 100.0 * (1.0 - level) / 2.0
    low, high = np.percentile(diffs, [tail, 100.0 - tail])
    return 100.0 * (wins - losses) / n, float(low), float(high)


def format_interval(ci: Sequence[float] | None) -> str:
    """A [low, high] interval in points as the reports print it, "+0.12 to +0.80"; "–" when there is none."""
    return "–" if ci is None else f"{ci[0]:+.2f} to {ci[1]:+.2f}"


SIGMOID_CLIP = 50.0  # |z| beyond this is clipped: exp(50) ≈ 5e21 fits float32, σ(±50) is 0/1 to 1e-21


def sigmoid(z: np.ndarray | float, out: np.ndarray | None = None) -> np.ndarray:
    """σ(z) = 1 / (1 + e^−z), elementwise, in z's float dtype, clipped to ±SIGMOID_CLIP first (no
    overflow warnings, the same result to float precision). With `out` (a float array, z itself
    allowed) the result is written there with no temporary arrays, for per-request paths."""
    if out is None:
        z = np.asarray(z)
        if z.dtype.kind != "f":
            z = z.astype(np.float64)
        return 1.0 / (1.0 + np.exp(-np.clip(z, -SIGMOID_CLIP, SIGMOID_CLIP)))
    np.clip(z, -SIGMOID_CLIP, SIGMOID_CLIP, out=out)
    np.negative(out, out=out)
    np.exp(out, out=out)
    out += 1.0
    return np.reciprocal(out, out=out)


def _iterations(min_iters: int, min_seconds: float) -> Iterator[int]:
    """0, 1, 2, … until at least `min_iters` calls and `min_seconds` s have gone by."""
    if min_iters < 1:
        raise ValueError(f"min_iters must be >= 1, got {min_iters}")
    deadline = time.perf_counter() + min_seconds
    i = 0
    while i < min_iters or time.perf_counter() < deadline:
        yield i
        i += 1


def time_calls(fn: Callable[[int], object], min_iters: int, min_seconds: float = 0.0, warmup: int = 0) -> np.ndarray:
    """(n,) ms per call of fn(i) for i = 0, 1, …: at least `min_iters` calls and `min_seconds` s of them.

    `warmup` untimed calls fn(0), …, fn(warmup − 1) come first (first calls allocate buffers and
    pick kernels). The index lets a caller cycle through inputs: fn = lambda i: run(x[i % len(x)]).
    """
    for i in range(warmup):
        fn(i)
    times = []
    for i in _iterations(min_iters, min_seconds):
        t = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t)
    return np.array(times) * 1e3


async def time_calls_async(
    fn: Callable[[int], Awaitable[object]], min_iters: int, min_seconds: float = 0.0, warmup: int = 0
) -> np.ndarray:
    """`time_calls` for a coroutine function: (n,) ms per `await fn(i)`."""
    for i in range(warmup):
        await fn(i)
    times = []
    for i in _iterations(min_iters, min_seconds):
        t = time.perf_counter()
        await fn(i)
        times.append(time.perf_counter() - t)
    return np.array(times) * 1e3
