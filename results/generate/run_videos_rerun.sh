#!/usr/bin/env bash
# Issue 16, after run_videos.sh: its FastV rows ran past the runs' timeouts (a cold compile cache), and DivPrune's
# greedy loop went from nine dispatched ops per pick to three (640 picks: 5,760 -> 1,920 launches). Same shapes and
# settings as run_videos.sh; each run times the untouched model again beside the methods.
# Ran in two calls on one H200 (2026-12-05): the first three lines, whose NeXT and Qwen FastV rows again ran past
# 110 and 185 s, then the last two with the machine still warm; NeXT's file is the second call's.
#   usage (repo root, on the GPU machine): OUT=DIR bash results/generate/run_videos_rerun.sh
source "$(dirname "$0")/bench.sh"
bench 165 ${gpu}_onevision_video32_static_b1_rerun.json llava-onevision-7b 1 static divprune:budget=640,fastv --video-frames 32
bench 110 ${gpu}_next_video32_static_b1_fastv.json llava-next-video-7b 1 static fastv --video-frames 32
bench 185 ${gpu}_qwen25_video16_static_b1_rerun.json qwen2.5-vl-7b 1 static divprune:budget=640,fastv --video-frames 16
bench 200 ${gpu}_next_video32_static_b1_fastv.json llava-next-video-7b 1 static fastv --video-frames 32
bench 200 ${gpu}_qwen25_video16_static_b1_fastv.json qwen2.5-vl-7b 1 static fastv --video-frames 16
