#!/usr/bin/env bash
# Create .venv and install finetune with its test extra. Idempotent: a second run only checks.
#   bash scripts/setup.sh          # train, evaluate, merge, push
#   bash scripts/setup.sh gguf     # also GGUF export: builds llama.cpp (4-6 minutes on 2 cores the first time;
#                                  # pip caches the wheel) and installs its converter; the tests need it
#   bash scripts/setup.sh vllm     # also .venv-vllm, the serving environment of `finetune serve` (scripts/setup_vllm.sh)
# torch/torchvision are pinned to a pair that imports together on CPU-only machines (the Qwen-VL and SmolVLM
# processors need torchvision); set FINETUNE_TORCH="" to keep whatever torch your platform resolves instead.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH=${FINETUNE_TORCH-"torch==2.14.1 torchvision==0.29.1"}
EXTRAS=dev
VLLM=
for arg in "$@"; do
  case $arg in
    gguf) EXTRAS=dev,gguf ;;
    vllm) VLLM=1 ;;
    *) echo "setup: unknown option '$arg' (known: gguf, vllm)" >&2; exit 2 ;;
  esac
done
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
if [ "$EXTRAS" != dev ] && ! .venv/bin/python -c "import llama_cpp" 2>/dev/null; then
  echo "setup: building llama.cpp for the gguf extra (4-6 minutes on 2 cores, once: pip caches the wheel)"
  # Portable CPU code (a cached wheel may run on another CPU), on every core.
  export CMAKE_ARGS=${CMAKE_ARGS:-"-DGGML_NATIVE=OFF"} CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
fi
install -e ".[$EXTRAS]"
rm -f "$log"
if [ "$EXTRAS" != dev ] && ! .venv/bin/python -c "from finetune.export.llama_cpp import converter; converter()" \
    2>/dev/null; then
  .venv/bin/finetune export-gguf --setup >/dev/null
fi
.venv/bin/python -c "import finetune, torch, torchvision, transformers, trl, peft, bitsandbytes; print(f'setup: finetune {finetune.__version__}, torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}, peft {peft.__version__}, bitsandbytes {bitsandbytes.__version__}')"
if [ -n "$VLLM" ]; then bash scripts/setup_vllm.sh; fi
