"""`finetune check`: validate a recipe, scan its data as training would, and show which tokens carry loss."""

from __future__ import annotations

import re
from typing import Sequence

from ..batching.collate import IGNORE_INDEX
from ..models.memory import base_memory, describe
from ..recipe import Recipe, load_recipe
from ..recipe.distributed import check_launch, from_accelerate_config, from_environment
from .pipeline import load_processing, scanned


def check(recipe: Recipe | str | dict, overrides: Sequence[str] = (), show_labels: int = 0,
          data: bool = True, accelerate_config: str | None = None) -> dict:
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, overrides)
    launch = from_accelerate_config(accelerate_config) if accelerate_config else from_environment()
    check_launch(recipe, launch)
    print(f"[finetune] recipe OK: {recipe.source or '<dict>'}"
          + (f" (with {accelerate_config}: {launch.strategy or 'no sharding'}, mixed precision "
             f"{launch.mixed_precision})" if accelerate_config else ""))
    report: dict = {"recipe": recipe.to_dict()}
    if not data:
        return report
    model_path, family, processor, collator = load_processing(recipe)
    dataset, result = scanned(recipe, recipe.data.train_split, family, collator)
    print(f"[finetune] model family: {family.name}")
    report["base_memory"] = base_memory_of(model_path, recipe, family)
    print(f"[finetune] base model weights (estimate, before activations and optimizer state): "
          f"{describe(report['base_memory'])}")
    print(f"[finetune] train data: {result.describe()}")
    report["train_data"] = result.summary()
    for i in result.kept[:show_labels]:
        sample = dataset[i]
        batch = collator([sample])
        if "completion_mask" in batch:  # DPO: the chosen, then the rejected sequence; [[...]] enter the log-probs
            labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, IGNORE_INDEX)
            for k, name in enumerate(("chosen", "rejected")):
                print(f"\n--- row {sample['row_id']} ({name}): tokens in [[...]] enter the DPO log-probs ---")
                print(mark_labels(processor.tokenizer, batch["input_ids"][k].tolist(), labels[k].tolist()))
            continue
        print(f"\n--- row {sample['row_id']}: tokens in [[...]] carry loss ---")
        print(mark_labels(processor.tokenizer, batch["input_ids"][0].tolist(), batch["labels"][0].tolist()))
    return report


def base_memory_of(model_path: str, recipe: Recipe, family) -> dict:
    """The base's weight memory by part, at the dtype and quantization the recipe loads it with."""
    from transformers import AutoConfig

    from ..models.loading import stored_dtype

    cfg = recipe.model
    config = AutoConfig.from_pretrained(model_path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    dtype = stored_dtype(cfg) if cfg.dtype == "auto" else cfg.dtype
    return base_memory(config, family, recipe.quantization.load_in_4bit, recipe.quantization.double_quant,
                       dtype_bytes=4 if dtype == "float32" else 2)


def mark_labels(tokenizer, input_ids: list[int], labels: list[int]) -> str:
    """Decode a sample with loss-carrying runs wrapped in [[...]] and runs of one repeated token collapsed."""
    pieces: list[str] = []
    i = 0
    while i < len(input_ids):
        j = i
        trained = labels[i] != IGNORE_INDEX
        while j < len(input_ids) and (labels[j] != IGNORE_INDEX) == trained:
            j += 1
        text = _collapse_repeats(tokenizer, input_ids[i:j])
        pieces.append(f"[[{text}]]" if trained else text)
        i = j
    return "".join(pieces)


def _collapse_repeats(tokenizer, ids: list[int]) -> str:
    out, i = [], 0
    while i < len(ids):
        j = i
        while j < len(ids) and ids[j] == ids[i]:
            j += 1
        token = tokenizer.decode([ids[i]])
        out.append(f"{token}x{j - i}" if j - i > 3 else token * (j - i))
        i = j
    return re.sub(r"\n", "\\\\n\n", "".join(out))
