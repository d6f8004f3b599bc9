"""What the gateway needs from an accuracy predictor, and the fallback when there is none.

The real predictor (a small MLP over cheap per-sample features) lives in
`adaptive_quant.predictor.model` and provides `load_predictor(repo_path, manifest) -> AccuracyPredictor`.
The gateway calls it only when `manifest.predictor` is set; otherwise, or when that module
cannot be imported or loaded, it serves with `PriorPredictor` and says so in /v1/status.
"""

from __future__ import annotations

import importlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

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
    kind: str  # "mlp" (the trained predictor), "prior" (manifest accuracies) or "custom" (given to create_app)
    summary: str  # one line for the start-up log and /v1/status: what routes, and how good it is
    detail: dict[str, Any] = field(default_factory=dict)  # the same, structured (JSON-ready), for /v1/status


def describe_mlp(entry: dict[str, Any], repo: str | Path | None = None) -> tuple[str, dict[str, Any]]:
    """The one-line summary and the structured detail of a trained predictor, from its manifest entry.

    "mlp 64-32 (6211 parameters) over 62 image features; AUROC at flagging errors fp32 0.57,
    fp16 0.58, int8 0.57 (test split)". The hidden sizes come from the predictor's spec file beside
    the weights, when it can be read.
    """
    keys = list(entry.get("variant_keys", []))
    n_features = len(entry.get("feature_names", [])) or entry.get("num_features")
    spec: dict[str, Any] = {}
    if repo is not None and entry.get("spec_path"):
        try:
            spec = json.loads((Path(repo) / entry["spec_path"]).read_text())
        except (OSError, ValueError):
            spec = {}  # the summary is informative, never a reason to refuse a predictor that loaded
    metrics = entry.get("metrics", {})
    auroc = metrics.get("auroc_error", {})  # AUROC of (1 − p) at flagging the variant's errors
    detail: dict[str, Any] = {
        "path": entry.get("path"),
        "variant_keys": keys,
        "features": n_features,
        "feature_version": entry.get("feature_version"),
        "hidden": spec.get("hidden"),
        "parameters": spec.get("parameters"),
        "trained_on": spec.get("trained_on"),
        "metrics": metrics,  # measured by the predictor stage on the test split
    }
    shape = ""
    if spec.get("hidden"):
        shape = " " + "-".join(str(h) for h in spec["hidden"])
        if spec.get("parameters") is not None:
            shape += f" ({spec['parameters']} parameters)"
    summary = f"mlp{shape} over {n_features} image features"
    if auroc:
        summary += "; AUROC at flagging errors " + ", ".join(f"{k} {v:.2f}" for k, v in auroc.items()) + " (test split)"
    return summary, detail


def load_accuracy_predictor(repo: str | Path, manifest: Manifest) -> LoadedPredictor:
    """The trained predictor when the manifest names one and it loads, else the prior."""
    prior = PriorPredictor.from_manifest(manifest)

    def fallback(reason: str) -> LoadedPredictor:
        accuracy = {k: round(float(a), 4) for k, a in zip(prior.variant_keys, prior.row)}
        return LoadedPredictor(
            prior,
            "prior",
            f"prior: each variant's validation accuracy for every sample ({reason})",
            {"reason": reason, "accuracy": accuracy},
        )

    if manifest.predictor is None:
        return fallback("manifest.json has no predictor entry")
    try:
        module = importlib.import_module("adaptive_quant.predictor.model")
        loader = module.load_predictor
    except (ImportError, AttributeError) as exc:
        log.warning(
            "manifest names a predictor but adaptive_quant.predictor.model.load_predictor is unavailable: %s", exc
        )
        return fallback(f"predictor module unavailable: {exc}")
    try:
        predictor = loader(Path(repo), manifest)
    except Exception as exc:  # a broken predictor must not keep the service down: route on priors
        log.exception("loading the accuracy predictor failed; routing on validation accuracies")
        return fallback(f"predictor failed to load: {type(exc).__name__}: {exc}")
    if not isinstance(predictor, AccuracyPredictor):
        return fallback(f"load_predictor returned {type(predictor).__name__}, not a predictor")
    summary, detail = describe_mlp(manifest.predictor, repo)
    return LoadedPredictor(predictor, "mlp", summary, detail)


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
