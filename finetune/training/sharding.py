"""Sharded training (FSDP, DeepSpeed ZeRO-3) and the one data layout it cannot train: text-only rows beside images.

Under FSDP and ZeRO-3 every rank holds a slice of the vision tower, and its forward pass gathers the full weights
with a collective call. A rank whose batch holds no image skips the vision tower, so it never joins that call and
the ranks wait for each other forever: the run hangs without an error. finetune refuses that setup up front.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..recipe import RecipeError


def sharded_strategy(args, env: dict | None = None) -> str | None:
    """"FSDP" or "DeepSpeed ZeRO-3" when the model's weights are sharded across ranks, else None.

    Read from the SFTConfig (`fsdp`, `deepspeed`) and from what `accelerate launch --config_file` exports.
    """
    env = os.environ if env is None else env
    if args.fsdp or env.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        return "FSDP"
    stage = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") if env.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true" \
        else None
    config = args.deepspeed or env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if config:
        if not isinstance(config, dict):
            config = json.loads(Path(config).read_text())
        stage = (config.get("zero_optimization") or {}).get("stage", stage)
    return "DeepSpeed ZeRO-3" if str(stage) == "3" else None


def refuse_text_only_rows_when_sharded(strategy: str | None, images_per_row: dict[int, int]) -> None:
    """`images_per_row`: row id -> image count of every training row. Raises when some rows have none and some do."""
    if strategy is None:
        return
    text_only = [row for row, n in images_per_row.items() if n == 0]
    if text_only and len(text_only) < len(images_per_row):
        raise RecipeError(
            f"data: {len(text_only)} of {len(images_per_row)} training rows have no image (row ids {text_only[:10]}"
            f"{' ...' if len(text_only) > 10 else ''}). Under {strategy} a batch without an image skips the sharded "
            "vision tower on its rank and the run hangs. Filter text-only rows out, or train with DDP or "
            "DeepSpeed ZeRO-2 (recipes/accelerate/multi-gpu-ddp.yaml, deepspeed-zero2.yaml)"
        )
