"""Training-health guards (non-finite loss or gradients, gradient-norm spikes) and Ctrl-C handling.

Checks run on every micro-batch (loss) and every optimizer step (gradient norm), so a NaN stops the run within the
step it appears in, before the optimizer applies it and before any checkpoint can contain it.
"""

from __future__ import annotations

import math
import signal
import statistics
import sys
import threading

import torch
from transformers import TrainerCallback


class TrainingHealthError(RuntimeError):
    """Training produced a non-finite loss, gradient or weight; the run stopped without saving it."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C: the run stopped after saving a resumable checkpoint."""


class HealthMonitor:
    """What the guards saw during the run, for run_summary.json."""

    def __init__(self, on_nonfinite: str, spike_factor: float | None, window: int = 20):
        self.on_nonfinite = on_nonfinite
        self.spike_factor = spike_factor
        self.window = window
        self.norms: list[float] = []
        self.skipped: list[dict] = []
        self.spikes: list[dict] = []

    def check_loss(self, value: float, step: int) -> bool:
        """True when the micro-batch is fine; raises (stop) or returns False (skip) when it is not."""
        if math.isfinite(value):
            return True
        return self._nonfinite("loss", value, step)

    def check_grad_norm(self, norm: float | None, step: int, loss_scaled: bool = False) -> bool:
        """True when the optimizer may apply this step's gradients; raises (stop) or returns False (skip) when not.
        `loss_scaled` (fp16): an inf norm is routine, the scaler skips that step and lowers the scale itself."""
        if norm is None:
            return True
        norm = float(norm)
        if loss_scaled and not math.isfinite(norm):
            return True
        if not math.isfinite(norm):
            return self._nonfinite("gradient norm", norm, step)
        recent = self.norms[-self.window:]
        median = statistics.median(recent) if len(recent) >= 5 else None
        if self.spike_factor and median is not None and norm > self.spike_factor * median:
            self.spikes.append({"step": step, "grad_norm": norm, "median_before": median})
            print(f"[finetune] WARNING: gradient-norm spike at step {step}: {norm:.4g} is "
                  f"{norm / median:.0f}x the median {median:.4g} of the last {len(recent)} steps", file=sys.stderr,
                  flush=True)
        self.norms.append(norm)
        return True

    def _nonfinite(self, what: str, value: float, step: int) -> bool:
        if self.on_nonfinite == "skip":
            self.skipped.append({"step": step, "what": what, "value": str(value)})
            print(f"[finetune] WARNING: {what} is {value} at step {step}; skipping this batch "
                  "(guards.on_nonfinite: skip)", file=sys.stderr, flush=True)
            return False
        raise TrainingHealthError(
            f"{what} is {value} at step {step}: training stopped before applying it, and no checkpoint was written "
            "after the last finite step. Common causes: learning rate too high, fp16 overflow (try bf16), or a "
            "broken sample. Resume from the last checkpoint with training.resume=auto, or set guards.on_nonfinite: "
            "skip to drop such batches"
        )

    def summary(self) -> dict:
        return {"skipped_batches": self.skipped, "grad_norm_spikes": self.spikes}


STAND_IN, NONFINITE = "stand-in batch", "non-finite loss"


def must_skip(loss: torch.Tensor, stand_in: bool, health: HealthMonitor, step: int) -> str | None:
    """None to train on this micro-batch's loss; why to skip it (STAND_IN: no row of it could be decoded, or
    NONFINITE under guards.on_nonfinite: skip); raises to stop. Every rank agrees: a loss not finite on one rank, or
    a stand-in batch on one, makes every rank stop or skip together. Checked before backward, so a NaN never
    reaches the gradients."""
    verdict = torch.tensor([int(torch.isfinite(loss.detach()).all()), int(not stand_in)], dtype=torch.int32,
                           device=loss.device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(verdict, op=torch.distributed.ReduceOp.MIN)
    finite, real = (bool(v) for v in verdict.tolist())
    if not real:
        return STAND_IN
    if finite:
        return None
    local = float(loss.detach().float().sum())
    # Finite here but not on another rank: report NaN, so that every rank stops (or skips) together.
    health.check_loss(local if not math.isfinite(local) else float("nan"), step)  # raises unless on_nonfinite: skip
    return NONFINITE


def zero_loss(model: torch.nn.Module) -> torch.Tensor:
    """A zero loss that still reaches every trainable weight, so backward gives exactly zero gradients (a skipped
    micro-batch; every rank still takes part in the gradient collectives)."""
    return sum((p * 0).sum() for p in model.parameters() if p.requires_grad)


def refuse_nonfinite_weights(model: torch.nn.Module, step: int) -> None:
    """Before a checkpoint is written: trainable weights must all be finite."""
    for name, param in model.named_parameters():
        if param.requires_grad and not torch.isfinite(param.detach()).all():
            raise TrainingHealthError(
                f"weight {name} is not finite after step {step}; refusing to write checkpoint-{step}. The previous "
                "checkpoint is intact: resume from it with training.resume=auto (and a lower learning rate)")


class SaveOnInterrupt(TrainerCallback):
    """First Ctrl-C: finish the current step, save a checkpoint, stop. A second Ctrl-C aborts at once."""

    def __init__(self):
        self.requested = False
        self.interrupted_at: int | None = None
        self._previous = None

    def on_train_begin(self, args, state, control, **kwargs):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)

    def on_train_end(self, args, state, control, **kwargs):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def _handle(self, signum, frame):
        self.requested = True
        signal.signal(signal.SIGINT, self._previous or signal.default_int_handler)
        print("\n[finetune] Ctrl-C: finishing this step and saving a resumable checkpoint "
              "(press Ctrl-C again to abort without saving)", file=sys.stderr, flush=True)

    def on_step_end(self, args, state, control, **kwargs):
        requested = self.requested
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # Every rank must stop at the same step, or the others wait forever in the next collective.
            flag = torch.tensor([int(requested)], device=args.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            requested = bool(flag.item())
        if requested:
            self.interrupted_at = state.global_step
            control.should_save = True
            control.should_training_stop = True
        return control
