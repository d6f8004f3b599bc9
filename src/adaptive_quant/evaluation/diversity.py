"""How differently two classifiers err: the measure for choosing a second network (issue 27).

A second network pays in a cascade only where it is right and the first is wrong. For a pair of
answers on the same labelled images this gives: each one's accuracy, how often they disagree, the
share of the first's errors the second shares, the oracle (right when either is right: the ceiling
of any router over the pair) and the averaged-probability answer (what a follow-up that averages
with the entry gives when every sample gets it). Pure NumPy over logits; the caller runs the
networks (on the validation split: a network, a plan or a threshold is never chosen on the test split).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from adaptive_quant.core.stats import softmax


@dataclass(frozen=True)
class PairDiversity:
    first: str
    second: str
    n: int  # images
    first_accuracy: float  # shares, 0..1
    second_accuracy: float
    disagreement: float  # top-1 answers differ
    shared_errors: float  # of the first's errors, the share the second also gets wrong
    oracle: float  # right when either is right
    averaged: float  # top-1 of the mean of both softmax outputs

    @property
    def averaged_gain_points(self) -> float:
        """Points the averaged answer gains over the better of the two."""
        return (self.averaged - max(self.first_accuracy, self.second_accuracy)) * 100

    def to_dict(self) -> dict[str, float | int | str]:
        return {**asdict(self), "averaged_gain_points": self.averaged_gain_points}


def pair_diversity(first: str, a: np.ndarray, second: str, b: np.ndarray, labels: np.ndarray) -> PairDiversity:
    """a, b (N, C) logits of two classifiers on the same images; labels (N,) int."""
    if a.shape != b.shape or a.shape[0] != labels.shape[0]:
        raise ValueError(f"logits {a.shape} and {b.shape} for {labels.shape[0]} labels: one row per image each")
    ra, rb = a.argmax(1) == labels, b.argmax(1) == labels
    wrong_a = ~ra
    averaged = (softmax(a) + softmax(b)).argmax(1) == labels
    return PairDiversity(
        first=first,
        second=second,
        n=int(labels.shape[0]),
        first_accuracy=float(ra.mean()),
        second_accuracy=float(rb.mean()),
        disagreement=float((a.argmax(1) != b.argmax(1)).mean()),
        shared_errors=float((wrong_a & ~rb).sum() / max(1, wrong_a.sum())),
        oracle=float((ra | rb).mean()),
        averaged=float(averaged.mean()),
    )


def render_pairs(pairs: list[PairDiversity]) -> str:
    """A markdown table, one row per pair."""
    rows = [
        "| first | second | first acc | second acc | disagree | shared errors | oracle | averaged | averaged − best |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for p in pairs:
        rows.append(
            f"| {p.first} | {p.second} | {p.first_accuracy:.2%} | {p.second_accuracy:.2%} | {p.disagreement:.2%} "
            f"| {p.shared_errors:.1%} | {p.oracle:.2%} | {p.averaged:.2%} | {p.averaged_gain_points:+.2f} |"
        )
    return "\n".join(rows)
