"""The evaluation: run every variant on the test split, time it, sweep the routing policy, price the baselines.

I/O lives here (ONNX Runtime sessions, the clock, the model repository); the counting is in
`report.py`, the files and plots in `report_render.py`, the HTTP mode in `evaluation_http.py`.

How latency is modelled (stated in the report too):
  - each variant is timed on this host with ONNX Runtime in-process, one sample per call
    (batch 1), `latency_iters` calls on distinct test images → p50/p95/p99 ms;
  - a routed sample's latency is the latency of the variant chosen for it: sample i on
    variant v is given one of v's measured batch-1 call times, drawn with a fixed seed, so
    every strategy sees the same (N, V) latency matrix and the mean and p99 carry real jitter;
  - the router's latency estimate is what the gateway's `LatencyEstimator` computes from a
    profile measured on this host, idle (no queue, observed/predicted ratio 1): the p95 at batch 1;
  - throughput is samples/s at batch 64 per variant; a mix of variants runs them one after
    the other on the same cores (`report.mixed_throughput`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from adaptive_quant.core.latency import LatencyConfig, LatencyEstimator
from adaptive_quant.core.manifest import LatencyPoint, LatencyProfile, Manifest, ManifestError, load_manifest
from adaptive_quant.core.routing import Priority, RoutingConfig, allowed_mask, route_batch
from adaptive_quant.data import Split
from adaptive_quant.evaluation.report import (
    ClassificationMetrics,
    StrategyPoint,
    classification_metrics,
    pareto_mask,
    score_choice,
    verdict,
)
from adaptive_quant.evaluation.strategies import PolicyPoint, random_same_mix, softmax_confidence
from adaptive_quant.export.ort_eval import host_info, make_session, profile_session, run_batched
from adaptive_quant.predictor.runtime import PriorPredictor, accuracy_matrix, load_accuracy_predictor

log = logging.getLogger(__name__)

CASCADE_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)  # INT8 top-1 softmax below this → ask FP32
LATENCY_MODEL = (
    "Latency per sample = a batch-1 ONNX Runtime call time of the chosen variant, measured on this host "
    "(one of {iters} timed calls per variant, drawn per sample with a fixed seed, so every strategy sees the "
    "same latencies); a cascade sample that escalates pays both variants. The router plans with the p95 of "
    "those calls (the gateway's latency estimate for an idle server, batch 1). Throughput = samples/s at "
    "batch 64; a mix runs its variants one after the other on the same cores (harmonic mean by share)."
)


class EvaluationError(RuntimeError):
    """Something the evaluation needs is missing; the message names it."""


@dataclass
class EvalOptions:
    """Knobs of one evaluation; defaults suit the CIFAR-10 test split on a small CPU host."""

    limit: int | None = None  # evaluate a seeded random subset of this many test samples
    latency_iters: int = 200  # batch-1 calls timed per variant (≈ 0.2–1 s per variant on CPU)
    throughput_seconds: float = 1.0  # s of batch-64 calls per variant for the throughput figure
    threads: int = 0  # ONNX Runtime intra-op threads; 0 = all cores (as export profiles)
    budgets: list[float] | None = None  # ms; None = derived from the variants' batch-1 p95
    priorities: tuple[Priority, ...] = (Priority.QUALITY, Priority.BALANCED, Priority.SPEED)
    cascade_thresholds: tuple[float, ...] = CASCADE_THRESHOLDS
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1, got {self.limit}")
        if self.latency_iters < 5:
            raise ValueError(f"latency_iters must be >= 5 (a p99 needs samples), got {self.latency_iters}")
        if self.throughput_seconds <= 0:
            raise ValueError(f"throughput_seconds must be > 0, got {self.throughput_seconds}")
        if self.budgets is not None and any(b <= 0 for b in self.budgets):
            raise ValueError(f"budgets must be positive ms, got {self.budgets}")


@dataclass
class VariantResult:
    key: str
    precision: str
    served: bool  # False: a baseline (the PTQ INT8 model), exported for reports, never routed to
    path: str
    size_bytes: int
    metrics: ClassificationMetrics
    accuracy_drop_points: float | None  # FP32 test accuracy − this one, in points (percent)
    latency_ms: dict[str, float]  # p50/p95/p99/mean at batch 1
    throughput_b64: float  # samples/s at batch 64
    val_accuracy: float | None  # from the manifest (validation split)


@dataclass
class EvaluationReport:
    mode: str  # "in-process" | "http"
    meta: dict[str, Any]
    variants: list[VariantResult]
    points: list[StrategyPoint]
    verdict: str
    service_metrics: ClassificationMetrics | None = None  # http: the service as callers see it

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def points_of(self, strategy: str) -> list[StrategyPoint]:
        return [p for p in self.points if p.strategy == strategy]


# ----------------------------------------------------------------------------- helpers


def pick_samples(split: Split, limit: int | None, seed: int) -> Split:
    """The whole split, or a seeded random subset (folder-layout splits are stored class by class,
    so the first N would be one class)."""
    if limit is None or limit >= len(split):
        return split
    idx = np.sort(np.random.default_rng(seed).choice(len(split), size=limit, replace=False))
    return Split(split.images[idx], split.labels[idx])


def time_batch1(session: Any, x: np.ndarray, iters: int, warmup: int = 5) -> np.ndarray:
    """(iters,) ms per batch-1 call, cycling through the samples of x (N, 3, H, W)."""
    name = session.get_inputs()[0].name
    for i in range(warmup):  # first calls allocate buffers and pick kernels
        session.run(None, {name: x[i % len(x)][None]})
    out = np.empty(iters)
    for i in range(iters):
        sample = x[i % len(x)][None]  # (1, 3, H, W)
        t = time.perf_counter()
        session.run(None, {name: sample})
        out[i] = (time.perf_counter() - t) * 1e3
    return out


def default_budgets(estimates_ms: list[float]) -> list[float]:
    """Budgets (ms) that cut between the variants: below the fastest, at each estimate, the geometric
    midpoints between neighbours, and well above the slowest."""
    e = sorted({float(v) for v in estimates_ms})
    out = [0.8 * e[0]]
    for lo, hi in zip(e, e[1:]):
        out += [lo, float(np.sqrt(lo * hi))]
    out += [e[-1], 1.5 * e[-1]]
    return sorted({round(b, 4) for b in out})


def latency_matrix(timings: dict[str, np.ndarray], keys: list[str], n: int, seed: int) -> np.ndarray:
    """(n, V) ms: sample i on variant v gets one of v's measured call times (seeded draw)."""
    rng = np.random.default_rng(seed)
    return np.stack([rng.choice(timings[k], size=n, replace=True) for k in keys], axis=1)


def router_estimates(profiles: dict[str, LatencyProfile], keys: list[str]) -> np.ndarray:
    """(V,) ms: the gateway's latency estimate for one sample on an idle server."""
    est = LatencyEstimator({k: profiles[k] for k in keys}, LatencyConfig(ewma_alpha=0.0))
    return np.array(est.estimates_ms(keys, 1))


# ----------------------------------------------------------------------------- strategies


def sweep_points(
    pred_acc: np.ndarray,
    correct: np.ndarray,
    lat: np.ndarray,
    throughput: np.ndarray,
    keys: list[str],
    served: list[int],
    precisions: list[str],
    estimates: np.ndarray,
    budgets: list[float | None],
    opts: EvalOptions,
) -> list[StrategyPoint]:
    """Adaptive points (budget × priority, through `route_batch`) and random assignment at each one's mix.

    pred_acc (N, S) over the served columns `served` of correct/lat (N, V); estimates (S,) ms.
    """
    rng = np.random.default_rng(opts.seed + 1)
    allowed = allowed_mask(precisions, None)
    share_budgets = [b for b in budgets if b is not None]
    out: list[StrategyPoint] = []
    grid = [(b, p) for b in budgets for p in opts.priorities]
    for budget, priority in tqdm(
        grid, desc="routing sweep", unit="point", disable=not opts.progress, dynamic_ncols=True
    ):
        decision = route_batch(pred_acc, estimates, allowed, budget, priority, opts.routing)
        choice = np.asarray(served)[decision.index]  # served column → global column
        where = "no budget" if budget is None else f"{budget:.3g} ms"
        label = f"adaptive {priority.value} @ {where}"
        point = score_choice(
            choice,
            correct,
            lat,
            throughput,
            keys,
            budget,
            "adaptive",
            label,
            priority=priority.value,
            share_budgets=share_budgets,
            extra={"router_budget_met": float(decision.budget_met.mean())},
        )
        out.append(point)
        # random assignment with exactly the same number of samples per variant
        counts = np.bincount(choice, minlength=len(keys))
        shuffled = rng.permutation(np.repeat(np.arange(len(keys)), counts))
        rand = score_choice(
            shuffled,
            correct,
            lat,
            throughput,
            keys,
            budget,
            "random-same-mix",
            f"random at the mix of {label}",
            priority=priority.value,
            share_budgets=share_budgets,
        )
        # its accuracy in expectation (exact, no sampling noise), via routing_eval
        expected = random_same_mix(
            PolicyPoint("adaptive", None, point.accuracy, point.mean_ms, point.mix), correct, lat.mean(axis=0), keys
        )
        rand.extra["sampled_accuracy"] = rand.accuracy
        rand.accuracy = expected.accuracy
        out.append(rand)
    return out


def oracle_choice(correct: np.ndarray, mean_ms: np.ndarray, columns: list[int]) -> np.ndarray:
    """(N,) global column: the cheapest of `columns` that is right (the cheapest of all when none is)."""
    cols = np.asarray(columns)[np.argsort(mean_ms[columns])]  # cheapest first
    right = correct[:, cols]
    first = np.where(right.any(axis=1), right.argmax(axis=1), 0)
    return cols[first]


def baseline_points(
    logits: dict[str, np.ndarray],
    correct: np.ndarray,
    lat: np.ndarray,
    throughput: np.ndarray,
    keys: list[str],
    served_keys: list[str],
    budgets: list[float | None],
    opts: EvalOptions,
) -> list[StrategyPoint]:
    """Every variant alone (served ones and the PTQ baseline), the oracle over the served ones,
    and the INT8→FP32 confidence cascade at each threshold."""
    n = correct.shape[0]
    share_budgets = [b for b in budgets if b is not None]
    out = []
    for j, k in enumerate(keys):
        is_served = k in served_keys
        label = f"fixed {k}" if is_served else f"fixed {k} (baseline, not served)"
        out.append(
            score_choice(
                np.full(n, j),
                correct,
                lat,
                throughput,
                keys,
                None,
                "fixed",
                label,
                deployable=is_served,
                share_budgets=share_budgets,
            )
        )
    served_cols = [keys.index(k) for k in served_keys]
    out.append(
        score_choice(
            oracle_choice(correct, lat.mean(axis=0), served_cols),
            correct,
            lat,
            throughput,
            keys,
            None,
            "oracle",
            "oracle (knows the labels)",
            deployable=False,
            share_budgets=share_budgets,
        )
    )
    if "int8" in served_keys and "fp32" in served_keys:
        c, e = keys.index("int8"), keys.index("fp32")
        conf = softmax_confidence(logits["int8"])  # (N,) top-1 probability of the cheap answer
        for thr in opts.cascade_thresholds:
            escalate = conf < thr
            choice = np.where(escalate, e, c)
            extra_share = np.zeros(len(keys))
            extra_share[c] = escalate.mean()  # escalated samples ran on int8 first
            out.append(
                score_choice(
                    choice,
                    correct,
                    lat,
                    throughput,
                    keys,
                    None,
                    "cascade",
                    f"cascade int8→fp32 (threshold {thr:g})",
                    param=thr,
                    extra_latency=escalate * lat[:, c],
                    extra_share=extra_share,
                    share_budgets=share_budgets,
                )
            )
    return out


def mark_frontiers(points: list[StrategyPoint]) -> None:
    """Set on_*_frontier over the deployable points (the oracle and non-served baselines are references)."""
    cand = [p for p in points if p.deployable]
    acc = [p.accuracy for p in cand]
    lat_mask = pareto_mask(acc, [p.mean_ms for p in cand])
    thr_mask = pareto_mask(acc, [-p.throughput for p in cand])
    for p, a, b in zip(cand, lat_mask, thr_mask):
        p.on_latency_frontier, p.on_throughput_frontier = bool(a), bool(b)


# ----------------------------------------------------------------------------- the whole thing


def _check_repository(repo: Path) -> Manifest:
    if not repo.is_dir():
        raise EvaluationError(
            f"model repository {repo} does not exist (scripts/export.py makes one, "
            f"or pass --checkpoint runs/<run>/best.pt to export one on the fly)"
        )
    try:
        manifest = load_manifest(repo, verify_files=True)
    except ManifestError as exc:
        raise EvaluationError(str(exc)) from exc
    if not manifest.served_variants():
        raise EvaluationError(f"{repo}/manifest.json lists no served variant")
    return manifest


def evaluate_repository(repo: str | Path, test: Split, opts: EvalOptions) -> EvaluationReport:
    """Measure every variant of `repo` on `test` and sweep the routing policy; nothing is written."""
    repo = Path(repo)
    manifest = _check_repository(repo)
    test = pick_samples(test, opts.limit, opts.seed)
    if len(test) == 0:
        raise EvaluationError("the test split is empty")
    from adaptive_quant.training.augment import to_normalized_tensor  # torch: imported only when an evaluation runs

    x = to_normalized_tensor(test.images).numpy()  # (N, 3, 32, 32) float32, the serving input
    keys = list(manifest.variants)  # served variants and the PTQ baseline
    served_keys = [v.key for v in manifest.served_variants()]

    logits, timings, thr = {}, {}, {}
    for k in tqdm(keys, desc="measure variants", unit="variant", disable=not opts.progress, dynamic_ncols=True):
        session = make_session(str(repo / manifest.variants[k].path), opts.threads)
        logits[k] = run_batched(session, x)
        timings[k] = time_batch1(session, x, opts.latency_iters)
        thr[k] = (
            profile_session(session, x[:64], [64], opts.throughput_seconds, min_iters=3, threads=opts.threads)
            .batches["64"]
            .throughput
        )
        log.info(
            "%s: accuracy %.4f, batch-1 p50 %.3f ms, batch-64 %.0f samples/s",
            k,
            (logits[k].argmax(1) == test.labels).mean(),
            np.percentile(timings[k], 50),
            thr[k],
        )

    correct = np.stack([logits[k].argmax(1) == test.labels for k in keys], axis=1)  # (N, V) bool
    lat = latency_matrix(timings, keys, len(test), opts.seed)  # (N, V) ms
    throughput = np.array([thr[k] for k in keys])
    variants = _variant_results(manifest, keys, logits, timings, thr, test.labels)

    loaded = load_accuracy_predictor(repo, manifest)
    prior = PriorPredictor.from_manifest(manifest)
    pred_acc = accuracy_matrix(loaded.predictor, test.images, served_keys, prior)  # (N, S)
    profiles = {
        k: LatencyProfile(
            host={},
            batches={
                "1": LatencyPoint(float(np.percentile(timings[k], 50)), float(np.percentile(timings[k], 95)), 0.0)
            },
        )
        for k in served_keys
    }
    estimates = router_estimates(profiles, served_keys)
    budgets: list[float | None] = [*(opts.budgets or default_budgets(list(estimates))), None]
    served_cols = [keys.index(k) for k in served_keys]
    precisions = [manifest.variants[k].precision for k in served_keys]

    points = baseline_points(logits, correct, lat, throughput, keys, served_keys, budgets, opts)
    points += sweep_points(pred_acc, correct, lat, throughput, keys, served_cols, precisions, estimates, budgets, opts)
    mark_frontiers(points)
    text = verdict(
        [p for p in points if p.strategy == "fixed"],
        [p for p in points if p.strategy == "adaptive"],
        [p for p in points if p.strategy == "random-same-mix"],
        [p for p in points if p.strategy == "cascade"],
        next((p for p in points if p.strategy == "oracle"), None),
        budgets,
    )
    meta = {
        "repository": str(repo.resolve()),
        "model": manifest.model_name,
        "classes": list(manifest.classes),
        "samples": len(test),
        "limit": opts.limit,
        "split": "test",
        "host": host_info(opts.threads),
        # the manifest's predictor entry is long (feature names); the path says which one
        "predictor": {
            "kind": loaded.kind,
            "path": (manifest.predictor or {}).get("path"),
            **({"why": loaded.detail} if loaded.kind == "prior" else {}),
        },
        "routing": {
            "speed_tolerance": opts.routing.speed_tolerance,
            "accuracy_per_halving": opts.routing.accuracy_per_halving,
        },
        "router_estimates_ms": {k: float(e) for k, e in zip(served_keys, estimates)},
        "budgets_ms": [b for b in budgets if b is not None],
        "latency_model": LATENCY_MODEL.format(iters=opts.latency_iters),
        "latency_iters": opts.latency_iters,
        "throughput_seconds": opts.throughput_seconds,
        "training": {k: manifest.training.get(k) for k in ("mlflow_run_id", "git_commit")},
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return EvaluationReport("in-process", meta, variants, points, text)


def _variant_results(
    manifest: Manifest,
    keys: list[str],
    logits: dict[str, np.ndarray],
    timings: dict[str, np.ndarray],
    thr: dict[str, float],
    labels: np.ndarray,
) -> list[VariantResult]:
    metrics = {k: classification_metrics(labels, logits[k].argmax(1), manifest.classes) for k in keys}
    ref = metrics["fp32"].accuracy if "fp32" in metrics else None
    out = []
    for k in keys:
        v = manifest.variants[k]
        t = timings[k]
        out.append(
            VariantResult(
                key=k,
                precision=v.precision,
                served=v.served,
                path=v.path,
                size_bytes=v.size_bytes,
                metrics=metrics[k],
                accuracy_drop_points=None if ref is None else 100.0 * (ref - metrics[k].accuracy),
                latency_ms={
                    "p50": float(np.percentile(t, 50)),
                    "p95": float(np.percentile(t, 95)),
                    "p99": float(np.percentile(t, 99)),
                    "mean": float(t.mean()),
                },
                throughput_b64=float(thr[k]),
                val_accuracy=v.val_accuracy,
            )
        )
    return out
