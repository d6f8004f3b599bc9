"""evaluation/diversity.py: how differently two classifiers err, on hand-built answers."""

from __future__ import annotations

import numpy as np
import pytest

from adaptive_quant.evaluation.diversity import pair_diversity, render_pairs


def one_hot_logits(answers: list[int], classes: int = 3, margin: float = 4.0) -> np.ndarray:
    z = np.zeros((len(answers), classes), np.float32)
    z[np.arange(len(answers)), answers] = margin
    return z


def test_two_networks_that_err_on_different_images() -> None:
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    a = one_hot_logits([0, 1, 2, 0, 1, 2, 0, 1, 0, 1])  # wrong on images 8 and 9
    b = one_hot_logits([0, 1, 2, 0, 1, 2, 1, 2, 2, 0])  # wrong on images 6 and 7
    b[6:8] /= 2  # b is unsure where it is wrong, sure where a is wrong: no tie anywhere
    b[8:10] *= 2
    p = pair_diversity("a", a, "b", b, labels)
    assert (p.first_accuracy, p.second_accuracy) == (0.8, 0.8)
    assert p.disagreement == pytest.approx(0.4)
    assert p.shared_errors == 0.0  # none of a's errors is b's
    assert p.oracle == 1.0  # every image has one right answer
    assert p.averaged == 1.0  # the surer of the two is right wherever they differ
    assert p.averaged_gain_points == pytest.approx(20.0)
    assert "| a | b | 80.00% | 80.00% | 40.00% | 0.0% | 100.00% | 100.00% | +20.00 |" in render_pairs([p])


def test_a_confident_second_opinion_fixes_an_unsure_first_answer() -> None:
    labels = np.array([0, 1])
    a = np.array([[1.0, 1.2, 0.0], [0.0, 3.0, 0.0]], np.float32)  # unsure and wrong on image 0
    b = np.array([[5.0, 0.0, 0.0], [0.0, 2.0, 0.0]], np.float32)
    p = pair_diversity("a", a, "b", b, labels)
    assert p.first_accuracy == 0.5 and p.averaged == 1.0 and p.averaged_gain_points == pytest.approx(0.0)
    assert p.shared_errors == 0.0 and p.oracle == 1.0


def test_logits_for_other_images_are_refused() -> None:
    with pytest.raises(ValueError, match="one row per image"):
        pair_diversity("a", np.zeros((3, 3)), "b", np.zeros((2, 3)), np.zeros(3, int))
