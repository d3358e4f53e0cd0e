#!/usr/bin/env bash
# One H200 call (issue 14): the GPU tests of CUDA graphs + compiled static decode (stage 3-4 methods
# included), then bench-generate on the LLaVA-1.5-7B shape: stage 3-4 methods on the static path at batch
# 1/16/64 (one process per batch size: torch.compile's recompile limit counts per process), and the eager
# path at batch 16. Each step has its own time limit; JSON is saved row by row.
#   usage (repo root, on the GPU machine): OUT=DIR bash results/generate/run_stage34_h200.sh
set -u
export PYTHONPATH=src PYTHONUNBUFFERED=1
out=${OUT:-results/generate}
bench() {  # seconds, json name, batch sizes, path, methods
  timeout "$1" python3 -m slimvlm.cli bench-generate --model shape:llava-1.5-7b --dtype bfloat16 --device cuda \
    --new-tokens 128 --batch-sizes "$3" --paths "$4" --methods "$5" --json "$out/$2" 2>&1 | grep -v "it/s\]" | tail -14
}
python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__, torch.cuda.get_device_name())"
timeout 150 python3 -m pytest -q -p no:warnings tests/test_cuda_graphs.py 2>&1 | tail -4
bench 130 h200_static_b1_stage34.json 1 static none,fastv,mustdrop-llava7b-64,visionzip-64
bench 100 h200_static_b16_stage34.json 16 static fastv,mustdrop-llava7b-64
bench 100 h200_static_b64_stage34.json 64 static fastv,mustdrop-llava7b-64
bench 90 h200_eager_b16.json 16 eager visionzip-64,divprune-64,fastv,mustdrop-llava7b-64
