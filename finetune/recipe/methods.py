"""The method table: everything that differs between training methods (`training.method`) lives here and nowhere
else, one `Method` record per method, as finetune.models.families is for architectures.

A record holds what the recipe, export and training stages need to know of a method without running it: the TRL
config class whose keys `training:` takes, the keys refused and why, the data it trains on, which of finetune's
features it can use (and why not), what the model card adds. How it trains (Trainer, collator, rows, held-out
comparison, what the run folder adds) is its training module, named by `module` and loaded only by
finetune.training.pipeline (`method_module`, the one dispatch place).

Adding a method is one module under finetune/training/ plus one row here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

#: SFTConfig/DPOConfig/GRPOConfig keys refused by every method: what they do would break finetune's data path.
_RAW_COLUMNS = "the collator needs the raw message columns"
_RESUME = "use training.resume (auto, or a checkpoint folder)"


@dataclass(frozen=True)
class Method:
    """One training method, keyed in METHODS by its `training.method` name."""

    #: What the method is, for `training.method`'s documentation and the model card.
    summary: str
    #: The TRL config class (in `trl`) whose keys `training:` takes, verbatim.
    trl_config: str
    #: The training module (under finetune.training) with `Trainer`, `collator`, `rows`, `trainer_kwargs`,
    #: `config_overrides`, `before_after` and `saved`.
    module: str
    #: TRL config keys refused at load, with the reason: they would silently break multimodal training.
    refused_keys: dict[str, str] = field(default_factory=dict)
    #: The `data.format` this method trains on; that format trains with this method only (None = any other format).
    data_format: str | None = None
    #: finetune packs rows for it (`training.packing`; finetune.batching.packing).
    packing: bool = False
    #: Why `data.streaming` cannot feed it ("" = it can).
    no_streaming: str = ""
    #: Why `evaluation.every_n_steps` is refused ("" = generation evals run during training).
    no_eval_during_training: str = ""
    #: It is trained on the `rewards:` section's functions (which every other method would ignore).
    rewards: bool = False
    #: A row must fit `training.max_length` with `training.max_completion_length` generated tokens after its prompt.
    generates: bool = False
    #: TRL's logged figures of this method shown on each progress line, beside loss, learning rate and tokens/s.
    progress: tuple[str, ...] = ()
    #: Rows of the model card's training table that only this method has: recipe -> [(setting, value)].
    card_settings: Callable[[object], list[tuple[str, object]]] | None = None


def _grpo_card_settings(recipe) -> list[tuple[str, object]]:
    t = recipe.training
    return [("GRPO: generations per prompt / completion length / beta",
             f"{t.num_generations} / {t.max_completion_length} / {t.beta}"),
            ("GRPO rewards (weights)", f"{', '.join(recipe.rewards.functions)} ({t.reward_weights or 'equal'})")]


METHODS: dict[str, Method] = {
    "sft": Method(
        summary="supervised fine-tuning (trl.SFTConfig keys)",
        trl_config="SFTConfig", module="finetune.training.sft", packing=True,
        refused_keys={
            "padding_free": "use training.packing: true (samples packed whole, attention isolated per sample)",
            "assistant_only_loss": "finetune always trains on assistant tokens only (see `finetune check "
                                   "--show-labels`)",
            "completion_only_loss": "finetune always trains on assistant tokens only (see `finetune check "
                                    "--show-labels`)",
            "dataset_text_field": "rows are chat messages; there is no text field",
            "remove_unused_columns": _RAW_COLUMNS,
            "resume_from_checkpoint": _RESUME,
        },
    ),
    "dpo": Method(
        summary="preference tuning on data.format preference (trl.DPOConfig keys)",
        trl_config="DPOConfig", module="finetune.training.dpo", data_format="preference",
        progress=("rewards/accuracies", "rewards/margins"),
        no_streaming="not supported with training.method dpo",
        no_eval_during_training="not supported with training.method dpo (TRL logs reward margins and accuracies "
                                "every training.logging_steps)",
        refused_keys={
            "padding_free": "padding-free batches are not supported for image datasets",
            "precompute_ref_log_probs": "not supported for image datasets (TRL); the reference is computed per "
                                        "batch",
            "sync_ref_model": "the reference is the base (adapter disabled), there is no reference model to sync",
            "remove_unused_columns": _RAW_COLUMNS,
            "resume_from_checkpoint": _RESUME,
        },
    ),
    "grpo": Method(
        summary="reinforcement learning with the `rewards:` section (trl.GRPOConfig keys)",
        trl_config="GRPOConfig", module="finetune.training.grpo", rewards=True, generates=True,
        progress=("reward", "kl"),
        no_streaming="not supported with training.method grpo",
        no_eval_during_training="not supported with training.method grpo (TRL logs the rewards every "
                                "training.logging_steps)",
        card_settings=_grpo_card_settings,
        refused_keys={
            "remove_unused_columns": "the reward functions need the reference answers column",
            "resume_from_checkpoint": _RESUME,
        },
    ),
}

DEFAULT_METHOD = "sft"


def method_of(training) -> Method:
    """The table row of a `training:` section (validated at load, so always present)."""
    return METHODS[training.method]


def format_owner(data_format: str) -> str | None:
    """The method that a `data.format` trains with exclusively (preference -> dpo), or None."""
    return next((name for name, m in METHODS.items() if m.data_format == data_format), None)
