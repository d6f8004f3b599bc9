"""Run ONNX variants with ONNX Runtime: sessions, batched inference, the validation gate, latency profiles.

No torch: the same code measures variants at export time and in offline evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from adaptive_quant.core.host import describe_host
from adaptive_quant.core.manifest import LatencyPoint, LatencyProfile
from adaptive_quant.core.stats import percentiles, time_calls


def make_session(path: str, threads: int = 0) -> ort.InferenceSession:
    """A CPU session; threads=0 lets ONNX Runtime use every core."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    opts.log_severity_level = 3  # errors only: fp16 graphs log a warning per inserted cast
    return ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])


def run_batched(session: ort.InferenceSession, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """x: (N, 3, H, W) float32 → (N, num_classes) float32 logits."""
    name = session.get_inputs()[0].name
    outs = [session.run(None, {name: x[i : i + batch_size]})[0] for i in range(0, len(x), batch_size)]
    return np.concatenate(outs).astype(np.float32, copy=False)


@dataclass
class GateResult:
    accuracy: float  # share, on the validation split
    agreement_with_fp32: float  # share of samples with the same top-1 as FP32
    max_abs_logit_diff: float  # largest |logit − FP32 logit| over the split
    non_finite: int  # count of NaN/Inf logits
    accuracy_drop: float  # FP32 accuracy − this accuracy, in points (percent)
    passed: bool
    reason: str  # empty when passed


def gate_variant(logits: np.ndarray, fp32_logits: np.ndarray, labels: np.ndarray, max_drop_points: float) -> GateResult:
    """The publication gate: finite outputs and an accuracy drop against FP32 within the limit."""
    non_finite = int((~np.isfinite(logits)).sum())
    acc = float((logits.argmax(1) == labels).mean())
    fp32_acc = float((fp32_logits.argmax(1) == labels).mean())
    drop = 100.0 * (fp32_acc - acc)
    reasons = []
    if non_finite:
        reasons.append(f"{non_finite} NaN/Inf logits")
    if drop > max_drop_points:
        reasons.append(
            f"accuracy {acc:.2%} is {drop:.2f} points below FP32's {fp32_acc:.2%} (limit {max_drop_points:.2f} points)"
        )
    diff = np.abs(np.nan_to_num(logits) - fp32_logits)
    return GateResult(
        accuracy=acc,
        agreement_with_fp32=float((logits.argmax(1) == fp32_logits.argmax(1)).mean()),
        max_abs_logit_diff=float(diff.max()) if diff.size else 0.0,
        non_finite=non_finite,
        accuracy_drop=drop,
        passed=not reasons,
        reason="; ".join(reasons),
    )


def host_info(threads: int) -> dict[str, object]:
    """Where a profile was measured: absolute times hold only for this host."""
    return describe_host(ort.__version__, threads)


def profile_session(
    session: ort.InferenceSession,
    sample: np.ndarray,
    batch_sizes: list[int],
    seconds_per_point: float = 1.0,
    min_iters: int = 10,
    threads: int = 0,
) -> LatencyProfile:
    """Time one call per batch size: p50/p95 ms and throughput (samples/s). sample: (M, 3, H, W) float32."""
    name = session.get_inputs()[0].name
    points: dict[str, LatencyPoint] = {}
    for b in batch_sizes:
        x = np.ascontiguousarray(np.resize(sample, (b,) + sample.shape[1:]).astype(np.float32))
        feed = {name: x}
        # 3 untimed warm-up calls: first calls allocate and pick kernels
        ms = time_calls(lambda _, feed=feed: session.run(None, feed), min_iters, seconds_per_point, warmup=3)
        q = percentiles(ms, (50, 95))
        points[str(b)] = LatencyPoint(p50_ms=q["p50"], p95_ms=q["p95"], throughput=float(b / (ms.mean() / 1e3)))
    return LatencyProfile(host=host_info(threads), batches=points)
