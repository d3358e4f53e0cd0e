#!/usr/bin/env bash
# The runs queued for the next GPU session, in order of what they decide (written 2026-12-07, not run yet), one
# device call of at most 10 minutes: each run is stopped at its share and writes its results as it goes.
#   usage (repo root, on the GPU machine, .whl carried): OUT=DIR bash experiments/next_gpu_session.sh
# 1. issue 27: DualSpeed's training steps on the LLaVA-1.5-7B and LLaVA-NeXT-7B shapes (targets 2.0x and 3.5x);
# 2. issue 27: baseline / NaivePrune / DualSpeed trained on the testbed, scored full-token and pruned;
# 3. issue 31: DyMU with virtual unmerging on the static cache, batch 1 and 16 (target TTFT <= 0.7x, call <= 1.0x).
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit
export PYTHONPATH=$PWD/src:$PWD:/tmp/site PYTHONUNBUFFERED=1
out=${OUT:?set OUT}
log=$out/runs.log
nvidia-smi -L > "$log"
run() {  # SECONDS NAME COMMAND...: one run, stopped after SECONDS, its output (progress bars left out) in runs.log
  echo "== $2: ${*:3}" >> "$log"
  timeout "$1" "${@:3}" 2>&1 | grep -v "it/s\]" >> "$log"
  echo "== $2: exit ${PIPESTATUS[0]}" >> "$log"
}
train="--dtype bfloat16 --device cuda --text-tokens 128 --answer-tokens 64 --lora 128 --gradient-checkpointing --steps 6 --warmup 2 --repeats 2"
run 150 bench-train-llava15 python3 -m slimvlm bench-train --model shape:llava-1.5-7b --batch-size 16 $train --json "$out/bench_train_llava15_7b_b16.json"
run 150 bench-train-next python3 -m slimvlm bench-train --model shape:llava-next-7b --batch-size 4 $train --json "$out/bench_train_next_7b_b4.json"
run 170 dualspeed-testbed python3 -m experiments.dualspeed.testbed --out "$out/dualspeed_testbed" --samples 150000 --max-runs 3 --device cuda
run 100 dymu-static python3 -m slimvlm bench-generate --model shape:llava-1.5-7b --dtype bfloat16 --device cuda --methods none,dymu:target=96 --batch-sizes 1,16 --paths static --new-tokens 128 --ideal --json "$out/generate_dymu_static.json"
