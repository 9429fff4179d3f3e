#!/usr/bin/env bash
# The speed table for GPU users, in under 8 minutes on one GPU: prefill and decode of lm-infinite vs dense attention
# (SDPA; FlashAttention-2 when flash_attn is installed) at 32k, 64k and 128k tokens on a Llama-7B-shaped model
# (random weights, built in code) in bfloat16, with peak memory. Records: results/gpu_speed.jsonl (the schema of
# `lengthwise bench`), table: results/gpu_speed.md. See benchmarks/gpu_speed.py for every option.
#
#   bash benchmarks/gpu.sh                 # one GPU (cuda:0)
#   bash benchmarks/gpu.sh --smoke         # any machine, on the CPU: a tiny shape, a few seconds (the test runs this)
#   bash benchmarks/gpu.sh --lengths 32768,65536 --out /tmp/g.jsonl
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
for arg in "$@"; do
  if [ "$arg" = "--smoke" ]; then
    exec "$PY" benchmarks/gpu_speed.py "$@"
  fi
done
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "error: torch sees no CUDA device here; run on a GPU machine, or 'bash benchmarks/gpu.sh --smoke' on a CPU" >&2
  exit 2
fi
# the script stops starting cells after --budget-s (420 s); the hard limit keeps the whole run under 8 minutes
exec timeout --signal=INT 470 "$PY" benchmarks/gpu_speed.py "$@"
