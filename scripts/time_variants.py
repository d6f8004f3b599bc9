"""Time variants of one repository against each other with ONNX Runtime, interleaved, on this host.

  python scripts/time_variants.py --repository model_repository --variants int8,int8_pruned25,int8_pruned50

Each round profiles every variant once (batch sizes --batches, --seconds each) in turn, so slow
phases of a shared host hit all of them alike; the table gives the median over rounds of each
variant's p50 ms per call, and its ratio to the first variant named (the reference).
"""

from __future__ import annotations

import argparse
import statistics
import sys

import numpy as np

from adaptive_quant.core.manifest import load_manifest
from adaptive_quant.export.ort_eval import make_session, profile_session


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repository", default="model_repository")
    p.add_argument("--variants", required=True, help="comma-separated manifest keys; the first is the reference")
    p.add_argument("--batches", default="1,64", help="batch sizes (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default: %(default)s)")
    p.add_argument("--seconds", type=float, default=1.0, help="s per variant and batch size per round")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads; 0 = all cores")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    manifest = load_manifest(args.repository, verify_files=True)
    keys = [k.strip() for k in args.variants.split(",") if k.strip()]
    batches = [int(b) for b in args.batches.split(",")]
    sessions = {k: make_session(f"{args.repository}/{manifest.variants[k].path}", args.threads) for k in keys}
    # any normalised input times the same: the work of a dense conv net does not depend on the pixels
    x = np.random.default_rng(0).standard_normal((64, 3, manifest.image_size, manifest.image_size), np.float32)
    p50: dict[tuple[str, int], list[float]] = {(k, b): [] for k in keys for b in batches}
    for _ in range(args.rounds):
        for k, s in sessions.items():
            prof = profile_session(s, x, batches, args.seconds, threads=args.threads)
            for b in batches:
                p50[(k, b)].append(prof.batches[str(b)].p50_ms)
    med = {kb: statistics.median(v) for kb, v in p50.items()}
    head = " | ".join(f"batch {b} p50 ms | × {keys[0]}" for b in batches)
    print(f"| variant | size KB | {head} |")
    print("|---" * (2 + 2 * len(batches)) + "|")
    for k in keys:
        cells = " | ".join(f"{med[(k, b)]:.3f} | {med[(k, b)] / med[(keys[0], b)]:.2f}" for b in batches)
        print(f"| {k} | {manifest.variants[k].size_bytes / 1e3:.0f} | {cells} |")
    spread = {k: max(max(p50[(k, b)]) / min(p50[(k, b)]) for b in batches) for k in keys}
    print(
        f"({args.rounds} rounds, threads {args.threads or 'all'}; largest max/min p50 over rounds: "
        + ", ".join(f"{k} {v:.2f}" for k, v in spread.items())
        + ")"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
