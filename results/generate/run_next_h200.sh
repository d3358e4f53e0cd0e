#!/usr/bin/env bash
# Queued for the next H200 call (not run yet: no device was lent in the sessions that wrote it). Issue 14, about
# 9 minutes: the GPU tests that replayed CUDA graphs equal eager runs (the batch-1 prefill segments included,
# both caches); MustDrop's and FastV's batch-1 TTFT on the static path (9f1a43c measured MustDrop at 1.28x the
# untouched) now that their prefill runs as CUDA-graph segments between drops and MustDrop's stage 1 joins the
# vision graph; batch 1 on generate()'s default (dynamic) cache, whose LLM prefill replays as segments too;
# MustDrop at batch 16 on the static path (cut by the last call's time limits).
#   usage (repo root, on the GPU machine): OUT=DIR bash results/generate/run_next_h200.sh
source "$(dirname "$0")/bench.sh"
timeout 240 python3 -m pytest -q -x -p no:warnings tests/test_cuda_graphs.py 2>&1 | tail -4
bench 90 h200_static_b1_mustdrop.json llava-1.5-7b 1 static mustdrop-llava7b-64,fastv
bench 110 h200_eager_b1_segments.json llava-1.5-7b 1 eager none,visionzip-64,fastv,mustdrop-llava7b-64
bench 80 h200_static_b16_mustdrop.json llava-1.5-7b 16 static mustdrop-llava7b-64
