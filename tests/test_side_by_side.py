"""evaluation/side_by_side.py: the corrupted copy and the table of scripts/bench_networks.py, on hand-built runs."""

from __future__ import annotations

import numpy as np
import pytest

from adaptive_quant.core.corruptions import CORRUPTIONS
from adaptive_quant.evaluation.side_by_side import TargetRun, corrupted_copy, render, summarise


def test_the_corrupted_copy_is_seeded_and_corrupts_every_image_with_one_of_the_corruptions() -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(30, 220, size=(40, 32, 32, 3), dtype=np.uint8)
    original = images.copy()
    a, which = corrupted_copy(images, seed=27)
    b, which_again = corrupted_copy(images, seed=27)
    assert np.array_equal(a, b) and np.array_equal(which, which_again)  # the same copy for every target
    assert a.shape == images.shape and a.dtype == np.uint8
    assert set(which.tolist()) <= set(range(len(CORRUPTIONS))) and len(set(which.tolist())) > 1
    changed = [(a[i] != images[i]).any() for i in range(len(images))]
    assert all(changed), "every image carries a corruption"
    c, _ = corrupted_copy(images, seed=28)
    assert not np.array_equal(a, c)
    assert np.array_equal(images, original)  # the clean images are left as they were


def _run(target: str, data: str, accuracy: float, mean_ms: float, errors: int = 0, right=None) -> TargetRun:
    return TargetRun(target, data, 100, accuracy, mean_ms, mean_ms, mean_ms, errors, right=right)


def _right(n_right: int, n: int = 100) -> np.ndarray:
    return np.arange(n) < n_right


def test_the_summary_gives_points_over_the_best_fixed_model_and_time_over_the_plain_server() -> None:
    runs = [_run("baseline", "clean", 0.90, 4.0), _run("gateway balanced", "clean", 0.915, 5.0, errors=1)]
    fixed = {"clean": {"int8": _right(90, 1000), "fp32": _right(905, 1000), "twin_int8": _right(899, 1000)}}
    summary = summarise(runs, fixed)
    gw = next(r for r in summary["rows"] if r["target"] == "gateway balanced")
    assert gw["best_fixed"] == "fp32" and abs(gw["points_over_best_fixed"] - 1.0) < 1e-9
    assert gw["time_vs_baseline"] == 5.0 / 4.0 and gw["errors"] == 1
    assert gw["points_ci95"] is None  # a run without its per-image outcomes has no interval
    assert summary["fixed"]["clean"]["fp32"] == 0.905
    text = render(summary, "test host")
    assert "| clean | gateway balanced | 91.50 % | +1.00 (fp32 90.50 %) | – | 1.25× | 5.00 ms | 1 |" in text


def test_the_summary_says_whether_a_gain_is_more_than_the_noise_of_the_images() -> None:
    """A gateway right on 9,150 of 10,000 images where the best fixed model is right on 9,050, all of
    them among the gateway's: +1.00 point with an interval clear of 0. A second one, +0.05 by trading
    400 images for 395: an interval that straddles 0, which a reader must see before trusting it."""
    n = 10_000
    fp32 = np.arange(n) < 9_050
    clear = np.arange(n) < 9_150
    noisy = fp32.copy()
    noisy[9_050:9_450] = True  # 400 images only the gateway gets right
    noisy[:395] = False  # 395 the fixed model gets right and it does not
    runs = [
        _run("baseline", "clean", float(fp32.mean()), 4.0, right=fp32),
        _run("gateway balanced", "clean", float(clear.mean()), 5.0, right=clear),
        _run("gateway quality", "clean", float(noisy.mean()), 9.0, right=noisy),
    ]
    rows = {r["target"]: r for r in summarise(runs, {"clean": {"fp32": fp32, "int8": np.arange(n) < 9_000}})["rows"]}
    low, high = rows["gateway balanced"]["points_ci95"]
    assert rows["gateway balanced"]["points_over_best_fixed"] == pytest.approx(1.0)
    assert 0.0 < low < 1.0 < high
    low, high = rows["gateway quality"]["points_ci95"]
    assert rows["gateway quality"]["points_over_best_fixed"] == pytest.approx(0.05)
    assert low < 0.0 < high
    assert rows["baseline"]["points_ci95"] == [0.0, 0.0]  # the same answers as the best fixed model
    text = render(summarise(runs, {"clean": {"fp32": fp32}}), "test host")
    assert f"| +1.00 (fp32 90.50 %) | {rows['gateway balanced']['points_ci95'][0]:+.2f} to " in text


def test_targets_take_turns_and_each_answers_every_image_once_over_real_http(tmp_path) -> None:
    """run_interleaved against a real gateway (uvicorn in a thread): two targets at the same URL and
    priority answer every image once each, identically; the rounds only change the order."""
    from adaptive_quant.evaluation.side_by_side import encode_bodies, run_interleaved
    from adaptive_quant.serving.app import create_app
    from adaptive_quant.serving.settings import load_settings
    from gateway_repo import build_repo
    from http_server import serve_in_thread

    repo = build_repo(tmp_path / "repo")
    settings = load_settings(overrides={"repository": str(repo), "latency.ewma_alpha": 0.0}, environ={})
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(23, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, 23)
    bodies = encode_bodies(images)
    with serve_in_thread(create_app(settings)) as url:
        targets = [("a", url, "speed"), ("b", url, "speed")]
        a, b = run_interleaved(targets, "clean", bodies, labels, rounds=5, progress=False)
        # more rounds than images: one image per chunk, still every image once
        (c,) = run_interleaved([("c", url, "speed")], "clean", bodies, labels, rounds=100, progress=False)
        with pytest.raises(ValueError, match="rounds must be >= 1"):
            run_interleaved(targets, "clean", bodies, labels, rounds=0, progress=False)
    for run in (a, b, c):
        assert run.samples == 23 and run.errors == 0 and sum(run.passes.values()) == 23
        assert run.mean_ms > 0 and run.p95_ms >= run.p50_ms > 0
    assert (a.target, b.target, c.target) == ("a", "b", "c")
    assert a.accuracy == b.accuracy == c.accuracy and a.passes == b.passes == c.passes
    # each run keeps which images it got right (the paired interval's input), consistent with its accuracy
    assert np.array_equal(a.right, b.right) and a.right.shape == (23,) and a.right.mean() == a.accuracy
