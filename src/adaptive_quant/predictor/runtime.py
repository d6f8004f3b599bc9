"""What the gateway needs from an accuracy predictor, and the fallback when there is none.

The real predictor (a small MLP over cheap per-sample features) lives in
`adaptive_quant.predictor.model` and provides `load_predictor(repo_path, manifest) -> AccuracyPredictor`.
The gateway calls it only when `manifest.predictor` is set; otherwise, or when that module
cannot be imported or loaded, it serves with `PriorPredictor` and says so in /v1/status.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from adaptive_quant.core.manifest import Manifest

log = logging.getLogger(__name__)


@runtime_checkable
class AccuracyPredictor(Protocol):
    """p(correct | sample, variant) for a batch of images."""

    variant_keys: list[str]  # column order of `predict`'s output

    def predict(self, images: np.ndarray) -> np.ndarray:
        """images (N, 32, 32, 3) uint8 RGB → (N, len(variant_keys)) float probabilities."""
        ...


class PriorPredictor:
    """Every sample gets each variant's validation accuracy from the manifest."""

    def __init__(self, accuracy: dict[str, float]) -> None:
        self.variant_keys = list(accuracy)
        self.row = np.array([accuracy[k] for k in self.variant_keys], dtype=np.float32)  # (V,) prior p(correct)

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> PriorPredictor:
        # a variant without a measured accuracy ranks by precision: fp32 > fp16 > int8,
        # a small step apart so that speed/balanced still prefer the cheap one when in doubt
        acc = {}
        for v in manifest.served_variants():
            fallback = {"fp32": 0.9, "fp16": 0.899, "int8": 0.898}.get(v.precision, 0.5)
            acc[v.key] = float(v.val_accuracy) if v.val_accuracy is not None else fallback
        return cls(acc)

    def predict(self, images: np.ndarray) -> np.ndarray:
        return np.broadcast_to(self.row, (images.shape[0], self.row.shape[0])).copy()


@dataclass(frozen=True)
class LoadedPredictor:
    predictor: AccuracyPredictor
    kind: str  # "mlp" (the trained predictor) or "prior" (manifest accuracies)
    detail: str  # why this one, for /v1/status and the start-up log


def load_accuracy_predictor(repo: str | Path, manifest: Manifest) -> LoadedPredictor:
    """The trained predictor when the manifest names one and it loads, else the prior."""
    prior = PriorPredictor.from_manifest(manifest)
    if manifest.predictor is None:
        return LoadedPredictor(prior, "prior", "manifest.json has no predictor entry; using validation accuracies")
    try:
        module = importlib.import_module("adaptive_quant.predictor.model")
        loader = module.load_predictor
    except (ImportError, AttributeError) as exc:
        log.warning(
            "manifest names a predictor but adaptive_quant.predictor.model.load_predictor is unavailable: %s", exc
        )
        return LoadedPredictor(prior, "prior", f"predictor module unavailable ({exc}); using validation accuracies")
    try:
        predictor = loader(Path(repo), manifest)
    except Exception as exc:  # a broken predictor must not keep the service down: route on priors
        log.exception("loading the accuracy predictor failed; routing on validation accuracies")
        return LoadedPredictor(prior, "prior", f"predictor failed to load ({type(exc).__name__}: {exc})")
    if not isinstance(predictor, AccuracyPredictor):
        return LoadedPredictor(prior, "prior", f"load_predictor returned {type(predictor).__name__}, not a predictor")
    return LoadedPredictor(predictor, "mlp", f"loaded from {manifest.predictor}")


def accuracy_matrix(
    loaded: AccuracyPredictor, images: np.ndarray, variant_keys: list[str], prior: PriorPredictor
) -> np.ndarray:
    """(N, len(variant_keys)) predicted accuracies in the gateway's column order.

    A served variant the predictor does not know gets its prior column.
    """
    raw = np.asarray(loaded.predict(images), dtype=np.float64)
    n = images.shape[0]
    if raw.shape != (n, len(loaded.variant_keys)):
        raise ValueError(f"predictor returned shape {raw.shape}, expected {(n, len(loaded.variant_keys))}")
    if list(loaded.variant_keys) == variant_keys:  # the common case: same columns, same order
        out = raw
    else:
        cols = {k: i for i, k in enumerate(loaded.variant_keys)}
        prior_cols = {k: i for i, k in enumerate(prior.variant_keys)}
        out = np.empty((n, len(variant_keys)), dtype=np.float64)
        for j, k in enumerate(variant_keys):
            out[:, j] = raw[:, cols[k]] if k in cols else prior.row[prior_cols[k]]
    # a NaN from a predictor would make the policy's comparisons meaningless: treat as unknown
    if np.isnan(out).any():
        out = np.nan_to_num(out, nan=0.0)
    return out
