"""Supervised fine-tuning: TRL's SFTTrainer with finetune's guards (finetune.training.trainer.Guarded), fed by the
ChatCollator, whose labels are the assistant replies only. Each training method is a module like this one:
`Trainer`, `collator`, `before_after` (the held-out comparison once training ends) and `saved` (what the run folder
and run_summary.json add after the adapter is written)."""

from __future__ import annotations

from pathlib import Path

from trl import SFTTrainer

from ..batching.collate import ChatCollator
from ..evaluation import in_training
from .trainer import Guarded


class Trainer(Guarded, SFTTrainer):
    """finetune's SFTTrainer."""


def collator(processor, family) -> ChatCollator:
    return ChatCollator(processor, family)


def before_after(run, out: Path) -> dict:
    """The base model (adapter disabled) against the fine-tuned one on the held-out split: eval/ and report.md."""
    return in_training.before_after(run, out)


def saved(run, out: Path) -> dict:
    """Nothing to add: the adapter, processor, recipe, summary and loss curve are every method's."""
    return {}


def rows(chat_rows, processor, family):
    """The scanned chat rows, as they are: the collator makes the batches."""
    return chat_rows


def trainer_kwargs(recipe) -> dict:
    """What the Trainer takes beyond the pipeline's common arguments: nothing."""
    return {}


def config_overrides(processor, family) -> dict:
    """TRL config values that depend on the processor: none."""
    return {}
