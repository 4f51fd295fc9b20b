"""Training: the run, top to bottom (pipeline), and what keeps it honest.

pipeline reads as the story: recipe -> processor and model -> data -> trainer -> train -> save -> merge/push. Each
`training.method` is a module (sft, dpo) giving its Trainer, collator and held-out comparison; trainer holds what
every method's trainer adds to TRL's (guards, atomic checkpoints, throughput, packed rows, streams); attention keeps
packed samples apart; checkpoints, guards and sharding keep a run resumable, finite and free of hangs; adapter
continues from a run's adapter; preflight is `finetune check`.
"""

from .checkpoints import CheckpointError
from .guards import TrainingHealthError, TrainingInterrupted
from .pipeline import METHODS, Run, prepare, train
from .preflight import check

__all__ = ["METHODS", "CheckpointError", "Run", "TrainingHealthError", "TrainingInterrupted", "check", "prepare",
           "train"]
