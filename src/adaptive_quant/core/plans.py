"""Follow-up plans: which extra passes may answer a sample after the entry pass. Pure, no I/O.

A *pass* is one variant run on one view of the image, written `variant[:view]` ("int8",
"int8:hflip", "fp32"). A *plan* is the list of extra passes a sample gets after the entry pass,
written with `+` ("int8:hflip", "int8:hflip+fp32:hflip"); the plan "none" has no extra pass. The
final answer averages the softmax probabilities of every pass that ran, the entry pass included
(averaging probabilities, not logits: the passes come from differently calibrated precisions).

Views are deterministic transforms the gateway applies to the normalised input, so a Triton server
only ever sees ordinary `images` tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

import numpy as np

NONE = "none"  # the plan without follow-up; always column 0 wherever plans are tabulated


class View(str, Enum):
    IDENTITY = "identity"
    HFLIP = "hflip"  # mirrored left to right: CIFAR-10 classes are symmetric under it, training used it


@dataclass(frozen=True)
class Pass:
    variant: str  # manifest key, e.g. "int8"
    view: View = View.IDENTITY

    @property
    def name(self) -> str:
        return self.variant if self.view is View.IDENTITY else f"{self.variant}:{self.view.value}"

    @classmethod
    def parse(cls, text: str) -> Pass:
        variant, _, view = text.strip().partition(":")
        if not variant:
            raise ValueError(f"pass {text!r}: expected variant[:view], e.g. 'int8' or 'int8:hflip'")
        try:
            return cls(variant, View(view or View.IDENTITY.value))
        except ValueError:
            accepted = ", ".join(v.value for v in View)
            raise ValueError(f"pass {text!r}: unknown view {view!r}; accepted: {accepted}") from None


@dataclass(frozen=True)
class Plan:
    passes: tuple[Pass, ...]  # extra passes after the entry pass, in the order they run

    @property
    def name(self) -> str:
        return "+".join(p.name for p in self.passes) if self.passes else NONE

    @property
    def variants(self) -> set[str]:
        return {p.variant for p in self.passes}

    @classmethod
    def parse(cls, text: str) -> Plan:
        text = text.strip()
        if text == NONE:
            return cls(())
        passes = tuple(Pass.parse(part) for part in text.split("+"))
        if len(set(passes)) != len(passes):
            raise ValueError(f"plan {text!r} repeats a pass")
        return cls(passes)


def apply_view(images: np.ndarray, view: View) -> np.ndarray:
    """(N, 3, H, W) normalised float32 → the same batch seen through `view` (a new contiguous array)."""
    if images.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {images.shape}")
    if view is View.IDENTITY:
        return images
    return np.ascontiguousarray(images[..., ::-1])  # W is the last axis


def combine(probabilities: Sequence[np.ndarray]) -> np.ndarray:
    """Average the (N, C) softmax outputs of the passes that ran: the final answer's probabilities."""
    if not probabilities:
        raise ValueError("combine needs at least the entry pass's probabilities")
    out = np.array(probabilities[0], dtype=np.float32, copy=True)
    for p in probabilities[1:]:
        out += p
    out /= len(probabilities)
    return out


def applicable(plan: Plan, entry: Pass, allowed_variants: set[str]) -> bool:
    """A plan may follow `entry` if every pass is on an allowed variant and none repeats the entry pass."""
    return plan.variants <= allowed_variants and entry not in plan.passes
