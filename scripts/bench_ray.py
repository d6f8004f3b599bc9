"""Plain `aq-serve` against `aq-serve --engine ray` on this machine, one client, one run.

    python scripts/bench_ray.py                         # closed loop, concurrency 64, 20 s each, 2 rounds
    python scripts/bench_ray.py --profile               # + py-spy on the Ray processes (needs py-spy)
    python scripts/bench_ray.py --full-split            # + the whole test split once over /v1 on Ray

For each engine: the time to ready, closed-loop throughput and latency (aq-loadtest, 1-image
requests, real CIFAR-10 test images, no budget), every request answered or not, accuracy, and
where the CPU went: each process's CPU seconds during the measured window (psutil), per request.
Rounds alternate the engines (uvicorn, ray, uvicorn, ray, ...) so that a drift of the machine
shows. SIGTERM ends each engine; the script records how long it took and what was left behind.
Writes OUT/summary.json and OUT/summary.md; both servers and the client share the CPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import httpx
import psutil

ENGINES = ("uvicorn", "ray")


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def role(p: psutil.Process) -> str:
    """A process's part, for the CPU table: ray::ServeReplica:app:gateway → gateway replica, ..."""
    try:
        name = " ".join(p.cmdline()[:2]) or p.name()
    except psutil.Error:
        return "gone"
    if "ServeReplica" in name:
        return "replica " + name.split(":")[-1].split()[0]
    for key in ("ProxyActor", "ServeController", "haproxy", "raylet", "gcs_server", "DashboardAgent"):
        if key in name:
            return key
    if "aq-serve" in name or "adaptive_quant" in name:
        return "aq-serve"
    if "multiprocessing" in name or "spawn" in name:
        return "gateway worker"
    return "other " + p.name()


def cpu_seconds(root: psutil.Process) -> dict[int, tuple[str, float]]:
    out = {}
    for p in [root, *root.children(recursive=True)]:
        try:
            t = p.cpu_times()
            out[p.pid] = (role(p), t.user + t.system)
        except psutil.Error:
            continue
    return out


def start(engine: str, repo: str, port: int, log: Path) -> tuple[subprocess.Popen, float]:
    cmd = [sys.executable, "-m", "adaptive_quant.cli.serve", "--repository", repo, "--port", str(port)]
    if engine == "ray":
        cmd += ["--engine", "ray"]
    t = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT)
    ready = "ready in" if engine == "ray" else "workers serving on"
    while ready not in log.read_text():
        if proc.poll() is not None:
            raise SystemExit(f"{engine} exited:\n{log.read_text()[-3000:]}")
        if time.monotonic() - t > 300:
            raise SystemExit(f"{engine} not ready in 300 s:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    took = time.monotonic() - t
    for _ in range(100):  # the port answers (HAProxy's backends registered, the workers listening)
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    return proc, took


def stop(proc: subprocess.Popen) -> tuple[float, int]:
    """SIGTERM; seconds to exit and the processes left behind (killed afterwards)."""
    children = psutil.Process(proc.pid).children(recursive=True)
    t = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(120)
    except subprocess.TimeoutExpired:
        proc.kill()
    took = time.monotonic() - t
    time.sleep(1)
    left = [p for p in children if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    for p in left:
        p.kill()
    return took, len(left)


def loadtest(url: str, out: Path, args: argparse.Namespace, extra: list[str] | None = None) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "adaptive_quant.cli.loadtest",
        "--url",
        url,
        "--mode",
        "closed",
        "--concurrency",
        str(args.concurrency),
        "--warmup",
        "3",
        "--data",
        args.data,
        "--no-plot",
        "--progress",
        "0",
        "--out",
        str(out),
        *(extra or ["--duration", str(args.duration)]),
    ]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())["phases"]["adaptive"]


def profile(proc: subprocess.Popen, out: Path, seconds: float) -> list[subprocess.Popen]:
    """py-spy on the gateway replica, the proxy and the INT8 replica (raw stacks, for flame graphs)."""
    spies = []
    for p in psutil.Process(proc.pid).children(recursive=True):
        r = role(p)
        if r in ("replica gateway", "replica variant-int8", "ProxyActor"):
            name = r.replace(" ", "_")
            spies.append(
                subprocess.Popen(
                    [
                        shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy")),
                        "record",
                        "-p",
                        str(p.pid),
                        "-d",
                        str(int(seconds)),
                        "-r",
                        "100",
                        "-f",
                        "raw",
                    ]
                    + ["--nonblocking", "-o", str(out / f"pyspy_{name}.txt")],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
    return spies


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repository", default="model_repository")
    p.add_argument("--data", default="data/cifar10")
    p.add_argument("--out", default="runs/bench_ray")
    p.add_argument("--port", type=int, default=8311)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--duration", type=float, default=20.0, help="s of closed-loop load per engine and round")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--profile", action="store_true", help="py-spy the Ray processes in the last round")
    p.add_argument("--full-split", action="store_true", help="send the whole test split once to the Ray engine")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    url = f"http://127.0.0.1:{args.port}"
    runs: dict[str, list[dict]] = defaultdict(list)
    for rnd in range(args.rounds):
        for engine in ENGINES:
            print(f"round {rnd + 1}: {engine} ...", flush=True)
            proc, ready_s = start(engine, args.repository, args.port, out / f"{engine}_{rnd}.log")
            root = psutil.Process(proc.pid)
            spies = (
                profile(proc, out, args.duration) if args.profile and engine == "ray" and rnd == args.rounds - 1 else []
            )
            before = cpu_seconds(root)
            t = time.monotonic()
            phase = loadtest(url, out / f"{engine}_{rnd}.json", args)
            wall = time.monotonic() - t
            after = cpu_seconds(root)
            for s in spies:
                s.wait()
            by_role: dict[str, float] = defaultdict(float)
            for pid, (r, sec) in after.items():
                by_role[r] += sec - before.get(pid, (r, 0.0))[1]
            requests = max(1, phase["requests"])
            full = None
            if args.full_split and engine == "ray" and rnd == args.rounds - 1:
                print("  the whole test split over /v1 ...", flush=True)
                full = loadtest(
                    url, out / "ray_full_split.json", args, ["--images", "10000", "--max-requests", "10000"]
                )
            stop_s, left = stop(proc)
            runs[engine].append(
                {
                    "ready_s": round(ready_s, 1),
                    "req_per_s": round(phase["throughput_rps"], 1),
                    "requests": phase["requests"],
                    "answered": phase["answered"],
                    "p50_ms": round(phase["latency_ms"]["p50"], 1),
                    "p95_ms": round(phase["latency_ms"]["p95"], 1),
                    "accuracy": round(phase["accuracy"], 4),
                    # ms of CPU per request, each part (load window incl. warm-up, so a little high)
                    "cpu_ms_per_request": {
                        r: round(1000 * sec / requests, 2) for r, sec in sorted(by_role.items(), key=lambda kv: -kv[1])
                    },
                    "window_s": round(wall, 1),
                    "stop_s": round(stop_s, 1),
                    "left_behind": left,
                    "full_split": None
                    if full is None
                    else {
                        "requests": full["requests"],
                        "answered": full["answered"],
                        "accuracy": round(full["accuracy"], 4),
                        "req_per_s": round(full["throughput_rps"], 1),
                    },
                }
            )
            print(f"  {json.dumps(runs[engine][-1])}", flush=True)
    ratio = [r["req_per_s"] / u["req_per_s"] for u, r in zip(runs["uvicorn"], runs["ray"], strict=True)]
    summary = {"cpu": cpu_model(), "cores": psutil.cpu_count(), "concurrency": args.concurrency, "runs": runs}
    summary["ray_vs_uvicorn_throughput"] = [round(x, 3) for x in ratio]
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    lines = [
        f"CPU: {summary['cpu']} ({summary['cores']} cores); closed loop, concurrency {args.concurrency}, 1-image requests",
        "",
        "| round | engine | ready s | req/s | p50 ms | p95 ms | answered | accuracy | stop s | left |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i in range(args.rounds):
        for engine in ENGINES:
            r = runs[engine][i]
            lines.append(
                f"| {i + 1} | {engine} | {r['ready_s']} | {r['req_per_s']} | {r['p50_ms']} | {r['p95_ms']} "
                f"| {r['answered']}/{r['requests']} | {r['accuracy']} | {r['stop_s']} | {r['left_behind']} |"
            )
    lines += ["", f"ray / uvicorn throughput per round: {summary['ray_vs_uvicorn_throughput']}"]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
