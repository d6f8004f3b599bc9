"""Accuracy and time of a gateway against the plain server, over HTTP, on a whole split, in one run.

Each image goes in its own `/v1/classify` request, one after the other (concurrency 1, keep-alive),
to every target in turn: the plain INT8 server (scripts/baseline_server.py) and the gateway at each
priority. The targets take turns in rounds (`run_interleaved`): the split is cut into chunks and every
target runs each chunk before the next one starts, in an order that rotates per round. A virtual
machine's speed drifts by tens of percent over minutes (other tenants, frequency): run one target
after the other and the drift lands in the ratio (docs/results/2026-12-04-three-networks.md: 1.77×
one after the other, 1.34× taking turns, same servers). Time is the client's round trip (request
sent → answer read), so it includes PNG decoding, routing, queueing and HTTP; the ratio of two targets' mean round trips is the "× the plain server's
time" of issue 27. Accuracy comes from the labels; each gain over the best fixed model comes with
a 95 % paired bootstrap interval over the images (one image is 0.01 points of 10,000, and a router
and its entry model differ on only a few hundred, so a 0.05-point gap is noise). The fixed choices (every served variant of every
network alone) are scored beside them by ONNX Runtime on the same files and images, in this process:
deterministic, so HTTP would add only time.

The corrupted copy: every image gets one corruption of core/corruptions.py, drawn per image by
`seed` (the same copy for every target). The images are encoded once (PNG) and the bodies reused.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from tqdm.auto import tqdm

from adaptive_quant.core.corruptions import CORRUPTIONS, corrupt
from adaptive_quant.core.images import to_model_input
from adaptive_quant.core.manifest import load_manifest
from adaptive_quant.core.stats import format_interval, paired_difference, percentile
from adaptive_quant.core.v1_wire import CLASSIFY_PATH, headers_for, request_body

log = logging.getLogger(__name__)


@dataclass
class TargetRun:
    target: str  # "baseline", "gateway balanced", ...
    data: str  # "clean" or "corrupted"
    samples: int
    accuracy: float  # share right
    mean_ms: float  # client round trip, ms
    p50_ms: float
    p95_ms: float
    errors: int  # answers other than 200 (each counts as wrong)
    passes: dict[str, int] = field(default_factory=dict)  # "int8+int8:hflip" → samples (gateway only)
    # (N,) bool, right on image i: what the paired interval against the fixed choices is computed from.
    # None for a run built without it (then the summary has no interval); never written to the JSON
    right: np.ndarray | None = field(default=None, repr=False, compare=False)


def corrupted_copy(images: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, H, W, 3) uint8 → (the copy, (N,) index into CORRUPTIONS of each image's corruption)."""
    names = list(CORRUPTIONS)
    which = np.random.default_rng(seed).integers(0, len(names), size=len(images))
    out = images.copy()
    for k, name in enumerate(names):
        idx = np.flatnonzero(which == k)
        if len(idx):
            out[idx] = corrupt(images[idx], name, seed=seed + k)
    return out, which


def encode_bodies(images: np.ndarray) -> list[bytes]:
    """One JSON body per image: {"instances": [{"b64": PNG}]}."""
    return [json.dumps(request_body(images[i : i + 1])).encode() for i in range(len(images))]


@dataclass
class _Tally:
    """One target's per-image outcomes, filled chunk by chunk."""

    right: np.ndarray
    ms: np.ndarray
    errors: int = 0
    passes: Counter[str] = field(default_factory=Counter)


def _post_each(
    client: httpx.Client, headers: dict[str, str], bodies: list[bytes], labels: np.ndarray, rows: range, t: _Tally
) -> None:
    for i in rows:
        start = time.perf_counter()
        r = client.post(CLASSIFY_PATH, content=bodies[i], headers=headers)
        t.ms[i] = (time.perf_counter() - start) * 1e3
        if r.status_code != 200:
            t.errors += 1
            continue
        pred = r.json()["predictions"][0]
        t.right[i] = pred["class_id"] == labels[i]
        if "passes" in pred:
            t.passes["+".join(pred["passes"])] += 1


def run_interleaved(
    targets: list[tuple[str, str, str | None]],
    data: str,
    bodies: list[bytes],
    labels: np.ndarray,
    rounds: int = 20,
    timeout_s: float = 30.0,
    progress: bool = True,
) -> list[TargetRun]:
    """Every body once per target, the targets taking turns chunk by chunk (module doc).

    targets: (name, url, priority or None). Round r runs chunk r on every target, starting with
    target r mod T, so each target is as often first (right after another's chunk) as last."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1; got {rounds}")
    n = len(bodies)
    edges = np.linspace(0, n, min(rounds, max(1, n)) + 1).astype(int)
    tallies = [_Tally(np.zeros(n, dtype=bool), np.zeros(n)) for _ in targets]
    clients = [httpx.Client(base_url=url.rstrip("/"), timeout=timeout_s) for _, url, _ in targets]
    headers = [{"content-type": "application/json", **headers_for(None, pr, None)} for _, _, pr in targets]
    try:
        for c, h in zip(clients, headers):  # warm-up: connections, caches, the first follow-ups; not recorded
            for _ in range(20):
                c.post(CLASSIFY_PATH, content=bodies[0], headers=h)
        bar = tqdm(total=n * len(targets), desc=f"{data}: {len(targets)} targets in turns", disable=not progress)
        for r in range(len(edges) - 1):
            rows = range(edges[r], edges[r + 1])
            for k in range(len(targets)):
                j = (r + k) % len(targets)
                _post_each(clients[j], headers[j], bodies, labels, rows, tallies[j])
                bar.update(len(rows))
        bar.close()
    finally:
        for c in clients:
            c.close()
    return [
        TargetRun(
            target=name,
            data=data,
            samples=n,
            accuracy=float(t.right.mean()),
            mean_ms=float(t.ms.mean()),
            p50_ms=percentile(t.ms, 50),
            p95_ms=percentile(t.ms, 95),
            errors=t.errors,
            passes=dict(t.passes.most_common()),
            right=t.right,
        )
        for (name, _, _), t in zip(targets, tallies)
    ]


def fixed_outcomes(repo: str | Path, images: np.ndarray, labels: np.ndarray, threads: int = 0) -> dict[str, np.ndarray]:
    """Every served variant alone (every network), ONNX Runtime on the repository's files: key → (N,)
    bool, right on image i."""
    from adaptive_quant.export.ort_eval import make_session, run_batched

    manifest = load_manifest(repo)
    x = to_model_input(images, manifest.mean, manifest.std)
    out = {}
    for v in manifest.served_variants():
        logits = run_batched(make_session(str(Path(repo) / v.path), threads), x)
        out[v.key] = logits.argmax(1) == labels
    return out


def summarise(runs: list[TargetRun], fixed: dict[str, dict[str, np.ndarray]]) -> dict[str, Any]:
    """Per data set: each run's points over the best fixed served model, with a 95 % paired bootstrap
    interval (core.stats.paired_difference; when the run kept its per-image outcomes), and its time
    over the baseline's. `fixed`: data set → variant key → (N,) bool right per image, the runs' images
    in the same order. The best fixed model is the one most accurate on these very images: chosen in
    hindsight, so the comparison is the hardest a fixed deployment could set."""
    accuracies = {data: {k: float(np.mean(r)) for k, r in outcomes.items()} for data, outcomes in fixed.items()}
    out: dict[str, Any] = {
        "runs": [{k: v for k, v in asdict(r).items() if k != "right"} for r in runs],
        "fixed": accuracies,
        "rows": [],
    }
    for data, accs in accuracies.items():
        best = max(accs, key=accs.get)
        base = next((r for r in runs if r.data == data and r.target == "baseline"), None)
        for r in runs:
            if r.data != data:
                continue
            interval = None
            if r.right is not None:
                _, low, high = paired_difference(r.right, fixed[data][best])
                interval = [low, high]
            out["rows"].append(
                {
                    "data": data,
                    "target": r.target,
                    "accuracy": r.accuracy,
                    "best_fixed": best,
                    "best_fixed_accuracy": accs[best],
                    "points_over_best_fixed": 100 * (r.accuracy - accs[best]),
                    "points_ci95": interval,  # [low, high] points, paired bootstrap over the images
                    "time_vs_baseline": r.mean_ms / base.mean_ms if base else None,
                    "mean_ms": r.mean_ms,
                    "errors": r.errors,
                }
            )
    return out


def render(summary: dict[str, Any], host: str) -> str:
    lines = [
        f"Whole split, one image per request, concurrency 1, over HTTP; {host}.",
        "",
        "| data | target | accuracy | vs best fixed served model | 95 % interval (paired bootstrap) "
        "| time vs plain INT8 server | mean round trip | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in summary["rows"]:
        t = row["time_vs_baseline"]
        lines.append(
            f"| {row['data']} | {row['target']} | {100 * row['accuracy']:.2f} % | "
            f"{row['points_over_best_fixed']:+.2f} ({row['best_fixed']} {100 * row['best_fixed_accuracy']:.2f} %) | "
            f"{format_interval(row.get('points_ci95'))} | "
            f"{'–' if t is None else f'{t:.2f}×'} | {row['mean_ms']:.2f} ms | {row['errors']} |"
        )
    lines += ["", "Fixed choices (ONNX Runtime, same files and images):", ""]
    for data, accs in summary["fixed"].items():
        lines.append(f"- {data}: " + ", ".join(f"{k} {100 * a:.2f} %" for k, a in sorted(accs.items())))
    lines += ["", "Passes per sample (gateway):", ""]
    for r in summary["runs"]:
        if r["passes"]:
            top = ", ".join(f"{k} {v}" for k, v in list(r["passes"].items())[:6])
            lines.append(f"- {r['target']} ({r['data']}): {top}")
    return "\n".join(lines) + "\n"
