"""Distributed training: what a run asked for, what really runs, and the adapter gathered whole from the shards.

Launchers and libraries fall back silently: accelerate turns FSDP on only for GPU-like devices (on the CPU it keeps
the plain data-parallel wrapper and drops the FSDP plugin without a word), and transformers writes no adapter for a
sharded state dict. finetune switches FSDP on for the CPU too (`enable_fsdp_on_cpu`), reads the strategy back from
the prepared model (`strategy_of`), stops a run whose strategy is not the one asked for (`refuse_fallback`), and
writes the trained adapter as an ordinary PEFT adapter in every mode (`full_trainable_state`).

Text-only rows beside image rows under FSDP and ZeRO-3: every rank holds a slice of the vision tower, and its forward
pass gathers the full weights with a collective call. A rank whose batch holds no image skips the vision tower, so it
never joins that call and the ranks wait for each other forever: the run hangs without an error. finetune refuses
that setup up front (`refuse_text_only_rows_when_sharded`).
"""

from __future__ import annotations

import os

import torch

from ..recipe import RecipeError
from ..recipe.distributed import deepspeed_stage, from_environment


def requested_strategy(args, env: dict | None = None) -> str | None:
    """"FSDP" or "DeepSpeed ZeRO-N" as the SFTConfig (`fsdp`, `deepspeed`) or `accelerate launch --config_file` (its
    environment variables) ask for; None when neither does."""
    env = os.environ if env is None else env
    if args.fsdp:
        return "FSDP"
    if args.deepspeed:
        return f"DeepSpeed ZeRO-{deepspeed_stage(args.deepspeed)}"
    launched = from_environment(env).strategy
    if launched and launched.startswith("DeepSpeed") and env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE"):
        return f"DeepSpeed ZeRO-{deepspeed_stage(env['ACCELERATE_DEEPSPEED_CONFIG_FILE'])}"
    return launched


def sharded_strategy(args, env: dict | None = None) -> str | None:
    """"FSDP" or "DeepSpeed ZeRO-3" when the model's weights are sharded across ranks, else None."""
    strategy = requested_strategy(args, env)
    return strategy if strategy in ("FSDP", "DeepSpeed ZeRO-3") else None


def enable_fsdp_on_cpu(accelerator, args) -> bool:
    """Switch a CPU (gloo) run that asks for FSDP to FSDP, as accelerate does for GPUs; True if it switched.

    accelerate's AcceleratorState turns FSDP on only for GPU-like device types and drops the plugin on MULTI_CPU, so the
    model would be wrapped in DistributedDataParallel instead. FSDP itself runs on gloo (every collective it needs)."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = accelerator.state
    if requested_strategy(args) != "FSDP" or state.distributed_type != DistributedType.MULTI_CPU:
        return False
    plugin = FullyShardedDataParallelPlugin(**(args.fsdp_plugin_args or {}))
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    return True


def strategy_of(trainer) -> dict:
    """What really runs, read from the prepared model or engine: {strategy, world_size}. Call once training began."""
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    from torch.nn.parallel import DistributedDataParallel

    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    wrapped, model = trainer.model_wrapped, trainer.model
    if hasattr(wrapped, "zero_optimization_stage"):  # a DeepSpeedEngine (deepspeed is an optional extra)
        strategy = f"DeepSpeed ZeRO-{wrapped.zero_optimization_stage()}"
    elif any(isinstance(m, FSDPModule) for m in model.modules()):
        strategy = "FSDP2"
    elif any(isinstance(m, FullyShardedDataParallel) for m in (wrapped, *model.modules())):
        strategy = "FSDP1"
    elif isinstance(wrapped, DistributedDataParallel):
        strategy = "DDP"
    else:
        strategy = "single" if world == 1 else "none (each process trains alone)"
    return {"strategy": strategy, "world_size": world}


def weights_sharded(ran: dict | None) -> bool:
    """FSDP and ZeRO-3 (what `strategy_of` read) split the weights across ranks: a forward pass needs every rank."""
    return bool(ran) and ran["strategy"].startswith(("FSDP", "DeepSpeed ZeRO-3"))


def refuse_fallback(asked: str | None, ran: dict) -> None:
    """Stop before the first step when the model is not distributed the way the run asked for."""
    strategy, world = ran["strategy"], ran["world_size"]
    if asked is not None and not (strategy.startswith("FSDP") if asked == "FSDP" else strategy == asked):
        raise RecipeError(f"the run asked for {asked} but the model was prepared as {strategy} over {world} "
                           "process(es); stopping before training")
    if strategy.startswith("none"):
        raise RecipeError(f"{world} processes run without gradient synchronisation; stopping before training "
                           "(launch through accelerate or torchrun, or set training.use_cpu on a CPU machine)")


def full_trainable_state(model) -> dict[str, torch.Tensor]:
    """Every trainable weight of `model` whole, on the CPU, keyed as in `model.state_dict()`: FSDP shards and ZeRO-3
    partitions gathered, frozen weights left out (the LoRA weights are small). A collective: every rank calls it; the
    result is complete on rank 0 (FSDP gathers there only)."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    zero3 = [p for _, p in trainable if hasattr(p, "ds_id")]
    if zero3:  # DeepSpeed ZeRO-3 partitions: gathered on every rank for the duration of the block
        import deepspeed

        with deepspeed.zero.GatheredParameters(zero3, modifier_rank=None):
            return {n: p.detach().to("cpu", copy=True) for n, p in trainable}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                ignore_frozen_params=True))


def leave_sharding() -> None:
    """Once the adapter is written: models loaded from here on (by one process: evaluation, merge) load whole. Under
    ZeRO-3, transformers would otherwise build them partitioned across ranks that have finished (a hang on GPUs)."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()


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
