#!/usr/bin/env bash
# The runs queued for the next GPU session, in order of what they decide (rewritten 2026-12-08, the session without a
# GPU): four device calls of at most 10 minutes each, the principal gaps first; each run is stopped at its share and
# writes as it goes.
#   usage (repo root, on the GPU machine, .whl carried): OUT=DIR bash experiments/next_gpu_session.sh 1   (then 2, 3, 4)
# Call 1 (issue 26): LLaVA-Mini's second stage from the shipped weights, given the whole call (run 3 reached C = 1
#   89.8%, C = 16 94.2% in generate() after 380 s, but its modules sat three folders deep and the device returns two:
#   they are copied flat here).
# Call 2 (issue 27): baseline / NaivePrune / DualSpeed trained on the testbed with compiled LM layers, scored
#   full-token and pruned, then the p x r sweep as far as the call allows.
# Call 3 (issue 27): DualSpeed's steps where the host was the floor: LLaVA-NeXT-7B at batch 4 with compiled layer
#   parts (batch 4 eager: 2.46x), at batch 16 eager and compiled, and LLaVA-1.5-7B at batch 16 compiled (eager 2.26x).
# Call 4 (issue 31): DyMU with virtual unmerging on the static cache (target at batch 1: TTFT <= 0.7x, call <= 1.0x),
#   and the eager batch-16 decode of `none` and DivPrune (1.42x and 1.24x the untouched call) under the profiler.
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
train="--dtype bfloat16 --device cuda --text-tokens 128 --answer-tokens 64 --lora 128 --gradient-checkpointing --steps 5 --warmup 1 --repeats 3"
case "${1:?say which call: 1, 2, 3 or 4}" in
1)
  run 520 llava-mini-stage2 python3 -m experiments.llava_mini.train --out "$out/mini" --students c1+c16 --continue-shipped \
    --lr 1e-4 --llm-lr 2e-5 --warmup 50 --samples 2000000 --max-train-seconds 410 --eval-every 100000 --device cuda
  for budget in c1 c16; do  # the device returns files at most two folders deep
    cp "$out/mini/c1-c16/$budget/llava_mini.safetensors" "$out/mini/${budget}_llava_mini.safetensors"
    cp "$out/mini/c1-c16/$budget/llava_mini.json" "$out/mini/${budget}_llava_mini.json"
    rm -r "$out/mini/c1-c16/$budget"
  done
  ;;
2)
  # compiled, every run alike (eager at p = 0.9 NaivePrune itself reached only 1.92x here); eagerly in what is left of the
  # call if the compiled runs finish none (torch.compile has not run on this machine's GPUs yet)
  run 570 dualspeed-testbed python3 -m experiments.dualspeed.testbed --out "$out/dualspeed_testbed" --samples 150000 --device cuda --compile
  [ -s "$out/dualspeed_testbed/results.json" ] || run $((585 - SECONDS)) dualspeed-testbed-eager python3 -m experiments.dualspeed.testbed \
    --out "$out/dualspeed_testbed" --samples 150000 --device cuda
  ;;
3)
  run 120 next-b4-compiled python3 -m slimvlm bench-train --model shape:llava-next-7b --batch-size 4 --compile $train --json "$out/bench_train_next_7b_b4_compiled.json"
  run 170 next-b16 python3 -m slimvlm bench-train --model shape:llava-next-7b --batch-size 16 ${train/--repeats 3/--repeats 2} --json "$out/bench_train_next_7b_b16.json"
  run 190 next-b16-compiled python3 -m slimvlm bench-train --model shape:llava-next-7b --batch-size 16 --compile ${train/--repeats 3/--repeats 2} --json "$out/bench_train_next_7b_b16_compiled.json"
  run 100 llava15-b16-compiled python3 -m slimvlm bench-train --model shape:llava-1.5-7b --batch-size 16 --compile $train --json "$out/bench_train_llava15_7b_b16_compiled.json"
  ;;
4)
  run 300 dymu-static python3 -m slimvlm bench-generate --model shape:llava-1.5-7b --dtype bfloat16 --device cuda \
    --methods none,dymu:target=96 --batch-sizes 1,16 --paths static --new-tokens 128 --ideal --json "$out/generate_dymu_static.json"
  run 250 eager-b16-profile python3 -m experiments.profiling.profile_generate --device cuda --batch-size 16 \
    --methods none,divprune:budget=64,visionzip-64 --steps 16 --out "$out/profile_b16"
  ;;
esac
