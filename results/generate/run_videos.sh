#!/usr/bin/env bash
# Issue 16: videos end to end on the 7B shapes, static path, batch 1: LLaVA-OneVision-7B with 32-frame videos
# (32 x 196 + 1 = 6273 tokens), LLaVA-NeXT-Video-7B with 32 frames (32 x 144 = 4608), Qwen2.5-VL-7B with 16-frame
# videos of 644 px (8 x 529 = 4232 tokens).
#   usage (repo root, on the GPU machine): OUT=DIR bash results/generate/run_videos.sh
# Ran on one H100 (2026-12-05, 547 s): every FastV row ran past its run's timeout; run_videos_rerun.sh has them.
source "$(dirname "$0")/bench.sh"
bench 180 ${gpu}_onevision_video32_static_b1.json llava-onevision-7b 1 static none,divprune:budget=640,fastv --video-frames 32
bench 150 ${gpu}_next_video32_static_b1.json llava-next-video-7b 1 static none,divprune:budget=460,fastv --video-frames 32
bench 200 ${gpu}_qwen25_video16_static_b1.json qwen2.5-vl-7b 1 static none,visionzip-64,divprune:budget=640,fastv --video-frames 16
