"""finetune: LoRA and QLoRA fine-tuning of vision-language models, from a YAML recipe or from Python.

    import finetune
    run_dir = finetune.train("recipes/tiny-chartqa.yaml", overrides=["training.max_steps=20"])

The CLI (`finetune train|check`) and `accelerate launch -m finetune train` call these same functions. The code is
laid out by stage, each a folder whose imports flow one way (tests/test_layout.py): data -> models -> batching ->
recipe -> evaluation -> export -> training, with `finetune.zoo` (tiny local models) at `finetune.models.zoo`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

__version__ = "0.1.0"

# bitsandbytes warns at import on AVX512-bf16 CPUs that an optional hub-downloaded kernel is missing; it then
# uses its built-in CPU path, which is what runs here. The warning is noise on every command, so it is muted.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def train(recipe, overrides: Sequence[str] = (), overwrite: bool = False) -> Path:
    """Fine-tune from a recipe (path, dict or `Recipe`); returns the run folder."""
    from .training.pipeline import train as _train

    return _train(recipe, overrides, overwrite=overwrite)


def check(recipe, overrides: Sequence[str] = (), show_labels: int = 0, data: bool = True,
          accelerate_config: str | None = None) -> dict:
    """Validate a recipe (against `accelerate_config`, an accelerate config file, when given) and (unless
    `data=False`) scan its data without training; returns the report."""
    from .training.preflight import check as _check

    return _check(recipe, overrides, show_labels=show_labels, data=data, accelerate_config=accelerate_config)


def load_recipe(source, overrides: Sequence[str] = ()):
    """Parse and validate a recipe without loading anything heavy."""
    from .recipe import load_recipe as _load

    return _load(source, overrides)


def evaluate(target, split=None, limit=None, metric=None, out_dir=None, recipe=None, **kwargs) -> dict:
    """Generation-based evaluation of a run folder, merged export or base model; returns the metrics."""
    from .evaluation.heldout import evaluate as _evaluate

    return _evaluate(target, split=split, limit=limit, metric=metric, out_dir=out_dir, recipe=recipe, **kwargs)


def predict(target, prompt: str, images: Sequence[str] = (), max_new_tokens: int = 32) -> str:
    """One greedy answer to a prompt about images (paths), from a run folder, merged export or base model."""
    from .evaluation.conversation import predict as _predict

    return _predict(target, prompt, list(images), max_new_tokens)


def merge(run_dir, out=None, dtype=None, onto: str = "original", parity: bool = True, tolerance=None,
          **kwargs) -> Path:
    """Merge a run's adapter into its base model, save a standalone export and check parity; returns the folder."""
    from .export.merging import merge as _merge

    return _merge(run_dir, out=out, dtype=dtype, onto=onto, parity=parity, tolerance=tolerance, **kwargs)


def export_gguf(target, outtypes=("f16",), out=None, **kwargs) -> Path:
    """Convert a run (merged first) or merged export to GGUF for llama.cpp and check it; returns the folder."""
    from .export.gguf import export_gguf as _export_gguf

    return _export_gguf(target, outtypes=outtypes, out=out, **kwargs)


def push(target, repo_id=None, private=None, revision=None, merged=None, token=None, **kwargs) -> str:
    """Upload a run's adapter (or merged export) with processor files and a model card; returns the commit URL."""
    from .export.hub import push as _push

    return _push(target, repo_id, private=private, revision=revision, merged=merged, token=token, **kwargs)


def serve(run_dir, port=None, adapter: bool = False, host: str = "127.0.0.1", check=None, vllm_args: str = "") -> str:
    """vLLM's OpenAI-compatible server on a run (merged first if needed) until Ctrl-C or SIGTERM; with `check=N`,
    N held-out answers over HTTP compared with predict instead (raises below N/N). Needs .venv-vllm."""
    if check is not None:
        from .export.serve_check import serve_check

        return serve_check(run_dir, check, port=port, adapter=adapter, host=host, vllm_args=vllm_args)
    from .export.serve import serve as _serve

    return _serve(run_dir, port=port, adapter=adapter, host=host, vllm_args=vllm_args)


def __getattr__(name: str):
    # `from finetune import zoo` (README, model cards' quick start) without importing the zoo for every other command.
    if name == "zoo":
        from .models import zoo

        return zoo
    raise AttributeError(f"module 'finetune' has no attribute {name!r}")
