"""Benchmark the gateway: routing decision time, gateway overhead, throughput (fixed vs adaptive).

    python scripts/bench_gateway.py                          # on model_repository/, all three parts
    python scripts/bench_gateway.py --repository /tmp/repo --parts routing overhead --duration 5

routing: one routing decision, µs per sample: the two-stage router reading the entry logits +
  the planner, or (a repository without a router) the single-stage policy on the manifest's
  accuracies + latency estimate.
overhead: one image at concurrency 1, the embedded backend called directly vs the same request
  through the whole gateway in-process (ASGI, no network), ms.
stages (not in the default set): one-image requests through the steps of the classify route on
  the app's own service, each timed: options, JSON, PNG decode, normalisation, classify (entry
  pass, router, follow-ups), the answer; µs. --iterations requests.
throughput: a gateway subprocess per mode (pinned to fp32, pinned to int8, adaptive), loaded by
  the load tester (`aq-loadtest`'s closed loop: --concurrency workers, each sending its next
  request when the last one returned) for --duration s after --warmup s; samples/s and client
  p50/p99 ms. For anything beyond that (open-loop arrivals, budget distributions, effective
  accuracy on labelled images) start `aq-serve` and run `aq-loadtest` against it, e.g.
    aq-loadtest --mode closed --concurrency 32 --duration 5 --budget fixed:1000 --synthetic

Figures depend on the machine and its load: say where they were measured when you quote them.
Writes the results as JSON too (--out).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import platform
import sys
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from adaptive_quant.core.latency import LatencyEstimator
from adaptive_quant.core.manifest import ManifestError, load_manifest
from adaptive_quant.core.precision import Precision
from adaptive_quant.core.prior import PriorAccuracy
from adaptive_quant.core.routing import Priority, allowed_mask, route_batch
from adaptive_quant.core.v1_wire import request_body
from adaptive_quant.serving.followup import FollowupStage, load_router
from adaptive_quant.serving.settings import ServeSettings, SettingsError, load_settings, parse_set
from adaptive_quant.tools import bench

ROUTING_BUDGET_MS = 10.0  # the budget each timed routing decision is made under


def bench_routing(settings: ServeSettings, iterations: int = 3000) -> dict[str, Any]:
    """µs per sample for one routing decision as the gateway makes it, at request sizes 1 and 32."""
    manifest = load_manifest(settings.repository)
    served = manifest.served_variants()
    keys = [v.key for v in served]
    estimator = LatencyEstimator({v.key: v.latency for v in served}, settings.latency)
    allowed = allowed_mask([Precision(v.precision) for v in served], None)

    router = load_router(settings.repository, manifest, settings.planner.enabled)
    if router.predictor is not None:
        # two-stage: the routing cost is the router reading the entry logits + the planner. The
        # logits are drawn once (their values do not change the work); the entry pass itself is
        # backend compute, measured by the overhead part
        stage = FollowupStage(
            router.predictor,
            keys,
            [Precision(v.precision) for v in served],
            settings.planner,
            manifest.plan_accuracies(router.predictor.plan_names),
        )
        entry = manifest.router["entry"]
        routable = dict.fromkeys(keys, True)
        pool = np.random.default_rng(0).normal(0.0, 3.0, (256, len(manifest.classes))).astype(np.float32)

        def decide(images: np.ndarray) -> object:
            mask = stage.allowed(entry, routable, None)
            return stage.decide(entry, pool[: len(images)], mask, ROUTING_BUDGET_MS, Priority.BALANCED, estimator)

        kind = f"two-stage router ({router.summary.split(';')[0]})"
    else:
        # single-stage, as the gateway routes without a router (service.classify): the prior row
        # broadcast to the request's samples, the latency estimate for a call of that size, the policy.
        # Still worth timing: it is the whole per-request routing cost of such a repository
        row = PriorAccuracy.from_manifest(manifest).row(keys)

        def decide(images: np.ndarray) -> object:
            acc = np.broadcast_to(row, (len(images), len(keys)))
            est = np.array(estimator.estimates_ms(keys, len(images)))
            return route_batch(acc, est, allowed, ROUTING_BUDGET_MS, Priority.BALANCED, settings.routing)

        kind = "single-stage on the manifest's validation accuracies"
    # as the gateway does after start-up (serving/app.py): the long-lived heap (modules, sessions,
    # the router) leaves the cyclic GC's scans, so a timed decision does not pay for scanning it
    gc.freeze()
    timed = bench.routing_times(decide, iterations)
    # the host's own interruptions, measured right after: what sets a short call's p99 on a VM
    return {**timed, "router": {"kind": kind}, "host_stalls": bench.host_stalls(1.0)}


async def _backend_direct(settings: ServeSettings, variant: str, x: np.ndarray, iterations: int) -> np.ndarray:
    from adaptive_quant.serving.app import backend_options
    from adaptive_quant.serving.backends import make_backend

    # the gateway's own backend settings (batcher, inline limit, instances, threads): the overhead
    # is then the gateway's layers alone, not a differently configured backend
    backend = make_backend(
        "embedded", settings.repository, load_manifest(settings.repository), **backend_options(settings)
    )
    await backend.start()
    try:
        return await bench.backend_times(lambda: backend.infer(variant, x), iterations)
    finally:
        await backend.close()


async def _through_gateway(pinned: ServeSettings, body: dict, iterations: int) -> tuple[np.ndarray, np.ndarray]:
    from adaptive_quant.serving.app import create_app

    app = create_app(pinned)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            return await bench.gateway_times(client, body, iterations)


def bench_overhead(
    settings: ServeSettings, pinned: ServeSettings, variant: str = "int8", iterations: int = 500
) -> dict[str, dict[str, float]]:
    """ms at concurrency 1, one image: the backend alone vs through the gateway `pinned` to `variant`."""
    from adaptive_quant.core.images import to_model_input

    manifest = load_manifest(settings.repository)
    img = bench.sample_images(1, seed=7)
    x = to_model_input(img, manifest.mean, manifest.std)
    direct = asyncio.run(_backend_direct(settings, variant, x, iterations))
    client_ms, server_ms = asyncio.run(_through_gateway(pinned, request_body(img), iterations))
    return bench.overhead(direct, client_ms, server_ms)


STAGES = ("options", "json", "decode", "normalise", "classify", "answer")


async def _stage_times(settings: ServeSettings, bodies: list[bytes], iterations: int) -> dict[str, np.ndarray]:
    """µs per stage of `fronts.v1_rest.classify_request`, each step called as the route calls it, on the
    app's own service (in-process, no HTTP): where a one-image request's server time goes."""
    import time

    from adaptive_quant.core.images import to_model_input
    from adaptive_quant.serving.app import create_app
    from adaptive_quant.serving.decode import decode_instances, parse_json
    from adaptive_quant.serving.fronts.v1_rest import encode_answer
    from adaptive_quant.serving.options import parse_options

    app = create_app(settings)
    times = {k: [] for k in (*STAGES, "request")}
    async with app.router.lifespan_context(app):
        svc, plane = app.state.service, app.state.dataplane
        m, limits = svc.manifest, svc.settings.limits
        warm = iterations // bench.WARMUP_SHARE
        clock = time.perf_counter
        for i in range(iterations):
            t0 = clock()
            options = parse_options({}, svc.settings.routing.default_priority)
            t1 = clock()
            payload = parse_json(bodies[i % len(bodies)])
            t2 = clock()
            images = decode_instances(payload, limits.max_instances, m.image_size)
            t3 = clock()
            x = to_model_input(images, m.mean, m.std)
            t4 = clock()
            result = await svc.classify(x, options, t0)
            t5 = clock()
            plane.record_result(result, options.budget_ms)
            encode_answer(result, options.budget_ms, t0)
            t6 = clock()
            if i >= warm:
                marks = (t0, t1, t2, t3, t4, t5, t6)
                for k, a, b in zip(STAGES, marks, marks[1:]):
                    times[k].append((b - a) * 1e6)
                times["request"].append((t6 - t0) * 1e6)
    return {k: np.array(v) for k, v in times.items()}


def bench_stages(settings: ServeSettings, iterations: int = 500) -> dict[str, dict[str, float]]:
    """µs p50/p99 per stage of a one-image classify request (see `_stage_times`)."""
    import orjson

    bodies = [orjson.dumps(request_body(bench.sample_images(1, seed=100 + i))) for i in range(64)]
    times = asyncio.run(_stage_times(settings, bodies, iterations))
    return {k: bench.p50_p99(v) for k, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/serve.yaml")
    p.add_argument("--repository")
    p.add_argument(
        "--parts",
        nargs="+",
        default=["routing", "overhead", "throughput"],
        choices=["routing", "overhead", "stages", "throughput"],
    )
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--modes", nargs="+", default=list(bench.MODES), choices=list(bench.MODES))
    p.add_argument("--duration", type=float, default=5.0, help="s of load per mode and concurrency")
    p.add_argument("--warmup", type=float, default=1.0, help="s of unrecorded load before each throughput run")
    p.add_argument("--budget", type=float, default=1000.0, help="X-Latency-Budget-Ms for throughput, ms (loose)")
    p.add_argument("--iterations", type=int, default=500, help="requests for the overhead and stages parts")
    p.add_argument("--server-nice", type=int, default=0, help="niceness of the server subprocess")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    variant = "int8"  # the overhead part's variant
    try:
        overrides = parse_set(args.set) | ({"repository": args.repository} if args.repository else {})
        settings = load_settings(args.config, overrides)
        pinned = load_settings(args.config, overrides | {"variants": [variant]})  # the gateway serving only it
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
        print(f"\nrouting decision ({r['router']['kind']}), µs per sample")
        for k in ("per_sample_us_at_n1", "per_sample_us_at_n32"):
            print(f"  {k:<22} p50 {r[k]['p50']:8.1f}   p99 {r[k]['p99']:8.1f}")
        h = r["host_stalls"]
        hit = r["per_sample_us_at_n1"]["p50"] * h["per_s"] / 1e6
        print(
            f"  host: {h['per_s']:.0f} stalls/s over {h['threshold_us']:g} µs (median {h['median_us']:.1f} µs, "
            f"p90 {h['p90_us']:.1f} µs), so ~{hit:.1%} of one-image decisions are interrupted by one: "
            "above 1 %, the p99 is the host's"
        )
    if "stages" in args.parts:
        st = bench_stages(settings, iterations=args.iterations)
        results["stages"] = st
        print("\nwhere a one-image request's server time goes (in-process, each step as the route calls it), µs")
        for k, v in st.items():
            print(f"  {k:<10} p50 {v['p50']:8.1f}   p99 {v['p99']:8.1f}")
    if "overhead" in args.parts:
        o = bench_overhead(settings, pinned, variant, iterations=args.iterations)
        results["overhead"] = o
        print(f"\ngateway overhead at concurrency 1, one image, {variant}, ms")
        for k in ("backend_direct_ms", "gateway_server_time_ms", "gateway_in_process_client_ms"):
            print(f"  {k:<30} p50 {o[k]['p50']:7.3f}   p99 {o[k]['p99']:7.3f}")
        print(
            f"  overhead p50: server time − direct {o['overhead_p50_ms']['server_time_minus_direct']:.3f} ms, "
            f"in-process client − direct {o['overhead_p50_ms']['client_minus_direct']:.3f} ms"
        )
    if "throughput" in args.parts:
        t = bench.bench_throughput(
            settings.repository,
            args.config,
            args.concurrency,
            args.duration,
            args.budget,
            args.modes,
            args.server_nice,
            args.warmup,
        )
        results["throughput"] = t
        print(
            f"\nthroughput over HTTP (closed loop, aq-loadtest's load generator), 1 image per request, "
            f"budget {args.budget:g} ms, samples/s (p50 / p99 latency ms)"
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
