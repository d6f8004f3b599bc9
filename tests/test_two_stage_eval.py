"""Offline two-stage evaluation: strategies priced on recorded outputs, the report, the CLIs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from adaptive_quant.cli import evaluate as evaluate_cli
from adaptive_quant.cli import fit_router as fit_router_cli
from adaptive_quant.core.corruptions import CORRUPTIONS, corrupt
from adaptive_quant.core.manifest import load_manifest
from adaptive_quant.core.planner import PlannerConfig
from adaptive_quant.core.routing import Priority
from adaptive_quant.core.versions import load_version_manifest, read_index
from adaptive_quant.data import make_synthetic
from adaptive_quant.evaluation.policies import router_choice, router_points
from adaptive_quant.evaluation.render import render_two_stage, write_two_stage
from adaptive_quant.evaluation.strategies import (
    cascade_points,
    confidence_at_rate,
    fixed_points,
    oracle_point,
    random_assignment,
    random_escalation,
)
from adaptive_quant.evaluation.two_stage import Recorded
from adaptive_quant.evaluation.two_stage_report import evaluate_two_stage
from adaptive_quant.export.plans import fit_router
from gateway_repo import build_repo


def hand_recorded() -> Recorded:
    """4 samples, 2 classes. Entry (int8): right on 0 and 1 (confident), wrong on 2 and 3 (unsure).
    The flipped pass fixes sample 2 only; fp32 fixes nothing."""
    labels = np.array([0, 0, 1, 1])
    big = 6.0
    logits = {
        "int8": np.array([[big, 0], [big, 0], [0.2, 0], [0.1, 0]]),
        "int8:hflip": np.array([[big, 0], [big, 0], [0, 3.0], [0.5, 0]]),
        "fp32": np.array([[big, 0], [big, 0], [0.3, 0], [0.3, 0]]),
    }
    ms = {"int8": 1.0, "int8:hflip": 1.0, "fp32": 3.0}
    return Recorded.from_logits(labels, "int8", logits, ["none", "int8:hflip", "fp32"], ms)


def test_fixed_plans_confidence_random_and_oracle_on_hand_checked_outputs():
    rec = hand_recorded()
    o = rec.outcomes(["fp32"])  # the entry + each plan, then fp32 alone
    assert o.keys == ["int8", "int8+int8:hflip", "int8+fp32", "fp32"]
    plans = {p.label: p for p in fixed_points(o, label="{key}")}
    assert plans["int8"].accuracy == 0.5 and plans["int8"].compute == 1.0
    assert plans["int8+int8:hflip"].accuracy == 0.75 and plans["int8+int8:hflip"].compute == 2.0
    assert plans["int8+fp32"].accuracy == 0.5 and plans["int8+fp32"].compute == 4.0
    assert plans["fp32"].accuracy == 0.5 and plans["fp32"].compute == 3.0 and plans["fp32"].escalated == 0.0
    assert plans["int8+fp32"].escalated == 1.0 and plans["int8+fp32"].mean_ms == 4.0  # ms: 1 + 3
    conf = rec.confidence()
    [cascade] = cascade_points(o, conf, "int8", "int8+int8:hflip", [0.9], "t={t:g}")  # the two unsure escalate
    assert cascade.accuracy == 0.75 and cascade.escalated == 0.5 and cascade.compute == 1.5
    assert confidence_at_rate(o, conf, "int8", "int8+int8:hflip", 0.25, "x").escalated == 0.25
    rnd = random_escalation(o, "int8", "int8+int8:hflip", 0.5, "x", draws=200)
    assert 0.55 < rnd.accuracy < 0.70  # sample 2 is among the 2 drawn in half the draws: 0.5 + 0.25 / 2
    assert rnd.escalated == 0.5 and rnd.compute == 1.5
    best = oracle_point(o, ["int8", "int8+int8:hflip", "int8+fp32"], label="any plan")
    assert best.accuracy == 0.75 and best.escalated == 0.25  # only sample 2 needs (and gets) a follow-up
    assert best.compute == 1.25 and not best.deployable


def test_the_router_points_use_the_planner_and_respect_budgets():
    rec = hand_recorded()
    # a predictor that knows: the flip helps sample 2 only
    pred = np.array([[0.99, 0.99, 0.99], [0.99, 0.99, 0.99], [0.4, 0.9, 0.4], [0.4, 0.4, 0.4]])
    [balanced] = router_points(rec, pred, [Priority.BALANCED], [0.01], PlannerConfig())
    assert balanced.accuracy == 0.75 and balanced.escalated == 0.25 and balanced.compute == 1.25
    [tight] = router_points(rec, pred, [Priority.BALANCED], [0.01], PlannerConfig(), budgets_ms=[1.5])
    assert tight.escalated == 0.0 and tight.accuracy == 0.5  # 1 ms entry + 1 ms flip > 1.5 ms


def test_quality_ties_follow_the_validation_prior_and_random_assignment_keeps_the_plan_mix():
    rec = hand_recorded()
    # confident samples: the router sees a hair between the plans; an unsure one it resolves
    pred = np.array([[0.990, 0.985, 0.986], [0.990, 0.985, 0.986], [0.4, 0.9, 0.4], [0.40, 0.41, 0.40]])
    plain = router_choice(rec, pred, Priority.QUALITY, PlannerConfig())
    assert plain.tolist() == [0, 0, 1, 1]  # no prior: the highest prediction
    prior = [0.50, 0.75, 0.50]  # the flip plan is the most accurate on validation
    tied = router_choice(rec, pred, Priority.QUALITY, PlannerConfig(), prior=prior)
    assert tied.tolist() == [1, 1, 1, 1]  # ties within 0.01 go to the flip; sample 2's 0.5 lead stands
    # random assignment of [none, none, flip, flip]: sample 2 gets the flip in half the shuffles
    assert 0.55 < random_assignment(rec.outcomes(), plain, draws=400) < 0.70
    assert random_assignment(rec.outcomes(), tied) == 0.75  # every sample escalated: nothing left to chance


def test_corruptions_change_the_images_and_keep_their_shape():
    imgs = make_synthetic(4, seed=0).images
    for name in CORRUPTIONS:
        out = corrupt(imgs, name, seed=1)
        assert out.shape == imgs.shape and out.dtype == np.uint8 and not np.array_equal(out, imgs), name
    assert np.array_equal(corrupt(imgs, "noise", seed=1), corrupt(imgs, "noise", seed=1))  # seeded
    with pytest.raises(ValueError, match="unknown corruption 'fog'; accepted: noise, blur"):
        corrupt(imgs, "fog")


@pytest.fixture(scope="module")
def routed_repo(tmp_path_factory):
    repo = build_repo(tmp_path_factory.mktemp("repo"))
    fit_router(repo, make_synthetic(300, seed=3), ["int8:hflip", "fp32"], threads=1)
    return repo


def test_the_two_stage_report_prices_every_strategy_and_writes_its_files(routed_repo, tmp_path):
    test = make_synthetic(200, seed=4)
    val = make_synthetic(100, seed=5)
    report = evaluate_two_stage(routed_repo, test, val=val, threads=1)
    strategies = {p.strategy for p in report.points}
    # random escalation is priced at each rate where the balanced router escalates some samples, not all
    random = {"random"} if report.equal_rate else set()
    assert strategies == {"fixed", "confidence", "adaptive", "oracle"} | random
    assert len([p for p in report.points if p.strategy == "random"]) == len(report.equal_rate)
    top = max(p.accuracy for p in report.points if p.strategy != "oracle")
    assert next(p for p in report.points if p.strategy == "oracle").accuracy >= top
    assert [s["corruption"] for s in report.shift] == list(CORRUPTIONS)
    assert set(report.auroc) == {"int8:hflip", "fp32"} and report.budgets
    files = write_two_stage(report, tmp_path / "out")
    md = (tmp_path / "out" / "two_stage.md").read_text()
    for section in ("## Verdict", "at equal rate", "## Budgets", "## Under shift", "## Targets"):
        assert section in md
    assert json.loads((tmp_path / "out" / "two_stage.json").read_text())["meta"]["entry"] == "int8"
    assert all(f.is_file() for f in files)


def test_aq_fit_router_and_aq_evaluate_on_a_repository(tmp_path, capsys):
    repo = build_repo(tmp_path / "repo")
    smoke = ["--config", "configs/smoke.yaml", "--set", "data.synthetic_train=400"]
    assert fit_router_cli.main(["--repository", str(repo), *smoke, "--set", "export.plans=[int8:hflip]"]) == 0
    out = capsys.readouterr().out
    assert "int8:hflip" in out and "fix AUROC" in out
    assert [p.name for p in load_manifest(repo).plans] == ["int8:hflip"]
    # the refit is the next version; version 1 (maybe serving in a gateway now) is left as it was
    assert "version 2" in out and read_index(repo).serving == 2
    assert load_version_manifest(repo, 1).plans == [] and (repo / "manifests" / "2.json").is_file()
    args = ["--repository", str(repo), "--out", str(tmp_path / "r"), "--limit", "40", "--no-mlflow", "--no-shift"]
    fast = ["--latency-iters", "5", "--throughput-seconds", "0.05", "--threads", "1", "--no-progress"]
    assert evaluate_cli.main([*args, *fast, "--config", "configs/smoke.yaml"]) == 0
    assert "Two-stage routing" in capsys.readouterr().out and (tmp_path / "r" / "two_stage.md").is_file()
    assert fit_router_cli.main(["--repository", str(tmp_path / "missing"), *smoke]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_each_budget_names_the_fixed_choice_validation_picks_and_puts_an_interval_on_quality(routed_repo):
    """The budget sweep's target compares quality with the best fixed choice that fits, found on the test
    split itself (in hindsight); each row also names the one validation would have chosen, and gives
    quality's gap to both a paired interval, so that a reader can tell a loss from the split's noise."""
    report = evaluate_two_stage(routed_repo, make_synthetic(200, seed=4), threads=1)
    m = load_manifest(routed_repo)
    validation = {v.key: v.val_accuracy for v in m.served_variants()} | {
        f"int8+{p.name}": p.val_accuracy for p in m.plans
    }
    for b in report.budgets:
        gap = 100 * (b["quality_acc"] - b["best_fixed_acc"])
        low, high = b["quality_ci95"]
        assert low - 1e-9 <= gap <= high + 1e-9
        assert b["best_validated"] in validation
        # the best in hindsight is at least as accurate on these images as validation's choice
        assert b["best_validated_acc"] <= b["best_fixed_acc"] + 1e-12
        diff, (low, high) = b["quality_vs_validated_points"], b["quality_vs_validated_ci95"]
        assert diff == pytest.approx(100 * (b["quality_acc"] - b["best_validated_acc"]))
        assert low - 1e-9 <= diff <= high + 1e-9
    # the widest budget fits every fixed choice: validation's pick is the most accurate one on validation
    widest = report.budgets[-1]
    assert validation[widest["best_validated"]] == max(validation.values())
    md = render_two_stage(report)
    assert "fixed choice best on validation" in md and "quality − it, 95 % interval" in md
    assert {"budgets_met_quality_validated", "budgets_no_significant_loss_quality"} <= set(report.targets)
