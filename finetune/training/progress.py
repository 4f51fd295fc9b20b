"""What a run shows while it trains: one formatted line per logging step above transformers' progress bar (loss,
learning rate, tokens/s, the held-out metric and the method's own figures), instead of the raw log dicts; and every
log dict, whole, in the run folder's `train_log.jsonl` (trackers get them from transformers as before)."""

from __future__ import annotations

import json
from pathlib import Path

from transformers.trainer_callback import PrinterCallback, ProgressCallback, TrainerCallback

from ..console import figure

#: What an evaluation logs about its own speed: not a held-out figure.
EVAL_TIMINGS = ("eval_runtime", "eval_samples_per_second", "eval_steps_per_second")
#: The run folder's log: one JSON object per log call (training, evaluation), appended as the run goes.
TRAIN_LOG = "train_log.jsonl"


def progress_line(step: int, max_steps: int, logs: dict, held_out: dict, extra: tuple[str, ...]) -> str:
    """`step 5/10 · loss 7.542 · lr 1.6e-04 · 1,234 tokens/s · eval_relaxed_accuracy 0.25 · ...`"""
    parts = [f"step {step}/{max_steps}"]
    if "loss" in logs:
        parts.append(f"loss {figure(logs['loss'])}")
    if "learning_rate" in logs:
        parts.append(f"lr {logs['learning_rate']:.2e}")
    if "tokens_per_second" in logs:
        parts.append(f"{figure(round(logs['tokens_per_second']))} tokens/s")
    parts += [f"{key} {figure(logs[key])}" for key in extra if key in logs]
    parts += [f"{key} {figure(value)}" for key, value in held_out.items()]
    return " · ".join(parts)


def loss_logged_at(args, step: int) -> bool:
    """Training logs its loss at this step (transformers' `logging_steps`, a count or a fraction of the run)."""
    every = args.logging_steps
    return args.logging_strategy == "steps" and every >= 1 and step > 0 and step % int(every) == 0


class ProgressLines:
    """The line of each log (`progress_line`); None for logs with nothing to show.

    `extra`: the method's own logged figures worth a glance (finetune.recipe.methods, `Method.progress`). Held-out
    figures (`eval_*`) are shown on their own line when they arrive and then on every training line after it."""

    def __init__(self, extra: tuple[str, ...] = ()):
        self.extra = extra
        self.held_out: dict = {}

    def line(self, args, state, logs: dict | None) -> str | None:
        logs = logs or {}
        if not state.is_world_process_zero or "train_runtime" in logs:
            return None  # the closing summary: finetune prints its own (finetune.training.pipeline.save)
        evaluated = {k: v for k, v in logs.items() if k.startswith("eval_") and k not in EVAL_TIMINGS}
        self.held_out.update(evaluated)
        if "loss" not in logs and (not evaluated or loss_logged_at(args, state.global_step)):
            return None  # nothing to show, or shown on this step's loss line, which follows
        return progress_line(state.global_step, state.max_steps, logs,
                             self.held_out if "loss" in logs else evaluated, self.extra)


class RunProgress(ProgressCallback):
    """transformers' progress bar, with one formatted line per log above it instead of the dict."""

    def __init__(self, extra: tuple[str, ...] = ()):
        super().__init__()
        self.lines = ProgressLines(extra)

    def on_log(self, args, state, control, logs=None, **kwargs):
        line = self.lines.line(args, state, logs)
        if line and self.training_bar is not None:
            self.training_bar.write(line)


class PrintedProgress(TrainerCallback):
    """Without a progress bar (`training.disable_tqdm`): the same lines, printed (transformers prints the dicts)."""

    def __init__(self, extra: tuple[str, ...] = ()):
        self.lines = ProgressLines(extra)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if line := self.lines.line(args, state, logs):
            print(line, flush=True)


def show_progress(callback_handler, extra: tuple[str, ...]) -> None:
    """Put finetune's progress lines in place of transformers' bar or printer (whichever the run has)."""
    if callback_handler.pop_callback(ProgressCallback) is not None:
        callback_handler.add_callback(RunProgress(extra))
    elif callback_handler.pop_callback(PrinterCallback) is not None:
        callback_handler.add_callback(PrintedProgress(extra))


class LogFile(TrainerCallback):
    """Every log dict, whole, appended to `output_dir/train_log.jsonl` by the main process as it arrives."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            path = Path(args.output_dir) / TRAIN_LOG
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": state.global_step, **logs}, default=str) + "\n")
