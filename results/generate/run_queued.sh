#!/usr/bin/env bash
# Queued for the next GPU session (written 2026-12-05, not run yet), about 9 minutes:
# 1. eager batch 1 on LLaVA-1.5-7B: FastV and MustDrop's decode steps since the decode takes generate()'s all-ones
#    mask as none (transformers 5.17 passes it every step); h200_eager_b1_rerun.json is the run before;
# 2. Qwen2.5-VL-7B 16-frame videos: VisionZip-64 since a video's frames are scored together (static, as
#    h100_qwen25_video16_static_b1.json), and the eager path (generate()'s default) for the video methods.
#   usage (repo root, on the GPU machine): OUT=DIR bash results/generate/run_queued.sh
source "$(dirname "$0")/bench.sh"
bench 150 ${gpu}_eager_b1_decode_mask.json llava-1.5-7b 1 eager none,fastv,mustdrop-llava7b-64
bench 150 ${gpu}_qwen25_video16_static_b1_visionzip.json qwen2.5-vl-7b 1 static none,visionzip-64 --video-frames 16
bench 220 ${gpu}_qwen25_video16_eager_b1.json qwen2.5-vl-7b 1 eager none,visionzip-64,divprune:budget=640,fastv --video-frames 16
