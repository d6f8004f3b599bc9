"""The routing policy (pure) and the live latency estimator: the decisions a caller would see."""

from __future__ import annotations

import numpy as np
import pytest

from adaptive_quant.core.latency import LatencyConfig, LatencyEstimator
from adaptive_quant.core.manifest import LatencyPoint, LatencyProfile
from adaptive_quant.core.precision import Precision
from adaptive_quant.core.routing import (
    NoVariantAllowed,
    Priority,
    RoutingConfig,
    allowed_mask,
    choose_variant,
    route_batch,
)

PRECISIONS = {"fp32": "fp32", "fp16": "fp16", "int8": "int8"}
ACC = {"fp32": 0.92, "fp16": 0.919, "int8": 0.91}  # predicted p(correct)
LAT = {"fp32": 0.8, "fp16": 0.9, "int8": 0.3}  # ms; FP16 is not faster on CPU
CFG = RoutingConfig(speed_tolerance=0.02, accuracy_per_halving=0.01)


def decide(budget=None, priority=Priority.BALANCED, floor=None, acc=ACC, lat=LAT, available=None, config=CFG):
    d = choose_variant(acc, lat, PRECISIONS, budget, priority, floor, config, available)
    return d.variant, d.budget_met


@pytest.mark.parametrize(
    "budget, priority, floor, expected",
    [
        # no budget: priority alone decides
        (None, Priority.QUALITY, None, ("fp32", True)),
        (None, Priority.SPEED, None, ("int8", True)),  # int8 within 2 points of fp32
        (None, Priority.BALANCED, None, ("int8", True)),  # 1 point per halving: 2.7× faster > 1 point lost
        # a budget removes the slow variants, even for quality
        (0.5, Priority.QUALITY, None, ("int8", True)),
        (0.85, Priority.QUALITY, None, ("fp32", True)),  # fp32 fits (0.8), fp16 (0.9) does not
        # nothing fits: the fastest allowed variant, and the budget is reported missed
        (0.1, Priority.QUALITY, None, ("int8", False)),
        # the floor is never crossed, even when that misses the budget
        (0.5, Priority.SPEED, Precision.FP16, ("fp32", False)),
        (None, Priority.SPEED, Precision.FP16, ("fp32", True)),  # fp32 faster than fp16, as accurate
        (None, Priority.BALANCED, Precision.FP32, ("fp32", True)),
        (10.0, Priority.SPEED, Precision.INT8, ("int8", True)),  # int8 floor = any
    ],
)
def test_routing_table(budget, priority, floor, expected):
    assert decide(budget, priority, floor) == expected


def test_speed_stops_at_the_tolerance():
    acc = {"fp32": 0.92, "fp16": 0.915, "int8": 0.85}
    lat = {"fp32": 0.8, "fp16": 0.5, "int8": 0.3}
    # int8 is 7 points worse: speed takes the fastest variant within 2 points, fp16
    assert decide(None, Priority.SPEED, acc=acc, lat=lat)[0] == "fp16"
    loose = RoutingConfig(speed_tolerance=0.1)
    assert decide(None, Priority.SPEED, acc=acc, lat=lat, config=loose)[0] == "int8"


def test_balanced_knob_moves_between_quality_and_speed():
    acc = {"fp32": 0.95, "fp16": 0.94, "int8": 0.80}
    # int8 is 15 points worse and 2.7× faster (1.4 halvings)
    assert decide(priority=Priority.BALANCED, acc=acc, config=RoutingConfig(accuracy_per_halving=0.0))[0] == "fp32"
    assert decide(priority=Priority.BALANCED, acc=acc, config=RoutingConfig(accuracy_per_halving=0.05))[0] == "fp32"
    assert decide(priority=Priority.BALANCED, acc=acc, config=RoutingConfig(accuracy_per_halving=0.2))[0] == "int8"


def test_unavailable_variants_are_skipped_and_none_left_raises():
    assert decide(None, Priority.SPEED, available={"fp32": True, "fp16": True, "int8": False})[0] == "fp32"
    with pytest.raises(NoVariantAllowed):
        decide(None, Priority.SPEED, floor=Precision.FP16, available={"fp32": False, "fp16": False, "int8": True})


def test_ties_go_to_the_faster_variant():
    same = {"fp32": 0.9, "fp16": 0.9, "int8": 0.9}
    assert decide(None, Priority.QUALITY, acc=same)[0] == "int8"


def test_route_batch_routes_each_sample_on_its_own():
    # columns fp32, fp16, int8; sample 0 is easy for everyone, sample 1 is hard for int8
    acc = np.array([[0.99, 0.99, 0.99], [0.95, 0.90, 0.40]])
    lat = np.array([0.8, 0.9, 0.3])
    out = route_batch(acc, lat, np.array([True, True, True]), None, Priority.QUALITY, CFG)
    assert out.index.tolist() == [2, 0]
    assert out.budget_met.tolist() == [True, True]
    # with a budget only int8 fits: both go to int8, the hard one too, and both budgets hold
    out = route_batch(acc, lat, np.array([True, True, True]), 0.5, Priority.QUALITY, CFG)
    assert out.index.tolist() == [2, 2]


def test_route_batch_agrees_with_choose_variant_on_random_inputs():
    rng = np.random.default_rng(0)
    keys = list(PRECISIONS)
    acc = rng.uniform(0.5, 1.0, size=(200, 3))
    lat = rng.uniform(0.1, 2.0, size=(200, 3))
    for priority in Priority:
        batch = route_batch(acc, lat, np.ones(3, dtype=bool), 1.0, priority, CFG)
        for i in range(0, 200, 7):
            d = choose_variant(dict(zip(keys, acc[i])), dict(zip(keys, lat[i])), PRECISIONS, 1.0, priority, None, CFG)
            assert (d.variant, d.budget_met) == (keys[batch.index[i]], bool(batch.budget_met[i]))


def test_allowed_mask_and_config_validation():
    assert allowed_mask(["fp32", "fp16", "int8"], Precision.FP16).tolist() == [True, True, False]
    assert allowed_mask(["fp32", "fp16", "int8"], None, [True, False, True]).tolist() == [True, False, True]
    with pytest.raises(ValueError, match="speed_tolerance"):
        RoutingConfig(speed_tolerance=-0.1)
    with pytest.raises(ValueError, match="accuracy_per_halving"):
        RoutingConfig(accuracy_per_halving=-1)
    with pytest.raises(ValueError, match="accepted: quality, balanced, speed"):
        Priority.parse("fastest")


# ----------------------------------------------------------------------------- latency estimator


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def profile(p95_b1: float) -> LatencyProfile:
    pts = {
        str(b): LatencyPoint(p50_ms=p95_b1 * f * 0.8, p95_ms=p95_b1 * f, throughput=1.0)
        for b, f in {1: 1, 8: 3, 32: 8}.items()
    }
    return LatencyProfile(host={"cpu": "test"}, batches=pts)


def test_estimate_starts_from_the_profile_at_the_batch_size():
    est = LatencyEstimator({"fp32": profile(1.0), "int8": None}, LatencyConfig(default_service_ms=5.0))
    assert est.estimate_ms("fp32", 1) == pytest.approx(1.0)
    assert est.estimate_ms("fp32", 5) == pytest.approx(3.0)  # smallest profiled batch ≥ 5 is 8
    assert est.estimate_ms("fp32", 100) == pytest.approx(8.0)  # beyond the profile: the largest point
    assert est.estimate_ms("int8", 1) == pytest.approx(5.0)  # no profile: the configured default


def test_in_flight_samples_add_queueing_until_they_finish():
    est = LatencyEstimator({"fp32": profile(1.0)}, LatencyConfig(max_batch_size=32, ewma_alpha=0.0))
    predicted = est.begin("fp32", 40)  # 40 samples in flight: two full batches ahead of us
    assert predicted == pytest.approx(8.0)  # what the 40-sample call itself was expected to take
    assert est.estimate_ms("fp32", 1) == pytest.approx(1.0 + 2 * 8.0)
    est.end("fp32", 40, observed_ms=8.0, predicted_ms=predicted)
    assert est.in_flight("fp32") == 0
    assert est.estimate_ms("fp32", 1) == pytest.approx(1.0)


def test_variants_sharing_compute_wait_for_each_others_work():
    profiles = {"fp32": profile(3.0), "int8": profile(1.0)}
    shared = LatencyEstimator(profiles, LatencyConfig(max_batch_size=32, ewma_alpha=0.0, compute_slots=1))
    apart = LatencyEstimator(profiles, LatencyConfig(max_batch_size=32, ewma_alpha=0.0, compute_slots=0))
    for est in (shared, apart):
        est.begin("int8", 64)  # two full INT8 batches queued: 2 × 8 ms of work
    # on one shared CPU an FP32 call waits behind INT8's work; on hardware of its own it does not
    assert shared.estimate_ms("fp32", 1) == pytest.approx(3.0 + 16.0)
    assert apart.estimate_ms("fp32", 1) == pytest.approx(3.0)
    assert shared.estimate_ms("int8", 1) == apart.estimate_ms("int8", 1) == pytest.approx(1.0 + 16.0)
    two = LatencyEstimator(profiles, LatencyConfig(max_batch_size=32, ewma_alpha=0.0, compute_slots=2))
    two.begin("int8", 64)
    assert two.estimate_ms("fp32", 1) == pytest.approx(3.0 + 8.0)  # two slots drain it twice as fast


def test_observed_latency_corrects_the_profile_and_relaxes_back():
    clock = FakeClock()
    cfg = LatencyConfig(ewma_alpha=0.5, relax_half_life_s=10.0)
    est = LatencyEstimator({"fp32": profile(1.0)}, cfg, clock=clock)
    p = est.begin("fp32", 1)
    est.end("fp32", 1, observed_ms=3.0, predicted_ms=p)  # 3× slower than profiled
    assert est.ratio("fp32") == pytest.approx(2.0)  # 0.5·1 + 0.5·3
    assert est.estimate_ms("fp32", 1) == pytest.approx(2.0)
    clock.t += 10.0  # one half-life without news: half the deviation is forgotten
    assert est.ratio("fp32") == pytest.approx(1.5)
    est.observe("fp32", 1e6)  # one absurd observation is clamped
    assert est.ratio("fp32") <= 0.5 * 1.5 + 0.5 * cfg.max_ratio + 1e-9


def test_failed_calls_release_load_without_teaching_latency():
    est = LatencyEstimator({"fp32": profile(1.0)}, LatencyConfig(ewma_alpha=0.5))
    p = est.begin("fp32", 3)
    est.end("fp32", 3, observed_ms=None, predicted_ms=p)
    assert est.in_flight("fp32") == 0
    assert est.ratio("fp32") == pytest.approx(1.0)


def test_balanced_prices_compute_not_queueing_under_load() -> None:
    """Under load the queue dominates every estimate; the price of a variant is still its compute.

    Latency with queueing: int8 20 ms (busy), fp32 12 ms (idle queue); own service times 0.5 and
    1.2 ms. Pricing the queue would send the sample to fp32, the variant that costs 2.4× the
    compute, exactly when compute is scarce.
    """
    import numpy as np

    from adaptive_quant.core.routing import Priority, RoutingConfig, route_batch

    acc = np.array([[0.895, 0.894]])  # fp32, int8
    busy = np.array([12.0, 20.0])
    own = np.array([1.2, 0.5])
    cfg = RoutingConfig(accuracy_per_halving=0.01)
    queue_priced = route_batch(acc, busy, np.array([True, True]), 50.0, Priority.BALANCED, cfg)
    compute_priced = route_batch(acc, busy, np.array([True, True]), 50.0, Priority.BALANCED, cfg, cost_ms=own)
    assert queue_priced.index.tolist() == [0]
    assert compute_priced.index.tolist() == [1]
    assert compute_priced.budget_met.tolist() == [True]


def test_balanced_prices_compute_higher_under_load():
    acc = np.array([[0.93, 0.90]])  # fp32 3 points more likely right; 4× the compute (2 halvings)
    cost = np.array([4.0, 1.0])
    cfg = RoutingConfig(accuracy_per_halving=0.01, load_price=1.0)
    idle = route_batch(acc, cost, np.array([True, True]), None, Priority.BALANCED, cfg, cost_ms=cost, load=0.0)
    busy = route_batch(acc, cost, np.array([True, True]), None, Priority.BALANCED, cfg, cost_ms=cost, load=1.0)
    assert idle.index[0] == 0  # 3 points > 2 halvings × 1 point: worth FP32 on an idle server
    assert busy.index[0] == 1  # one full batch waiting: 2 halvings × 2 points > 3 points
    flat = route_batch(
        acc,
        cost,
        np.array([True, True]),
        None,
        Priority.BALANCED,
        RoutingConfig(load_price=0.0),
        cost_ms=cost,
        load=5.0,
    )
    assert flat.index[0] == 0


def test_with_nothing_feasible_the_cheapest_compute_answers_not_the_momentarily_fastest():
    acc = np.array([[0.90, 0.90]])
    live = np.array([40.0, 60.0])  # FP32 looks faster right now (INT8 just stalled)...
    cost = np.array([3.0, 1.0])  # ...but INT8 is the cheaper compute
    d = route_batch(acc, live, np.array([True, True]), 10.0, Priority.BALANCED, RoutingConfig(), cost_ms=cost)
    assert d.index[0] == 1 and not d.budget_met[0]
    d = route_batch(acc, live, np.array([True, True]), 50.0, Priority.BALANCED, RoutingConfig(), cost_ms=cost)
    assert d.index[0] == 0 and d.budget_met[0]  # when FP32 fits and INT8 does not, FP32 it is
