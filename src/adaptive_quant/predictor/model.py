"""The per-sample accuracy predictor at inference time: features → MLP → calibrated p(correct | variant).

NumPy only (the gateway imports no torch). The weights live in the model repository as an
.npz beside a JSON spec; manifest.json's `predictor` entry points at both.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import onnx

from adaptive_quant.core.manifest import Manifest, ManifestError, sha256_file
from adaptive_quant.predictor.features import FEATURE_NAMES, FEATURE_VERSION, compute_features

PREDICTOR_DIR = "accuracy_predictor"
WEIGHTS_FILE = "predictor.npz"
SPEC_FILE = "predictor.json"


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -50.0, 50.0)))  # clipped: no overflow warnings, same result


class MLPPredictor:
    """features (standardised) → [Linear → ReLU]* → Linear → logit z → sigmoid(a·z + b), per variant.

    (a, b) is Platt scaling fitted on held-out samples. Not a bare temperature (z / T): with a
    base rate near 90 % correct, shrinking logits toward 0 pulls every probability toward 50 %.
    """

    def __init__(self, weights: dict[str, np.ndarray], variant_keys: list[str]) -> None:
        self.variant_keys = list(variant_keys)
        self.feat_mean = weights["feat_mean"].astype(np.float32)
        self.feat_std = weights["feat_std"].astype(np.float32)
        self.calib_scale = weights["calib_scale"].astype(np.float32)  # (V,) a, fitted on held-out samples
        self.calib_bias = weights["calib_bias"].astype(np.float32)  # (V,) b
        n_layers = sum(1 for k in weights if k.startswith("w"))
        self.layers = [
            (weights[f"w{i}"].astype(np.float32), weights[f"b{i}"].astype(np.float32)) for i in range(n_layers)
        ]
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
        return sigmoid(self.logits_from_features(feats) * self.calib_scale + self.calib_bias)

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


def binary_nll(probs: np.ndarray, outcomes: np.ndarray) -> float:
    """Mean negative log-likelihood of outcomes under probabilities (clipped away from 0 and 1)."""
    p = np.clip(np.asarray(probs, np.float64), 1e-7, 1 - 1e-7)
    y = np.asarray(outcomes, np.float64)
    return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())


def fit_platt(logits: np.ndarray, outcomes: np.ndarray, l2: float = 1e-3, iters: int = 100) -> tuple[float, float]:
    """Platt scaling: (a, b) minimising the binary NLL of sigmoid(a·logit + b).

    Newton's method with a backtracking line search (a plain Newton step overshoots when the
    logits are large and the curvature small). A small L2 on (a − 1, b) keeps the fit finite
    when the held-out outcomes are separable.
    """
    z = np.asarray(logits, np.float64)
    y = np.asarray(outcomes, np.float64)
    n = max(1, len(z))

    def loss(a: float, b: float) -> float:
        t = a * z + b  # NLL = log(1 + e^t) − y·t, stable through logaddexp
        return float((np.logaddexp(0.0, t) - y * t).sum() / n + 0.5 * l2 * ((a - 1) ** 2 + b**2))

    a, b = 1.0, 0.0
    current = loss(a, b)
    for _ in range(iters):
        p = sigmoid(np.clip(a * z + b, -50, 50))
        w = p * (1 - p)
        grad = np.array([((p - y) * z).sum() / n + l2 * (a - 1), (p - y).sum() / n + l2 * b])
        hess = np.array([[(w * z * z).sum() / n + l2, (w * z).sum() / n], [(w * z).sum() / n, w.sum() / n + l2]])
        step = np.linalg.solve(hess, grad)
        t = 1.0
        while t > 1e-6 and loss(a - t * step[0], b - t * step[1]) > current:
            t *= 0.5
        a, b = a - t * step[0], b - t * step[1]
        new = loss(a, b)
        if current - new < 1e-12:
            break
        current = new
    return float(a), float(b)


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


def predictor_onnx(weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    """The MLP as an ONNX graph, features (N, F) → p_correct (N, V), so Triton can load the folder
    as a model of its own (it treats every repository folder as one) and other clients can run it."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    n_layers = sum(1 for k in weights if k.startswith("w"))
    inits = [
        numpy_helper.from_array(weights[k].astype(np.float32), k)
        for k in ("feat_mean", "feat_std", "calib_scale", "calib_bias")
    ]
    nodes = [
        helper.make_node("Sub", ["features", "feat_mean"], ["centred"]),
        helper.make_node("Div", ["centred", "feat_std"], ["h0"]),
    ]
    for i in range(n_layers):
        inits += [
            numpy_helper.from_array(weights[f"w{i}"].astype(np.float32), f"w{i}"),
            numpy_helper.from_array(weights[f"b{i}"].astype(np.float32), f"b{i}"),
        ]
        nodes.append(helper.make_node("MatMul", [f"h{i}", f"w{i}"], [f"m{i}"]))
        nodes.append(helper.make_node("Add", [f"m{i}", f"b{i}"], [f"z{i}"]))
        if i < n_layers - 1:
            nodes.append(helper.make_node("Relu", [f"z{i}"], [f"h{i + 1}"]))
    nodes += [
        helper.make_node("Mul", [f"z{n_layers - 1}", "calib_scale"], ["scaled"]),
        helper.make_node("Add", ["scaled", "calib_bias"], ["calibrated"]),
        helper.make_node("Sigmoid", ["calibrated"], ["p_correct"]),
    ]
    n_feat, n_out = weights["w0"].shape[0], weights[f"w{n_layers - 1}"].shape[1]
    graph = helper.make_graph(
        nodes,
        "accuracy_predictor",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", n_feat])],
        [helper.make_tensor_value_info("p_correct", TensorProto.FLOAT, ["batch", n_out])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9  # readable by the ONNX Runtime in Triton 24.x images too
    onnx.checker.check_model(model)
    return model


def save_predictor(repo: str | Path, predictor_weights: dict[str, np.ndarray], spec: dict[str, Any]) -> dict[str, Any]:
    """Write weights + spec (+ ONNX and config.pbtxt) under <repo>/accuracy_predictor/; return the manifest entry."""
    import onnx

    from adaptive_quant.export.triton_config import TritonModelSpec, render_config

    folder = Path(repo) / PREDICTOR_DIR / "1"
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / WEIGHTS_FILE, **predictor_weights)
    (folder / SPEC_FILE).write_text(json.dumps(spec, indent=2) + "\n")
    onnx.save(predictor_onnx(predictor_weights), str(folder / "model.onnx"))
    n_out = len(spec["variant_keys"])
    triton_spec = TritonModelSpec(
        name=PREDICTOR_DIR,
        input_name="features",
        output_name="p_correct",
        image_size=0,
        num_classes=n_out,
        input_dims=(int(predictor_weights["w0"].shape[0]),),
        output_dims=(n_out,),
    )
    (folder.parent / "config.pbtxt").write_text(render_config(triton_spec))
    rel = f"{PREDICTOR_DIR}/1/{WEIGHTS_FILE}"
    return {
        "path": rel,
        "spec_path": f"{PREDICTOR_DIR}/1/{SPEC_FILE}",
        "onnx_path": f"{PREDICTOR_DIR}/1/model.onnx",  # the same MLP for Triton or other clients
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
