#!/usr/bin/env bash
# GPU checks for a session that has a GPU: each section bounded by `timeout`, figures as JSON
# under "$OUT" (default ./out/gpu). Run from the repository root:  bash bench/gpu/run.sh
# Sections append below; keep each one at most ~2 minutes.
set -u
OUT="${OUT:-out/gpu}"
mkdir -p "$OUT"
PY="${PYTHON:-.venv/bin/python}"
export PYTHONPATH="operator:trainer${PYTHONPATH:+:$PYTHONPATH}"
status=0

section() {  # section NAME SECONDS CMD...: run CMD bounded, record its exit status in $OUT/NAME.rc
  local name=$1 limit=$2
  shift 2
  echo "== $name (at most ${limit}s)"
  timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "$rc" >"$OUT/$name.rc"
  [ "$rc" -eq 0 ] || { echo "   $name failed (exit $rc), see $OUT/$name.log"; status=1; }
}

# -- par3d (#14): MoE vs dense step time on one GPU, same active parameters --------------------
section moe_vs_dense 110 "$PY" bench/gpu/moe_vs_dense.py --out "$OUT/moe_vs_dense.json" --steps 20

# -- state (#13): sharded async checkpoints and MFU ------------------------------------------------
# time blocked per save of a ~1B model (goal < 100 ms), step time with a save in flight (goal ≤ 2% slower)
section checkpoint_1b 110 "$PY" bench/gpu/checkpoint_gpu.py --json "$OUT/checkpoint_1b.json"
# MFU of the 350M and 1B presets against transformers.Trainer in the same run (goals ≥ 50% / ≥ 55%, ≥ 1.5×)
section mfu_350m 105 "$PY" bench/train_throughput.py --preset h100-350m --steps 6 --warmup 2 --rounds 1 \
  --json "$OUT/mfu_350m.json"
section mfu_1b 105 "$PY" bench/train_throughput.py --preset h100-1b --steps 6 --warmup 2 --rounds 1 \
  --json "$OUT/mfu_1b.json"

# -- goodput (#11): our Llama against transformers' on CUDA: bit-equal losses and weights, step time
section llama_native 45 "$PY" bench/llama_native.py --device cuda --repeats 1 --steps 10 --hidden 1024 \
  --layers 8 --seq 1024 --batch 4 --json "$OUT/llama_native.json"

exit $status
