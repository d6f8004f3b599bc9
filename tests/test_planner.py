"""The follow-up planner and plans: properties a caller relies on (budget, floor, priorities, load)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adaptive_quant.core.planner import PlannerConfig, effective_slack, plan_followups
from adaptive_quant.core.plans import NONE, Pass, Plan, View, applicable, apply_view, combine
from adaptive_quant.core.routing import Priority

CFG = PlannerConfig()


@st.composite
def problems(draw):
    n = draw(st.integers(1, 12))
    p = draw(st.integers(1, 5))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    acc = rng.uniform(0, 1, (n, p))
    cost = np.concatenate([[0.0], rng.uniform(0.2, 4.0, p - 1)])
    ms = np.concatenate([[0.0], rng.uniform(0.1, 20.0, p - 1)])
    allowed = rng.uniform(size=p) < 0.8
    remaining = draw(st.one_of(st.none(), st.floats(0.0, 25.0)))
    load = draw(st.floats(0.0, 8.0))
    return acc, cost, ms, allowed, remaining, load


@settings(max_examples=150, deadline=None)
@given(problems())
def test_the_budget_and_the_allowed_plans_are_respected(problem):
    acc, cost, ms, allowed, remaining, load = problem
    for priority in Priority:
        d = plan_followups(acc, cost, ms, allowed, remaining, priority, CFG, load)
        chosen = d.index[d.index > 0]
        assert allowed[chosen].all(), "a plan whose variant is below the floor or down was chosen"
        if remaining is not None:
            assert (ms[chosen] <= remaining).all(), "a follow-up that cannot finish in the budget was planned"


@settings(max_examples=150, deadline=None)
@given(problems())
def test_quality_is_at_least_balanced_which_is_at_least_speed_and_none(problem):
    acc, cost, ms, allowed, remaining, load = problem
    got = {pr: plan_followups(acc, cost, ms, allowed, remaining, pr, CFG, load).predicted for pr in Priority}
    assert (got[Priority.QUALITY] >= got[Priority.BALANCED] - 1e-12).all()
    assert (got[Priority.BALANCED] >= got[Priority.SPEED] - 1e-12).all()
    assert (got[Priority.SPEED] >= acc[:, 0] - 1e-12).all()


@settings(max_examples=100, deadline=None)
@given(problems(), st.floats(0.0, 4.0), st.floats(0.1, 8.0))
def test_load_raises_the_price_so_follow_ups_are_shed_first(problem, load, more):
    """More load never buys more compute, with latencies that order like the plans' compute (as
    they do from one latency profile). With independent ones it can: the margin grows with the
    load (effective_slack), so a cheap but slow plan may stop fitting and a costlier, faster one
    still clear the price (hypothesis found load 0.5 → 1.5, remaining 17 ms: a 0.67-pass plan of
    11 ms infeasible at 2× margin, a 2.8-pass plan of 7.4 ms not). Then the budget decides, as it
    should; a sample that had no follow-up still gets none (first assertion)."""
    acc, cost, ms_any, allowed, remaining, _ = problem
    # with any latencies, a sample without a follow-up keeps none: every plan only got dearer or infeasible
    calm_any = plan_followups(acc, cost, ms_any, allowed, remaining, Priority.BALANCED, CFG, load)
    busy_any = plan_followups(acc, cost, ms_any, allowed, remaining, Priority.BALANCED, CFG, load + more)
    assert (busy_any.index[calm_any.index == 0] == 0).all()
    ms = cost * (ms_any.max() / max(float(cost.max()), 1e-9))  # one profile: time ∝ compute
    calm = plan_followups(acc, cost, ms, allowed, remaining, Priority.BALANCED, CFG, load)
    busy = plan_followups(acc, cost, ms, allowed, remaining, Priority.BALANCED, CFG, load + more)
    assert cost[busy.index].sum() <= cost[calm.index].sum() + 1e-9
    assert (busy.index > 0).sum() <= (calm.index > 0).sum() or cost[busy.index].sum() < cost[calm.index].sum()


@settings(max_examples=200, deadline=None)
@given(problems(), st.booleans())
def test_one_sample_requests_get_the_same_decision_as_the_vectorised_rule(problem, with_prior):
    acc, cost, ms, allowed, remaining, load = problem
    prior = np.random.default_rng(len(acc)).uniform(0.85, 0.92, acc.shape[1]) if with_prior else None
    for priority in Priority:
        batch = plan_followups(acc, cost, ms, allowed, remaining, priority, CFG, load, prior)  # vectorised
        for i in range(len(acc)):  # each row alone takes the scalar path
            one = plan_followups(acc[i : i + 1], cost, ms, allowed, remaining, priority, CFG, load, prior)
            assert one.index.tolist() == [batch.index[i]] and one.predicted[0] == batch.predicted[i]


@settings(max_examples=150, deadline=None)
@given(problems())
def test_quality_ties_go_to_the_plan_more_accurate_on_validation(problem):
    """quality with a prior: the chosen plan is predicted within the tie (quality_tie, shrinking
    with the load) of the best feasible one, and no feasible plan as close is more accurate on
    validation."""
    acc, cost, ms, allowed, remaining, load = problem
    prior = np.random.default_rng(acc.shape[1]).uniform(0.85, 0.92, acc.shape[1])
    d = plan_followups(acc, cost, ms, allowed, remaining, Priority.QUALITY, CFG, load, prior)
    ok = allowed.copy()
    ok[0] = True
    feasible = ok & (True if remaining is None else effective_slack(CFG, load) * ms <= remaining)
    feasible[0] = True
    best = np.where(feasible, acc, -np.inf).max(axis=1)
    tie = max(1e-9, CFG.quality_tie * (1.0 - min(1.0, load)))
    assert (d.predicted >= best - tie - 1e-12).all()
    tied = feasible & (acc >= best[:, None] - tie)
    assert (prior[d.index] >= np.where(tied, prior, -np.inf).max(axis=1) - 1e-9).all()
    balanced = plan_followups(acc, cost, ms, allowed, remaining, Priority.BALANCED, CFG, load, prior)
    assert (d.predicted >= balanced.predicted - tie - 1e-12).all()


@settings(max_examples=150, deadline=None)
@given(problems())
def test_balanced_escalates_where_the_price_says_and_ties_between_follow_ups_go_to_validation(problem):
    """balanced with a prior: the same samples escalate as without it (the price decides that); the
    follow-up each gets scores within plan_tie (shrinking with the load) of the best follow-up, and
    no feasible follow-up as close is more accurate on validation."""
    acc, cost, ms, allowed, remaining, load = problem
    prior = np.random.default_rng(acc.shape[1] + 1).uniform(0.85, 0.92, acc.shape[1])
    off = PlannerConfig(plan_tie=0.0)
    for priority in (Priority.BALANCED, Priority.SPEED):
        d = plan_followups(acc, cost, ms, allowed, remaining, priority, CFG, load, prior)
        plain = plan_followups(acc, cost, ms, allowed, remaining, priority, off, load, prior)
        if priority is Priority.BALANCED:
            assert ((d.index > 0) == (plain.index > 0)).all()
        else:  # speed keeps a follow-up only if its own predicted gain clears the tolerance
            assert not ((d.index > 0) & (plain.index == 0)).any()
    d = plan_followups(acc, cost, ms, allowed, remaining, Priority.BALANCED, CFG, load, prior)
    ok = allowed.copy()
    ok[0] = True
    feasible = ok & (True if remaining is None else effective_slack(CFG, load) * ms <= remaining)
    price = CFG.followup_price * (1.0 + CFG.load_price * load)
    score = np.where(feasible, acc - price * cost, -np.inf)[:, 1:]
    rows = np.nonzero(d.index > 0)[0]
    if not len(rows) or score.shape[1] == 0:
        return
    tie = CFG.plan_tie * (1.0 - min(1.0, load))
    best = score[rows].max(axis=1)
    chosen = score[rows, d.index[rows] - 1]
    assert (chosen >= best - tie - 1e-12).all()
    tied = score[rows] >= best[:, None] - tie
    assert (prior[d.index[rows]] >= np.where(tied, prior[1:], -np.inf).max(axis=1) - 1e-9).all()


def test_balanced_gives_an_escalating_sample_the_plan_validation_prefers_when_the_router_cannot_tell():
    # an unsure sample; after the price (1 point per entry pass) the one-look plan scores 1.2 points
    # above the two-look one (68.7 against 67.5), within the tie, and validation says the two-look
    # plan is 0.3 points better over the whole split
    acc = np.array([[0.60, 0.700, 0.705]])
    cost, ms = np.array([0.0, 1.3, 3.0]), np.array([0.0, 1.0, 2.4])
    prior = np.array([0.909, 0.9162, 0.9192])  # validation: none, twin_int8:hflip, twin_int8:hflip+wide_int8
    assert plan_followups(acc, cost, ms, np.ones(3, bool), None, Priority.BALANCED, CFG, 0.0, prior).index.tolist() == [
        2
    ]
    # no prior, or the rule off: the score alone
    assert plan_followups(acc, cost, ms, np.ones(3, bool), None, Priority.BALANCED, CFG).index.tolist() == [1]
    off = PlannerConfig(plan_tie=0.0)
    assert plan_followups(acc, cost, ms, np.ones(3, bool), None, Priority.BALANCED, off, 0.0, prior).index.tolist() == [
        1
    ]
    # a budget the two-look plan does not fit: the one-look plan
    assert plan_followups(acc, cost, ms, np.ones(3, bool), 2.0, Priority.BALANCED, CFG, 0.0, prior).index.tolist() == [
        1
    ]
    # a confident sample does not escalate, however much validation likes a plan
    sure = np.array([[0.99, 0.991, 0.992]])
    assert plan_followups(
        sure, cost, ms, np.ones(3, bool), None, Priority.BALANCED, CFG, 0.0, prior
    ).index.tolist() == [0]


def test_quality_spends_compute_on_a_confident_sample_only_when_the_validation_prior_says_it_pays():
    # a confident sample: the router sees 0.2 points between none and a flip, less than it resolves
    acc = np.array([[0.980, 0.978, 0.979]])
    cost, ms = np.array([0.0, 1.0, 3.7]), np.array([0.0, 1.0, 3.0])
    prior = np.array([0.8923, 0.8987, 0.8942])  # validation: none, int8:hflip, fp32 (every sample)
    q = plan_followups(acc, cost, ms, np.ones(3, bool), None, Priority.QUALITY, CFG, 0.0, prior)
    assert q.index.tolist() == [1]  # the flip, which is the most accurate plan on validation
    plain = plan_followups(acc, cost, ms, np.ones(3, bool), None, Priority.QUALITY, CFG)
    assert plain.index.tolist() == [0]  # no prior: the prediction alone, and "none" is highest
    off = PlannerConfig(quality_tie=0.0)
    assert plan_followups(acc, cost, ms, np.ones(3, bool), None, Priority.QUALITY, off, 0.0, prior).index.tolist() == [
        0
    ]
    clear = np.array([[0.50, 0.56, 0.53]])  # an unsure sample: the router's 6 points decide, not the prior
    assert plan_followups(
        clear, cost, ms, np.ones(3, bool), None, Priority.QUALITY, CFG, 0.0, prior
    ).index.tolist() == [1]
    assert plan_followups(acc, cost, ms, np.ones(3, bool), 0.5, Priority.QUALITY, CFG, 0.0, prior).index.tolist() == [0]
    # under load the tie's compute is not free: at a full batch in flight, the prediction alone
    assert plan_followups(acc, cost, ms, np.ones(3, bool), None, Priority.QUALITY, CFG, 1.0, prior).index.tolist() == [
        0
    ]
    assert plan_followups(acc, cost, ms, np.ones(3, bool), None, Priority.QUALITY, CFG, 0.5, prior).index.tolist() == [
        1
    ]


def test_a_follow_up_runs_where_it_is_predicted_to_pay_and_not_elsewhere():
    # sample 0: confident, a flip adds nothing; sample 1: unsure, a flip is predicted to add 6 points
    acc = np.array([[0.99, 0.99, 0.995], [0.50, 0.56, 0.57]])
    cost = np.array([0.0, 1.0, 2.7])  # none, int8:hflip, fp32 (2.7 entry passes on CPU)
    ms = np.array([0.0, 1.0, 3.0])
    point = PlannerConfig(followup_price=0.01)  # a point of accuracy per entry pass
    d = plan_followups(acc, cost, ms, np.ones(3, bool), None, Priority.BALANCED, point)
    # flip: 0.56 - 0.01 x 1 = 0.55 > 0.50; fp32: 0.57 - 0.01 x 2.7 = 0.543, one more point for 1.7 more passes
    assert d.index.tolist() == [0, 1]
    # at half the price (the default, 0.005) fp32's extra point is worth its passes: 0.5565 > 0.555
    assert plan_followups(acc, cost, ms, np.ones(3, bool), None, Priority.BALANCED, CFG).index.tolist() == [0, 2]
    q = plan_followups(acc, cost, ms, np.ones(3, bool), None, Priority.QUALITY, CFG)
    assert q.index.tolist() == [2, 2]
    tight = plan_followups(acc, cost, ms, np.ones(3, bool), 2.0, Priority.QUALITY, CFG)
    assert tight.index.tolist() == [0, 1]  # fp32 does not fit 2 ms; a flip that adds nothing loses the tie
    spent = plan_followups(acc, cost, ms, np.ones(3, bool), 0.5, Priority.QUALITY, CFG)
    assert spent.index.tolist() == [0, 0]  # nothing fits: the entry answer stands
    speed = plan_followups(acc, cost, ms, np.ones(3, bool), None, Priority.SPEED, PlannerConfig(speed_tolerance=0.1))
    assert speed.index.tolist() == [0, 0]  # a 6-point gain does not clear a 10-point tolerance


def test_bad_shapes_name_what_is_expected():
    with pytest.raises(ValueError, match=r"extra_cost must be \(2,\)"):
        plan_followups(np.zeros((3, 2)), np.zeros(3), np.zeros(2), np.ones(2, bool), None, Priority.BALANCED, CFG)
    with pytest.raises(ValueError, match="column 0 = none"):
        plan_followups(np.zeros(3), np.zeros(1), np.zeros(1), np.ones(1, bool), None, Priority.BALANCED, CFG)


def test_plans_parse_and_print_as_written():
    plan = Plan.parse("int8:hflip+fp32")
    assert plan.passes == (Pass("int8", View.HFLIP), Pass("fp32"))
    assert plan.name == "int8:hflip+fp32" and Plan.parse(NONE).name == NONE
    assert plan.variants == {"int8", "fp32"}
    with pytest.raises(ValueError, match="unknown view 'vflip'; accepted: identity, hflip"):
        Pass.parse("int8:vflip")
    with pytest.raises(ValueError, match="repeats a pass"):
        Plan.parse("int8:hflip+int8:hflip")
    entry = Pass("int8")
    assert applicable(Plan.parse("int8:hflip"), entry, {"int8", "fp32"})
    assert not applicable(Plan.parse("int8"), entry, {"int8"})  # the entry pass again adds nothing
    assert not applicable(Plan.parse("int8:hflip"), Pass("fp32"), {"fp32"})  # below the floor


def test_views_and_the_average_of_passes():
    x = np.arange(2 * 3 * 2 * 4, dtype=np.float32).reshape(2, 3, 2, 4)
    flipped = apply_view(x, View.HFLIP)
    assert flipped.flags.c_contiguous and np.array_equal(flipped[..., 0], x[..., -1])
    assert apply_view(flipped, View.HFLIP).tolist() == x.tolist()
    assert apply_view(x, View.IDENTITY) is x
    a = np.array([[0.8, 0.2]], np.float32)
    b = np.array([[0.2, 0.8]], np.float32)
    c = np.array([[0.2, 0.8]], np.float32)
    assert np.allclose(combine([a, b, c]), [[0.4, 0.6]]) and np.allclose(a, [[0.8, 0.2]])  # inputs untouched


def test_an_idle_server_plans_a_follow_up_that_just_fits_and_a_busy_one_keeps_a_margin():
    acc = np.array([[0.5, 0.6]])  # a flip predicted to add 10 points
    cost, ms = np.array([0.0, 1.0]), np.array([0.0, 1.0])  # its estimate: 1 ms

    def plan(load: float) -> int:
        return int(plan_followups(acc, cost, ms, np.ones(2, bool), 1.2, Priority.QUALITY, CFG, load).index[0])

    assert plan(0.0) == 1  # idle: the estimate (a p95 profile, no queue) fits the 1.2 ms left
    assert plan(1.0) == 0  # busy: it must fit twice over (planner.slack), 2 ms > 1.2 ms
    assert effective_slack(CFG, 0.0) == 1.0 and effective_slack(CFG, 0.5) == 1.5 and effective_slack(CFG, 7.0) == 2.0


@settings(max_examples=100, deadline=None)
@given(problems(), st.floats(0.1, 8.0))
def test_a_follow_up_feasible_under_load_is_feasible_idle(problem, more):
    acc, cost, ms, allowed, remaining, load = problem
    if remaining is None:
        return
    busy = plan_followups(acc, cost, ms, allowed, remaining, Priority.QUALITY, CFG, load + more)
    # quality ignores the price: only feasibility differs between the loads
    idle_feasible = allowed & (effective_slack(CFG, load) * ms <= remaining)
    assert (idle_feasible[busy.index[busy.index > 0]]).all()
