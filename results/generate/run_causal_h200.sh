#!/usr/bin/env bash
# Run once at a9bd06f (381 s; results/generate/README.md "The static prefill with is_causal and no mask").
# After the static prefill moved each row's real tokens first and attends with is_causal and no mask, and
# MustDrop's cut layers share one cache view: the GPU tests, a profile of the eager batch-1 decode step of
# FastV and MustDrop beside the untouched model, their eager batch-1 rows in one run, and LLaVA-OneVision-7B's
# static batch-1 rows (its `none` TTFT was 1.26x with the masked prefill).
#   usage (repo root, on the GPU machine): OUT=DIR bash results/generate/run_causal_h200.sh
source "$(dirname "$0")/bench.sh"
timeout 150 python3 -m pytest -q -p no:warnings -o addopts="" tests/test_cuda_graphs.py 2>&1 | tail -4
timeout 110 python3 scripts/profile_generate.py --device cuda --methods fastv,mustdrop-llava7b-64 --steps 8 --out "$out/profile" \
  2>&1 | grep -v "it/s\]" | tail -5
bench 130 h200_eager_b1_rerun.json llava-1.5-7b 1 eager none,fastv,mustdrop-llava7b-64
bench 175 h200_onevision_static_b1_causal.json llava-onevision-7b 1 static none,divprune:budget=640,fastv
