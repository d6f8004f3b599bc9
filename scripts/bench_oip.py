"""Throughput of the gateway's three fronts on the same images, from one client process:
/v1/classify (httpx), the Open Inference Protocol over HTTP (tritonclient.http.aio) and over
gRPC (tritonclient.grpc.aio). Closed loop: `--concurrency` callers each send the next request
as soon as the last one is answered, for `--seconds` per front; the fronts take turns for
`--rounds` rounds (so background load on a shared machine falls on all of them alike) and the
median round is reported, with the ratio to /v1/classify.

    aq-serve --grpc-port 8081 &                       # the gateway, both fronts
    python scripts/bench_oip.py --batch 1 --concurrency 8
    python scripts/bench_oip.py --batch 32 --concurrency 4 --v1-encoding pixels --v2-input pixels

Images: the CIFAR-10 test split's decoded cache (data/cache/cifar10_test_*.npz) when present,
else random pixels. /v1 gets them as PNG (b64) or pixel lists, v2 as the normalised FP32 tensor
(`images`, what tritonclient callers send) or UINT8 `pixels`; every request carries the same
routing priority (--priority), as a header on /v1 and a parameter on v2.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import glob
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Awaitable, Callable

import httpx
import numpy as np
import tritonclient.grpc.aio as triton_grpc
import tritonclient.http.aio as triton_http

from adaptive_quant.core.images import encode_png, to_model_input

Send = Callable[[int], Awaitable[list[int]]]  # request index → the class ids it got


def load_images(n: int, pattern: str) -> np.ndarray:
    """(n, 32, 32, 3) uint8: the test split's first n images, or random ones without it."""
    found = sorted(glob.glob(pattern))
    if found:
        return np.load(found[0])["images"][:n]
    print(f"no {pattern}: random pixels")
    return np.random.default_rng(0).integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


async def make_fronts(args: argparse.Namespace, batches: list[np.ndarray]) -> dict[str, tuple[Send, Callable]]:
    """front name → (send, close). Bodies and tensors are built once: the client's own cost per
    request is what the libraries add, not encoding."""
    # the normalisation the FP32 input needs, as the model configuration states it
    config = httpx.get(f"{args.url}/v2/models/{args.model}/config", headers=_key(args), timeout=10).json()
    mean, std = ([float(v) for v in config["parameters"][k]["string_value"].split(",")] for k in ("mean", "std"))
    fronts: dict[str, tuple[Send, Callable]] = {}
    headers = {"X-Priority": args.priority, **_key(args)}
    if "v1" in args.fronts:
        http = httpx.AsyncClient(base_url=args.url, timeout=60, limits=httpx.Limits(max_connections=args.concurrency))
        if args.v1_encoding == "b64":
            bodies = [
                json.dumps({"instances": [{"b64": base64.b64encode(encode_png(im)).decode()} for im in b]}).encode()
                for b in batches
            ]
        else:
            bodies = [json.dumps({"instances": [{"pixels": im.tolist()} for im in b]}).encode() for b in batches]

        async def v1(i: int) -> list[int]:
            r = await http.post("/v1/classify", content=bodies[i % len(bodies)], headers=headers)
            r.raise_for_status()
            return [p["class_id"] for p in r.json()["predictions"]]

        fronts["v1"] = (v1, http.aclose)

    def tensors(module) -> list:
        out = []
        for b in batches:
            x = to_model_input(b, mean, std) if args.v2_input == "images" else b
            t = module.InferInput(args.v2_input, list(x.shape), "FP32" if args.v2_input == "images" else "UINT8")
            t.set_data_from_numpy(x)
            out.append([t])
        return out

    params = {"routing_priority": args.priority}
    if "http" in args.fronts:
        hc = triton_http.InferenceServerClient(args.url.removeprefix("http://"), conn_limit=args.concurrency)
        hin = tensors(triton_http)

        async def v2_http(i: int) -> list[int]:
            r = await hc.infer(args.model, hin[i % len(hin)], parameters=params, headers=_key(args) or None)
            return r.as_numpy("logits").argmax(1).tolist()

        fronts["http"] = (v2_http, hc.close)
    if "grpc" in args.fronts:
        gc = triton_grpc.InferenceServerClient(args.grpc)
        gin = tensors(triton_grpc)

        async def v2_grpc(i: int) -> list[int]:
            r = await gc.infer(args.model, gin[i % len(gin)], parameters=params, headers=_key(args) or None)
            return r.as_numpy("logits").argmax(1).tolist()

        fronts["grpc"] = (v2_grpc, gc.close)
    return fronts


def _key(args: argparse.Namespace) -> dict[str, str]:
    return {"x-api-key": args.api_key} if args.api_key else {}


def process_cpu_s(pid: int | None) -> float:
    """CPU seconds (user + system) a process has used so far (Linux /proc); 0 without a pid."""
    if not pid:
        return 0.0
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime in ticks


async def closed_loop(send: Send, concurrency: int, seconds: float, server_pid: int | None = None) -> dict[str, float]:
    """`concurrency` callers for `seconds`: requests/s, latency percentiles (ms), errors, and the
    CPU ms per answered request of the server (given its pid) and of this client: on a small
    shared machine the client's cost takes cores from the server, so both are worth seeing."""
    latencies: list[float] = []
    errors = 0
    end = time.perf_counter() + seconds
    counter = iter(range(10**9))

    async def caller() -> None:
        nonlocal errors
        while time.perf_counter() < end:
            t = time.perf_counter()
            try:
                await send(next(counter))
                latencies.append(time.perf_counter() - t)
            except Exception:  # counted, not fatal: a benchmark reports what it saw
                errors += 1

    t0, server0, client0 = time.perf_counter(), process_cpu_s(server_pid), time.process_time()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    n = max(len(latencies), 1)
    server_ms = (process_cpu_s(server_pid) - server0) * 1e3 / n if server_pid else float("nan")
    ms = np.array(latencies) * 1e3 if latencies else np.array([np.nan])
    return {
        "rps": len(latencies) / wall,
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "errors": errors,
        "server_cpu_ms": server_ms,
        "client_cpu_ms": (time.process_time() - client0) * 1e3 / n,
    }


async def main_async(args: argparse.Namespace) -> dict:
    images = load_images(args.batch * args.distinct, args.images)
    batches = [images[i : i + args.batch] for i in range(0, len(images), args.batch)]
    fronts = await make_fronts(args, batches)
    # the same images get the same answer on every front (routing aside, which --priority fixes)
    answers = {name: await send(0) for name, (send, _) in fronts.items()}
    agree = len({tuple(a) for a in answers.values()}) == 1
    for send, _ in fronts.values():  # warm-up: connections, the server's caches
        await closed_loop(send, args.concurrency, args.warmup)
    rounds: dict[str, list[dict[str, float]]] = {name: [] for name in fronts}
    load_before = os.getloadavg()
    for r in range(args.rounds):
        order = list(fronts)[r % len(fronts) :] + list(fronts)[: r % len(fronts)]  # rotate who goes first
        for name in order:
            rounds[name].append(await closed_loop(fronts[name][0], args.concurrency, args.seconds, args.server_pid))
    load_after = os.getloadavg()
    for _, close in fronts.values():
        await close()
    summary = {}
    for name, runs in rounds.items():
        rps = [x["rps"] for x in runs]
        mid = sorted(runs, key=lambda x: x["rps"])[len(runs) // 2]
        summary[name] = {**mid, "rps_median": statistics.median(rps), "rps_rounds": [round(v, 1) for v in rps]}
    return {
        "cpu": cpu_model(),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "loadavg_1m_before_after": [round(load_before[0], 2), round(load_after[0], 2)],
        "batch": args.batch,
        "concurrency": args.concurrency,
        "seconds": args.seconds,
        "rounds": args.rounds,
        "v1_encoding": args.v1_encoding,
        "v2_input": args.v2_input,
        "priority": args.priority,
        "answers_agree": agree,
        "fronts": summary,
    }


def main(argv: list[str] | None = None) -> int:
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
    p.add_argument("--server-pid", type=int, help="the gateway's pid (same host): its CPU ms per request")
    p.add_argument("--json", help="also write the result here")
    args = p.parse_args(argv)
    args.fronts = [f.strip() for f in args.fronts.split(",") if f.strip()]
    result = asyncio.run(main_async(args))
    v1 = result["fronts"].get("v1", {}).get("rps_median")
    print(
        f"{result['cpu']}, {result['cores']} cores, load average {result['loadavg_1m_before_after']} (before, after); "
        f"batch {args.batch}, concurrency {args.concurrency}, {args.rounds} × {args.seconds:g} s per front; "
        f"answers agree: {result['answers_agree']}"
    )
    print(
        f"{'front':<6} {'req/s':>8} {'img/s':>8} {'vs v1':>6} {'p50 ms':>7} {'p99 ms':>7} {'errors':>6} "
        f"{'server CPU ms/req':>17} {'client CPU ms/req':>17}  rounds (req/s)"
    )
    for name, s in result["fronts"].items():
        ratio = f"{s['rps_median'] / v1:.2f}" if v1 else "-"
        print(
            f"{name:<6} {s['rps_median']:>8.1f} {s['rps_median'] * args.batch:>8.0f} {ratio:>6} "
            f"{s['p50_ms']:>7.1f} {s['p99_ms']:>7.1f} {s['errors']:>6} {s['server_cpu_ms']:>17.2f} "
            f"{s['client_cpu_ms']:>17.2f}  {s['rps_rounds']}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
