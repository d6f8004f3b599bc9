"""evaluation/diversity.py: how differently two classifiers err, on hand-built answers."""

from __future__ import annotations

import numpy as np
import pytest

from adaptive_quant.evaluation.diversity import greedy_plans, pair_diversity, render_pairs, render_plan_steps


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


def probs_of(rows: list[list[float]]) -> np.ndarray:
    return np.array(rows, np.float64)


def test_greedy_plans_take_the_look_that_fixes_the_most_first_and_break_ties_by_name() -> None:
    # 4 images, 2 classes, all of class 0; the entry is wrong and unsure on images 2 and 3
    labels = np.array([0, 0, 0, 0])
    entry = probs_of([[0.9, 0.1], [0.9, 0.1], [0.45, 0.55], [0.4, 0.6]])
    looks = {
        "copy": entry.copy(),  # errs exactly like the entry: adds nothing
        "fixes_one": probs_of([[0.9, 0.1], [0.9, 0.1], [0.8, 0.2], [0.5, 0.5]]),  # fixes image 2 only
        "fixes_both": probs_of([[0.6, 0.4], [0.6, 0.4], [0.9, 0.1], [0.9, 0.1]]),  # fixes 2 and 3
    }
    steps = greedy_plans(entry, looks, labels, max_looks=2, share=0.5)
    assert steps[0].plan == "fixes_both"
    assert steps[0].accuracy == 1.0 and steps[0].escalated_accuracy == 1.0  # images 2, 3 are the unsure half
    # second look: both candidates keep every image right (image 3: 0.4 + 0.9 + 0.4 = 1.7 > 1.3 with
    # the copy), so the tie goes to the name that sorts first, whatever the dict's order
    assert steps[1].plan == "fixes_both+copy" and steps[1].accuracy == 1.0
    reordered = greedy_plans(entry, dict(reversed(looks.items())), labels, max_looks=2, share=0.5)
    assert [s.plan for s in reordered] == [s.plan for s in steps]
    table = render_plan_steps("entry", 0.5, steps, 0.5)
    assert "| none | 1 | 50.00% | 50.00% |" in table and "| fixes_both | 2 | 100.00% | 100.00% |" in table


def test_greedy_plans_escalated_accuracy_leaves_the_confident_samples_to_the_entry() -> None:
    labels = np.array([1, 0])
    entry = probs_of([[0.95, 0.05], [0.3, 0.7]])  # confidently wrong on image 0, unsure and wrong on 1
    look = {"other": probs_of([[0.0, 1.0], [1.0, 0.0]])}  # right on both
    (step,) = greedy_plans(entry, look, labels, max_looks=3, share=0.5)  # one candidate: one step
    assert step.accuracy == 1.0  # (0.95 + 0) / 2 < (0.05 + 1) / 2 on image 0
    assert step.escalated_accuracy == 0.5  # only image 1 (the less confident) gets the look


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"share": 0.0}, "share must be in"),
        ({"max_looks": 0}, "max_looks must be"),
        ({"looks": {"bad": np.zeros((2, 3))}}, "look 'bad' has shape"),
    ],
)
def test_greedy_plans_refuses_what_it_cannot_measure(kwargs: dict, message: str) -> None:
    args = {"entry": probs_of([[0.6, 0.4], [0.4, 0.6]]), "looks": {"x": probs_of([[1, 0], [0, 1]])}}
    args.update({"labels": np.array([0, 1]), "max_looks": 1, "share": 0.5} | kwargs)
    with pytest.raises(ValueError, match=message):
        greedy_plans(**args)
