"""The training run, top to bottom: recipe -> processor and model -> data -> trainer -> train -> save -> merge/push."""

from __future__ import annotations

import importlib
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..batching.collate import ChatCollator
from ..batching.lengths import Measurer
from ..batching.packing import PackCollator, PackedRows, cached_plan, refusal
from ..batching.scan import ScanReport, cache_dir, scan_rows
from ..batching.streaming import streamed
from ..console import quiet_library_warnings
from ..data.rows import RowReader, chat_rows, source_rows
from ..evaluation.in_training import during_training
from ..evaluation.inference import load_target
from ..evaluation.plots import training_figure
from ..evaluation.report import loss_points, metric_points, write_recipe, write_summary
from ..export.hub import push
from ..export.gguf import export_gguf
from ..export.merging import merge
from ..models.families import Family
from ..models.frozen import run_frozen_without_autograd
from ..models.loading import load_family, load_model, load_processor
from ..models.lora import LoraPlan, plan_lora, trainable_by_group
from ..recipe import Recipe, RecipeError, load_recipe, method_of
from ..recipe.distributed import check_launch, from_environment
from .adapter import continue_from
from .attention import use_vision_varlen
from .checkpoints import CHECKPOINT, CheckpointError, checkpoints, leftovers, newest_complete, resume_point, step_of
from .guards import HealthMonitor, TrainingInterrupted
from .kernels import refuse_missing_kernels
from .progress import TRAIN_LOG
from .sharding import leave_sharding, refuse_text_only_rows_when_sharded, sharded_strategy, weights_sharded

#: What `finetune merge`, `push` and `PeftModel.from_pretrained` read from a run folder.
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")



def method_module(recipe: Recipe):
    """The training module of `training.method` (its row's `module` in finetune.recipe.methods): its Trainer (and
    the arguments it adds: `trainer_kwargs`, `config_overrides`), collator, the rows it trains on (`rows`), held-out
    comparison (`before_after`) and what it saves (`saved`). The one place a method's code is chosen."""
    return importlib.import_module(method_of(recipe.training).module)


@dataclass
class Run:
    """Everything a training run is made of, ready to `trainer.train()`."""

    recipe: Recipe
    family: Family
    processor: object
    trainer: object
    lora: LoraPlan
    train_scan: ScanReport
    eval_scan: ScanReport | None
    train_data: object = None  # the scanned (kept) rows, as datasets.Dataset
    eval_data: object = None


def train(recipe: Recipe | str | Path | dict, overrides: Sequence[str] = (), overwrite: bool = False) -> Path:
    """Fine-tune as the recipe says; returns the output folder holding the adapter, processor and summary."""
    quiet_library_warnings()
    started = time.time()
    if isinstance(recipe, Recipe) and overrides:  # overrides apply to a loaded recipe too, never silently not
        source = recipe.source
        recipe = load_recipe(recipe.to_dict(), overrides)
        recipe.source = source
    elif not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, overrides)
    out = Path(recipe.training.output_dir)
    resume = resume_point(recipe.training.resume, out, recipe.training.resume_allow_incomplete)
    if is_main_process():  # one process decides about the folder; the others only train
        _claim_output_dir(out, overwrite, resuming=resume is not None)
    if resume:
        log(f"resuming from {resume} (step {step_of(resume)})" if CHECKPOINT.match(resume.name)
            else f"resuming from {resume}")
    run = prepare(recipe, resume_step=trained_steps(resume) if resume else 0)
    result = run.trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    if run.trainer.interrupt.interrupted_at is not None:
        where = newest_complete(out)
        raise TrainingInterrupted(
            f"interrupted at step {run.trainer.interrupt.interrupted_at}; saved {where}. Continue with: "
            f"finetune train {recipe.source or 'RECIPE'} training.resume=auto")
    throughput = run.trainer.throughput(result.metrics["train_runtime"])  # collectives: every rank calls them
    decode_failures = run.trainer.dropped.report()  # rows whose images failed to decode
    run.trainer.save_model(str(out))  # every rank: sharded weights are gathered before rank 0 writes them
    if not run.trainer.is_world_process_zero():
        return out
    save(run, result, out, started, throughput, decode_failures)
    sharded = weights_sharded(run.trainer.distributed)
    if sharded:
        leave_sharding()
    if run.eval_data is not None and recipe.evaluation.enabled:
        if sharded:
            reload_adapter(run, out)
        method_module(recipe).before_after(run, out)
    export_run(recipe, out)
    return out


def prepare(recipe: Recipe, resume_step: int = 0) -> Run:
    """Load processor, data (scanned), model and adapters, and build the trainer of `training.method`.
    `resume_step`: the step of the checkpoint a run resumes from (a stream continues from the batch after it)."""
    check_launch(recipe, from_environment())  # the launcher's settings agree with the recipe's, before any work
    # Processor first: it is cheap, and the data scan needs it before any weights are read.
    model_path, family, processor, collator = load_processing(recipe)
    packing = packing_on(recipe)
    if packing:
        if reason := refusal(family, recipe.model.attn_implementation):
            raise RecipeError(f"training.packing: not supported for {family.name}: {reason}")
    method = method_module(recipe)
    args = recipe.trl_config(**_runtime_overrides(recipe), **method.config_overrides(processor, family))
    # One process per machine scans (and caches); the others wait, then load the cached scan. `args.device` sets
    # up the process group first: without it the ranks do not know of each other yet and would all scan.
    args.device  # noqa: B018
    with args.main_process_first(local=True, desc="pre-flight scan"):
        if recipe.data.streaming:
            train_dataset, train_scan, train_data = streamed(recipe, family, collator, Measurer(processor, family),
                                                             resume_step)
        else:
            train_data, train_scan = scanned(recipe, recipe.data.train_split, family, collator)
            train_data = train_dataset = train_data.select(train_scan.kept)
            if packing:  # planned (and stored) once per machine too: the other ranks load the plan
                packs = cached_plan(train_scan.lengths, recipe.training.max_length, cache_dir().parent / "packs")
                train_dataset = PackedRows(train_data, packs, train_scan.lengths)
        train_dataset = method.rows(train_dataset, processor, family)
        eval_data = eval_scan = None
        if recipe.data.eval_split:
            eval_data, eval_scan = scanned(recipe, recipe.data.eval_split, family, collator)
            eval_data = eval_data.select(eval_scan.kept)
    stream = f"first {train_scan.rows} rows of the stream (the rest is checked as it is read): " \
        if recipe.data.streaming else ""
    log(f"train data: {stream}{train_scan.describe()}")
    if eval_scan is not None:
        log(f"eval data: {eval_scan.describe()}")

    refuse_text_only_rows_when_sharded(sharded_strategy(args), train_scan.images_per_row)

    model = load_model(model_path, recipe.model, recipe.quantization, family)
    lora = plan_lora(model, family, recipe.lora)
    peft_config = lora.peft_config(recipe.lora)
    if recipe.model.adapter:  # continue training a run's adapter (its own LoRA settings) instead of a fresh one
        model, peft_config = continue_from(model, recipe.model.adapter, recipe.model.name_or_path), None

    lengths = None if recipe.data.streaming else train_scan.lengths
    data_collator = collator
    if packing:
        data_collator, lengths = PackCollator(collator), train_dataset.lengths
        log(f"train data: {train_dataset.describe(recipe.training.max_length)}")

    trainer = method.Trainer(
        model=model,
        family=family,
        lengths=lengths,
        # A stream's preview rows are checked again as they are read (and counted there).
        rows_dropped_in_scan=0 if recipe.data.streaming else train_scan.rows - len(train_scan.kept),
        health=HealthMonitor(recipe.guards.on_nonfinite, recipe.guards.grad_norm_spike),
        args=args,
        train_dataset=train_dataset,
        eval_dataset=method.rows(eval_data, processor, family) if eval_data is not None else None,
        data_collator=data_collator,
        processing_class=processor,
        peft_config=peft_config,
        progress=method_of(recipe.training).progress,
        **method.trainer_kwargs(recipe),
    )
    trainable = trainable_by_group(trainer.model, family)
    log("trainable parameters: " + ", ".join(f"{g} {n:,}" for g, n in trainable.items() if n))
    # Exact (the same forward, without a graph): no reason to ever keep autograd in a frozen tower.
    trainer.frozen_parts = run_frozen_without_autograd(trainer.model, family)
    if use_vision_varlen(trainer.model):  # CUDA only: one kernel call per layer instead of one per image window
        log("vision tower attention: one varlen kernel call per layer (finetune.training.attention)")
    run = Run(recipe, family, processor, trainer, lora, train_scan, eval_scan, train_data, eval_data)
    if recipe.evaluation.every_n_steps:
        during_training(run)
    return run


def load_processing(recipe: Recipe) -> tuple[str, Family, object, ChatCollator]:
    """Model path, family, processor (with the recipe's image settings) and the training collator."""
    model_path, family = load_family(recipe.model)
    if reason := family.method_refusal(recipe.training.method):
        raise RecipeError(f"training.method: {recipe.training.method} is not supported for {family.name}: {reason}")
    refuse_missing_kernels(recipe, family)  # here, so `finetune check` says it too, before any weights load
    processor = load_processor(model_path, recipe.model, recipe.data.image_processor, family)
    return model_path, family, processor, method_module(recipe).collator(processor, family)


def scanned(recipe: Recipe, split: str, family: Family, collator: ChatCollator):
    """A split as chat rows, and the pre-flight scan of it (lengths, what is dropped and why)."""
    cfg = recipe.data
    reader = RowReader(cfg, videos_as_images=not family.video_input)
    rows = source_rows(cfg, split)
    # A row of a method that generates is its prompt and max_completion_length generated tokens.
    budget = recipe.training.max_completion_length if method_of(recipe.training).generates else None
    report = scan_rows(rows, reader, Measurer(collator.processor, family), recipe.training.max_length,
                       cfg.on_too_long, cfg.on_bad_image, verify=cfg.verify_images,
                       num_proc=cfg.num_proc or available_cores(), log=rank_log,
                       completion_budget=budget)
    return chat_rows(rows, reader), report


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def save(run: Run, result, out: Path, started: float, throughput: dict | None = None,
         decode_failures: dict | None = None) -> None:
    """Adapter + processor (everything inference needs), the resolved recipe, summary and loss curve."""
    trainer = run.trainer
    missing = [name for name in ADAPTER_FILES if not (out / name).is_file()]
    if missing:  # a run that cannot be merged or pushed must not look finished
        raise CheckpointError(f"training finished but the adapter was not written: {out} lacks {', '.join(missing)}")
    method_facts = method_module(run.recipe).saved(run, out)
    (out / "training_args.bin").unlink(missing_ok=True)  # a pickle; recipe.yaml records the same, as text
    run.processor.save_pretrained(str(out))
    write_recipe(run.recipe, out)
    points = loss_points(trainer.state.log_history)
    training_figure(trainer.state.log_history, out / "loss_curve.png", title=run.recipe.model.name_or_path,
                    metric=metric_points(trainer.state.log_history))
    write_summary({
        "base_model": run.recipe.model.name_or_path,
        "family": run.family.name,
        "distributed": trainer.distributed,  # read from the prepared model: what really ran
        "steps": trainer.state.global_step,
        "epochs": trainer.state.epoch,
        "first_loss": points[0][1] if points else None,
        "final_loss": points[-1][1] if points else None,
        "train_loss": result.training_loss,
        "loss_curve": [{"step": s, "loss": v} for s, v in points],
        "eval_during_training": metric_points(trainer.state.log_history),
        "trainable_parameters": trainable_by_group(trainer.model, run.family),
        "lora_modules": {group: len(names) for group, names in run.lora.modules.items()},
        "lora_parameters": run.lora.parameters,
        "train_data": {**run.train_scan.summary(), "dropped_in_training": decode_failures or {},
                       **({"packing": trainer.train_dataset.summary()} if hasattr(trainer.train_dataset, "packs")
                          else {})},
        "eval_data": run.eval_scan.summary() if run.eval_scan else None,
        "wall_time_s": round(time.time() - started, 1),
        "train_runtime_s": result.metrics.get("train_runtime"),
        # Measured over the batches actually trained (all processes), not estimated from the dataset size.
        "throughput": throughput,
        "health": trainer.health.summary(),
        "log_history": trainer.state.log_history,  # every logged dict (also in train_log.jsonl, as it went)
        **method_facts,
    }, out)
    loss = (f"loss {points[0][1]:.4f} -> {points[-1][1]:.4f}" if points
            else f"mean loss {result.training_loss:.4f} (no step logged: lower training.logging_steps)")
    speed = (f"; {throughput['tokens_per_second']:.0f} tokens/s, {throughput['samples_per_second']:.2f} samples/s, "
             f"{throughput['padding_fraction']:.0%} padding" if throughput else "")
    if throughput and throughput.get("mfu") is not None:  # CUDA runs only (finetune.training.trainer.throughput)
        speed += f", MFU {throughput['mfu']:.1%}"
    print(f"[finetune] done in {time.time() - started:.0f}s; {loss}{speed}; outputs in {out}")
    for reason, info in ((decode_failures or {}).get("rows") or {}).items():
        print(f"[finetune] left out during training ({reason}): {info['count']} rows, ids {info['row_ids'][:10]}; "
              f"e.g. {info['example']}")


def reload_adapter(run: Run, out: Path) -> None:
    """Put the base model with the adapter just written in place of the sharded one, for work one process does alone
    (the held-out evaluation): sharded weights can only run with every rank taking part."""
    model = load_target(out).model
    run.trainer.model = run.trainer.model_wrapped = model


def export_run(recipe: Recipe, out: Path) -> None:
    """What the recipe's `export` section asks for once training has written `out` (main process only): a merged,
    parity-checked checkpoint, checked GGUF files and/or a push to the Hub."""
    cfg = recipe.export
    if cfg.merge or (cfg.push_to_hub and cfg.hub_merged):
        merge(out, dtype=cfg.merge_dtype, onto=cfg.merge_onto)
    if cfg.gguf:
        export_gguf(out, outtypes=cfg.gguf)
    if cfg.push_to_hub:
        push(out, cfg.hub_repo_id, private=cfg.hub_private, revision=cfg.hub_revision, merged=cfg.hub_merged)


def is_main_process() -> bool:
    """Rank 0 of a torchrun/accelerate launch, or the only process (read before the process group exists)."""
    return int(os.environ.get("RANK", "0")) == 0


def log(message: str) -> None:
    """Print once per run, not once per process."""
    if is_main_process():
        print(f"[finetune] {message}", flush=True)


def rank_log(message: str) -> None:
    """Print from every process, naming the rank where there are several."""
    rank = f" rank {os.environ['RANK']}:" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    print(f"[finetune]{rank} {message}", flush=True)


def _runtime_overrides(recipe: Recipe) -> dict:
    """Settings that depend on how the run was launched, not on the recipe."""
    import torch

    overrides = {}
    # Under torchrun/accelerate on a machine without CUDA, transformers only joins the process group (gloo) when
    # use_cpu is set; without it every process silently trains alone and they all write the same folder.
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available() and not recipe.training.use_cpu:
        overrides["use_cpu"] = True
    if packing_on(recipe):
        overrides["packing"] = False  # finetune packs (finetune.batching.packing); TRL's packing is for text rows
    if recipe.data.streaming:  # the stream skips what a resumed run trained (finetune.batching.streaming), undecoded
        overrides["ignore_data_skip"] = True
    # Pinned memory only helps copies to an accelerator; without one torch warns on every dataloader.
    if recipe.training.dataloader_pin_memory and (recipe.training.use_cpu or not torch.accelerator.is_available()):
        overrides["dataloader_pin_memory"] = False
    return overrides


def packing_on(recipe: Recipe) -> bool:
    """finetune packs this run's rows (`training.packing`, for a method that packs)."""
    return method_of(recipe.training).packing and recipe.training.packing


def trained_steps(checkpoint: Path) -> int:
    """The global step a checkpoint was saved at (its trainer_state.json)."""
    import json

    return int(json.loads((checkpoint / "trainer_state.json").read_text())["global_step"])


def _claim_output_dir(out: Path, overwrite: bool, resuming: bool = False) -> None:
    """Never write into a previous run silently; a resumed run continues in its own folder."""
    if out.exists() and any(out.iterdir()):
        stale = leftovers(out)  # incomplete by construction: a save that was cut off
        if overwrite:
            shutil.rmtree(out)
        # A run stopped before its first checkpoint leaves only its log: a new run appends to it.
        elif resuming or all(p in stale or p.name == TRAIN_LOG for p in out.iterdir()):
            for path in stale:
                log(f"removing {path}: an incomplete checkpoint from an interrupted save")
                shutil.rmtree(path)
        else:
            found = [p for p in checkpoints(out) if p not in stale]
            hint = (f" (it has {found[-1].name}: training.resume=auto continues from it)" if found else "")
            raise RecipeError(
                f"training.output_dir: {out} already holds files from an earlier run{hint}; choose another folder "
                "(training.output_dir=...), resume (training.resume=auto) or pass --overwrite to replace it"
            )
    out.mkdir(parents=True, exist_ok=True)
