#!/usr/bin/env bash
# Queued for a GPU call after run_families_h200.sh (not run yet: no device was lent in the session that wrote it).
# Issue 16: videos end to end on the 7B shapes, static path, batch 1: LLaVA-OneVision-7B with 32-frame videos
# (32 x 196 + 1 = 6273 tokens), LLaVA-NeXT-Video-7B with 32 frames (32 x 144 = 4608), Qwen2.5-VL-7B with 16-frame
# videos of 644 px (8 x 529 = 4232 tokens).
#   usage (repo root, on the GPU machine): OUT=DIR bash results/generate/run_videos_h200.sh
source "$(dirname "$0")/bench.sh"
bench 180 h200_onevision_video32_static_b1.json llava-onevision-7b 1 static none,divprune:budget=640,fastv --video-frames 32
bench 150 h200_next_video32_static_b1.json llava-next-video-7b 1 static none,divprune:budget=460,fastv --video-frames 32
bench 200 h200_qwen25_video16_static_b1.json qwen2.5-vl-7b 1 static none,visionzip-64,divprune:budget=640,fastv --video-frames 16
