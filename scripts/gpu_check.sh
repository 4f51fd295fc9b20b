#!/usr/bin/env bash
# One prepared GPU check of finetune (GPU tests, cookbook-vs-finetune benchmark at Qwen2.5-VL-7B shape on ChartQA-sized
# rows with each speed lever on and off and a profile, the 7B QLoRA recipe's peak memory), bounded to 7 minutes on
# one H100 or H200 including installation. Details: scripts/gpu_check.py, scripts/bench_compare.py.
#
#   OUT=/path/to/results bash scripts/gpu_check.sh    # on the GPU machine; OUT defaults to ./gpu-check-out
#   bash scripts/gpu_check.sh --dry-run               # the same steps at tiny shapes on the CPU (CI runs this)
#
# Where trl, bitsandbytes or datasets are missing (the GPU machine) it installs .gpu-wheels/, which
# scripts/gpu_wheels.sh downloads beforehand on a machine with PyPI. Results: $OUT/gpu-results.json,
# $OUT/gpu-results.md and $OUT/gpu-check.log, rewritten after every step. Exit status 0 when every step passed.
set -uo pipefail  # no -e: one step's failure must not stop the next (the Python core runs them)
cd "$(dirname "$0")/.."

# The first interpreter that has torch: FINETUNE_PYTHON, the project's .venv, then the system's.
python=""
for candidate in "${FINETUNE_PYTHON:-}" .venv/bin/python python3 python; do
  if [ -n "$candidate" ] && command -v "$candidate" >/dev/null 2>&1 \
      && "$candidate" -c "import torch" >/dev/null 2>&1; then
    python=$candidate
    break
  fi
done
if [ -z "$python" ]; then
  echo "gpu_check: no Python with torch found (set FINETUNE_PYTHON)" >&2
  exit 1
fi
export OUT=${OUT:-$PWD/gpu-check-out}
exec "$python" scripts/gpu_check.py "$@"
