"""Distributed settings that must agree before launch: the recipe's FSDP / DeepSpeed keys (`training.fsdp`,
`training.fsdp_config`, `training.deepspeed`, as in transformers' TrainingArguments) and what `accelerate launch`
brings (its config file, or the environment it exports to each process).

A disagreement is never resolved silently here: transformers lets the launcher's mixed precision win over a recipe's
`bf16: false`, and DeepSpeed refuses the same mismatch with a traceback; an `fsdp_config` without `fsdp` is ignored.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..errors import RecipeError
from .types import check_choice

#: The `training.fsdp_config` keys transformers reads (each also accepted with an `fsdp_` prefix, as it does).
FSDP_CONFIG_KEYS = ("version", "auto_wrap_policy", "min_num_params", "transformer_layer_cls_to_wrap", "cpu_offload",
                    "cpu_ram_efficient_loading", "state_dict_type", "activation_checkpointing",
                    "reshard_after_forward", "forward_prefetch", "backward_prefetch", "use_orig_params",
                    "sync_module_states", "limit_all_gathers", "xla", "xla_fsdp_settings", "xla_fsdp_v2",
                    "xla_fsdp_grad_ckpt")
STATE_DICT_TYPES = ("FULL_STATE_DICT", "SHARDED_STATE_DICT")
PRECISIONS = {"no": "full precision (float32 compute)", "bf16": "bf16 mixed precision", "fp16": "fp16 mixed precision"}


@dataclass
class Launch:
    """How the processes were (or will be) launched, as far as the recipe must agree with it."""

    strategy: str | None  # "FSDP", "DeepSpeed ZeRO-N", or None (DDP or one process)
    mixed_precision: str | None  # "no", "bf16", "fp16"; None when the launcher does not say
    source: str  # where it was read, for messages


def from_environment(env: dict | None = None) -> Launch:
    """What `accelerate launch` exported to this process (nothing under plain python or torchrun)."""
    env = os.environ if env is None else env
    strategy = None
    if env.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        strategy = "FSDP"
    elif env.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        strategy = f"DeepSpeed ZeRO-{env.get('ACCELERATE_DEEPSPEED_ZERO_STAGE', '?')}"
    return Launch(strategy, env.get("ACCELERATE_MIXED_PRECISION"), "accelerate launch")


def from_accelerate_config(path: str | Path) -> Launch:
    """An accelerate config file (`accelerate launch --config_file PATH`)."""
    path = Path(path)
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        raise RecipeError(f"--accelerate-config: cannot read {path}: {e}") from e
    kind = str(config.get("distributed_type", "NO")).upper()
    strategy = {"FSDP": "FSDP"}.get(kind)
    if kind == "DEEPSPEED":
        strategy = f"DeepSpeed ZeRO-{(config.get('deepspeed_config') or {}).get('zero_stage', '?')}"
    return Launch(strategy, str(config.get("mixed_precision", "no")), str(path))


def recipe_precision(training) -> str:
    """The mixed precision a `training:` section trains in ("bf16" unless it says otherwise, as TRL does)."""
    return "fp16" if training.fp16 else "no" if training.bf16 is False else "bf16"


def fsdp_on(training) -> bool:
    """`training.fsdp` turns FSDP on: true, or one of transformers' (deprecated) option strings."""
    return training.fsdp not in (None, False, "", [])


def validate_distributed(r) -> None:
    """The recipe's own FSDP / DeepSpeed keys, with the quantization they must match."""
    t = r.training
    fsdp = fsdp_on(t)
    if t.fsdp_config and not fsdp:
        raise RecipeError("training.fsdp_config: used only with training.fsdp: true (it would be ignored)")
    if fsdp and t.deepspeed:
        raise RecipeError("training.fsdp: cannot be combined with training.deepspeed; choose one")
    if isinstance(t.fsdp_config, dict):
        for key, value in t.fsdp_config.items():
            name = key[5:] if key.startswith("fsdp_") else key
            check_choice("training.fsdp_config", name, FSDP_CONFIG_KEYS, what="key")
            if name == "version" and value not in (1, 2):
                raise RecipeError(f"training.fsdp_config.{key}: must be 1 or 2, got {value!r}")
            if name == "state_dict_type":
                check_choice(f"training.fsdp_config.{key}", str(value).upper(), STATE_DICT_TYPES)
    elif isinstance(t.fsdp_config, str) and not Path(t.fsdp_config).is_file():
        raise RecipeError(f"training.fsdp_config: {t.fsdp_config} is not a file (a JSON file or a mapping)")
    stage = deepspeed_stage(t.deepspeed)
    strategy = "FSDP" if fsdp else (f"DeepSpeed ZeRO-{stage}" if t.deepspeed else None)
    if strategy:
        check_strategy(r, strategy, "training.fsdp" if fsdp else "training.deepspeed")


def deepspeed_stage(config) -> int | None:
    """The ZeRO stage of `training.deepspeed` (a JSON file or a mapping); None when there is none."""
    if not config:
        return None
    if isinstance(config, str):
        try:
            config = json.loads(Path(config).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise RecipeError(f"training.deepspeed: cannot read {config} as a DeepSpeed JSON config: {e}") from e
    stage = (config.get("zero_optimization") or {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise RecipeError(f"training.deepspeed: zero_optimization.stage must be 0-3, got {stage!r}")
    return stage


def check_strategy(r, strategy: str, where: str) -> None:
    """What a strategy cannot train: 4-bit weights shard under FSDP only when stored in the model's dtype and not at
    all under ZeRO-3; a mid-run generation eval runs each rank's own generate, which sharded weights cannot."""
    if r.evaluation.every_n_steps and strategy in ("FSDP", "DeepSpeed ZeRO-3"):
        raise RecipeError(f"evaluation.every_n_steps: not supported under {strategy} ({where}): the weights are split "
                          "across ranks; the held-out evaluation after training still runs (from the written adapter)")
    q = r.quantization
    if not q.load_in_4bit:
        return
    if strategy == "FSDP" and (q.quant_storage == "uint8" or r.model.dtype not in ("auto", q.quant_storage)):
        dtype = r.model.dtype if r.model.dtype != "auto" else "bfloat16"
        raise RecipeError(
            f"quantization.quant_storage: {q.quant_storage} 4-bit weights cannot be sharded by FSDP ({where}); set "
            f"quantization.quant_storage={dtype} (the model's dtype)")
    if strategy == "DeepSpeed ZeRO-3":
        raise RecipeError(f"quantization.load_in_4bit: DeepSpeed ZeRO-3 ({where}) does not shard bitsandbytes 4-bit "
                          "weights; use ZeRO-2, DDP, or FSDP with quantization.quant_storage set to the model's dtype")


def check_launch(r, launch: Launch) -> None:
    """The recipe against how it is launched: one strategy, one mixed precision, quantization that shards."""
    t = r.training
    own = "FSDP" if fsdp_on(t) else ("DeepSpeed" if t.deepspeed else None)
    if own and launch.strategy and not launch.strategy.startswith(own):
        raise RecipeError(f"training.{'fsdp' if own == 'FSDP' else 'deepspeed'}: the recipe asks for {own} but "
                          f"{launch.source} sets up {launch.strategy}; choose one")
    wanted = recipe_precision(t)
    if launch.mixed_precision is not None and launch.mixed_precision != wanted:
        key = "training.fp16" if t.fp16 else "training.bf16"
        value = {"fp16": "true", "no": "false"}.get(wanted, "unset (true)")
        fix = "training.bf16=true" if launch.mixed_precision == "bf16" else (
            "training.fp16=true" if launch.mixed_precision == "fp16" else "training.bf16=false")
        raise RecipeError(
            f"{key}: {value} trains in {PRECISIONS[wanted]}, but {launch.source} sets mixed_precision: "
            f"{launch.mixed_precision}; make them agree ({fix}, or --mixed_precision {wanted} at launch)")
    if launch.strategy:
        check_strategy(r, launch.strategy, launch.source)
