"""The export gate's shift check: a new network must not break where the one it replaces holds.

Clean validation accuracy alone once favoured a network that answered at chance under Gaussian
pixel noise where the shipped one held (docs/results/). So the gate also looks at the validation
split under each corruption of core/corruptions.py (seeded, the same images for both networks)
and refuses a new INT8 variant that answers more than `max_shift_drop` points below the INT8
variant of the repository it replaces, on any of them.

A first export (no repository at the target yet) records its figures and refuses nothing: there
is nothing to fall behind. The figures land in manifest.json ("shift"), so the next export and a
reader of the repository see them.

Pure logic (`compare`) apart from the ONNX Runtime runs (`measure`, `previous_session`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from adaptive_quant.core.corruptions import corrupt
from adaptive_quant.core.images import to_model_input
from adaptive_quant.core.manifest import ManifestError, load_manifest
from adaptive_quant.export.ort_eval import make_session, run_batched

log = logging.getLogger(__name__)

ENTRY_KEY = "int8"  # the variant every request's first pass runs: the one whose failure users see


@dataclass
class ShiftResult:
    accuracy: dict[str, float]  # corruption → the new INT8 variant's validation accuracy, 0..1
    previous: dict[str, float] = field(default_factory=dict)  # the replaced repository's; empty: none
    failures: list[str] = field(default_factory=list)  # one readable line per corruption that fails

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_manifest(self) -> dict[str, dict[str, float]]:
        return {"int8": dict(self.accuracy), "replaced_int8": dict(self.previous)}


def corrupted_inputs(
    images: np.ndarray, names: list[str], mean: list[float], std: list[float], seed: int
) -> dict[str, np.ndarray]:
    """(N, H, W, 3) uint8 → {corruption: the model input (N, 3, H, W) float32, normalised with mean/std}."""
    return {name: to_model_input(corrupt(images, name, seed), mean, std) for name in names}


def measure(session: ort.InferenceSession, inputs: dict[str, np.ndarray], labels: np.ndarray) -> dict[str, float]:
    return {name: float((run_batched(session, x).argmax(1) == labels).mean()) for name, x in inputs.items()}


def previous_session(repo: Path, threads: int) -> tuple[ort.InferenceSession, list[float], list[float]] | None:
    """The INT8 session (and its normalisation) of the repository at `repo`, or None when there is none."""
    if not (repo / "manifest.json").is_file():
        return None
    try:
        manifest = load_manifest(repo)
    except ManifestError as exc:
        log.warning("shift check: the repository at %s cannot be read (%s); nothing to compare with", repo, exc)
        return None
    entry = manifest.variants.get(ENTRY_KEY)
    if entry is None or not (repo / entry.path).is_file():
        log.warning("shift check: %s has no %s variant; nothing to compare with", repo, ENTRY_KEY)
        return None
    return make_session(str(repo / entry.path), threads), manifest.mean, manifest.std


def compare(new: dict[str, float], previous: dict[str, float], max_drop_points: float) -> list[str]:
    """A line per corruption where `new` is more than max_drop_points below `previous` (both 0..1)."""
    failures = []
    for name, acc in new.items():
        if name in previous and (previous[name] - acc) * 100 > max_drop_points:
            failures.append(
                f"under {name} the new INT8 answers {acc:.2%}, the repository it replaces {previous[name]:.2%}: "
                f"{(previous[name] - acc) * 100:.1f} points lower, more than export.max_shift_drop={max_drop_points:g}"
            )
    return failures


def shift_check(
    session: ort.InferenceSession,
    images: np.ndarray,
    labels: np.ndarray,
    names: list[str],
    mean: list[float],
    std: list[float],
    replaced: Path,
    max_drop_points: float,
    seed: int,
    threads: int = 0,
) -> ShiftResult:
    """The new INT8 `session` against the INT8 of the repository at `replaced` on corrupted `images`."""
    new = measure(session, corrupted_inputs(images, names, mean, std, seed), labels)
    old = previous_session(replaced, threads)
    previous = {}
    if old is not None:
        old_session, old_mean, old_std = old
        previous = measure(old_session, corrupted_inputs(images, names, old_mean, old_std, seed), labels)
    result = ShiftResult(accuracy=new, previous=previous, failures=compare(new, previous, max_drop_points))
    for name in names:
        was = f", replaced {previous[name]:.4f}" if name in previous else ""
        log.info("shift %-10s int8 acc %.4f%s", name, new[name], was)
    return result
