"""The measures every predictor is judged by (predictor/calibration.py): Platt scaling, ECE, AUROC."""

import numpy as np

from adaptive_quant.predictor.calibration import auroc, binary_nll, expected_calibration_error, fit_platt, sigmoid


def test_platt_scaling_improves_calibration_on_held_out_data() -> None:
    rng = np.random.default_rng(0)
    true_logit = rng.normal(2.0, 1.5, 4000)  # mostly right, like a 90 %-accurate classifier
    outcomes = rng.random(4000) < sigmoid(true_logit)
    miscalibrated = true_logit * 3 - 2  # three times too sure, and shifted
    a, b = fit_platt(miscalibrated[:2000], outcomes[:2000])
    assert abs(a - 1 / 3) < 0.08 and abs(b - 2 / 3) < 0.3  # recovers the inverse map
    before = expected_calibration_error(sigmoid(miscalibrated[2000:]), outcomes[2000:])
    after = expected_calibration_error(sigmoid(a * miscalibrated[2000:] + b), outcomes[2000:])
    assert after < before / 2
    # and the held-out log-loss falls with it
    assert binary_nll(sigmoid(a * miscalibrated[2000:] + b), outcomes[2000:]) < binary_nll(
        sigmoid(miscalibrated[2000:]), outcomes[2000:]
    )


def test_auroc_matches_definition() -> None:
    assert auroc(np.array([0.1, 0.4, 0.5, 0.8]), np.array([False, True, False, True])) == 0.75  # 3 of 4 pairs ordered
    assert auroc(np.array([1, 1, 1.0]), np.array([True, False, True])) == 0.5
    assert np.isnan(auroc(np.array([0.2, 0.3]), np.array([True, True])))
