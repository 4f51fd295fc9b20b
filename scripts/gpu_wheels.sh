#!/usr/bin/env bash
# Download, on a machine with PyPI access, the wheels that the borrowed GPU machine lacks, for
# scripts/gpu_check.sh to install there without a network (--no-index --no-deps --target).
#
#   bash scripts/gpu_wheels.sh                          # CPython 3.12 manylinux x86_64 -> .gpu-wheels/
#   bash scripts/gpu_wheels.sh --python 3.11 --dest /tmp/wheels311   # another interpreter (a local simulation)
#
# The GPU machine has torch 2.11 (CUDA 13), transformers 5.17, peft, accelerate, huggingface_hub, tokenizers,
# pyarrow, pandas, xxhash, pyyaml, pillow, pytest (shared/reference/gpu-machine.md). finetune also needs trl,
# bitsandbytes and datasets; datasets needs dill and multiprocess; SmolVLM's processor needs num2words; the
# benchmark measures Liger's kernels (liger-kernel: pure Python, its Triton comes with the CUDA torch there).
# transformers does not travel: finetune runs on 5.17 (its tests pass there), and leaving it behind also keeps
# the machine's own tokenizers/huggingface_hub pairing intact.
#
# Everything must travel together with the working tree in 64 MiB; the script prints the sizes and fails above
# LIMIT_MIB (62: a little room for what a run adds to the tree).
set -euo pipefail
cd "$(dirname "$0")/.."

PY_VERSION=3.12
DEST=.gpu-wheels
LIMIT_MIB=${LIMIT_MIB:-62}
# Pinned to the versions finetune is developed and tested with (scripts/setup.sh resolves the same ones; liger-kernel:
# the release whose model table finetune.training.kernels was checked against).
WHEELS=(trl==1.16.0 bitsandbytes==0.50.2 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 num2words==0.5.14
        liger-kernel==0.8.5)

while [ $# -gt 0 ]; do
  case "$1" in
    --python) PY_VERSION=$2; shift 2 ;;
    --dest) DEST=$2; shift 2 ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "gpu_wheels: unknown argument $1" >&2; exit 2 ;;
  esac
done

PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
tag=${PY_VERSION/./}
mkdir -p "$DEST"
rm -f "$DEST"/*.whl  # exactly this set: a stale wheel would be installed on the GPU machine too
# Several manylinux tags: pip takes the newest each package publishes (bitsandbytes 2_24, multiprocess none-any).
"$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
  --python-version "$PY_VERSION" --implementation cp --abi "cp$tag" --abi abi3 --abi none \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any \
  --dest "$DEST" "${WHEELS[@]}"

count=$(ls "$DEST"/*.whl | wc -l)
if [ "$count" -ne "${#WHEELS[@]}" ]; then
  echo "gpu_wheels: expected ${#WHEELS[@]} wheels in $DEST, found $count" >&2
  exit 1
fi

# What travels: tracked files and untracked files git does not ignore, plus the wheel folder (carried).
"$PY" - "$DEST" "$LIMIT_MIB" <<'EOF'
import os, subprocess, sys
from pathlib import Path

dest, limit = Path(sys.argv[1]), float(sys.argv[2])
mib = 2 ** 20
files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                       capture_output=True, check=True).stdout.decode().split("\0")
files = [f for f in files if f and os.path.isfile(f)]
tree = sum(os.path.getsize(f) for f in files)
data = sum(os.path.getsize(f) for f in files if f.startswith("data/"))
wheels = sorted(dest.glob("*.whl"))
for w in wheels:
    print(f"  {w.stat().st_size / mib:7.2f} MiB  {w.name}")
total_wheels = sum(w.stat().st_size for w in wheels)
total = tree + total_wheels
# However it is counted: as bytes, or in 4 KiB disk blocks (the 1,200 small PNGs of data/ then weigh ~5 MiB).
blocks = sum(-(-os.path.getsize(f) // 4096) * 4096 for f in files + [str(w) for w in wheels])
print(f"wheels {total_wheels / mib:.1f} MiB + working tree {tree / mib:.1f} MiB (data/ {data / mib:.1f} MiB, "
      f"{len(files)} files) = {total / mib:.1f} MiB; in 4 KiB disk blocks {blocks / mib:.1f} MiB "
      f"(limit {limit:g} MiB of the 64 MiB that travel)")
total = max(total, blocks)
if total / mib > limit:
    sys.exit(f"gpu_wheels: {total / mib:.1f} MiB is over {limit:g} MiB: it would not travel")
EOF
