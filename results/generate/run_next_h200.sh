#!/usr/bin/env bash
# Queued for the next H200 call (not run yet: this session's device time ran out, and loans were paused).
# Issue 14: MustDrop's and FastV's batch-1 TTFT on the static path (9f1a43c measured MustDrop at 1.28x the
# untouched) after their host reads were cut and their prefill runs as CUDA-graph segments between drops (MustDrop's
# stage 1 in the vision graph); first the GPU tests that replayed graphs equal eager runs (segments included);
# eager batch 1 `none` against the untouched model once more.
# Issue 16: end-to-end generate() on the 7B shapes of the new families, static path, batch 1 and 16.
#   usage (repo root, on the GPU machine): OUT=DIR bash results/generate/run_next_h200.sh
set -u
export PYTHONPATH=src PYTHONUNBUFFERED=1
out=${OUT:-results/generate}
bench() {  # seconds, json name, model shape, batch sizes, path, methods
  timeout "$1" python3 -m slimvlm.cli bench-generate --model "shape:$3" --dtype bfloat16 --device cuda \
    --new-tokens 128 --batch-sizes "$4" --paths "$5" --methods "$6" --json "$out/$2" 2>&1 | grep -v "it/s\]" | tail -12
}
timeout 150 python3 -m pytest -q -x -p no:warnings tests/test_cuda_graphs.py 2>&1 | tail -4
bench 90 h200_static_b1_mustdrop.json llava-1.5-7b 1 static mustdrop-64,fastv
bench 50 h200_eager_b1_none.json llava-1.5-7b 1 eager none
bench 150 h200_next_static_b1.json llava-next-7b 1 static none,visionzip-64,divprune:budget=320,fastv
bench 150 h200_qwen25_static_b1.json qwen2.5-vl-7b 1 static none,visionzip-64,divprune:budget=64,fastv
bench 120 h200_onevision_static_b1.json llava-onevision-7b 1 static none,divprune:budget=640,fastv
