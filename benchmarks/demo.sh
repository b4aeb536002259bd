#!/usr/bin/env bash
# The main job on the embedded miniature data: datasets -> backbones (random init, MSCN pretrained here) ->
# linear probes, C4 detection, ADE20K segmentation -> leaderboard, printed and as a page (OUT/report/index.html).
# Every row is non-protocol (tiny budgets on 96 px synthetic images); the published rows beside them are the
# reference numbers.
# Usage: bash benchmarks/demo.sh [OUT]   (the Makefile's `make demo` runs it inside .venv)
set -euo pipefail
OUT=${1:-demo}
DATA=$OUT/data
RESULTS=$OUT/results
CACHE=$OUT/cache
TRIALS=${TRIALS:-3}
start=$(date +%s)
stamp() { echo "   [$(( $(date +%s) - start )) s]"; }

echo "== miniature datasets (real layouts) -> $DATA"
bench data mini --root "$DATA"

echo "== random-init reference backbone"
bench backbone random --arch resnet50 --width 16 -o "$OUT/backbones/random-init.safetensors"

echo "== MSCN (SimCLR) pretraining, config mscn-cpu-tiny, on the miniature images"
python pretrain/run.py mscn --output-dir "$OUT/pretrain/mscn"
cp "$OUT/pretrain/mscn/backbone.safetensors" "$OUT/backbones/mscn-simclr.safetensors"
stamp

for backbone in random-init mscn-simclr; do
  for benchmark in inat18 places205; do
    echo "== $benchmark: $backbone, $TRIALS trials (cached features, budget tiny)"
    bench run "$benchmark" --backbone "$OUT/backbones/$backbone.safetensors" --name "$backbone" \
      --data-root "$DATA" --budget tiny --trials "$TRIALS" --out "$RESULTS" --cache-dir "$CACHE"
  done
done
stamp

for benchmark in voc07+12 coco-c4-1x; do
  for backbone in random-init mscn-simclr; do
    echo "== $benchmark: $backbone, 1 trial (C4 detection, torchvision engine, budget tiny)"
    bench run "$benchmark" --backbone "$OUT/backbones/$backbone.safetensors" --name "$backbone" \
      --data-root "$DATA" --budget tiny --trials 1 --workers 0 --out "$RESULTS"
  done
done
stamp

echo "== ade20k: random-init, UperNet (mmseg), budget tiny"
bench run ade20k --backbone "$OUT/backbones/random-init.safetensors" --name random-init \
  --data-root "$DATA" --budget tiny --out "$RESULTS"
stamp

echo "== leaderboard"
bench report --results "$RESULTS"
page=$(bench report --results "$RESULTS" --format html -o "$OUT/report")
echo "demo finished in $(( $(date +%s) - start )) s; results in $RESULTS"
echo "leaderboard page (open it in a browser): $(cd "$(dirname "$page")" && pwd)/$(basename "$page")"
