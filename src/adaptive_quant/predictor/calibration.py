"""How good a probability is, and how to make it a better one: AUROC, ECE, log-loss, Platt scaling.

NumPy only and pure, so the router's fit (`fit_deferral`), the two-stage evaluation and the
tests all measure a predictor the same way.
"""

from __future__ import annotations

import numpy as np

from adaptive_quant.core.stats import sigmoid as sigmoid  # re-exported: the fit and the tests use it from here


def expected_calibration_error(probs: np.ndarray, outcomes: np.ndarray, bins: int = 10) -> float:
    """ECE: |accuracy − confidence| averaged over equal-width probability bins, weighted by count."""
    probs, outcomes = np.asarray(probs, np.float64).ravel(), np.asarray(outcomes, np.float64).ravel()
    ids = np.minimum((probs * bins).astype(int), bins - 1)
    ece = 0.0
    for b in range(bins):
        m = ids == b
        if m.any():
            ece += m.mean() * abs(outcomes[m].mean() - probs[m].mean())
    return float(ece)


def binary_nll(probs: np.ndarray, outcomes: np.ndarray) -> float:
    """Mean negative log-likelihood of outcomes under probabilities (clipped away from 0 and 1)."""
    p = np.clip(np.asarray(probs, np.float64), 1e-7, 1 - 1e-7)
    y = np.asarray(outcomes, np.float64)
    return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())


def fit_platt(logits: np.ndarray, outcomes: np.ndarray, l2: float = 1e-3, iters: int = 100) -> tuple[float, float]:
    """Platt scaling: (a, b) minimising the binary NLL of sigmoid(a·logit + b).

    Newton's method with a backtracking line search (a plain Newton step overshoots when the
    logits are large and the curvature small). A small L2 on (a − 1, b) keeps the fit finite
    when the held-out outcomes are separable.
    """
    z = np.asarray(logits, np.float64)
    y = np.asarray(outcomes, np.float64)
    n = max(1, len(z))

    def loss(a: float, b: float) -> float:
        t = a * z + b  # NLL = log(1 + e^t) − y·t, stable through logaddexp
        return float((np.logaddexp(0.0, t) - y * t).sum() / n + 0.5 * l2 * ((a - 1) ** 2 + b**2))

    a, b = 1.0, 0.0
    current = loss(a, b)
    for _ in range(iters):
        p = sigmoid(a * z + b)
        w = p * (1 - p)
        grad = np.array([((p - y) * z).sum() / n + l2 * (a - 1), (p - y).sum() / n + l2 * b])
        hess = np.array([[(w * z * z).sum() / n + l2, (w * z).sum() / n], [(w * z).sum() / n, w.sum() / n + l2]])
        step = np.linalg.solve(hess, grad)
        t = 1.0
        while t > 1e-6 and loss(a - t * step[0], b - t * step[1]) > current:
            t *= 0.5
        a, b = a - t * step[0], b - t * step[1]
        new = loss(a, b)
        if current - new < 1e-12:
            break
        current = new
    return float(a), float(b)


def auroc(scores: np.ndarray, positives: np.ndarray) -> float:
    """Area under the ROC curve (Mann–Whitney, ties counted half); nan when one class is absent."""
    scores = np.asarray(scores, np.float64)
    pos = np.asarray(positives, bool)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    # average ranks over ties
    i = 0
    while i < len(scores):
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))
