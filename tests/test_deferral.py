"""Deferral predictor (two-stage routing): entry features, fitting, calibration, files, input errors.

Synthetic entry logits whose truth depends on the margin: the entry pass is right more often the
larger its margin; the plan "int8:hflip" fixes most low-margin errors and rarely breaks anything;
the plan "fp32" fixes a few errors anywhere and breaks more right answers than it fixes.
"""

import json
import math

import numpy as np
import pytest

from adaptive_quant.core.manifest import sha256_file
from adaptive_quant.predictor.calibration import auroc, expected_calibration_error
from adaptive_quant.predictor.deferral import (
    SPEC_FILE,
    WEIGHTS_FILE,
    DeferralPredictor,
    DeferralSpecError,
    parse_plan,
    plan_name,
)
from adaptive_quant.predictor.entry_features import FEATURE_NAMES, entry_features, feature_names, features_one
from adaptive_quant.predictor.fit_deferral import DeferralFitConfig, fit_deferral, plan_outcomes

PLANS = ["none", "int8:hflip", "fp32"]


def synthetic(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(logits (N, 10), outcomes (N, 3) bool, margin (N,)) as described in the module doc."""
    rng = np.random.default_rng(seed)
    logits = (rng.normal(size=(n, 10)) * rng.uniform(0.5, 6.0, (n, 1))).astype(np.float32)
    margin = entry_features(logits)[:, FEATURE_NAMES.index("margin")]
    right = rng.random(n) < 0.25 + 0.75 * margin
    low = margin < 0.25
    u = rng.random(n)
    hflip = np.where(right, u > 0.01, np.where(low, u < 0.7, u < 0.05))
    v = rng.random(n)
    fp32 = np.where(right, v > 0.15, v < 0.1)
    return logits, np.stack([right, hflip, fp32], axis=1), margin


@pytest.fixture(scope="module")
def fitted():
    logits, outcomes, _ = synthetic(4000, seed=0)
    return fit_deferral(logits, outcomes, PLANS, DeferralFitConfig(seed=0))


# ----------------------------------------------------------------------------- features


def test_entry_features_are_finite_in_their_documented_ranges_and_class_order_free() -> None:
    logits, _, _ = synthetic(500, seed=1)
    logits[0] = 1e4 * np.eye(10)[3]  # saturated softmax
    logits[1] = 0.0  # a perfect tie
    f = entry_features(logits)
    assert f.shape == (500, len(FEATURE_NAMES)) and f.dtype == np.float32 and np.isfinite(f).all()
    col = {name: f[:, i] for i, name in enumerate(FEATURE_NAMES)}
    top = f[:, :5]
    assert (top >= 0).all() and (top <= 1).all() and (np.diff(top, axis=1) <= 0).all()  # sorted, descending
    assert (col["margin"] >= 0).all() and (col["margin"] <= 1).all()
    assert (col["entropy"] >= 0).all() and (col["entropy"] <= 1).all()
    assert (col["log_p_top1"] <= 0).all() and (col["log_p_top1"] >= -math.log(10) - 1e-6).all()
    assert col["margin"][0] == pytest.approx(1.0) and col["entropy"][0] == pytest.approx(0.0, abs=1e-6)
    assert col["margin"][1] == 0.0 and col["entropy"][1] == pytest.approx(1.0)
    # relabelling the classes changes nothing: the features describe certainty, not the class
    perm = np.random.default_rng(2).permutation(10)
    assert np.allclose(entry_features(logits[:, perm]), f, atol=1e-6)
    # the one-image Python path agrees with the batched NumPy path
    assert np.allclose([features_one(r) for r in logits[:50].tolist()], f[:50], atol=1e-6)
    # fewer classes than the top-k: k shrinks, names follow
    assert entry_features(np.zeros((2, 3))).shape == (2, len(feature_names(3))) == (2, 6)


def test_bad_inputs_name_the_expected_shape(fitted) -> None:
    predictor, _ = fitted
    with pytest.raises(ValueError, match=r"\(N, C\)"):
        entry_features(np.zeros(10))  # one image must be (1, C)
    with pytest.raises(ValueError, match=r"C = 10.*got shape \(1, 5\)"):
        predictor.predict(np.zeros((1, 5), np.float32))
    with pytest.raises(ValueError, match=r"\(N, C\).*got shape \(2, 10, 1\)"):
        predictor.predict(np.zeros((2, 10, 1), np.float32))
    for n in (1, 3):  # the one-image fast path checks too
        bad = np.zeros((n, 10), np.float32)
        bad[0, 2] = np.nan
        with pytest.raises(ValueError, match="NaN"):
            predictor.predict(bad)
    logits, outcomes, _ = synthetic(100, seed=3)
    with pytest.raises(ValueError, match=r"shape \(N, P\) = \(100, 3\)"):
        fit_deferral(logits, outcomes[:, :2], PLANS)
    with pytest.raises(ValueError, match="must start with 'none'"):
        fit_deferral(logits, outcomes, ["int8:hflip", "none", "fp32"])
    with pytest.raises(ValueError, match="view in"):
        parse_plan("int8:vflip")


# ----------------------------------------------------------------------------- fitting


def test_fitted_predictor_ranks_and_is_calibrated_on_held_out_data(fitted) -> None:
    predictor, report = fitted
    logits, outcomes, _ = synthetic(4000, seed=10)  # never seen by the fit
    p = predictor.predict(logits)
    assert p.shape == (4000, 3) and p.dtype == np.float32 and ((p >= 0) & (p <= 1)).all()
    assert predictor.plan_names == PLANS
    # the true probabilities themselves reach AUROC 0.80, 0.71, 0.72 here: int8:hflip rescues
    # the low-margin samples, so its truth depends less on the margin
    for j, floor in enumerate((0.75, 0.62, 0.65)):
        assert auroc(p[:, j], outcomes[:, j]) > floor, f"plan {PLANS[j]} ranks barely better than chance"
        assert expected_calibration_error(p[:, j], outcomes[:, j]) < 0.05, f"plan {PLANS[j]} is miscalibrated"
    # the report measured the same on its own calibration part
    assert report.n_fit + report.n_calibration == 4000 and report.n_calibration == pytest.approx(1000, abs=2)
    assert set(report.plans) == set(PLANS) and set(report.gain) == {"int8:hflip", "fp32"}
    # (1,000 samples: ECE over 10 bins carries ~0.03 of estimation noise of its own)
    assert report.plans["none"].auroc > 0.7 and report.plans["none"].ece_calibrated < 0.08
    for m in report.plans.values():
        assert m.nll_calibrated <= m.nll_raw + 1e-3  # Platt minimises the log-loss it is fitted on
    assert report.gain["int8:hflip"].auroc_learned_gain > 0.8
    json.dumps(report.to_dict())  # JSON-ready, for a manifest or MLflow


def test_a_plan_is_predicted_to_help_exactly_where_it_fixes_errors(fitted) -> None:
    predictor, _ = fitted
    logits, outcomes, margin = synthetic(4000, seed=11)
    gain = predictor.predicted_gain(logits)
    low, high = margin < 0.15, margin > 0.6
    # int8:hflip fixes low-margin errors: predicted gain there is clearly positive, ~0 when sure
    assert gain[low, 1].mean() > 0.15 and abs(gain[high, 1].mean()) < 0.03
    assert gain[low, 1].mean() > gain[high, 1].mean() + 0.1
    # and its predicted accuracy matches what it does on those samples
    assert predictor.predict(logits)[low, 1].mean() == pytest.approx(outcomes[low, 1].mean(), abs=0.06)
    # fp32 breaks more than it fixes where the entry is sure: predicted as a loss there
    assert gain[high, 2].mean() < -0.03


def test_fitting_is_deterministic_for_a_seed() -> None:
    logits, outcomes, _ = synthetic(800, seed=4)
    cfg = DeferralFitConfig(epochs=60, seed=5)
    a, _ = fit_deferral(logits, outcomes, PLANS, cfg)
    b, _ = fit_deferral(logits, outcomes, PLANS, cfg)
    assert all(np.array_equal(a.weights[k], b.weights[k]) for k in a.weights)


# ----------------------------------------------------------------------------- runtime and files


def test_one_image_path_matches_the_batched_path(fitted) -> None:
    predictor, _ = fitted
    logits, _, _ = synthetic(200, seed=6)
    batched = predictor.predict(logits)
    one_by_one = np.concatenate([predictor.predict(logits[i : i + 1]) for i in range(200)])
    assert one_by_one.dtype == np.float32 and np.allclose(one_by_one, batched, atol=1e-6)
    assert np.allclose(predictor.predict(logits.astype(np.float64)), batched, atol=1e-6)


def test_save_load_round_trip_and_sha256(fitted, tmp_path) -> None:
    predictor, report = fitted
    spec = predictor.save(tmp_path / "deferral", extra={"metrics": report.to_dict()["gain"]})
    assert spec["sha256"] == sha256_file(tmp_path / "deferral" / WEIGHTS_FILE)
    on_disk = json.loads((tmp_path / "deferral" / SPEC_FILE).read_text())
    assert on_disk["sha256"] == spec["sha256"] and on_disk["parameters"] == predictor.num_parameters()
    assert [p["name"] for p in on_disk["plans"]] == PLANS and on_disk["plans"][2]["passes"] == ["fp32:identity"]
    loaded = DeferralPredictor.load(tmp_path / "deferral", sha256=spec["sha256"])
    logits, _, _ = synthetic(300, seed=7)
    assert np.array_equal(loaded.predict(logits), predictor.predict(logits))
    assert np.array_equal(loaded.predict(logits[:1]), predictor.predict(logits[:1]))
    with pytest.raises(DeferralSpecError, match="sha256 given by the caller"):
        DeferralPredictor.load(tmp_path / "deferral", sha256="0" * 64)
    with (tmp_path / "deferral" / WEIGHTS_FILE).open("ab") as fh:
        fh.write(b"tampered")
    with pytest.raises(DeferralSpecError, match="sha256 given by its spec"):
        DeferralPredictor.load(tmp_path / "deferral")


# ----------------------------------------------------------------------------- plans and outcomes


def test_plan_outcomes_average_the_entry_with_the_plans_passes() -> None:
    labels = np.array([0, 1])
    entry = np.array([[0.40, 0.60], [0.45, 0.55]])  # wrong on 0, right on 1
    passes = {
        "int8:hflip": np.array([[0.90, 0.10], [0.70, 0.30]]),  # flips both: fixes 0, breaks 1
        "fp32": np.array([[0.30, 0.70], [0.50, 0.50]]),  # bare variant = identity view
    }
    plans = [[], ["int8:hflip"], ["fp32:identity"], ["int8:hflip", "fp32"]]
    out = plan_outcomes(entry, passes, plans, labels)
    # mean over [entry, hflip, fp32]: sample 0 → (0.533, 0.467) right; sample 1 → (0.55, 0.45) wrong
    assert out.tolist() == [[False, True, False, True], [True, False, True, False]]
    with pytest.raises(ValueError, match=r"needs passes \['fp16:hflip'\]"):
        plan_outcomes(entry, passes, [["fp16:hflip"]], labels)
    with pytest.raises(ValueError, match="must have the entry's shape"):
        plan_outcomes(entry, {"fp32": np.ones((3, 2))}, [["fp32"]], labels)


def test_plan_names_round_trip() -> None:
    assert parse_plan("none") == []
    assert parse_plan("int8:hflip+fp32") == ["int8:hflip", "fp32:identity"]
    assert plan_name(["fp32:identity", "fp32:hflip"]) == "fp32+fp32:hflip"
    assert plan_name(parse_plan("int8:hflip+fp32:hflip")) == "int8:hflip+fp32:hflip"


def test_the_gateways_one_image_planning_decides_as_the_batched_planner(fitted) -> None:
    """FollowupStage plans a one-image request in plain Python floats (its fast path); across
    priorities, budgets, queues and a drifted latency ratio it must choose what the vectorised
    planner chooses from the same predictions and prices."""
    from adaptive_quant.core.latency import LatencyConfig, LatencyEstimator
    from adaptive_quant.core.manifest import LatencyPoint, LatencyProfile
    from adaptive_quant.core.planner import PlannerConfig, plan_followups
    from adaptive_quant.core.precision import Precision
    from adaptive_quant.core.routing import Priority
    from adaptive_quant.serving.followup import FollowupStage

    predictor, _ = fitted

    def profile(b1_ms: float) -> LatencyProfile:
        pts = {
            str(b): LatencyPoint(p50_ms=b1_ms * f, p95_ms=b1_ms * f, throughput=1.0) for b, f in {1: 1, 32: 9}.items()
        }
        return LatencyProfile(host={"cpu": "test"}, batches=pts)

    clock = [0.0]
    est = LatencyEstimator({"int8": profile(0.5), "fp32": profile(1.8)}, LatencyConfig(), clock=lambda: clock[0])
    config = PlannerConfig(followup_price=0.004)  # cheap enough that both plans get chosen somewhere
    stage = FollowupStage(predictor, ["int8", "fp32"], [Precision.INT8, Precision.FP32], config)
    assert stage._predict_row is not None  # the fast path is the one under test
    logits, _, _ = synthetic(300, seed=7)
    rng = np.random.default_rng(8)
    chosen = set()
    for i in range(300):
        z = logits[i : i + 1]
        in_flight = int(rng.integers(0, 80))
        if in_flight:
            est.begin("int8", in_flight)
        est.observe("fp32", float(rng.uniform(0.5, 3.0)))  # a drifted ratio, relaxing with the clock
        clock[0] += float(rng.uniform(0.0, 20.0))
        allowed = np.array([True, True, bool(rng.random() < 0.8)])
        remaining = None if rng.random() < 0.3 else float(rng.uniform(0.0, 12.0))
        priority = list(Priority)[i % 3]
        fast = stage.decide("int8", z, allowed, remaining, priority, est)
        cost, ms = stage.price("int8", 1, est)
        slow = plan_followups(
            predictor.predict(logits[i : i + 2])[:1], cost, ms[None], allowed, remaining, priority, config, est.load()
        )
        assert fast.index.tolist() == slow.index.tolist(), (i, priority, remaining, in_flight)
        assert np.allclose(fast.predicted, slow.predicted, atol=1e-6)
        chosen.add(int(fast.index[0]))
        if in_flight:
            est.end("int8", in_flight, None, 1.0)
    # both answers were compared: no follow-up, and the plan that pays (the synthetic fp32 plan
    # breaks more than it fixes, so no priority picks it)
    assert chosen == {0, 1}


def test_follow_ups_are_priced_by_the_profiles_median_so_a_noisy_tail_does_not_make_fp32_look_cheap(fitted):
    """A start-up profile taken on busy cores inflates every p95 alike (seen: INT8 5.1 ms, FP32
    6.9 ms, where quiet it is 4.4x). The price of a plan is its compute, the p50 ratio; its
    feasibility under a budget still uses the p95 estimate."""
    from adaptive_quant.core.latency import LatencyConfig, LatencyEstimator
    from adaptive_quant.core.manifest import LatencyPoint, LatencyProfile
    from adaptive_quant.core.planner import PlannerConfig
    from adaptive_quant.core.precision import Precision
    from adaptive_quant.serving.followup import FollowupStage

    def profile(p50: float, p95: float) -> LatencyProfile:
        return LatencyProfile(host={"cpu": "busy"}, batches={"1": LatencyPoint(p50_ms=p50, p95_ms=p95, throughput=1.0)})

    est = LatencyEstimator({"int8": profile(0.5, 5.1), "fp32": profile(2.2, 6.9)}, LatencyConfig())
    predictor, _ = fitted
    stage = FollowupStage(predictor, ["int8", "fp32"], [Precision.INT8, Precision.FP32], PlannerConfig())
    cost, ms = stage.price("int8", 1, est)
    by_plan = dict(zip(predictor.plan_names, cost))
    assert by_plan["int8:hflip"] == pytest.approx(1.0) and by_plan["fp32"] == pytest.approx(4.4)
    assert dict(zip(predictor.plan_names, ms))["fp32"] == pytest.approx(6.9)  # deadlines: the p95
    assert est.compute_ms("fp32", 1) == 2.2 and est.service_ms("fp32", 1) == 6.9
