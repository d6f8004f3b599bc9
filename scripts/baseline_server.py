"""The baseline every gateway performance claim is a ratio against: the plain server a user who
wants none of adaptive-quant would write, deployed the way a competent user deploys it: uvicorn
with one worker process per core, each with one ONNX Runtime INT8 session whose threads share
the cores out (cores // workers), one call per request, no routing, no batching, no limits.

  python scripts/baseline_server.py --repository model_repository --port 8013   # workers = cores
  python scripts/baseline_server.py --workers 1 --threads 0 ...   # one process, ORT's default threads

Same API shape as the gateway's POST /v1/classify ({"instances": [{"b64": PNG}]} in,
"predictions" out), plus the fields the load tester reads (`variant`, `budget_met`,
X-Server-Time-Ms, X-Precision), a minimal /v1/models and /v1/status. Deliberately not
optimised: do not improve it, or the ratios measured against it stop meaning anything.
It depends on nothing of adaptive_quant (it reads manifest.json directly).
"""

import argparse
import base64
import io
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import psutil
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from PIL import Image

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--repository", default="model_repository", help="model repository (default: %(default)s)")
p.add_argument("--variant", default="int8", help="manifest variant key to serve (default: %(default)s)")
p.add_argument("--host", default="127.0.0.1")
p.add_argument("--port", type=int, default=8013)
p.add_argument("--workers", type=int, default=0, help="uvicorn worker processes (default 0: one per core)")
p.add_argument(
    "--threads",
    type=int,
    default=-1,
    help="ORT intra-op threads per worker (default -1: cores // workers; 0: ORT's own)",
)
# uvicorn's workers import this file afresh: they read the parsed arguments from the environment
ARGS_ENV = "AQ_BASELINE_ARGS"
args = p.parse_args(json.loads(os.environ[ARGS_ENV]) if ARGS_ENV in os.environ else None)
cores = len(os.sched_getaffinity(0))
workers = args.workers or cores
threads = max(1, cores // workers) if args.threads < 0 else args.threads

manifest = json.loads((Path(args.repository) / "manifest.json").read_text())
options = ort.SessionOptions()
options.intra_op_num_threads = threads  # 0: ORT's default (one per physical core)
session = ort.InferenceSession(str(Path(args.repository) / manifest["variants"][args.variant]["path"]), options)
mean = np.array(manifest["mean"], np.float32).reshape(1, 3, 1, 1)
std = np.array(manifest["std"], np.float32).reshape(1, 3, 1, 1)
classes = manifest["classes"]
app = FastAPI()


@app.post("/v1/classify")
async def classify(request: Request) -> JSONResponse:
    started = time.perf_counter()
    body = await request.json()
    images = [np.asarray(Image.open(io.BytesIO(base64.b64decode(i["b64"]))).convert("RGB")) for i in body["instances"]]
    x = ((np.stack(images).astype(np.float32) / 255.0).transpose(0, 3, 1, 2) - mean) / std
    logits = session.run(None, {manifest["input_name"]: x})[0]
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    predictions = [
        {"label": classes[c], "class_id": int(c), "confidence": float(probs[i, c]), "variant": args.variant}
        for i, c in enumerate(probs.argmax(1))
    ]
    ms = (time.perf_counter() - started) * 1e3
    headers = {"X-Server-Time-Ms": f"{ms:.3f}", "X-Precision": manifest["variants"][args.variant]["precision"]}
    return JSONResponse({"predictions": predictions, "budget_met": True}, headers=headers)


@app.get("/v1/models")
async def models() -> dict:
    return {"model": manifest["model_name"], "classes": classes}


@app.get("/v1/status")
async def status() -> dict:
    # RSS and CPU s (user + system, every thread) for the load tester's lines: this process, and
    # with several workers the whole server (uvicorn's parent and every worker), as the gateway reports
    me = psutil.Process()
    procs = [me]
    if workers > 1 and (parent := me.parent()) is not None:
        procs = [parent, *parent.children()]
    rss = cpu = 0.0
    for proc in procs:
        with proc.oneshot():
            rss += proc.memory_info().rss
            t = proc.cpu_times()
            cpu += t.user + t.system
    usage = {"rss_bytes": int(rss), "cpu_s": cpu, "processes": len(procs)}
    return {"backend": "baseline", "variants": [{"key": args.variant}], "process": usage, "gateway": usage}


if __name__ == "__main__":
    if workers == 1:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    else:
        os.environ[ARGS_ENV] = json.dumps(sys.argv[1:])
        print(f"baseline: {workers} uvicorn workers x {threads} ORT thread(s) on {cores} core(s)", flush=True)
        uvicorn.run(
            "baseline_server:app",
            app_dir=str(Path(__file__).parent),
            workers=workers,
            host=args.host,
            port=args.port,
            log_level="warning",
        )
