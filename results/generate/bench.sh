# Sourced by the run_*_h200.sh scripts (repo root, on the GPU machine; OUT: where the JSON files go).
# bench SECONDS JSON SHAPE BATCH_SIZES PATH METHODS [more bench-generate options]: one bench-generate run, bf16,
# 128 new tokens, stopped after SECONDS (its JSON is saved row by row).
set -u
export PYTHONPATH=src PYTHONUNBUFFERED=1
out=${OUT:-results/generate}
# the card's short name (h100, h200), the JSON files' prefix where a script says ${gpu}
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | grep -o 'H[0-9]\+' | tr H h)
bench() {
  timeout "$1" python3 -m slimvlm.cli bench-generate --model "shape:$3" --dtype bfloat16 --device cuda \
    --new-tokens 128 --batch-sizes "$4" --paths "$5" --methods "$6" --json "$out/$2" "${@:7}" 2>&1 \
    | grep -v "it/s\]" | tail -12
}
