"""The baseline every gateway performance claim is a ratio against: the plain server a user who
wants none of adaptive-quant would write. FastAPI, one ONNX Runtime INT8 session with its
default threads, one call per request, no routing, no batching, no limits.

  python scripts/baseline_server.py --repository model_repository --port 8013

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
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from PIL import Image

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--repository", default="model_repository", help="model repository (default: %(default)s)")
p.add_argument("--variant", default="int8", help="manifest variant key to serve (default: %(default)s)")
p.add_argument("--host", default="127.0.0.1")
p.add_argument("--port", type=int, default=8013)
args = p.parse_args()

manifest = json.loads((Path(args.repository) / "manifest.json").read_text())
session = ort.InferenceSession(str(Path(args.repository) / manifest["variants"][args.variant]["path"]))
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
    with open(f"/proc/{os.getpid()}/statm") as f:  # resident pages → bytes, for the load tester's RSS line
        rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    cpu = os.times()  # user + system s of every thread: the load tester's CPU-per-request line
    process = {"rss_bytes": rss, "cpu_s": cpu.user + cpu.system}
    return {"backend": "baseline", "variants": [{"key": args.variant}], "process": process}


if __name__ == "__main__":
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
