"""Train the accuracy predictor from a model repository, and measure it honestly.

1. Run every served variant (ONNX Runtime) on the validation split: correct[i, v] ∈ {0, 1}.
2. Fit an MLP features → logit per variant (BCE) on part of the validation split.
3. Fit Platt scaling (a, b) per variant on the held-out rest (calibration), report ECE before/after.
4. Save it into the repository (+ manifest entry), log to MLflow.
5. Report on the *test* split, which no step above has seen: AUROC at spotting a variant's
   errors, ECE, and routing-level points against random-same-mix, oracle and cascade.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from adaptive_quant.config import ExperimentConfig, PredictorConfig
from adaptive_quant.core.manifest import Manifest, load_manifest, save_manifest
from adaptive_quant.core.routing import Priority, RoutingConfig
from adaptive_quant.data import Split, load_dataset
from adaptive_quant.evaluation.strategies import (
    CASCADE_THRESHOLDS,
    Outcomes,
    StrategyPoint,
    adaptive_point,
    cascade_points,
    fixed_points,
    oracle_point,
    random_same_mix,
)
from adaptive_quant.export.ort_eval import make_session, run_batched
from adaptive_quant.predictor.features import FEATURE_NAMES, FEATURE_VERSION, NUM_FEATURES, compute_features
from adaptive_quant.predictor.model import (
    MLPPredictor,
    auroc,
    binary_nll,
    expected_calibration_error,
    fit_platt,
    save_predictor,
)
from adaptive_quant.training.augment import to_normalized_tensor

log = logging.getLogger(__name__)

PREDICTOR_VERSION = 1
ROUTING_KNOBS = (0.0, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1)  # accuracy_per_halving values the report sweeps


@dataclass
class PredictorReport:
    variant_keys: list[str]
    parameters: int
    # per variant, on the test split
    auroc_error: dict[str, float]  # AUROC of (1 − p) at flagging "this variant is wrong here"
    ece_raw: dict[str, float]  # before Platt scaling
    ece_calibrated: dict[str, float]
    ece_calibration_split_raw: dict[str, float]  # on the held-out validation part the scaling was fit on
    ece_calibration_split_calibrated: dict[str, float]
    # log-loss on the held-out calibration part: what Platt scaling minimises, so it cannot rise
    nll_calibration_split_raw: dict[str, float]
    nll_calibration_split_calibrated: dict[str, float]
    calibration: dict[str, tuple[float, float]]  # (a, b) of sigmoid(a·z + b)
    test_error_rate: dict[str, float]
    routing: list[StrategyPoint] = field(default_factory=list)
    latency_ms: dict[str, float] = field(default_factory=dict)  # batch-1 p50 used for routing points

    def to_dict(self) -> dict[str, Any]:
        """Everything, with one compact row per routing point (the predictor report's long-standing
        JSON form; the full points, p99 and budgets included, are the evaluation report's job)."""
        d = asdict(self)
        d["routing"] = [
            {"name": p.strategy, "param": p.param, "accuracy": p.accuracy, "mean_latency_ms": p.mean_ms, "mix": p.mix}
            for p in self.routing
        ]
        return d


def variant_logits(
    repo: Path, manifest: Manifest, keys: list[str], split: Split, threads: int = 0
) -> dict[str, np.ndarray]:
    """Each variant's logits on a split, through ONNX Runtime (what serving runs)."""
    x = to_normalized_tensor(split.images).numpy()
    out = {}
    for k in tqdm(keys, desc="run variants", unit="variant", dynamic_ncols=True):
        out[k] = run_batched(make_session(str(repo / manifest.variants[k].path), threads), x)
    return out


def fit_mlp(feats: np.ndarray, targets: np.ndarray, cfg: PredictorConfig, seed: int) -> dict[str, np.ndarray]:
    """Full MLP training (torch, CPU, seconds). Returns NumPy weights in MLPPredictor's layout."""
    torch.manual_seed(seed)
    mean = feats.mean(axis=0)
    std = feats.std(axis=0) + 1e-6  # a constant feature must not divide by zero
    x = torch.from_numpy((feats - mean) / std).float()
    y = torch.from_numpy(targets).float()
    dims = [feats.shape[1], *cfg.hidden, targets.shape[1]]
    layers: list[nn.Module] = []
    for i in range(len(dims) - 1):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < len(dims) - 2:
            layers.append(nn.ReLU())
    mlp = nn.Sequential(*layers)
    with torch.no_grad():  # start at the base rate: the bias of the output is logit(mean target)
        rate = y.mean(0).clamp(1e-3, 1 - 1e-3)
        mlp[-1].bias.copy_(torch.log(rate / (1 - rate)))
    opt = torch.optim.AdamW(mlp.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.epochs)
    gen = torch.Generator().manual_seed(seed)
    loss_fn = nn.BCEWithLogitsLoss()
    for _ in tqdm(range(cfg.epochs), desc="fit predictor", unit="epoch", leave=False, dynamic_ncols=True):
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            loss = loss_fn(mlp(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    weights: dict[str, np.ndarray] = {"feat_mean": mean.astype(np.float32), "feat_std": std.astype(np.float32)}
    linears = [m for m in mlp if isinstance(m, nn.Linear)]
    for i, lin in enumerate(linears):
        weights[f"w{i}"] = lin.weight.detach().numpy().T.copy()  # (in, out): h @ w
        weights[f"b{i}"] = lin.bias.detach().numpy().copy()
    weights["calib_scale"] = np.ones(targets.shape[1], np.float32)  # identity until calibrated
    weights["calib_bias"] = np.zeros(targets.shape[1], np.float32)
    return weights


def train_predictor(cfg: ExperimentConfig, repo: str | Path, tracking: bool = True) -> PredictorReport:
    """The stage: fit on validation, calibrate on held-out validation, save into `repo`, report on test."""
    repo = Path(repo)
    manifest = load_manifest(repo, verify_files=True)
    keys = [v.key for v in manifest.served_variants()]
    data = load_dataset(cfg.data, cfg.seed)
    pc = cfg.predictor

    val_logits = variant_logits(repo, manifest, keys, data.val, cfg.export.ort_threads)
    correct_val = np.stack([val_logits[k].argmax(1) == data.val.labels for k in keys], axis=1)  # (N, V)
    feats_val = compute_features(data.val.images)

    rng = np.random.default_rng(cfg.seed)
    perm = rng.permutation(len(feats_val))
    n_cal = int(round(len(perm) * pc.calibration_fraction))
    cal, fit = perm[:n_cal], perm[n_cal:]
    t0 = time.perf_counter()
    weights = fit_mlp(feats_val[fit], correct_val[fit].astype(np.float32), pc, cfg.seed)
    raw = MLPPredictor(weights, keys)
    cal_logits = raw.logits_from_features(feats_val[cal])
    platt = [fit_platt(cal_logits[:, j], correct_val[cal, j]) for j in range(len(keys))]
    weights["calib_scale"] = np.array([a for a, _ in platt], np.float32)
    weights["calib_bias"] = np.array([b for _, b in platt], np.float32)
    predictor = MLPPredictor(weights, keys)
    log.info(
        "predictor fitted in %.1f s on %d validation samples (%d held out for calibration)",
        time.perf_counter() - t0,
        len(fit),
        len(cal),
    )

    report = _report_on_test(repo, manifest, keys, predictor, raw, feats_val[cal], correct_val[cal], data.test, cfg)
    spec = {
        "version": PREDICTOR_VERSION,
        "variant_keys": keys,
        "feature_version": FEATURE_VERSION,
        "feature_names": FEATURE_NAMES,
        "num_features": NUM_FEATURES,
        "hidden": pc.hidden,
        "parameters": predictor.num_parameters(),
        "trained_on": f"validation split ({len(fit)} fit, {len(cal)} calibration), seed {cfg.seed}",
        "metrics": {"auroc_error": report.auroc_error, "ece_calibrated": report.ece_calibrated},
    }
    manifest.predictor = save_predictor(repo, weights, spec)
    save_manifest(repo, manifest)
    if tracking and cfg.tracking.enabled:
        _log_to_mlflow(cfg, manifest, report)
    return report


def _report_on_test(
    repo: Path,
    manifest: Manifest,
    keys: list[str],
    predictor: MLPPredictor,
    raw: MLPPredictor,
    cal_feats: np.ndarray,
    cal_correct: np.ndarray,
    test: Split,
    cfg: ExperimentConfig,
) -> PredictorReport:
    test_logits = variant_logits(repo, manifest, keys, test, cfg.export.ort_threads)
    correct = np.stack([test_logits[k].argmax(1) == test.labels for k in keys], axis=1)
    feats = compute_features(test.images)
    p_cal, p_raw = predictor.predict_features(feats), raw.predict_features(feats)
    pc_cal, pc_raw = predictor.predict_features(cal_feats), raw.predict_features(cal_feats)
    latency = np.array([manifest.variants[k].latency.at(1).p50_ms for k in keys])
    precisions = [manifest.variants[k].precision for k in keys]

    # every sample on variant v costs v's batch-1 p50 (no per-sample jitter here); the random
    # assignment's latency is then its expectation (to rounding) whatever the draw
    o = Outcomes(keys, correct, latency)
    routing = fixed_points(o)
    routing.append(oracle_point(o, cost_ms=latency))
    rng = np.random.default_rng(cfg.seed)
    for knob in ROUTING_KNOBS:
        config = RoutingConfig(accuracy_per_halving=knob)
        label = f"adaptive balanced, accuracy_per_halving {knob:g}"
        point = adaptive_point(o, p_cal, latency, precisions, None, Priority.BALANCED, config, label=label, param=knob)
        routing += [point, random_same_mix(o, point, rng)]
    if "int8" in keys and "fp32" in keys:
        routing += cascade_points(o, test_logits["int8"], "int8", "fp32", CASCADE_THRESHOLDS)
    return PredictorReport(
        variant_keys=keys,
        parameters=predictor.num_parameters(),
        auroc_error={k: auroc(1 - p_cal[:, j], ~correct[:, j]) for j, k in enumerate(keys)},
        ece_raw={k: expected_calibration_error(p_raw[:, j], correct[:, j]) for j, k in enumerate(keys)},
        ece_calibrated={k: expected_calibration_error(p_cal[:, j], correct[:, j]) for j, k in enumerate(keys)},
        ece_calibration_split_raw={
            k: expected_calibration_error(pc_raw[:, j], cal_correct[:, j]) for j, k in enumerate(keys)
        },
        ece_calibration_split_calibrated={
            k: expected_calibration_error(pc_cal[:, j], cal_correct[:, j]) for j, k in enumerate(keys)
        },
        nll_calibration_split_raw={k: binary_nll(pc_raw[:, j], cal_correct[:, j]) for j, k in enumerate(keys)},
        nll_calibration_split_calibrated={k: binary_nll(pc_cal[:, j], cal_correct[:, j]) for j, k in enumerate(keys)},
        calibration={k: (float(a), float(b)) for k, a, b in zip(keys, predictor.calib_scale, predictor.calib_bias)},
        test_error_rate={k: float(1 - correct[:, j].mean()) for j, k in enumerate(keys)},
        routing=routing,
        latency_ms={k: float(x) for k, x in zip(keys, latency)},
    )


def _log_to_mlflow(cfg: ExperimentConfig, manifest: Manifest, report: PredictorReport) -> None:
    import json
    import tempfile

    from adaptive_quant.tracking import start_run

    with start_run(cfg.tracking, kind="predictor") as tracker:
        tracker.set_tags({"phase": "predictor", "training_run": str(manifest.training.get("mlflow_run_id"))})
        tracker.log_params(
            {
                "predictor.hidden": cfg.predictor.hidden,
                "predictor.epochs": cfg.predictor.epochs,
                "predictor.parameters": report.parameters,
                "features": len(FEATURE_NAMES),
            }
        )
        metrics = {}
        for k in report.variant_keys:
            metrics[f"{k}/auroc_error"] = report.auroc_error[k]
            metrics[f"{k}/ece_raw"] = report.ece_raw[k]
            metrics[f"{k}/ece_calibrated"] = report.ece_calibrated[k]
        tracker.log_metrics(metrics)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "predictor_report.json"
            path.write_text(json.dumps(report.to_dict(), indent=2))
            tracker.log_artifact(path)
