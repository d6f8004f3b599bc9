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


@dataclass(frozen=True)
class PlanStep:
    """One step of the greedy search for follow-up plans (`greedy_plans`)."""

    plan: str  # the follow-up's passes, written as the router spells them: "twin_int8:hflip+wide_int8"
    accuracy: float  # 0..1, every sample answered by the mean of the entry's and the plan's softmax
    escalated_accuracy: float  # 0..1, only the entry's least confident `share` of samples get the plan


def greedy_plans(
    entry: np.ndarray, looks: dict[str, np.ndarray], labels: np.ndarray, max_looks: int, share: float = 0.2
) -> list[PlanStep]:
    """Grow a follow-up one look at a time, each step adding the look that most raises the accuracy
    of the averaged answer (entry included) when every sample gets it.

    entry: (N, C) softmax of the entry pass; looks: pass name → (N, C) softmax of a candidate pass
    ("twin_int8", "wide_int8:hflip"); labels (N,). Returns one step per look added (at most
    `max_looks`, fewer if the candidates run out), so step k is the best plan of k + 1 looks that
    keeps step k − 1's. Greedy rather than every combination: C(12, 4) = 495 plans fitted on 5,000
    validation images would choose the lucky one, not the good one. Ties go to the name that sorts
    first, so the result does not hang on the order of `looks`. `escalated_accuracy` is what a
    confidence rule at that share would answer: closer to what `balanced` does with the plan."""
    n = labels.shape[0]
    if entry.ndim != 2 or entry.shape[0] != n:
        raise ValueError(f"entry probabilities {entry.shape} for {n} labels: expected (N, C)")
    for name, p in looks.items():
        if p.shape != entry.shape:
            raise ValueError(f"look {name!r} has shape {p.shape}; the entry's is {entry.shape}")
    if not 0.0 < share <= 1.0:
        raise ValueError(f"share must be in (0, 1]; got {share}")
    if max_looks < 1:
        raise ValueError(f"max_looks must be ≥ 1; got {max_looks}")
    unsure = np.zeros(n, dtype=bool)
    unsure[np.argsort(entry.max(axis=1), kind="stable")[: max(1, round(share * n))]] = True
    total = np.array(entry, dtype=np.float64, copy=True)
    chosen: list[str] = []
    steps: list[PlanStep] = []
    for _ in range(min(max_looks, len(looks))):
        best_name, best_acc = "", -1.0
        for name in sorted(set(looks) - set(chosen)):
            acc = float(((total + looks[name]).argmax(axis=1) == labels).mean())
            if acc > best_acc:  # strictly: an equal later name never displaces an earlier one
                best_name, best_acc = name, acc
        chosen.append(best_name)
        total += looks[best_name]
        escalated = np.where(unsure[:, None], total, entry).argmax(axis=1) == labels
        steps.append(PlanStep("+".join(chosen), best_acc, float(escalated.mean())))
    return steps


def render_plan_steps(entry_name: str, entry_accuracy: float, steps: list[PlanStep], share: float) -> str:
    """A markdown table of the greedy steps, the entry alone first."""
    rows = [
        f"| follow-up after {entry_name} | looks | every sample | least confident {share:.0%} only |",
        "|---|---|---|---|",
        f"| none | 1 | {entry_accuracy:.2%} | {entry_accuracy:.2%} |",
    ]
    for s in steps:
        rows.append(f"| {s.plan} | {s.plan.count('+') + 2} | {s.accuracy:.2%} | {s.escalated_accuracy:.2%} |")
    return "\n".join(rows)
