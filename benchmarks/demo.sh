#!/usr/bin/env bash
# The main job on the embedded miniature data: datasets -> backbones -> benchmarks -> leaderboard.
# Usage: bash benchmarks/demo.sh [OUT]   (the Makefile's `make demo` runs it inside .venv)
set -euo pipefail
OUT=${1:-demo}
DATA=$OUT/data
RESULTS=$OUT/results
CACHE=$OUT/cache
TRIALS=${TRIALS:-3}
start=$(date +%s)

echo "== miniature datasets (real layouts) -> $DATA"
bench data mini --root "$DATA"

echo "== random-init reference backbone"
bench backbone random --arch resnet50 --width 16 -o "$OUT/backbones/random-init.safetensors"

for benchmark in inat18 places205; do
  echo "== $benchmark: random-init, $TRIALS trials (cached features, budget tiny)"
  bench run "$benchmark" --backbone "$OUT/backbones/random-init.safetensors" --name random-init \
    --data-root "$DATA" --budget tiny --trials "$TRIALS" --out "$RESULTS" --cache-dir "$CACHE"
done

echo "== leaderboard"
bench report --results "$RESULTS"
echo "demo finished in $(( $(date +%s) - start )) s; results in $RESULTS"
