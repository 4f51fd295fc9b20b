"""Training: the run, top to bottom (pipeline), and what keeps it honest.

pipeline reads as the story: recipe -> processor and model -> data -> trainer -> train -> save -> merge/push. Each
`training.method` is a module (sft, dpo, grpo: the `module` of its row in finetune.recipe.methods) giving its
Trainer, collator, rows, held-out comparison and what it saves; trainer holds what
every method's trainer adds to TRL's (guards, atomic checkpoints, throughput, packed rows, streams); attention keeps
packed samples apart; checkpoints, guards and sharding keep a run resumable, finite and free of hangs; adapter
continues from a run's adapter; preflight is `finetune check`.
"""

from .checkpoints import CheckpointError
from .guards import TrainingHealthError, TrainingInterrupted
from .pipeline import Run, method_module, prepare, train
from .preflight import check

__all__ = ["CheckpointError", "Run", "TrainingHealthError", "TrainingInterrupted", "check", "method_module", "prepare",
           "train"]
