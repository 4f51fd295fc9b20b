"""The core of scripts/gpu_check.sh: one prepared GPU check of finetune, results written after every step.

    OUT=/path/to/results bash scripts/gpu_check.sh     # on the GPU machine (OUT defaults to ./gpu-check-out)
    bash scripts/gpu_check.sh --dry-run                # the same steps at tiny shapes on the CPU (CI runs this)

Steps, each in its own process with its own timeout, one's failure never stopping the next, all within one
overall budget (FINETUNE_GPU_CHECK_BUDGET seconds, default 420 on a GPU):
  install  the wheels of .gpu-wheels/ (scripts/gpu_wheels.sh) into a private folder with `pip install --no-index
           --no-deps --target` (or by unpacking them, where pip is missing), put on PYTHONPATH after the checkout
           and before the system's site-packages; skipped when the interpreter already has trl, bitsandbytes and
           datasets;
  env      versions, the card, a bitsandbytes NF4 round trip and a bf16 matmul rate on the device;
  tests    `pytest -m gpu tests/test_gpu.py`;
  bench    `scripts/bench_gpu.py --compare` at Qwen2.5-VL-7B shape on ChartQA-sized rows, LoRA and QLoRA: cookbook vs
           finetune's best, each lever on/off, a profile (scripts/bench_compare.py; it builds the random checkpoint,
           kept for the next step);
  recipe   `scripts/bench_gpu.py --recipe-memory recipes/qwen2_5-vl-7b-qlora.yaml` (scripts/bench_memory.py).
$OUT receives gpu-results.json, gpu-results.md and gpu-check.log, rewritten after every step so that a run cut
off still leaves what it measured. It and the gpu_*.py modules it imports load with the standard library alone
(tests/test_layout.py checks): they run before the wheels are in. gpu_steps.py runs the steps, gpu_install.py
installs, gpu_probe.py is the env step, gpu_report.py collects the results and renders gpu-results.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

from gpu_install import install, path_with
from gpu_probe import probe
from gpu_report import render_markdown
from gpu_steps import ROOT, Check, Step

RECIPE = "recipes/qwen2_5-vl-7b-qlora.yaml"
CHECKPOINT_GIB = 20  # the random Qwen2.5-VL-7B checkpoint is 16.6 GB in bf16


# --- the steps ----------------------------------------------------------------------------------------------------


def steps(python: str, work: Path, dry_run: bool, checkpoints: Path) -> list[Step]:
    bench = [python, "scripts/bench_gpu.py"]
    if dry_run:  # tiny shapes on the CPU; the recipe's 2048 tokens shrunk so the CPU does it in seconds
        compare = ["--preset", "tiny", "--samples", "24", "--max-pixels", str(112 * 112), "--pack-length", "512",
                   "--sweep-steps", "2"]
        recipe = ["--preset", "tiny", "--max-length", "1024"]
    else:  # 128 ChartQA rows of 351-1,311 tokens: cookbook 32 steps of 4 rows, finetune 37 packs of 2560 tokens
        compare = ["--checkpoint-dir", str(checkpoints), "--deadline-s", "270"]
        recipe = ["--checkpoint-dir", str(checkpoints)]
    # Timeouts bound a hang, the overall budget bounds the sum. Expected on an H100/H200: env 16 s, tests 35 s,
    # bench ~290 s (build and save 16.6 GB; per mode two full epochs of ~100k real tokens, a sweep of 4-6 levers at 6
    # steps, QLoRA's load), recipe 30 s. On 2 CPU cores: 6, 15, 20, 10 s. The bench writes its JSON after every
    # measurement: cut off, it still leaves what it measured.
    return [
        Step("env", "versions, device, bitsandbytes NF4 round trip, bf16 matmul rate",
             [python, "scripts/gpu_check.py", "--probe", str(work / "env.json")], 60, results=work / "env.json"),
        Step("tests", "pytest -m gpu tests/test_gpu.py",
             [python, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "tests/test_gpu.py",
              f"--junitxml={work / 'tests.xml'}"], 120 if dry_run else 90,
             env={"FINETUNE_GPU_RESULTS": str(work / "tests.json")}, results=work / "tests.xml"),
        Step("bench", "cookbook vs finetune at Qwen2.5-VL-7B shape on ChartQA rows, LoRA and QLoRA, levers, profile",
             [*bench, "--models", "qwen2_5_vl_7b", "--modes", "qlora", "lora", "--compare", *compare,
              "--json", str(work / "bench.json")], 120 if dry_run else 300, results=work / "bench.json"),
        Step("recipe", f"peak memory of {RECIPE} at its max_length",
             [*bench, "--recipe-memory", RECIPE, *recipe, "--json", str(work / "recipe.json")],
             120 if dry_run else 90, results=work / "recipe.json"),
    ]


def step_env(work: Path, site: Path, dry_run: bool) -> dict[str, str]:
    """Offline, quiet, caches in the work folder; the dry run hides any GPU."""
    cache = os.environ.get("FINETUNE_CACHE") or str(work / "cache")  # CI's pytest passes its zoo cache down
    env = {**os.environ, "PYTHONPATH": path_with(site, dict(os.environ)), "FINETUNE_CACHE": cache,
           "FINETUNE_TEST_CACHE": cache, "HF_HOME": str(work / "hf"), "HF_DATASETS_CACHE": str(work / "datasets"),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1",
           "MPLBACKEND": "Agg", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
           "PYTHONDONTWRITEBYTECODE": "1", "PYTHONWARNINGS": "ignore::FutureWarning,ignore::DeprecationWarning"}
    if dry_run:
        env.update(CUDA_VISIBLE_DEVICES="", FINETUNE_GPU_CHECK="cpu")
    return env


def checkpoint_dir(work: Path) -> Path:
    """Where the 16.6 GB random checkpoint goes: RAM-backed /dev/shm when it has room (no disk round trip)."""
    for base in (Path("/dev/shm"), work):
        try:
            if shutil.disk_usage(base).free >= CHECKPOINT_GIB * 2**30:
                return base / f"finetune-gpu-check-{os.getpid()}"
        except OSError:
            continue
    return work / "checkpoints"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU, no CUDA")
    p.add_argument("--wheels", default=str(ROOT / ".gpu-wheels"), help="folder of wheels to install if needed")
    p.add_argument("--probe", metavar="JSON", help=argparse.SUPPRESS)  # internal: the env step
    args = p.parse_args()
    if args.probe:
        return probe(Path(args.probe))

    out = Path(os.environ.get("OUT") or ROOT / "gpu-check-out")
    out.mkdir(parents=True, exist_ok=True)
    work = Path(os.environ.get("FINETUNE_GPU_WORK") or tempfile.mkdtemp(prefix="finetune-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    budget = float(os.environ.get("FINETUNE_GPU_CHECK_BUDGET") or (300 if args.dry_run else 420))
    check = Check(out, work, args.dry_run, budget)
    site = work / "site"
    checkpoints = checkpoint_dir(work)
    check.log(f"{'DRY RUN: ' if args.dry_run else ''}python {sys.executable} ({platform.python_version()}), "
              f"results in {out}, work in {work}, checkpoint in {checkpoints}")
    try:
        started = time.monotonic()
        check.results["install"] = install(check, sys.executable, Path(args.wheels), site, dict(os.environ))
        check.results["install"]["seconds"] = round(time.monotonic() - started, 1)
        check.log(f"install: {check.results['install']['status']}")
        check.save()
        env = step_env(work, site, args.dry_run)
        for step in steps(sys.executable, work, args.dry_run, checkpoints):
            check.run(step, env)
    finally:
        shutil.rmtree(checkpoints, ignore_errors=True)  # 16 GB, possibly in RAM
        if not os.environ.get("FINETUNE_GPU_WORK"):
            shutil.rmtree(work, ignore_errors=True)
        check.save()
    check.log("done; results: " + ", ".join(f"{n} {s.get('status')}" for n, s in check.results["steps"].items()))
    print(render_markdown(check.results), flush=True)
    return 0 if all(s.get("status") == "passed" for s in check.results["steps"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
