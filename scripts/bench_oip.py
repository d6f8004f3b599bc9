"""Throughput of the gateway's three fronts on the same images, each through the client its
callers use: /v1/classify (httpx), the Open Inference Protocol over HTTP (tritonclient.http.aio)
and over gRPC (tritonclient.grpc.aio). Closed loop (the load tester's): `--concurrency` callers
each send the next request as soon as the last one is answered, for `--seconds` per front; the
fronts take turns for `--rounds` rounds (so background load on a shared machine falls on all of
them alike) and the median round is reported, with the ratio to /v1/classify.

    aq-serve --grpc-port 8081 &                       # the gateway, both fronts
    python scripts/bench_oip.py --batch 1 --concurrency 8
    python scripts/bench_oip.py --batch 32 --concurrency 4 --v1-encoding pixels --v2-input pixels

Images: the CIFAR-10 test split's decoded cache (data/cache/cifar10_test_*.npz) when present,
else random pixels. /v1 gets them as PNG (b64) or pixel lists, v2 as the normalised FP32 tensor
(`images`, what tritonclient callers send) or UINT8 `pixels`; every request carries the same
routing priority (--priority), as a header on /v1 and a parameter on v2. The server's CPU ms per
request comes from its /v1/status, as aq-loadtest reads it. Loopback only, like aq-loadtest.
The measurement is adaptive_quant.tools.loadtest.fronts; this script parses and prints.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from adaptive_quant.tools.loadtest.config import LoadTestConfigError
from adaptive_quant.tools.loadtest.fronts import FrontsConfig, load_images, run_fronts


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the gateway's HTTP base URL")
    p.add_argument("--grpc", default="127.0.0.1:8081", help="host:port of its gRPC front (server.grpc_port)")
    p.add_argument("--model", default="cifar_resnet", help="the v2 model name (the manifest's model_name)")
    p.add_argument("--fronts", default="v1,http,grpc", help="comma-separated: v1, http, grpc")
    p.add_argument("--batch", type=int, default=1, help="images per request")
    p.add_argument("--distinct", type=int, default=64, help="distinct requests cycled through")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    p.add_argument("--seconds", type=float, default=8.0, help="s per front per round")
    p.add_argument("--warmup", type=float, default=2.0, help="s per front before measuring")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--priority", default="balanced", choices=["quality", "balanced", "speed"])
    p.add_argument("--v1-encoding", default="b64", choices=["b64", "pixels"])
    p.add_argument("--v2-input", default="images", choices=["images", "pixels"])
    p.add_argument("--images", default="data/cache/cifar10_test_*.npz")
    p.add_argument("--api-key", default=os.environ.get("AQ_API_KEY", ""))
    p.add_argument("--json", help="also write the result here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = FrontsConfig(
            url=args.url,
            grpc=args.grpc,
            model=args.model,
            fronts=tuple(f.strip() for f in args.fronts.split(",") if f.strip()),
            batch=args.batch,
            distinct=args.distinct,
            concurrency=args.concurrency,
            seconds=args.seconds,
            warmup=args.warmup,
            rounds=args.rounds,
            priority=args.priority,
            v1_encoding=args.v1_encoding,
            v2_input=args.v2_input,
            api_key=args.api_key or None,
        )
    except LoadTestConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result = run_fronts(cfg, load_images(cfg.batch * cfg.distinct, args.images))
    v1 = result["fronts"].get("v1", {}).get("rps_median")
    print(
        f"{result['cpu']}, {result['cores']} cores, load average {result['loadavg_1m_before_after']} (before, after); "
        f"batch {cfg.batch}, concurrency {cfg.concurrency}, {cfg.rounds} × {cfg.seconds:g} s per front; "
        f"answers agree: {result['answers_agree']}"
    )
    print(
        f"{'front':<6} {'req/s':>8} {'img/s':>8} {'vs v1':>6} {'p50 ms':>7} {'p99 ms':>7} {'errors':>6} "
        f"{'server CPU ms/req':>17} {'client CPU ms/req':>17}  rounds (req/s)"
    )
    for name, s in result["fronts"].items():
        ratio = f"{s['rps_median'] / v1:.2f}" if v1 else "-"
        print(
            f"{name:<6} {s['rps_median']:>8.1f} {s['rps_median'] * cfg.batch:>8.0f} {ratio:>6} "
            f"{s['p50_ms']:>7.1f} {s['p99_ms']:>7.1f} {s['errors']:>6} {s['server_cpu_ms']:>17.2f} "
            f"{s['client_cpu_ms']:>17.2f}  {s['rps_rounds']}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
