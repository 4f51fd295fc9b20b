"""Which families vLLM serves as trained: per family, a short run on the ChartQA sample (on the zoo replica of its
published checkpoint in tests/fixtures/hub, small preset; the plain zoo model where there is none), merged, served
by vLLM and checked with `finetune serve --check` (held-out rows, with and without a system message).
Prints a markdown table (docs/export.md quotes it). Needs .venv-vllm (bash scripts/setup.sh vllm).

    .venv/bin/python scripts/vllm_families.py [--samples 8] [--family qwen2_vl ...]   # ~1.5 min a family on 2 cores
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def main() -> None:
    import conftest
    from finetune.batching import DataRefused
    from finetune.export.serve import ServeError
    from finetune.export.serve_check import serve_check
    from finetune.models.families import FAMILIES
    from finetune.recipe import load_recipe
    from finetune.training.pipeline import train

    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--family", action="append", help="default: every family")
    args = parser.parse_args()
    replicas = {}
    for folder in sorted((ROOT / "tests" / "fixtures" / "hub").iterdir()):
        replicas.setdefault(json.loads((folder / "config.json").read_text())["model_type"], folder)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.family or list(FAMILIES):
            started = time.monotonic()
            out = Path(tmp) / family
            model = f"zoo:{replicas[family]}:small" if family in replicas else f"zoo:{family}:small"
            recipe = conftest.tiny_recipe(
                out, model={"name_or_path": model}, data={"max_samples": 24, "eval_split": "test"},
                lora={"r": 8, "alpha": 16},
                training={"max_steps": 6, "per_device_train_batch_size": 4, "learning_rate": 5e-3,
                          "max_length": 4096})  # LLaVA-NeXT's tiles at the published resolution
            try:
                run = train(load_recipe(recipe))
                result = serve_check(run, args.samples).split(" rows: ", 1)[-1]
            except (ServeError, DataRefused) as e:
                result = str(e)
            source = replicas[family].name.replace("__", "/") if family in replicas else "zoo"
            rows.append((FAMILIES[family].name, family, source, result, time.monotonic() - started))
            print(f"{family}: {result}", flush=True)
    print("\n| family | `model_type` | replica of | served by vLLM vs `finetune predict` | wall s |\n"
          "|---|---|---|---|---|")
    for name, key, source, result, wall in rows:
        print(f"| {name} | `{key}` | {source} | {result} | {wall:.0f} |")


if __name__ == "__main__":
    main()
