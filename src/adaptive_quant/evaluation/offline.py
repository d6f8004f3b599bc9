"""The evaluation: run every variant on the test split, time it, sweep the routing policy, price the baselines.

The sweep is single-stage routing as the gateway runs it without a router: `route_batch` on each
variant's validation accuracy (core.prior), the same for every sample, so each budget and
priority picks one variant. Single-stage is two-stage with no follow-up: the routes here are the
variants alone, plus the INT8→FP32 cascade's route; per-sample follow-ups are the two-stage
router's, reported by `two_stage_report.py` with the same strategies.

I/O lives here (ONNX Runtime sessions, the clock, the model repository); the strategies are priced
in `strategies.py` and `policies.py`, the counting and the verdict are in `report.py`, the files
and plots in `render.py`, the HTTP mode in `over_http.py`.

How latency is modelled (stated in the report too):
  - each variant is timed on this host with ONNX Runtime in-process, one sample per call
    (batch 1), `latency_iters` calls on distinct test images → p50/p95/p99 ms;
  - a routed sample's latency is the latency of the variant chosen for it: sample i on
    variant v is given one of v's measured batch-1 call times, drawn with a fixed seed, so
    every strategy sees the same (N, V) latency matrix and the mean and p99 carry real jitter;
  - the router's latency estimate is what the gateway's `LatencyEstimator` computes from a
    profile measured on this host, idle (no queue, observed/predicted ratio 1): the p95 at batch 1;
  - throughput is samples/s at batch 64 per variant; a mix of variants runs them one after
    the other on the same cores (`strategies.mixed_throughput`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from adaptive_quant.core.images import to_model_input
from adaptive_quant.core.latency import LatencyConfig, LatencyEstimator
from adaptive_quant.core.manifest import LatencyPoint, LatencyProfile, Manifest, ManifestError, load_manifest
from adaptive_quant.core.prior import PriorAccuracy
from adaptive_quant.core.routing import Priority, RoutingConfig
from adaptive_quant.core.stats import max_softmax, percentile, percentiles, time_calls
from adaptive_quant.data import Split
from adaptive_quant.evaluation.policies import adaptive_point
from adaptive_quant.evaluation.report import ClassificationMetrics, classification_metrics, mark_frontiers, verdict
from adaptive_quant.evaluation.strategies import Outcomes, StrategyPoint, cascade_points, fixed_points, oracle_point
from adaptive_quant.export.ort_eval import host_info, make_session, profile_session, run_batched

log = logging.getLogger(__name__)

LATENCY_MODEL = (
    "Latency per sample = a batch-1 ONNX Runtime call time of the chosen variant, measured on this host "
    "(one of {iters} timed calls per variant, drawn per sample with a fixed seed, so every strategy sees the "
    "same latencies); a cascade sample that escalates pays both variants. The router plans with the p95 of "
    "those calls (the gateway's latency estimate for an idle server, batch 1). Throughput = samples/s at "
    "batch 64; a mix runs its variants one after the other on the same cores (harmonic mean by share)."
)


CASCADE_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)  # int8 top-1 softmax below this → fp32


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
    feeds = [{name: x[i][None]} for i in range(min(len(x), max(iters, warmup)))]  # (1, 3, H, W) each, built untimed
    return time_calls(lambda i: session.run(None, feeds[i % len(feeds)]), iters, warmup=warmup)


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
    o: Outcomes,
    pred_acc: np.ndarray,
    served: list[int],
    precisions: list[str],
    estimates: np.ndarray,
    budgets: list[float | None],
    opts: EvalOptions,
) -> list[StrategyPoint]:
    """Adaptive points: budget × priority, through `route_batch` as the gateway routes.

    pred_acc (N, S) over the served columns `served` of the outcomes; estimates (S,) ms.
    """
    out: list[StrategyPoint] = []
    grid = [(b, p) for b in budgets for p in opts.priorities]
    for budget, priority in tqdm(
        grid, desc="routing sweep", unit="point", disable=not opts.progress, dynamic_ncols=True
    ):
        out.append(adaptive_point(o, pred_acc, estimates, precisions, budget, priority, opts.routing, columns=served))
    return out


def baseline_points(
    o: Outcomes, logits: dict[str, np.ndarray], served_keys: list[str], opts: EvalOptions
) -> list[StrategyPoint]:
    """Every variant alone (served ones and the PTQ baseline), the oracle over the served ones,
    and the INT8→FP32 confidence cascade at each threshold: INT8 first, FP32's answer instead
    where INT8's top softmax probability is low (the route "int8→fp32" pays both)."""
    out = fixed_points(o, served=served_keys)
    out.append(oracle_point(o, served_keys))
    if "int8" in served_keys and "fp32" in served_keys:
        confidence = max_softmax(logits["int8"])  # (N,) int8's top-1 probability
        label = "cascade int8→fp32 (threshold {t:g})"
        out += cascade_points(o.then("int8", "fp32"), confidence, "int8", "int8→fp32", opts.cascade_thresholds, label)
    return out


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
    x = to_model_input(test.images, manifest.mean, manifest.std)  # (N, 3, 32, 32) float32, what every stage feeds
    keys = list(manifest.variants)  # served variants and the PTQ baseline
    served_keys = [v.key for v in manifest.served_variants()]
    # the policy sweep routes over what a default gateway routes to: opt-in variants (a pruned INT8
    # network) are measured and shown alone, but never taken into routing unless the gateway is told
    routed_keys = [v.key for v in manifest.routed_variants()]

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
            percentile(timings[k], 50),
            thr[k],
        )

    correct = np.stack([logits[k].argmax(1) == test.labels for k in keys], axis=1)  # (N, V) bool
    lat = latency_matrix(timings, keys, len(test), opts.seed)  # (N, V) ms
    throughput = np.array([thr[k] for k in keys])
    variants = _variant_results(manifest, keys, logits, timings, thr, test.labels)

    prior = PriorAccuracy.from_manifest(manifest)
    pred_acc = prior.matrix(len(test), routed_keys)  # (N, S): the same row for every sample
    profiles = {}
    for k in routed_keys:
        q = percentiles(timings[k], (50, 95))
        profiles[k] = LatencyProfile(host={}, batches={"1": LatencyPoint(q["p50"], q["p95"], 0.0)})
    estimates = router_estimates(profiles, routed_keys)
    budgets: list[float | None] = [*(opts.budgets or default_budgets(list(estimates))), None]
    served_cols = [keys.index(k) for k in routed_keys]
    precisions = [manifest.variants[k].precision for k in routed_keys]

    outcomes = Outcomes(keys, correct, lat, throughput, share_budgets=[b for b in budgets if b is not None])
    points = baseline_points(outcomes, logits, served_keys, opts)
    points += sweep_points(outcomes, pred_acc, served_cols, precisions, estimates, budgets, opts)
    mark_frontiers(points)
    text = verdict(points, budgets)
    meta = {
        "repository": str(repo.resolve()),
        "model": manifest.model_name,
        "classes": list(manifest.classes),
        "samples": len(test),
        "limit": opts.limit,
        "split": "test",
        "host": host_info(opts.threads),
        "single_stage": prior.to_json(),  # what the adaptive sweep routes on
        "routing": {
            "speed_tolerance": opts.routing.speed_tolerance,
            "accuracy_per_halving": opts.routing.accuracy_per_halving,
        },
        "router_estimates_ms": {k: float(e) for k, e in zip(routed_keys, estimates)},
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
                latency_ms={**percentiles(t), "mean": float(t.mean())},  # p50/p95/p99/mean
                throughput_b64=float(thr[k]),
                val_accuracy=v.val_accuracy,
            )
        )
    return out
