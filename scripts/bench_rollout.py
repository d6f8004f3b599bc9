"""Two roll-outs under live Poisson load: one promoted, one rolled back, nothing lost (issue 26's bar).

    python scripts/bench_rollout.py --out runs/rollout_bench                  # Triton + 2 gateway workers
    python scripts/bench_rollout.py --backend embedded --out runs/rollout_emb # no Triton

What it does, in one run on this machine:
  1. copies --repository (the shipped one) to OUT/serving (Triton: its python flavour, which the
     tritonserver of nvidia-pytriton can run), and writes two staged copies of its serving version:
     OUT/staged_resave (same networks, new files) and OUT/staged_permuted (every answer a permuted
     class, the manifest's figures unchanged);
  2. starts Triton (explicit model control) on OUT/serving, and the gateway (--workers, default 2)
     on the same repository;
  3. sends one-image requests as a Poisson process (--rate req/s) with X-Latency-Budget-Ms
     (--budget-ms) for the whole run, recording each answer's status, latency and X-Model-Version;
  4. runs `aq-rollout OUT/staged_resave --repository OUT/serving --gateway URL` (expect exit 0),
     waits --gap s, then the same with OUT/staged_permuted (expect exit 1);
  5. samples the memory (RSS) of the gateway's processes and of Triton's every 0.5 s.
It prints, and writes to OUT/result.json: answers that were not 200, the share within the budget
(overall and in each roll-out's window), the time from each aq-rollout start to the new version's
first answer and to the switch (the last answer of the version that stops serving), the memory
while two versions are loaded against one, and which version answers at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil

from adaptive_quant.core.host import cpu_model
from adaptive_quant.core.v1_wire import CLASSIFY_PATH, request_body
from adaptive_quant.tools.loadtest.fronts import load_images
from adaptive_quant.tools.loadtest.wire import WireError, WirePool
from adaptive_quant.tools.staged_copy import make_staged_copy
from adaptive_quant.tools.triton_server import free_port

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def tree_rss(pid: int) -> int:
    """Bytes: the resident memory of a process and all its descendants (0 when it is gone)."""
    try:
        p = psutil.Process(pid)
        procs = [p, *p.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for q in procs:
        try:
            total += q.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def wait_http(url: str, timeout_s: float, proc: subprocess.Popen) -> None:
    import urllib.request

    t_end = time.time() + timeout_s
    while time.time() < t_end:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:3]} exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer 200 within {timeout_s:.0f} s")


class Load:
    """Open-loop Poisson requests until stopped; one record per request."""

    def __init__(self, url: str, rate: float, budget_ms: float, images: np.ndarray, seed: int) -> None:
        self.pool = WirePool(url, 256, 10.0)
        self.rate, self.budget_ms = rate, budget_ms
        self.bodies = [json.dumps(request_body(images[i : i + 1])).encode() for i in range(len(images))]
        self.rng = np.random.default_rng(seed)
        self.records: list[dict] = []
        self.stopped = False
        self.t0 = 0.0

    async def one(self, i: int, scheduled: float) -> None:
        headers = {"Content-Type": "application/json", "X-Latency-Budget-Ms": f"{self.budget_ms:g}"}
        rec = {"t": scheduled - self.t0, "status": None, "ms": None, "version": None}
        try:
            r = await self.pool.request("POST", CLASSIFY_PATH, self.bodies[i % len(self.bodies)], headers)
            rec["ms"] = (time.perf_counter() - scheduled) * 1e3
            rec["status"] = r.status
            rec["version"] = r.headers.get("x-model-version")
        except (WireError, TimeoutError) as exc:
            rec["status"] = f"no answer: {type(exc).__name__}"
        self.records.append(rec)

    async def run(self) -> None:
        self.t0 = time.perf_counter()
        tasks, i, next_t = set(), 0, self.t0
        while not self.stopped:
            next_t += self.rng.exponential(1.0 / self.rate)
            delay = next_t - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            t = asyncio.create_task(self.one(i, next_t))
            tasks.add(t)
            t.add_done_callback(tasks.discard)
            i += 1
        if tasks:
            await asyncio.gather(*tasks)
        await self.pool.aclose()


async def sample_memory(pids: dict[str, int], out: list[dict], t0: float, stop: asyncio.Event) -> None:
    while not stop.is_set():
        out.append({"t": time.perf_counter() - t0, **{k: tree_rss(p) for k, p in pids.items()}})
        try:
            await asyncio.wait_for(stop.wait(), 0.5)
        except TimeoutError:
            pass


async def rollout(args: argparse.Namespace, staged: Path, serving: Path, url: str, t0: float) -> dict:
    cmd = [
        PY,
        str(ROOT / "scripts" / "rollout.py"),
        str(staged),
        "--repository",
        str(serving),
        "--gateway",
        url,
        "--canary-seconds",
        str(args.canary_seconds),
        "--canary-share",
        str(args.canary_share),
        "--no-mlflow",
    ]
    start = time.perf_counter() - t0
    proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await proc.communicate()
    end = time.perf_counter() - t0
    text = out.decode(errors="replace")
    print(text[-3000:], flush=True)
    return {"staged": staged.name, "rc": proc.returncode, "start_s": start, "end_s": end, "log_tail": text[-4000:]}


def window(records: list[dict], a: float, b: float) -> list[dict]:
    return [r for r in records if a <= r["t"] < b]


def within(records: list[dict], budget_ms: float) -> float | None:
    if not records:
        return None
    return sum(1 for r in records if r["status"] == 200 and r["ms"] is not None and r["ms"] <= budget_ms) / len(records)


def analyse(records: list[dict], rollouts: list[dict], memory: list[dict], budget_ms: float) -> dict:
    records = sorted(records, key=lambda r: r["t"])
    bad = [r for r in records if r["status"] != 200]
    result: dict = {
        "requests": len(records),
        "non_200": len(bad),
        "non_200_kinds": sorted({str(r["status"]) for r in bad}),
        "within_budget": within(records, budget_ms),
        "versions_by_10s": {},
        "rollouts": [],
    }
    for r in records:
        key = str(int(r["t"] // 10) * 10)
        result["versions_by_10s"].setdefault(key, {})
        v = str(r["version"])
        result["versions_by_10s"][key][v] = result["versions_by_10s"][key].get(v, 0) + 1
    for ro in rollouts:
        before = window(records, ro["start_s"] - 10, ro["start_s"])
        old = max(
            {r["version"] for r in before if r["version"]},
            key=lambda v: sum(1 for r in before if r["version"] == v),
            default=None,
        )
        during = window(records, ro["start_s"], ro["end_s"] + 5)
        new_versions = sorted({r["version"] for r in during if r["version"] and r["version"] != old})
        first_new = next((r["t"] for r in during if r["version"] in new_versions), None)
        after = window(records, ro["end_s"], ro["end_s"] + 10)
        final = max(
            {r["version"] for r in after if r["version"]},
            key=lambda v: sum(1 for r in after if r["version"] == v),
            default=None,
        )
        gone = new_versions[0] if final == old and new_versions else old  # the version that stops answering
        last_gone = max((r["t"] for r in records if r["version"] == gone and r["t"] >= ro["start_s"]), default=None)
        mem_one = [m for m in memory if ro["start_s"] - 10 <= m["t"] < ro["start_s"]]
        mem_two = [m for m in memory if first_new is not None and first_new <= m["t"] <= ro["end_s"]]

        def total(ms: list[dict]) -> list[int]:
            return [sum(v for k, v in m.items() if k != "t") for m in ms]

        result["rollouts"].append(
            {
                **{k: ro[k] for k in ("staged", "rc", "start_s", "end_s")},
                "old_version": old,
                "new_versions": new_versions,
                "serving_after": final,
                "first_new_answer_after_s": None if first_new is None else round(first_new - ro["start_s"], 2),
                "switch_after_s": None if last_gone is None else round(last_gone - ro["start_s"], 2),
                "rollout_seconds": round(ro["end_s"] - ro["start_s"], 2),
                "requests_in_window": len(during),
                "non_200_in_window": sum(1 for r in during if r["status"] != 200),
                "within_budget_in_window": within(during, budget_ms),
                "within_budget_switch_10s": within(window(records, ro["end_s"] - 5, ro["end_s"] + 5), budget_ms),
                "answers_by_version_in_window": {
                    v: sum(1 for r in during if r["version"] == v) for v in {r["version"] for r in during}
                },
                "rss_one_version_mb": round(float(np.median(total(mem_one))) / 2**20, 1) if mem_one else None,
                "rss_two_versions_peak_mb": round(max(total(mem_two)) / 2**20, 1) if mem_two else None,
                "rss_by_process_peak_mb": {
                    k: round(max(m[k] for m in mem_two) / 2**20, 1) for k in (mem_two[0] if mem_two else {}) if k != "t"
                },
            }
        )
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repository", default="model_repository", help="the repository to copy and serve")
    p.add_argument("--out", default="runs/rollout_bench", help="work folder (replaced)")
    p.add_argument("--backend", choices=["triton", "embedded"], default="triton")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--rate", type=float, default=150.0, help="Poisson requests/s (default %(default)s)")
    p.add_argument("--budget-ms", type=float, default=50.0)
    p.add_argument("--canary-seconds", type=float, default=30.0)
    p.add_argument("--canary-share", type=float, default=0.1)
    p.add_argument("--warm-s", type=float, default=20.0, help="load before the first roll-out, s")
    p.add_argument("--gap", type=float, default=15.0, help="s between the roll-outs, and after the last")
    args = p.parse_args(argv)

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    serving = out / "serving"
    if args.backend == "triton":
        from adaptive_quant.export.triton_python import write_python_flavor

        write_python_flavor(args.repository, serving)
    else:
        shutil.copytree(args.repository, serving)
    make_staged_copy(args.repository, out / "staged_resave")
    make_staged_copy(args.repository, out / "staged_permuted", permute_seed=1)

    procs: dict[str, subprocess.Popen] = {}
    triton = None
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [PY, str(ROOT / "scripts" / "serve.py"), "--repository", str(serving), "--port", str(port)]
    cmd += ["--workers", str(args.workers), "--backend", args.backend]
    try:
        if args.backend == "triton":
            from adaptive_quant.export.triton_python import served_model_names
            from adaptive_quant.tools.triton_server import LocalTriton, TritonServerConfig

            cfg = TritonServerConfig.explicit(serving, served_model_names(serving))
            triton = LocalTriton(cfg, workdir=out / "triton").start(timeout_s=120)
            cmd += ["--triton-url", triton.grpc_url, "--set", "backend.model_control=explicit"]
        log = (out / "gateway.log").open("w")
        procs["gateway"] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        wait_http(f"{url}/readyz", 300, procs["gateway"])
        print(f"gateway ready at {url} ({args.workers} workers, {args.backend})", flush=True)
        images = load_images(1000, str(ROOT / "data" / "cache" / "cifar10_test_*.npz"))
        pids = {"gateway": procs["gateway"].pid}
        if triton is not None and triton.process is not None:
            pids["triton"] = triton.process.pid

        async def run() -> dict:
            load = Load(url, args.rate, args.budget_ms, images, seed=0)
            stop = asyncio.Event()
            memory: list[dict] = []
            load_task = asyncio.create_task(load.run())
            await asyncio.sleep(0.1)
            mem_task = asyncio.create_task(sample_memory(pids, memory, load.t0, stop))
            await asyncio.sleep(args.warm_s)
            rollouts = [await rollout(args, out / "staged_resave", serving, url, load.t0)]
            await asyncio.sleep(args.gap)
            rollouts.append(await rollout(args, out / "staged_permuted", serving, url, load.t0))
            await asyncio.sleep(args.gap)
            load.stopped = True
            await load_task
            stop.set()
            await mem_task
            (out / "records.json").write_text(json.dumps(load.records))
            (out / "memory.json").write_text(json.dumps(memory))
            return analyse(load.records, rollouts, memory, args.budget_ms)

        result = asyncio.run(run())
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
        if triton is not None:
            triton.stop()
    result["settings"] = vars(args)
    result["cpu"] = cpu_model()
    result["cores"] = os.cpu_count()
    (out / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "versions_by_10s"}, indent=2))
    ok = (
        result["non_200"] == 0
        and (result["within_budget"] or 0) >= 0.99
        and [r["rc"] for r in result["rollouts"]] == [0, 1]
    )
    print("PASS" if ok else "FAIL", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
