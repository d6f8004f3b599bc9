#!/usr/bin/env bash
# The gateway (default configuration) against the plain FastAPI + ONNX Runtime INT8 server
# (scripts/baseline_server.py), side by side with one load client, on this machine:
#   1. p50 latency at concurrency 1           (1-image requests)
#   2. closed-loop throughput at concurrency 64 (1-image requests)
#   3. images/s with 32-image requests at concurrency 8
#   4. goodput: highest Poisson rate with >= 99 % of requests within 50 ms (bisected)
#   5. a 60 s Poisson soak at 80 % of the gateway's goodput, budget 50 ms (RSS, errors, 5xx)
# Usage: scripts/bench_vs_baseline.sh [OUT_DIR]   (default runs/bench); needs data/cifar10.
# Both servers and the client share the CPU: quote the ratios, and the CPU the run names.
set -euo pipefail
OUT=${1:-runs/bench}
DUR=${DUR:-20}          # s per closed-loop measurement
REPO=${REPO:-model_repository}
GW=http://127.0.0.1:8011
BASE=http://127.0.0.1:8013
mkdir -p "$OUT"
aq-serve --repository "$REPO" --port 8011 > "$OUT/gateway.log" 2>&1 &
GW_PID=$!
python scripts/baseline_server.py --repository "$REPO" --port 8013 > "$OUT/baseline.log" 2>&1 &
BASE_PID=$!
trap 'kill $GW_PID $BASE_PID 2>/dev/null || true' EXIT
for url in $GW $BASE; do
  for _ in $(seq 1 120); do curl -sf "$url/v1/models" > /dev/null && break; sleep 0.5; done
done
# /v1/models answers once the first worker serves: wait for all of them (or uvicorn's line, one process)
for _ in $(seq 1 120); do grep -q "workers serving on\|Uvicorn running" "$OUT/gateway.log" && break; sleep 0.5; done
grep -m1 "latency profiles" "$OUT/gateway.log" || true
LT="aq-loadtest --url $GW --compare baseline=$BASE --no-plot --progress 0"
$LT --concurrency 1 --duration "$DUR" --warmup 3 --out "$OUT/c1.json"
$LT --concurrency 64 --duration "$DUR" --warmup 3 --out "$OUT/c64.json"
$LT --concurrency 8 --batch 32 --images 2048 --duration "$DUR" --warmup 3 --out "$OUT/b32c8.json"
$LT --goodput --goodput-budget 50 --goodput-share 0.99 --goodput-start 200 --out "$OUT/goodput.json"
RATE=$(python -c "import json; print(round(0.8 * json.load(open('$OUT/goodput.json'))['goodput']['gateway']['goodput_rps']))")
aq-loadtest --url "$GW" --mode poisson --rate "$RATE" --budget fixed:50 --duration 60 --warmup 10 \
  --progress 0 --out "$OUT/soak.json" --no-plot
lscpu | grep -m1 "Model name" | tee "$OUT/cpu.txt"
