"""Cross-validation of the router on the validation split: folds, out-of-fold fits, the tie choice, the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

from adaptive_quant.cli import fit_router as fit_router_cli
from adaptive_quant.core.manifest import load_manifest
from adaptive_quant.evaluation.render import render_cross_validation
from adaptive_quant.evaluation.router_cv import cross_validate, fold_ids, out_of_fold, selected_fixed
from adaptive_quant.evaluation.two_stage import Recorded, best_within, fixed_choices, fixed_right
from adaptive_quant.predictor.fit_deferral import DeferralFitConfig
from gateway_repo import build_repo

FAST = DeferralFitConfig(epochs=60)


def recorded(n: int = 400, seed: int = 0) -> Recorded:
    """2 classes. The entry is right where it is confident and a coin where it is not; the flipped
    pass is right everywhere (so the flip plan fixes every unsure sample); fp32 copies the entry."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    sure = rng.random(n) < 0.7
    entry_says = np.where(sure | (rng.random(n) < 0.5), labels, 1 - labels)
    margin = np.where(sure, 5.0, 0.2) + rng.normal(0, 0.05, n)
    entry = np.zeros((n, 2))
    entry[np.arange(n), entry_says] = margin
    flip = np.zeros((n, 2))
    flip[np.arange(n), labels] = 8.0  # outweighs the entry in the mean of probabilities
    logits = {"int8": entry, "int8:hflip": flip, "fp32": entry.copy()}
    ms = {"int8": 1.0, "int8:hflip": 1.0, "fp32": 3.0}
    return Recorded.from_logits(labels, "int8", logits, ["none", "int8:hflip", "fp32"], ms)


def test_folds_partition_the_samples_and_follow_their_seed():
    f = fold_ids(103, 5, seed=1)
    assert sorted(np.bincount(f).tolist()) == [20, 20, 21, 21, 21]  # every sample in one fold, sizes ±1
    assert np.array_equal(f, fold_ids(103, 5, seed=1)) and not np.array_equal(f, fold_ids(103, 5, seed=2))
    with pytest.raises(ValueError, match="folds must be between 2 and the number of samples"):
        fold_ids(10, 1, seed=0)


def test_out_of_fold_priors_come_from_the_other_folds_only():
    rec = recorded()
    oof = out_of_fold(rec, folds=4, seed=0, fit_config=FAST)
    ok = rec.correct()
    for k in range(4):
        assert np.allclose(oof.priors[k], ok[oof.fold != k].mean(0))  # never the held-out fold's own
    assert oof.pred.shape == ok.shape and np.isfinite(oof.pred).all()
    # the out-of-fold router still learns who needs the flip: higher predicted gain where it fixes
    gain = oof.pred[:, 1] - oof.pred[:, 0]
    fixes = ok[:, 1] & ~ok[:, 0]
    assert gain[fixes].mean() > gain[~fixes].mean() + 0.1


def test_quality_matches_the_fixed_plan_that_fits_and_the_tie_choice_is_reported():
    rec = recorded()
    cv = cross_validate(rec, ["int8", "fp32"], folds=4, ties=(0.0, 1.0), factors=(1.05, 2.5), fit_config=FAST)
    ok = rec.correct()
    by_tie = {t["quality_tie"]: t for t in cv.ties}
    # tie 1: every sample gets the plan most accurate on the other folds, the flip (always right)
    none, tight, roomy = by_tie[1.0]["budgets"]
    assert tight["quality_acc"] == pytest.approx(ok[:, 0].mean()) and tight["best_fixed"] == "int8"
    assert roomy["quality_acc"] == pytest.approx(ok[:, 1].mean()) == pytest.approx(1.0)
    assert roomy["best_fixed"] == "int8+int8:hflip" and roomy["gap_points"] == pytest.approx(0.0)
    assert none["escalated"] == 1.0
    # the tie is chosen against the nested comparator: the best worst budget there
    assert cv.chosen_tie in (0.0, 1.0) and by_tie[cv.chosen_tie]["worst_gap_vs_selected_points"] == max(
        t["worst_gap_vs_selected_points"] for t in cv.ties
    )
    assert best_within(fixed_choices(rec, ["int8", "fp32"]), 0.5, "int8") == ("int8", ok[:, 0].mean())  # nothing fits
    assert cv.balanced["confidence_plan"] == "int8:hflip" and 0 < cv.balanced["escalated"] < 1
    # the nested comparator: the flip plan is right everywhere, so every fold picks it where it fits,
    # and quality at tie 1 matches it there; where nothing but the entry fits, it is the entry
    assert roomy["selected_fixed_acc"] == pytest.approx(1.0) and roomy["gap_vs_selected_points"] == pytest.approx(0.0)
    assert tight["selected_fixed_acc"] == pytest.approx(ok[:, 0].mean())
    assert by_tie[1.0]["worst_gap_vs_selected_points"] == pytest.approx(0.0)
    text = render_cross_validation(cv, 1.0)
    assert "quality_tie" in text and "← chosen" in text and "balanced:" in text and "nested" in text


def test_the_nested_comparator_picks_on_the_other_folds_and_scores_on_the_held_out_one():
    """Two fixed choices of equal pooled accuracy that split the folds between them: in hindsight the
    pooled comparator reaches their common 75 %; the nested one picks, per fold, the choice that the
    other folds prefer, which is the one wrong on the held-out fold, and scores what a deployment
    choosing on validation would get."""
    n = 400
    labels = np.zeros(n, dtype=np.int64)
    fold = np.repeat(np.arange(4), n // 4)
    # "int8" is right on folds 0 and 1 and on half of 2 and 3; "fp32" mirrors it
    a_right = (fold < 2) | (np.arange(n) % 2 == 0)
    b_right = (fold >= 2) | (np.arange(n) % 2 == 0)
    # wrong answers are the surer ones, so the plan "fp32" (int8 and fp32 averaged) is right only
    # where both are: 50 %, never the pick
    as_logits = lambda right: np.where(right[:, None], [[4.0, 0.0]], [[0.0, 6.0]])  # noqa: E731
    logits = {"int8": as_logits(a_right), "fp32": as_logits(b_right)}
    rec = Recorded.from_logits(labels, "int8", logits, ["none", "fp32"], {"int8": 1.0, "fp32": 1.0})
    assert fixed_choices(rec, ["int8", "fp32"])["int8"][0] == pytest.approx(0.75)
    table, right = fixed_choices(rec, ["int8", "fp32"]), fixed_right(rec, ["int8", "fp32"])
    acc, picks = selected_fixed(table, right, "int8", fold, None)
    # fold 0 held out: int8 is right on 100 + 50 + 50 of the other 300, fp32 on 50 + 100 + 100: fp32,
    # which is right on half of fold 0; likewise for every fold
    assert picks == ["fp32", "fp32", "int8", "int8"]
    assert acc == pytest.approx(0.5)
    # a budget nothing fits in leaves the entry alone
    assert selected_fixed(table, right, "int8", fold, 0.5) == (pytest.approx(0.75), ["int8"] * 4)


def test_aq_fit_router_cross_validate_writes_nothing_to_the_repository(tmp_path, capsys):
    repo = build_repo(tmp_path / "repo")
    smoke = ["--config", "configs/smoke.yaml", "--set", "data.synthetic_train=400"]
    assert fit_router_cli.main(["--repository", str(repo), *smoke, "--set", "export.plans=[int8:hflip]"]) == 0
    before = (repo / "manifest.json").read_bytes()
    out = tmp_path / "cv.json"
    args = ["--repository", str(repo), *smoke, "--cross-validate", "3", "--repeats", "1", "--out", str(out)]
    assert fit_router_cli.main(args) == 0
    printed = capsys.readouterr().out
    assert "3-fold cross-validation" in printed and "chosen planner.quality_tie" in printed
    assert json.loads(out.read_text())["folds"] == 3
    assert (repo / "manifest.json").read_bytes() == before and load_manifest(repo).plans[0].name == "int8:hflip"
    assert fit_router_cli.main(["--repository", str(repo), *smoke, "--cross-validate", "1"]) == 2
    assert "--cross-validate takes K ≥ 2 folds" in capsys.readouterr().err


def test_balanced_price_sweep_escalates_less_as_the_price_rises_and_reports_points_over_the_best_variant():
    rec = recorded()
    cv = cross_validate(rec, ["int8", "fp32"], folds=4, ties=(0.0,), factors=(2.5,), fit_config=FAST, prices=(0.0, 1.0))
    free, dear = cv.prices
    ok = rec.correct()
    # free follow-ups: every sample the router expects any gain on gets the flip, which is always right;
    # a price of 1.0 (100 points of accuracy per entry pass of compute) is one no plan can pay
    assert free["escalated"] > 0.25 and dear["escalated"] == 0.0
    assert dear["accuracy"] == pytest.approx(ok[:, 0].mean()) and dear["compute"] == pytest.approx(1.0)
    assert free["accuracy"] > dear["accuracy"] + 0.1 and free["compute"] > 1.25
    # int8 and fp32 answer alike (fp32 copies the entry): the comparator is the better-or-first of them
    assert free["best_variant"] in ("int8", "fp32")
    assert free["gain_points"] == pytest.approx(100 * (free["accuracy"] - ok[:, 0].mean()))
    text = render_cross_validation(cv, 1.0)
    assert "balanced per planner.followup_price" in text and f"{free['gain_points']:+.2f}" in text
