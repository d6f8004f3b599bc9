#!/usr/bin/env bash
# The Open Inference Protocol front (POST /v2/models/{model}/infer, binary FP32 tensors) against
# /v1/classify (PNG instances) on ONE gateway, one load client, the same images, in alternating
# rounds (a noisy shared host then weighs on both alike; quote the medians):
#   per round and front: closed loop at concurrency 64 (1 image), 8 (32 images) and 1 (1 image)
# Usage: scripts/bench_v1_vs_v2.sh [OUT_DIR] (default runs/bench_v2); ROUNDS=3 DUR=10; needs data/cifar10.
set -euo pipefail
OUT=${1:-runs/bench_v2}
ROUNDS=${ROUNDS:-3}
DUR=${DUR:-10}          # s per measurement
REPO=${REPO:-model_repository}
GW=http://127.0.0.1:8011
mkdir -p "$OUT"
aq-serve --repository "$REPO" --port 8011 > "$OUT/gateway.log" 2>&1 &
GW_PID=$!
trap 'kill $GW_PID 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do curl -sf "$GW/readyz" > /dev/null && break; sleep 0.5; done
LT="aq-loadtest --no-plot --progress 0 --log-level WARNING --warmup 1"
for r in $(seq 1 "$ROUNDS"); do
  for front in v1 v2; do
    url=$GW; [ "$front" = v2 ] && url=v2+$GW
    echo "round $r, $front"
    $LT --url "$url" --concurrency 64 --duration "$DUR" --out "$OUT/r${r}_${front}_c64.json" | grep adaptive
    $LT --url "$url" --concurrency 8 --batch 32 --duration "$DUR" --out "$OUT/r${r}_${front}_b32.json" | grep adaptive
    $LT --url "$url" --concurrency 1 --duration "$DUR" --out "$OUT/r${r}_${front}_c1.json" | grep adaptive
  done
done
