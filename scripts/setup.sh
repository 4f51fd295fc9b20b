#!/usr/bin/env bash
# Create .venv and install finetune with its test extra. Idempotent: a second run only checks.
# torch/torchvision are pinned to a pair that imports together on CPU-only machines (the Qwen-VL and SmolVLM
# processors need torchvision); set FINETUNE_TORCH="" to keep whatever torch your platform resolves instead.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH=${FINETUNE_TORCH-"torch==2.14.1 torchvision==0.29.1"}
[ -x .venv/bin/python ] || python3 -m venv .venv
log=$(mktemp)
install() {
  if ! .venv/bin/pip install -q --disable-pip-version-check "$@" >"$log" 2>&1; then
    grep -v "^WARNING: Location" "$log" >&2
    echo "setup: pip install $* failed" >&2
    exit 1
  fi
}
# shellcheck disable=SC2086
[ -z "$TORCH" ] || install $TORCH
install -e ".[dev]"
rm -f "$log"
.venv/bin/python -c "import finetune, torch, torchvision, transformers, trl, peft, bitsandbytes; print(f'setup: finetune {finetune.__version__}, torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}, peft {peft.__version__}, bitsandbytes {bitsandbytes.__version__}')"
