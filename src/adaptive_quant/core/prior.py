"""What single-stage routing knows about a sample before any variant has run: nothing but each
variant's validation accuracy, the same for every sample (the manifest's "prior").

Single-stage routing is what a repository without a router gets (or `planner.enabled: false`);
two-stage routing learns per sample from the entry pass instead (serving/followup.py). A
pre-inference predictor over pixel features was tried here and retired: its AUROC at flagging
a variant's errors was 0.57, no better than random assignment at the same mix
(docs/results/2026-11-22-previous-network.md).

Pure: reads a Manifest object, no files.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from adaptive_quant.core.manifest import Manifest

# a variant without a measured accuracy ranks by precision: fp32 > fp16 > int8, a small step
# apart, so that speed/balanced still prefer the cheap one when in doubt
UNMEASURED_ACCURACY = {"fp32": 0.9, "fp16": 0.899, "int8": 0.898}
UNMEASURED_OTHER = 0.5  # a precision not listed above


@dataclass(frozen=True)
class PriorAccuracy:
    """p(correct | variant) for any sample: each variant's validation accuracy (share, 0..1)."""

    accuracy: dict[str, float]  # variant key → validation accuracy, or the stand-in below
    unmeasured: tuple[str, ...] = ()  # keys whose manifest entry had no val_accuracy (stand-in used)

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> PriorAccuracy:
        acc, unmeasured = {}, []
        for v in manifest.served_variants():
            if v.val_accuracy is None:
                unmeasured.append(v.key)
                acc[v.key] = UNMEASURED_ACCURACY.get(v.precision, UNMEASURED_OTHER)
            else:
                acc[v.key] = float(v.val_accuracy)
        return cls(acc, tuple(unmeasured))

    def row(self, keys: Sequence[str]) -> np.ndarray:
        """(V,) float64 accuracies in the column order `keys` (served variant keys)."""
        return np.array([self.accuracy[k] for k in keys], dtype=np.float64)

    def matrix(self, n: int, keys: Sequence[str]) -> np.ndarray:
        """(n, V) the row repeated for n samples: what `core.routing.route_batch` takes (read-only view)."""
        row = self.row(keys)
        return np.broadcast_to(row, (n, row.shape[0]))

    def summary(self) -> str:
        """One line for the start-up log and /v1/status."""
        parts = ", ".join(f"{k} {a:.4f}" for k, a in self.accuracy.items())
        line = f"each variant's validation accuracy from manifest.json, the same for every sample: {parts}"
        if self.unmeasured:
            line += f" (no accuracy measured for {', '.join(self.unmeasured)}: ranked by precision)"
        return line

    def to_json(self) -> dict[str, Any]:
        return {
            "source": "manifest",
            "accuracy": {k: round(a, 4) for k, a in self.accuracy.items()},
            "unmeasured": list(self.unmeasured),
        }
