"""Atomic checkpoints and choosing one to resume from.

A checkpoint is written under `<output_dir>/.partial/checkpoint-N`, every file fsynced, then a completion marker
(`finetune-checkpoint.json`, listing each file and its size) is written last and the folder renamed to
`<output_dir>/checkpoint-N`. A rename within one filesystem is atomic, so `checkpoint-N` either is complete or
does not exist: a process killed mid-write leaves only `.partial/`, which resume ignores and the next run removes.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import sys
from pathlib import Path

MARKER = "finetune-checkpoint.json"
STAGING = ".partial"
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# What an exact resume needs: weights, optimizer, scheduler, trainer state and RNG streams. Each is one of several
# layouts, as each distributed mode writes it: plain (optimizer.pt), FSDP (pytorch_model_fsdp_0/, optimizer_0/, or
# .bin files for a full state dict), DeepSpeed (global_stepN/ holds the model and optimizer states of every rank).
RESUME_STATE = {
    "adapter_model.safetensors": ("adapter_model.safetensors", "pytorch_model_fsdp*", "global_step*/*model_states.pt"),
    "optimizer.pt": ("optimizer.pt", "optimizer_0", "optimizer.bin", "global_step*/*optim_states.pt"),
    "scheduler.pt": ("scheduler.pt",),
    "trainer_state.json": ("trainer_state.json",),
    "rng_state*.pth": ("rng_state*.pth",),
}
ALTERNATIVES = {"adapter_model.safetensors": " (or pytorch_model_fsdp_0/ under FSDP, global_stepN/ under DeepSpeed)",
                "optimizer.pt": " (or optimizer_0/ under FSDP, global_stepN/ under DeepSpeed)"}
# A pickle of TrainingArguments that HF writes beside every save; recipe.yaml records the same as text.
PICKLED_ARGS = "training_args.bin"


class CheckpointError(RuntimeError):
    """A checkpoint that could not be written, or one that cannot be resumed from."""


def commit(staging: Path, final: Path) -> None:
    """Make a fully written staging folder visible as `final`: fsync, write the marker last, rename."""
    (staging / PICKLED_ARGS).unlink(missing_ok=True)
    files = sorted(p for p in staging.rglob("*") if p.is_file())
    for path in files:
        _fsync(path)
    manifest = {"step": int(CHECKPOINT.match(final.name).group(1)),
                "files": {str(p.relative_to(staging)): p.stat().st_size for p in files}}
    marker = staging / MARKER
    with open(marker, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    _fsync(staging)
    if final.exists():  # the same step saved again (e.g. a resumed run): swap, never leave a gap
        old = staging.parent / f"{final.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        staging.rename(final)
        shutil.rmtree(old)
    else:
        staging.rename(final)
    _fsync(final.parent)


@contextlib.contextmanager
def staged(trainer, run_dir: Path):
    """The checkpoint of this step, written in the block into the folder yielded (`run_dir/.partial/checkpoint-N`),
    then committed as `run_dir/checkpoint-N` and old ones rotated, on every rank together. A failed write keeps
    nothing of it and raises a CheckpointError saying the previous checkpoint is intact."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

    args, wait = trainer.args, trainer.accelerator.wait_for_everyone
    name = f"{PREFIX_CHECKPOINT_DIR}-{trainer.state.global_step}"
    staging, final = run_dir / STAGING, run_dir / name
    if args.should_save:
        shutil.rmtree(staging, ignore_errors=True)
    wait()
    try:
        yield staging
        wait()
        if args.should_save:
            commit(staging / name, final)
            shutil.rmtree(staging)
    except OSError as e:
        previous = newest_complete(run_dir)
        if args.should_save:
            shutil.rmtree(staging, ignore_errors=True)
        kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
        hint = "free some disk space, then " if e.errno == errno.ENOSPC else ""
        raise CheckpointError(f"saving {name} failed ({e.strerror or e}); nothing of it was kept and {kept}. "
                              f"{hint}resume with training.resume=auto") from e
    state = trainer.state
    if state.best_model_checkpoint:
        state.best_model_checkpoint = state.best_model_checkpoint.replace(str(staging), str(run_dir))
    if args.should_save:
        rotate_checkpoints(output_dir=str(run_dir), save_total_limit=args.save_total_limit,
                           best_model_checkpoint=state.best_model_checkpoint)
    wait()


@contextlib.contextmanager
def trainable_dtypes_kept(model):
    """Trainable weights keep their dtype through a load in the block: peft upcasts adapters it loads to float32,
    and TRL keeps QLoRA adapters in bfloat16, so a resumed run would drift from the uninterrupted one."""
    dtypes = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
    yield
    for name, param in model.named_parameters():
        if name in dtypes and param.dtype != dtypes[name]:
            param.data = param.data.to(dtypes[name])


def is_complete(path: Path) -> bool:
    """The marker is there and every file it lists has the size it was written with."""
    try:
        manifest = json.loads((path / MARKER).read_text(encoding="utf-8"))
        return all((path / name).stat().st_size == size for name, size in manifest["files"].items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def step_of(path: Path) -> int:
    return int(CHECKPOINT.match(path.name).group(1))


def checkpoints(out: Path) -> list[Path]:
    """`checkpoint-N` folders in `out`, oldest step first."""
    if not out.is_dir():
        return []
    return sorted((p for p in out.iterdir() if p.is_dir() and CHECKPOINT.match(p.name)), key=step_of)


def newest_complete(out: Path) -> Path | None:
    done = [p for p in checkpoints(out) if is_complete(p)]
    return done[-1] if done else None


def leftovers(out: Path) -> list[Path]:
    """What an interrupted save leaves behind: the staging folder, never anything else.

    A `checkpoint-N` without a marker is skipped by resume but kept: it may be a user's copy, or come from another
    tool, and deleting what someone wrote is not ours to decide.
    """
    return [out / STAGING] if (out / STAGING).exists() else []


def missing_resume_state(path: Path) -> list[str]:
    missing = [name + ALTERNATIVES.get(name, "") for name, layouts in RESUME_STATE.items()
               if not any(any(path.glob(layout)) for layout in layouts)]
    if not (path / MARKER).exists():
        missing.append(f"{MARKER} (the completion marker)")
    elif not is_complete(path):
        missing.append(f"files listed in {MARKER} (some are missing or have changed size)")
    return missing


def resume_point(resume: str | None, out: Path, allow_incomplete: bool) -> Path | None:
    """The checkpoint `training.resume` asks for: None (start fresh), `auto` (newest complete one, or fresh), a path."""
    if resume is None:
        return None
    if resume == "auto":
        return newest_complete(out)
    path = Path(resume)
    if not path.is_dir():
        raise CheckpointError(f"training.resume: {path} is not a checkpoint folder (use auto, or a checkpoint-N path)")
    missing = missing_resume_state(path)
    if missing:
        what = f"training.resume: {path} is incomplete: missing {', '.join(missing)}"
        if not allow_incomplete:
            raise CheckpointError(f"{what}. Resuming from it would not continue the same run; pick a complete "
                                  "checkpoint, use training.resume=auto, or set training.resume_allow_incomplete=true "
                                  "to resume anyway")
        print(f"[finetune] WARNING: {what}; resuming anyway because training.resume_allow_incomplete is set: the "
              "missing state starts fresh and the run will NOT match an uninterrupted one", file=sys.stderr, flush=True)
    return path


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories; the rename is still atomic
        if not path.is_dir():
            raise
    finally:
        os.close(fd)
