#!/usr/bin/env bash
# Did a change cost speed? This tree's gateway against the gateway of an earlier commit, with the
# plain server (scripts/baseline_server.py, uvicorn workers = cores) as the common reference: three
# servers up at once, driven in turn by one load client with the same schedule, two rounds with the
# two gateways' order swapped, then one goodput search over all three.
#   scripts/bench_before_after.sh REF [OUT_DIR]      e.g. scripts/bench_before_after.sh fdfa014 runs/ab
# Both gateways plan with the manifest's latency profiles (profiling.mode=never): start-up profiles
# of a shared host differ from one start to the next, and would change the follow-up decisions
# (the work per request) rather than measure the code. Needs data/cifar10 and .venv; ~12 min.
set -euo pipefail
REF=${1:?usage: scripts/bench_before_after.sh REF [OUT_DIR]}
OUT=$(realpath -m "${2:-runs/before_after}")
DUR=${DUR:-15}          # s per closed-loop measurement
ROOT=$(git rev-parse --show-toplevel)
REPO="$ROOT/model_repository"  # both gateways serve this tree's repository: the code is what differs
BEFORE=$(mktemp -d)/before
mkdir -p "$OUT"
git -C "$ROOT" worktree add --detach "$BEFORE" "$REF" > /dev/null
export PATH="$ROOT/.venv/bin:$PATH" AQ_PROFILING__MODE=never
cleanup() {
  pkill -f "aq-serve --repository $REPO --port 802[12]" 2>/dev/null || true
  pkill -f "baseline_server.py --repository $REPO --port 8023" 2>/dev/null || true
  git -C "$ROOT" worktree remove --force "$BEFORE" 2>/dev/null || true
}
trap cleanup EXIT
cd "$ROOT"
PYTHONPATH="$ROOT/src" aq-serve --repository "$REPO" --port 8021 > "$OUT/after.log" 2>&1 &
(cd "$BEFORE" && PYTHONPATH="$BEFORE/src" aq-serve --repository "$REPO" --port 8022 > "$OUT/before.log" 2>&1) &
PYTHONPATH="$ROOT/src" python scripts/baseline_server.py --repository "$REPO" --port 8023 > "$OUT/baseline.log" 2>&1 &
A=http://127.0.0.1:8021 B=http://127.0.0.1:8022 C=http://127.0.0.1:8023
for url in $A $B $C; do
  for _ in $(seq 1 240); do curl -sf "$url/v1/models" > /dev/null && break; sleep 0.5; done
done
sleep 10  # every worker of both gateways up
for r in 1 2; do
  if [ "$r" = 1 ]; then LT="aq-loadtest --url $A --name after --compare before=$B --compare baseline=$C"
  else LT="aq-loadtest --url $B --name before --compare after=$A --compare baseline=$C"; fi
  LT="$LT --no-plot --progress 0 --duration $DUR --warmup 3"
  $LT --concurrency 1 --out "$OUT/c1_$r.json"
  $LT --concurrency 64 --out "$OUT/c64_$r.json"
  $LT --concurrency 8 --batch 32 --images 2048 --out "$OUT/b32c8_$r.json"
done
aq-loadtest --url $A --name after --compare before=$B --compare baseline=$C --no-plot --progress 0 \
  --goodput --goodput-budget 50 --goodput-share 0.99 --goodput-start 200 --out "$OUT/goodput.json"
lscpu | grep -m1 "Model name" | tee "$OUT/cpu.txt"
