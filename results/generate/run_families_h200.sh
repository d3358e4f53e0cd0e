#!/usr/bin/env bash
# Queued for a GPU call after run_next_h200.sh (not run yet: no device was lent in the sessions that wrote it).
# Issue 16, about 7 minutes: end-to-end generate() on the 7B shapes of the new families, static path, batch 1:
# LLaVA-NeXT-7B (672 x 672 images, 2928 tokens), Qwen2.5-VL-7B (644 x 644, 529 tokens, VisionZip on its merged
# tokens), LLaVA-OneVision-7B (1920 x 768, 8154 tokens).
#   usage (repo root, on the GPU machine): OUT=DIR bash results/generate/run_families_h200.sh
source "$(dirname "$0")/bench.sh"
bench 150 h200_next_static_b1.json llava-next-7b 1 static none,visionzip-64,divprune:budget=320,fastv
bench 150 h200_qwen25_static_b1.json qwen2.5-vl-7b 1 static none,visionzip-64,divprune:budget=64,fastv
bench 120 h200_onevision_static_b1.json llava-onevision-7b 1 static none,divprune:budget=640,fastv
