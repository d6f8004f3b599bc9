"""The deferral predictor at inference time: entry-pass logits → p(final answer right | plan).

Two-stage routing: the INT8 variant runs first (the entry pass); this predictor reads its logits
and estimates, for "no follow-up" (column 0, "none") and for every follow-up plan, the
probability that the final answer is right. A plan is a list of extra passes `variant:view`
(views: identity, hflip); its answer is the argmax of the mean softmax of the entry pass and the
plan's passes. The planner then weighs these against each plan's cost.

The MLP does not output p(right | plan) directly. With the entry right ~90 % of the time and a
plan changing the answer on ~3 % of samples, p(plan) and p(none) are two near-equal numbers whose
difference (the gain the planner acts on) drowns in their noise. It outputs instead, by the law
of total probability, 1 + 2·(P − 1) heads:

    e   = p(entry right)
    f_j = p(plan j right | entry wrong)   — the plan fixes it
    b_j = p(plan j wrong | entry right)   — the plan breaks it
    p(right | plan j) = e·(1 − b_j) + (1 − e)·f_j,   gain_j = (1 − e)·f_j − e·b_j

each head learned on the samples where its condition holds and Platt-calibrated (a, b) on
held-out ones, so the composition is a calibrated probability when its parts are.

NumPy only (the gateway imports no torch). Files: <dir>/deferral.npz (weights) and
<dir>/deferral.json (spec, with the weights' sha256 so a manifest can name them).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from adaptive_quant.core.manifest import sha256_file
from adaptive_quant.core.plans import NONE, Pass, Plan, View
from adaptive_quant.core.stats import sigmoid
from adaptive_quant.predictor.entry_features import (
    FEATURE_VERSION,
    check_logits,
    feature_names,
    features_of_checked,
    features_one,
)

SPEC_VERSION = 1
WEIGHTS_FILE = "deferral.npz"
SPEC_FILE = "deferral.json"
VIEWS = tuple(v.value for v in View)  # ("identity", "hflip"): the views core.plans knows
_ZERO = np.float32(0.0)


class DeferralSpecError(ValueError):
    """A deferral predictor's files are missing, malformed, or disagree with each other or this code."""


# ----------------------------------------------------------------------------- plans


def parse_pass(text: str) -> str:
    """'fp32' → 'fp32:identity'; 'int8:hflip' stays. The canonical `variant:view` form (core.plans parses)."""
    try:
        p = Pass.parse(text)
    except ValueError:
        raise ValueError(f"a pass is 'variant' or 'variant:view' with view in {VIEWS}; got {text!r}") from None
    return f"{p.variant}:{p.view.value}"


def parse_plan(name: str) -> list[str]:
    """'none' → []; 'int8:hflip+fp32' → ['int8:hflip', 'fp32:identity']."""
    if name.strip() == NONE:
        return []
    return [parse_pass(p) for p in name.split("+")]


def plan_name(passes: list[str]) -> str:
    """The inverse of `parse_plan`, ':identity' left out: ['fp32:identity', 'fp32:hflip'] → 'fp32+fp32:hflip'."""
    return Plan(tuple(Pass.parse(q) for q in passes)).name


def head_names(plan_names: list[str]) -> list[str]:
    """The MLP's output columns for these plans: entry_right, fix:<plan>…, break:<plan>…."""
    return ["entry_right"] + [f"fix:{p}" for p in plan_names[1:]] + [f"break:{p}" for p in plan_names[1:]]


# ----------------------------------------------------------------------------- predictor


class DeferralPredictor:
    """Entry logits (N, C) → (N, P) calibrated p(final answer right | plan), column 0 = "none".

    `weights` holds feat_mean/feat_std (F,), w0, b0, …, w{L-1}, b{L-1} (ReLU between layers; the
    last layer has 1 + 2·(P − 1) outputs, see the module doc) and calib_scale/calib_bias (H,),
    the per-head Platt scaling sigmoid(a·z + b). At construction the standardisation is folded
    into the first layer and the Platt scaling into the last: the forward pass is L matmuls
    with ReLUs between.
    """

    def __init__(self, weights: dict[str, np.ndarray], plan_names: list[str], num_classes: int) -> None:
        if not plan_names or plan_names[0] != NONE:
            raise ValueError(f"plan_names[0] must be {NONE!r} (no follow-up); got {plan_names[:1]}")
        self.plan_names = [NONE] + [plan_name(parse_plan(p)) for p in plan_names[1:]]
        if len(set(self.plan_names)) != len(self.plan_names):
            raise ValueError(f"plan names must be distinct; got {self.plan_names}")
        self.plan_passes = [parse_plan(p) for p in self.plan_names]
        self.num_classes = int(num_classes)
        self.feature_names = feature_names(self.num_classes)
        self.head_names = head_names(self.plan_names)
        self.weights = {k: np.asarray(v, np.float32) for k, v in weights.items()}
        n_layers = sum(1 for k in self.weights if k.startswith("w"))
        try:
            layers = [(self.weights[f"w{i}"], self.weights[f"b{i}"]) for i in range(n_layers)]
            mean, std = self.weights["feat_mean"], self.weights["feat_std"]
            scale, bias = self.weights["calib_scale"], self.weights["calib_bias"]
        except KeyError as exc:
            raise DeferralSpecError(f"deferral weights lack {exc}; have {sorted(self.weights)}") from None
        n_feat, n_heads = len(self.feature_names), len(self.head_names)
        if n_layers == 0 or layers[0][0].shape[0] != n_feat or mean.shape != (n_feat,) or std.shape != (n_feat,):
            raise DeferralSpecError(f"deferral weights do not take {n_feat} features ({self.feature_names})")
        for i, (w, b) in enumerate(layers):
            if w.ndim != 2 or b.shape != (w.shape[1],) or (i and w.shape[0] != layers[i - 1][0].shape[1]):
                raise DeferralSpecError(f"deferral layer {i} has inconsistent shapes w {w.shape}, b {b.shape}")
        if layers[-1][0].shape[1] != n_heads or scale.shape != (n_heads,) or bias.shape != (n_heads,):
            raise DeferralSpecError(f"deferral output width does not match {n_heads} heads for plans {self.plan_names}")
        self.hidden = [int(w.shape[1]) for w, _ in layers[:-1]]
        # fold (x − mean)/std into layer 0 and a·z + b into the last layer, then every bias into
        # its matrix as an extra input row fed by a constant-1 unit (kept alive through the ReLUs
        # by an extra output column): the forward pass is matmul, ReLU, matmul, ReLU, matmul
        folded = [(w.astype(np.float64), b.astype(np.float64)) for w, b in layers]
        w0, b0 = folded[0]
        folded[0] = (w0 / std[:, None], b0 - (mean / std) @ w0)
        wl, bl = folded[-1]
        folded[-1] = (wl * scale, bl * scale + bias)
        self._mats: list[np.ndarray] = []
        for i, (w, b) in enumerate(folded):
            last = i == len(folded) - 1
            a = np.zeros((w.shape[0] + 1, w.shape[1] + (0 if last else 1)))
            a[: w.shape[0], : w.shape[1]] = w
            a[w.shape[0], : w.shape[1]] = b
            if not last:
                a[w.shape[0], w.shape[1]] = 1.0  # the constant unit: relu(1) = 1
            self._mats.append(np.ascontiguousarray(a, dtype=np.float32))
        self._hidden_mats, self._last_mat = self._mats[:-1], self._mats[-1]
        self._n_plans = len(self.plan_names)
        self._n_feat = n_feat

    def num_parameters(self) -> int:
        return int(sum(self.weights[f"w{i}"].size + self.weights[f"b{i}"].size for i in range(len(self.hidden) + 1)))

    def _calibrated_logits(self, x: np.ndarray) -> np.ndarray:
        """(…, F + 1) features with a trailing 1 → (…, H) calibrated head logits."""
        # ndarray.dot and a float32 zero: at N = 1 each costs ~0.5 µs against ~1.5 µs for `@` and
        # a Python 0.0 (which NumPy converts on every call)
        h = x
        for a in self._hidden_mats:
            h = h.dot(a)
            np.maximum(h, _ZERO, out=h)
        return h.dot(self._last_mat)

    def heads(self, entry_logits: np.ndarray) -> np.ndarray:
        """(N, C) → (N, 1 + 2·(P − 1)) calibrated head probabilities, columns as `head_names`."""
        z = check_logits(entry_logits, self.num_classes)
        x = np.empty((z.shape[0], self._n_feat + 1), np.float32)
        features_of_checked(z, out=x[:, : self._n_feat])
        x[:, self._n_feat] = 1.0
        t = self._calibrated_logits(x)
        return sigmoid(t, out=t)  # σ(calibrated logit), in place

    def predict(self, entry_logits: np.ndarray) -> np.ndarray:
        """(N, C) entry logits → (N, P) float32 p(final answer right | plan), columns as `plan_names`."""
        z = np.asarray(entry_logits)
        if z.shape == (1, self.num_classes) and z.dtype.kind in "fiu":
            return self._predict_one(z)
        s = self.heads(z)
        p = self._n_plans
        e = s[:, :1]  # p(entry right)
        out = np.empty((s.shape[0], p), np.float32)
        out[:, :1] = e
        # e·(1 − b) + (1 − e)·f = e + (1 − e)·f − e·b
        np.multiply(1.0 - e, s[:, 1:p], out=out[:, 1:])
        out[:, 1:] -= e * s[:, p:]
        out[:, 1:] += e
        return out

    def _predict_one(self, z: np.ndarray) -> np.ndarray:
        return np.array([self.predict_row(z[0].tolist())], np.float32)

    def predict_row(self, values: list[float]) -> list[float]:
        """`predict` for one image's C logits as Python floats → P floats (the gateway's one-image
        path). Features, sigmoid and composition in plain Python, the three matmuls in NumPy: at
        N = 1 every NumPy call costs ~1 µs whatever its size, so this is ~3× cheaper than the
        batched path (`aq-bench --parts routing` times it)."""
        if len(values) != self.num_classes:
            raise ValueError(f"entry logits must have {self.num_classes} values for one image; got {len(values)}")
        if not math.isfinite(sum(values)):  # NaN or ±inf anywhere makes the sum non-finite (float32 cannot overflow it)
            raise ValueError("entry logits contain NaN or ±inf; expected finite floats")
        x = features_one(values)
        x.append(1.0)
        h = self._calibrated_logits(np.array(x, np.float32))
        exp = math.exp
        # σ of the calibrated logits (core.stats.sigmoid, scalar by scalar: a NumPy call per head would
        # cost more than the arithmetic on this one-row path); exp(700) is the float64 edge
        s = [1.0 / (1.0 + exp(-v)) if v > -700.0 else 0.0 for v in h.tolist()]
        p = self._n_plans
        e = s[0]
        f = 1.0 - e
        # e·(1 − b) + (1 − e)·f = e + (1 − e)·f − e·b
        return [e] + [e + f * s[j] - e * s[p - 1 + j] for j in range(1, p)]

    def predicted_gain(self, entry_logits: np.ndarray) -> np.ndarray:
        """(N, P) p(right | plan) − p(right | none): column 0 is 0 by construction."""
        p = self.predict(entry_logits)
        return p - p[:, :1]

    # ------------------------------------------------------------------------- files

    def spec(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """The JSON spec (without the sha256, which `save` adds once the weights are written)."""
        calib = {
            h: [float(a), float(b)]
            for h, a, b in zip(self.head_names, self.weights["calib_scale"], self.weights["calib_bias"])
        }
        return {
            "kind": "deferral_mlp",
            "version": SPEC_VERSION,
            "input": "entry logits (N, num_classes), float32",
            "num_classes": self.num_classes,
            "feature_version": FEATURE_VERSION,
            "feature_names": self.feature_names,
            "plans": [{"name": n, "passes": ps} for n, ps in zip(self.plan_names, self.plan_passes)],
            "heads": self.head_names,
            "hidden": self.hidden,
            "parameters": self.num_parameters(),
            "calibration": calib,  # head → (a, b) of sigmoid(a·z + b)
            "weights_file": WEIGHTS_FILE,
            **(extra or {}),
        }

    def save(self, folder: str | Path, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Write <folder>/deferral.npz and <folder>/deferral.json; return the spec (sha256 included).

        `extra` (JSON-ready: trained_on, metrics, …) is merged into the spec.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        np.savez(folder / WEIGHTS_FILE, **self.weights)
        spec = self.spec(extra)
        spec["sha256"] = sha256_file(folder / WEIGHTS_FILE)
        (folder / SPEC_FILE).write_text(json.dumps(spec, indent=2) + "\n")
        return spec

    @classmethod
    def load(cls, folder: str | Path, sha256: str | None = None) -> DeferralPredictor:
        """The predictor saved in `folder`; refuses weights that do not match the spec's sha256 (or
        the given one, e.g. a manifest's), or a spec written for other features."""
        folder = Path(folder)
        try:
            spec = json.loads((folder / SPEC_FILE).read_text())
        except (OSError, ValueError) as exc:
            raise DeferralSpecError(f"cannot read the deferral spec {folder / SPEC_FILE}: {exc}") from exc
        if spec.get("kind") != "deferral_mlp" or spec.get("version") != SPEC_VERSION:
            raise DeferralSpecError(
                f"{folder / SPEC_FILE} is kind {spec.get('kind')!r} version {spec.get('version')}; "
                f"this code reads 'deferral_mlp' version {SPEC_VERSION}"
            )
        path = folder / spec.get("weights_file", WEIGHTS_FILE)
        if not path.is_file():
            raise DeferralSpecError(f"deferral weights {path} are missing")
        actual = sha256_file(path)
        for expected, source in ((spec.get("sha256"), "its spec"), (sha256, "the caller")):
            if expected is not None and actual != expected:
                raise DeferralSpecError(f"deferral weights {path} do not match the sha256 given by {source}")
        try:
            num_classes = int(spec["num_classes"])
            plan_names = [p["name"] for p in spec["plans"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise DeferralSpecError(f"{folder / SPEC_FILE} lacks a valid num_classes / plans entry: {exc!r}") from exc
        if spec.get("feature_version") != FEATURE_VERSION or spec.get("feature_names") != feature_names(num_classes):
            raise DeferralSpecError(
                f"deferral predictor was fitted on entry features version {spec.get('feature_version')} "
                f"{spec.get('feature_names')}; this code computes version {FEATURE_VERSION} {feature_names(num_classes)}"
            )
        with np.load(path) as z:
            weights = {k: z[k] for k in z.files}
        return cls(weights, plan_names, num_classes)
