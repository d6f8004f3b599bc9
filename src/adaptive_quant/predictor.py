"""The per-sample accuracy predictor at inference time: features → MLP → calibrated p(correct | variant).

NumPy only (the gateway imports no torch). The weights live in the model repository as an
.npz beside a JSON spec; manifest.json's `predictor` entry points at both.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .features import FEATURE_NAMES, FEATURE_VERSION, compute_features
from .manifest import Manifest, ManifestError, sha256_file

PREDICTOR_DIR = "accuracy_predictor"
WEIGHTS_FILE = "predictor.npz"
SPEC_FILE = "predictor.json"


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


class MLPPredictor:
    """features (standardised) → [Linear → ReLU]* → Linear → logit / temperature → sigmoid, per variant."""

    def __init__(self, weights: dict[str, np.ndarray], variant_keys: list[str]) -> None:
        self.variant_keys = list(variant_keys)
        self.feat_mean = weights["feat_mean"].astype(np.float32)
        self.feat_std = weights["feat_std"].astype(np.float32)
        self.temperature = weights["temperature"].astype(np.float32)  # (V,), fitted on held-out samples
        n_layers = sum(1 for k in weights if k.startswith("w"))
        self.layers = [(weights[f"w{i}"].astype(np.float32), weights[f"b{i}"].astype(np.float32)) for i in range(n_layers)]
        if self.layers[-1][0].shape[1] != len(self.variant_keys):
            raise ValueError("predictor output width does not match its variant keys")

    def logits_from_features(self, feats: np.ndarray) -> np.ndarray:
        """(N, F) raw features → (N, V) uncalibrated logits."""
        h = (feats - self.feat_mean) / self.feat_std
        for w, b in self.layers[:-1]:
            h = np.maximum(h @ w + b, 0.0)
        w, b = self.layers[-1]
        return h @ w + b

    def predict_features(self, feats: np.ndarray) -> np.ndarray:
        return sigmoid(self.logits_from_features(feats) / self.temperature)

    def predict(self, images: np.ndarray) -> np.ndarray:
        """(N, 32, 32, 3) uint8 → (N, V) calibrated probabilities that each variant is right."""
        return self.predict_features(compute_features(images))

    def num_parameters(self) -> int:
        return int(sum(w.size + b.size for w, b in self.layers))


# ----------------------------------------------------------------------------- calibration


def expected_calibration_error(probs: np.ndarray, outcomes: np.ndarray, bins: int = 10) -> float:
    """ECE: |accuracy − confidence| averaged over equal-width probability bins, weighted by count."""
    probs, outcomes = np.asarray(probs, np.float64).ravel(), np.asarray(outcomes, np.float64).ravel()
    ids = np.minimum((probs * bins).astype(int), bins - 1)
    ece = 0.0
    for b in range(bins):
        m = ids == b
        if m.any():
            ece += m.mean() * abs(outcomes[m].mean() - probs[m].mean())
    return float(ece)


def fit_temperature(logits: np.ndarray, outcomes: np.ndarray) -> float:
    """Temperature T minimising the binary NLL of sigmoid(logit / T) (grid + refinement; 1-D, convex enough)."""
    logits = np.asarray(logits, np.float64)
    y = np.asarray(outcomes, np.float64)

    def nll(t: float) -> float:
        p = np.clip(sigmoid(logits / t), 1e-7, 1 - 1e-7)
        return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())

    grid = np.exp(np.linspace(np.log(0.1), np.log(10.0), 61))
    best = float(grid[np.argmin([nll(t) for t in grid])])
    fine = best * np.exp(np.linspace(-0.08, 0.08, 33))
    return float(fine[np.argmin([nll(t) for t in fine])])


def auroc(scores: np.ndarray, positives: np.ndarray) -> float:
    """Area under the ROC curve (Mann–Whitney, ties counted half); nan when one class is absent."""
    scores = np.asarray(scores, np.float64)
    pos = np.asarray(positives, bool)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    # average ranks over ties
    i = 0
    while i < len(scores):
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


# ----------------------------------------------------------------------------- files


def save_predictor(repo: str | Path, predictor_weights: dict[str, np.ndarray], spec: dict[str, Any]) -> dict[str, Any]:
    """Write weights + spec under <repo>/accuracy_predictor/1/; return the manifest entry."""
    folder = Path(repo) / PREDICTOR_DIR / "1"
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / WEIGHTS_FILE, **predictor_weights)
    (folder / SPEC_FILE).write_text(json.dumps(spec, indent=2) + "\n")
    rel = f"{PREDICTOR_DIR}/1/{WEIGHTS_FILE}"
    return {
        "path": rel,
        "spec_path": f"{PREDICTOR_DIR}/1/{SPEC_FILE}",
        "sha256": sha256_file(folder / WEIGHTS_FILE),
        "variant_keys": spec["variant_keys"],
        "feature_version": spec["feature_version"],
        "feature_names": spec["feature_names"],
        "version": spec["version"],
        "metrics": spec.get("metrics", {}),
    }


def load_predictor(repo: str | Path, manifest: Manifest) -> MLPPredictor:
    """The predictor a manifest names; refuses a file that does not match its sha256 or feature version."""
    entry = manifest.predictor
    if not entry:
        raise ManifestError("manifest has no predictor entry (run scripts/train_predictor.py)")
    path = Path(repo) / entry["path"]
    if not path.is_file():
        raise ManifestError(f"predictor file {path} is missing")
    if sha256_file(path) != entry["sha256"]:
        raise ManifestError(f"predictor file {path} does not match its sha256 in the manifest")
    if entry.get("feature_version") != FEATURE_VERSION or entry.get("feature_names") != FEATURE_NAMES:
        raise ManifestError(
            f"predictor was trained on feature version {entry.get('feature_version')}, this code computes {FEATURE_VERSION}"
        )
    with np.load(path) as z:
        weights = {k: z[k] for k in z.files}
    return MLPPredictor(weights, entry["variant_keys"])
