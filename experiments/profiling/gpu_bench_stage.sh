#!/usr/bin/env bash
# GPU measurements for issues 4 (DyMU: DToMe overhead, VTU cost per layer) and 5 (MustDrop's
# output-aware cache), in one go: 4 processes, about 2-2.5 minutes on one H100.
#
#   PYTHONPATH=src bash experiments/profiling/gpu_bench_stage.sh OUTDIR
#
# Writes into OUTDIR (each JSON holds the command that made it, the device and the numbers):
#   vision_dtome.json          vision tower + projector alone: none / tome:r=16 / dymu-mid (calibrated here), batch 1 and 32
#   thresholds/*.json          the dymu-mid thresholds calibrated in this run (random weights need their own)
#   layer_vtu.json             one LLM decoder layer: full 576+64 / merged (tome:r=16 -> 208)+64 / merged + VTU, batch 1 and 16
#   mustdrop_b16_decode128.json  slimvlm bench, batch 16, 128 new tokens: none, mustdrop-llava7b-64, mustdrop-llava7b-64 without the cache
#   mustdrop_b1_decode32.json    the same at batch 1, 32 new tokens
#   wall_times.txt             milliseconds each step took
#
# Smoke run on a CPU with a tiny model (e.g. from `slimvlm make-tiny models/tiny`):
#   MODEL=models/tiny DEVICE=cpu DTYPE=float32 PYTHONPATH=src bash experiments/profiling/gpu_bench_stage.sh /tmp/smoke
set -euo pipefail

OUT=${1:?usage: bash experiments/profiling/gpu_bench_stage.sh OUTDIR}
MODEL=${MODEL:-shape:llava-1.5-7b}
DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-bfloat16}
PYTHON=${PYTHON:-python}
# repeats: timing medians after warm-up; the decode runs are the expensive part (128 steps each)
REPEATS=${REPEATS:-10}
DECODE_REPEATS=${DECODE_REPEATS:-2}
B16_NEW_TOKENS=${B16_NEW_TOKENS:-128}
B1_NEW_TOKENS=${B1_NEW_TOKENS:-32}
mkdir -p "$OUT"
COMMON=(--model "$MODEL" --device "$DEVICE" --dtype "$DTYPE")
: > "$OUT/wall_times.txt"

step() {  # step NAME COMMAND...: run it, record its wall time
    local name=$1 start end
    shift
    echo "== $name: $*"
    start=$(date +%s%N)
    "$@"
    end=$(date +%s%N)
    echo "$name $(( (end - start) / 1000000 )) ms" | tee -a "$OUT/wall_times.txt"
}

total_start=$(date +%s%N)

# 1. DToMe overhead on the vision tower alone (CLIP ViT-L/336 + projector), tokens out per image
step vision $PYTHON -m slimvlm.cli bench-vision "${COMMON[@]}" \
    --methods none,tome:r=16,dymu-mid:vtu=false --batch-sizes 1,32 --calibration-images 32 \
    --warmup 3 --repeats "$REPEATS" --json "$OUT/vision_dtome.json"

# 2. VTU cost per LLM layer (layer 2 of 32; every layer has the same shape)
step layer $PYTHON -m slimvlm.cli bench-layer "${COMMON[@]}" \
    --merge tome:r=16 --layer 2 --batch-sizes 1,16 --text-tokens 64 \
    --warmup 3 --repeats "$REPEATS" --json "$OUT/layer_vtu.json"

# 3. MustDrop's output-aware cache: long generation at batch 16, then batch 1
step mustdrop_b16 $PYTHON -m slimvlm.cli bench "${COMMON[@]}" --batch-size 16 \
    --methods none,mustdrop-llava7b-64,mustdrop-llava7b-64,output_cache=false --new-tokens "$B16_NEW_TOKENS" \
    --warmup 1 --repeats "$DECODE_REPEATS" --json "$OUT/mustdrop_b16_decode${B16_NEW_TOKENS}.json"

step mustdrop_b1 $PYTHON -m slimvlm.cli bench "${COMMON[@]}" --batch-size 1 \
    --methods none,mustdrop-llava7b-64,mustdrop-llava7b-64,output_cache=false --new-tokens "$B1_NEW_TOKENS" \
    --warmup 1 --repeats "$DECODE_REPEATS" --json "$OUT/mustdrop_b1_decode${B1_NEW_TOKENS}.json"

echo "total $(( ($(date +%s%N) - total_start) / 1000000 )) ms" | tee -a "$OUT/wall_times.txt"
