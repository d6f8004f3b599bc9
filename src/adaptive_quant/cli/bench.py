"""Benchmark the gateway: routing decision time, gateway overhead, throughput (fixed vs adaptive).

    python scripts/bench_gateway.py                          # on model_repository/, all three parts
    python scripts/bench_gateway.py --repository /tmp/repo --parts routing overhead --duration 5

Figures depend on the machine and its load: say where they were measured when you quote them.
Writes the results as JSON too (--out).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
from pathlib import Path

from adaptive_quant.core.manifest import ManifestError, load_manifest
from adaptive_quant.serving.settings import SettingsError, load_settings, parse_set
from adaptive_quant.tools.bench import MODES, bench_overhead, bench_routing, bench_throughput


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/serve.yaml")
    p.add_argument("--repository")
    p.add_argument(
        "--parts",
        nargs="+",
        default=["routing", "overhead", "throughput"],
        choices=["routing", "overhead", "throughput"],
    )
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--duration", type=float, default=5.0, help="s of load per mode and concurrency")
    p.add_argument("--budget", type=float, default=1000.0, help="X-Latency-Budget-Ms for throughput, ms (loose)")
    p.add_argument("--iterations", type=int, default=500, help="requests for the overhead part")
    p.add_argument("--server-nice", type=int, default=0, help="niceness of the server subprocess")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    try:
        overrides = parse_set(args.set) | ({"repository": args.repository} if args.repository else {})
        settings = load_settings(args.config, overrides)
        manifest = load_manifest(settings.repository)
    except (SettingsError, ManifestError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    results: dict = {
        "host": {
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_avg_1m": os.getloadavg()[0],
        },
        "repository": settings.repository,
        "model": manifest.model_name,
    }
    print(
        f"benchmarking {manifest.model_name} from {settings.repository} on {os.cpu_count()} CPUs "
        f"(1-min load average {os.getloadavg()[0]:.1f})"
    )

    if "routing" in args.parts:
        r = bench_routing(settings)
        results["routing"] = r
        print(f"\nrouting decision (predictor: {r['predictor']['kind']} + latency estimate + policy), µs per sample")
        for k in ("per_sample_us_at_n1", "per_sample_us_at_n32"):
            print(f"  {k:<22} p50 {r[k]['p50']:8.1f}   p99 {r[k]['p99']:8.1f}")
    if "overhead" in args.parts:
        o = bench_overhead(settings, iterations=args.iterations)
        results["overhead"] = o
        print("\ngateway overhead at concurrency 1, one image, int8, ms")
        for k in ("backend_direct_ms", "gateway_server_time_ms", "gateway_in_process_client_ms"):
            print(f"  {k:<30} p50 {o[k]['p50']:7.3f}   p99 {o[k]['p99']:7.3f}")
        print(
            f"  overhead p50: server time − direct {o['overhead_p50_ms']['server_time_minus_direct']:.3f} ms, "
            f"in-process client − direct {o['overhead_p50_ms']['client_minus_direct']:.3f} ms"
        )
    if "throughput" in args.parts:
        t = bench_throughput(
            settings.repository, args.config, args.concurrency, args.duration, args.budget, args.modes, args.server_nice
        )
        results["throughput"] = t
        print(
            f"\nthroughput over HTTP, 1 image per request, budget {args.budget:g} ms, samples/s (p50 / p99 latency ms)"
        )
        print(f"  {'mode':<12}" + "".join(f"{'c=' + str(c):>26}" for c in args.concurrency))
        for mode, by_c in t.items():
            cells = "".join(
                f"{v['samples_per_s']:>10.0f} ({v['p50_ms']:5.1f}/{v['p99_ms']:6.1f})" for v in by_c.values()
            )
            print(f"  {mode:<12}{cells}")
        for mode, by_c in t.items():
            mix = {c: v["precisions"] for c, v in by_c.items()}
            errors = sum(v["errors"] for v in by_c.values())
            print(f"  {mode}: precisions served {mix}, errors {errors}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2, default=str) + "\n")
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
