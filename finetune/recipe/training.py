"""The `training:` section: the keys of the TRL config of `training.method` verbatim (`trl.SFTConfig`, `DPOConfig`,
`GRPOConfig`: finetune.recipe.methods), mirrored as a dataclass with the same names, types and defaults, plus
finetune's few extensions and defaults."""

from __future__ import annotations

import dataclasses
import functools
import typing
from dataclasses import field
from typing import Any, Literal

from ..errors import RecipeError
from .methods import DEFAULT_METHOD, METHODS

#: Learning rates LoRA fine-tuning uses in practice; outside it needs guards.allow_unusual_learning_rate.
SANE_LEARNING_RATES = (1e-7, 1e-2)

#: Keys of the `training:` section that finetune adds to the TRL config's (never passed to it).
TRAINING_EXTENSIONS: list[tuple[str, Any, Any, str]] = [
    ("method", Literal[tuple(METHODS)], DEFAULT_METHOD, "; ".join(f"{n} = {m.summary}" for n, m in METHODS.items())),
    ("resume", str | None, None,
     "null = start fresh; auto = continue from the newest complete checkpoint in output_dir (fresh if none); "
     "or a checkpoint folder, which must be complete"),
    ("max_length", int | None, None,
     "grpo (GRPOConfig has no such key): prompt tokens, images expanded, plus max_completion_length must fit; "
     "longer rows are dropped by the pre-flight scan (data.on_too_long), with their ids"),
    ("resume_allow_incomplete", bool, False,
     "resume from an explicit checkpoint even if it lacks optimizer/scheduler/RNG state (warns loudly)"),
]

# finetune's defaults where they differ from SFTConfig's, each for a reason.
TRAINING_DEFAULTS: dict[str, Any] = {
    # Our collator needs the raw `messages`/`images` columns, not the model's forward signature.
    "remove_unused_columns": False,
    # Rows are tokenised by finetune's collator (assistant-only labels, images never truncated).
    "dataset_kwargs": {"skip_prepare_dataset": True},
    "report_to": "none",
    # TRL 1.16 defaults the deprecated `gradient_checkpointing` alias to True, which makes transformers 5 warn on
    # every run; the same default (checkpointing on) under its current name.
    "activation_checkpointing": True,
    "gradient_checkpointing": None,
}

#: SFTConfig keys transformers 5 renamed (the old names warn and go in v6): read under the new name. Recipes always
#: use the new names; on a transformers without them (5.17 has only `gradient_checkpointing`) finetune passes them
#: to TRL under the old ones (`trl_name`).
RENAMED_TRAINING_KEYS = {
    "gradient_checkpointing": "activation_checkpointing",
    "gradient_checkpointing_kwargs": "activation_checkpointing_kwargs",
}


#: Keys whose annotation in transformers is narrower than what it accepts: `fsdp: true` is the form its own help and
#: deprecation warning ask for (the strings are deprecated), but it is annotated `str | None`.
WIDENED_TYPES = {"fsdp": bool | str | None}


def trl_name(config: type, name: str) -> str:
    """The name the installed TRL config has for recipe key `name` (old transformers: the pre-rename one)."""
    if name in {f.name for f in dataclasses.fields(config)}:
        return name
    old = {new: old for old, new in RENAMED_TRAINING_KEYS.items()}.get(name)
    return old if old is not None else name

def trl_config_class(method: str = DEFAULT_METHOD) -> type:
    import trl

    return getattr(trl, METHODS[method].trl_config)


@functools.cache
def training_config_class(method: str = DEFAULT_METHOD) -> type:
    """A dataclass with exactly the method's TRL config fields (same names, types, defaults) plus finetune's
    extensions, and no side effects."""
    config = trl_config_class(method)
    hints = typing.get_type_hints(config)
    names = {f.name for f in dataclasses.fields(config)}
    renamed = {old: new for old, new in RENAMED_TRAINING_KEYS.items() if new not in names}  # old transformers
    defaults = {k: v for k, v in TRAINING_DEFAULTS.items() if k in names and k not in renamed}
    specs = []
    for f in dataclasses.fields(config):
        if not f.init:
            continue
        default = defaults.get(f.name, f.default)
        if f.name in defaults or f.default is not dataclasses.MISSING:
            spec = field(default_factory=lambda d=default: _copy(d))
        elif f.default_factory is not dataclasses.MISSING:
            spec = field(default_factory=f.default_factory)
        else:
            spec = field(default=None)
        specs.append((renamed.get(f.name, f.name), WIDENED_TYPES.get(f.name, hints.get(f.name, Any)), spec))
    # `method` keeps its default (sft) in every class, so a dpo recipe always writes it out (recipe.yaml).
    specs += [(name, ann, field(default=default)) for name, ann, default, _ in TRAINING_EXTENSIONS if name not in names]
    return dataclasses.make_dataclass(f"TrainingConfig_{method}", specs)


def _copy(value: Any) -> Any:
    return dict(value) if isinstance(value, dict) else list(value) if isinstance(value, list) else value


def trl_config(training: Any, **overrides: Any):
    """The TRL config of `training.method` for a `training:` section: only keys that differ from its defaults are
    passed."""
    config = trl_config_class(training.method)
    defaults = {f.name: f for f in dataclasses.fields(config) if f.init}
    ours = {trl_name(config, f.name): f.name for f in dataclasses.fields(training)}
    kwargs = {}
    for name, f in defaults.items():
        value = getattr(training, ours.get(name, name))
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        if value != default:
            kwargs[name] = value
    kwargs.update(overrides)
    try:
        return config(**kwargs)
    except ValueError as e:
        hint = ""
        if "bf16" in str(e) or "fp16" in str(e):
            hint = " (this machine has no bf16/fp16-capable GPU: set training.bf16=false to train on CPU)"
        raise RecipeError(f"training: {e}{hint}") from e


#: Counts that must be at least 1 (transformers accepts 0 or negative values for several and fails later, or loops).
AT_LEAST_ONE = ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                "max_length")


def check_ranges(training: Any) -> None:
    """Numbers that cannot mean anything: refused with the dotted key before any work."""
    for name in AT_LEAST_ONE:
        value = getattr(training, name, None)
        if value is not None and value < 1:
            raise RecipeError(f"training.{name}: must be at least 1, got {value}")
    if training.num_train_epochs <= 0:
        raise RecipeError(f"training.num_train_epochs: must be > 0, got {training.num_train_epochs}")
    if training.max_steps == 0 or training.max_steps < -1:
        raise RecipeError(f"training.max_steps: must be > 0, or -1 to train for num_train_epochs; got "
                          f"{training.max_steps}")
    if training.learning_rate < 0:
        raise RecipeError(f"training.learning_rate: must not be negative, got {training.learning_rate:g}")
