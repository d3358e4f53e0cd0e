#!/usr/bin/env bash
# Testbed accuracy for DyMU (issue 4) and MustDrop (issue 5), on a CPU (~15 min on 2 cores).
#   bash results/testbed/run.sh      (from the repo root, with slimvlm installed)
set -euo pipefail
D=results/testbed
# (the paper's dymu-low target, 89, is out of reach in the testbed's 5 merging layers: 96 is the lowest)
for t in 96 195 394; do
  slimvlm calibrate --model testbed --method dymu --target $t --images testbed --num-images 256 --batch-size 32 --out $D/dymu_$t.json --check
done
# DyMU with and without VTU, beside ToMe at the same average tokens (ToMe merges in 5 encoder layers: 576 - 5r)
M=none
for t in 96 195 394; do M="$M,dymu:thresholds=$D/dymu_$t.json,vtu=false,dymu:thresholds=$D/dymu_$t.json"; done
M="$M,tome:r=96,tome:r=96+vtu,tome:r=76,tome:r=76+vtu,tome:r=36,tome:r=36+vtu"
slimvlm eval --model testbed --methods "$M" --samples 200 --json $D/dymu.json 2>/dev/null | tee $D/dymu.txt
# the same with visual tokens keeping their patches' positions (separates VTU from position renumbering)
slimvlm eval --model testbed --methods "$M" --samples 200 --keep-positions --json $D/dymu_keep_positions.json 2>/dev/null | tee $D/dymu_keep_positions.txt
# MustDrop presets, each part switched off (at mustdrop-llava7b-64), two settings that filter after LLM layers 0 and 1, and FastV near the same LLM tokens
M5="none,mustdrop-llava7b-192,mustdrop-llava7b-128,mustdrop-llava7b-64"
M5="$M5,mustdrop-llava7b-64,lsm=false,mustdrop-llava7b-64,important=false,mustdrop-llava7b-64,filter=false,mustdrop-llava7b-64,output_cache=false"
M5="$M5,mustdrop:layers=0;1,mustdrop:layers=0;1,global_thr=0.05,individual_thr=0.05"
M5="$M5,fastv:k=2,ratio=0.9,fastv:k=2,ratio=0.75,fastv:k=1,ratio=0.9"
slimvlm eval --model testbed --methods "$M5" --samples 200 --json $D/mustdrop.json 2>/dev/null | tee $D/mustdrop.txt
# the same MustDrop settings with visual tokens keeping their positions (LSM shortens the span)
slimvlm eval --model testbed --methods "none,mustdrop-llava7b-64,mustdrop-llava7b-64,lsm=false,mustdrop-llava7b-64,filter=false" --samples 200 --keep-positions --json $D/mustdrop_keep_positions.json 2>/dev/null | tee $D/mustdrop_keep_positions.txt
# MustDrop's middle preset beside the other methods at 128 tokens (the demo covers 64 and 192)
slimvlm eval --model testbed --methods "none,mustdrop-llava7b-128,tome:r=90,tome:r=90+vtu,fastv:k=2,ratio=0.7778,visionzip:dominant=108,contextual=20,divprune:budget=128" --samples 200 --json $D/budget128.json 2>/dev/null | tee $D/budget128.txt
