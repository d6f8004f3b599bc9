"""report.py and strategies.py on hand-made numbers: classification counts, strategy scoring, the Pareto frontier, the verdict."""

from __future__ import annotations

import numpy as np
import pytest

from adaptive_quant.core.stats import max_softmax
from adaptive_quant.evaluation.report import classification_metrics, confusion_matrix, pareto_mask, recommend, verdict
from adaptive_quant.evaluation.strategies import (
    Outcomes,
    StrategyPoint,
    cascade_points,
    fixed_points,
    mixed_throughput,
    oracle_point,
)


def test_classification_metrics_by_hand():
    labels = np.array([0, 0, 1, 1, 2])
    pred = np.array([0, 1, 1, 1, 0])
    m = classification_metrics(labels, pred, ["a", "b", "c"])
    assert m.confusion == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]  # rows: true, columns: predicted
    assert m.accuracy == pytest.approx(3 / 5)
    by = {c.name: c for c in m.per_class}
    assert (by["a"].precision, by["a"].recall, by["a"].f1) == pytest.approx((0.5, 0.5, 0.5))
    assert (by["b"].precision, by["b"].recall, by["b"].f1) == pytest.approx((2 / 3, 1.0, 0.8))
    assert (by["c"].precision, by["c"].recall, by["c"].f1, by["c"].support) == (0.0, 0.0, 0.0, 1)  # never predicted
    assert m.macro_precision == pytest.approx((0.5 + 2 / 3) / 3)
    assert m.macro_f1 == pytest.approx(1.3 / 3)


def test_confusion_matrix_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="differ in shape"):
        confusion_matrix(np.array([0, 1]), np.array([0]), 2)


def test_pareto_mask_hand_made_points():
    #            A     B     C     D     E(=B) F     G(nan)
    acc = [0.90, 0.85, 0.80, 0.90, 0.85, 0.95, float("nan")]
    lat = [10.0, 5.0, 6.0, 12.0, 5.0, 20.0, 1.0]
    mask = pareto_mask(acc, lat)
    # C: B is more accurate and faster; D: A is as accurate and faster; G has no accuracy
    assert mask.tolist() == [True, True, False, False, True, True, False]


def test_pareto_mask_ties_on_one_axis():
    # same latency, lower accuracy → dominated; same accuracy, higher latency → dominated
    assert pareto_mask([0.9, 0.8], [5.0, 5.0]).tolist() == [True, False]
    assert pareto_mask([0.9, 0.9], [5.0, 6.0]).tolist() == [True, False]
    assert pareto_mask([0.9, 0.9], [5.0, 5.0]).tolist() == [True, True]  # exact duplicates both stay
    assert pareto_mask([], []).tolist() == []


def test_pareto_mask_throughput_as_negative_cost():
    acc, thr = [0.9, 0.8, 0.85], [100.0, 300.0, 250.0]
    assert pareto_mask(acc, [-t for t in thr]).tolist() == [True, True, True]
    assert pareto_mask([0.9, 0.8, 0.79], [-100.0, -300.0, -250.0]).tolist() == [True, True, False]


def test_mixed_throughput_is_harmonic():
    assert mixed_throughput(np.array([0.5, 0.5]), np.array([100.0, 300.0])) == pytest.approx(150.0)
    assert mixed_throughput(np.array([1.0, 0.0]), np.array([100.0, 300.0])) == pytest.approx(100.0)


def test_score_choice_counts():
    correct = np.array([[1, 0], [1, 1], [0, 1], [0, 0]], dtype=bool)
    lat = np.array([[10.0, 1.0], [10.0, 1.0], [10.0, 2.0], [10.0, 3.0]])  # ms, (N, V)
    choice = np.array([0, 1, 1, 1])
    o = Outcomes(["fp32", "int8"], correct, lat, np.array([100.0, 1000.0]), share_budgets=[2.5])
    p = o.score(choice, "adaptive", "x", budget_ms=2.5)
    assert p.accuracy == pytest.approx(3 / 4)  # right, right, right, wrong
    assert p.mean_ms == pytest.approx((10 + 1 + 2 + 3) / 4)
    assert p.within_budget == pytest.approx(2 / 4)  # 1 ms and 2 ms samples
    assert p.mix == {"fp32": 0.25, "int8": 0.75}
    assert p.throughput == pytest.approx(1 / (0.25 / 100 + 0.75 / 1000))
    assert p.within_by_budget == {"2.5": 0.5}
    assert p.escalated == 0.0 and p.compute is None  # single-stage routes: no follow-up, compute not counted


def test_strategies_on_a_per_variant_latency():
    """Outcomes with one latency per variant (V,) and no throughput measured."""
    keys = ["fp32", "int8"]
    correct = np.array([[1, 1], [1, 0], [0, 1], [0, 0]], dtype=bool)
    o = Outcomes(keys, correct, np.array([3.0, 1.0]))  # ms: int8 is the cheap one
    fp32, int8 = fixed_points(o)
    assert (fp32.accuracy, fp32.mean_ms, fp32.mix) == (0.5, pytest.approx(3.0), {"fp32": 1.0, "int8": 0.0})
    assert int8.accuracy == 0.5 and int8.mean_ms == pytest.approx(1.0) and np.isnan(int8.throughput)
    oracle = oracle_point(o)  # the cheapest right one: int8, fp32, int8, and int8 when none is right
    assert oracle.accuracy == 0.75 and oracle.mix == {"fp32": 0.25, "int8": 0.75} and not oracle.deployable
    assert oracle.mean_ms == pytest.approx((1 + 3 + 1 + 1) / 4)
    # int8 sure of samples 0 and 1 (top-1 softmax ≈ 1), unsure of 2 and 3 (two classes tied: 0.5)
    logits = np.array([[20.0, 0.0], [20.0, 0.0], [5.0, 5.0], [5.0, 5.0]], dtype=np.float32)
    cascade = o.then("int8", "fp32")  # the route int8 then fp32, fp32's answer: single-stage's cascade
    assert cascade.keys == ["fp32", "int8", "int8→fp32"]
    low, high = cascade_points(cascade, max_softmax(logits), "int8", "int8→fp32", [0.4, 0.6], "t={t:g}")
    assert low.mix == {"fp32": 0.0, "int8": 1.0} and low.accuracy == 0.5 and low.mean_ms == pytest.approx(1.0)
    assert high.mix == {"fp32": 0.5, "int8": 0.5} and high.param == 0.6 and high.label == "t=0.6"
    assert (low.escalated, high.escalated) == (0.0, 0.5)
    assert high.accuracy == pytest.approx(1 / 4)  # int8 right on 0, wrong on 1; fp32 wrong on 2 and 3
    assert high.mean_ms == pytest.approx((1 + 1 + 4 + 4) / 4)  # an escalated sample pays both


def _pt(strategy, label, acc, ms, mix, budget=None, prio=None, within=None, deployable=True, wb=None):
    return StrategyPoint(
        strategy,
        label,
        acc,
        ms,
        ms * 1.2,
        within,
        1000.0 / ms,
        mix,
        budget_ms=budget,
        priority=prio,
        deployable=deployable,
        within_by_budget=wb or {},
    )


def test_recommend_and_verdict_from_numbers():
    fp32 = _pt("fixed", "fixed fp32", 0.93, 3.0, {"fp32": 1.0, "int8": 0.0}, wb={"1": 0.0, "2": 0.0, "4": 1.0})
    int8 = _pt("fixed", "fixed int8", 0.91, 1.0, {"fp32": 0.0, "int8": 1.0}, wb={"1": 0.96, "2": 1.0, "4": 1.0})
    ptq = _pt("fixed", "fixed int8_ptq (baseline, not served)", 0.88, 1.0, {"int8_ptq": 1.0}, deployable=False)
    ad = _pt(
        "adaptive",
        "adaptive balanced @ 2 ms",
        0.925,
        1.6,
        {"fp32": 0.3, "int8": 0.7},
        budget=2.0,
        prio="balanced",
        within=0.97,
    )
    recs = dict(recommend([fp32, int8, ad], [0.5, 1.0, 2.0, 4.0, None]))
    assert recs[0.5] is None  # nothing finishes 95% of samples within 0.5 ms
    assert recs[1.0] is int8
    assert recs[2.0] is ad  # more accurate than int8 and 97% within 2 ms
    assert recs[4.0] is fp32 and recs[None] is fp32
    text = verdict([fp32, int8, ptq, ad], [0.5, 1.0, 2.0, 4.0, None])
    assert "3.0× faster" in text and "-2.00 points" in text
    assert "gains 3.00 points against post-training" in text
    assert "at 2 ms run adaptive balanced (92.50%" in text
    assert "at 4 ms run fixed fp32" in text and "at 0.5 ms nothing keeps 95%" in text
    assert "never mixed" not in text  # this adaptive point mixes fp32 and int8
    # single-stage routing on priors: every point sends all samples to one variant, and the verdict says so
    one = _pt("adaptive", "adaptive quality @ no budget", 0.93, 3.0, {"fp32": 1.0, "int8": 0.0}, prio="quality")
    text = verdict([fp32, int8, one], [1.0, None])
    assert "Adaptive routing never mixed variants in this sweep" in text and "fixed precision per budget" in text
