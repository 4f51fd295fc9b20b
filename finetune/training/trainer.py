"""What finetune adds to every TRL trainer it uses (`Guarded`, mixed in before TRL's class by each method module:
finetune.training.sft, finetune.training.dpo): length-grouped batches from the scan's lengths, health guards, atomic
checkpoints, throughput counted over real tokens, packed rows laid out on the device, streams served as they are
read."""

from __future__ import annotations

import contextlib
import errno
import math
import shutil
import time
from pathlib import Path

import torch
from transformers.trainer_callback import ProgressCallback, TrainerCallback
from transformers.trainer_pt_utils import LengthGroupedSampler
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from ..batching.packing import PackedRows
from ..batching.streaming import StreamingRows
from ..console import rounded
from . import checkpoints
from .attention import packed_inputs
from .flops import batch_flops, matmul_rate, mfu_facts, model_shape
from .guards import HealthMonitor, SaveOnInterrupt, refuse_nonfinite_weights
from .sharding import enable_fsdp_on_cpu, full_trainable_state, refuse_fallback, requested_strategy, strategy_of


class Guarded:
    """What finetune adds to a TRL trainer (mixed in before it: `class Trainer(Guarded, SFTTrainer)`).

    `lengths` are the token counts the pre-flight scan measured, one per training sample, in dataset order.

    With `training.train_sampling_strategy: group_by_length`, transformers would read a length column of the
    dataset (decoding every image to build it) or guess from `input_ids`; the scan already knows the real lengths.
    """

    def __init__(self, *args, lengths: list[int] | None = None, health: HealthMonitor | None = None,
                 rows_dropped_in_scan: int = 0, family=None, **kwargs):
        stream = kwargs.get("train_dataset")
        if isinstance(stream, (StreamingRows, PackedRows)):
            # TRL accepts only `datasets` datasets and peeks at one sample (to see images); the stream is not one,
            # and peeking would read it. It is put in place once TRL is set up (get_train_dataloader serves it).
            import datasets

            kwargs["train_dataset"] = datasets.Dataset.from_dict({"images": [[]], "messages": [[]]})
        self.lengths = lengths
        self.family = family  # finetune.models.families.Family: how packed batches are laid out
        self._packed_tokens: int | None = None  # real tokens of the current packed batch (TRL counts positions)
        self.rows_dropped_in_scan = rows_dropped_in_scan  # reported with the loss, for trackers
        self.health = health or HealthMonitor("stop", None)
        self.interrupt = SaveOnInterrupt()
        self.seen = torch.zeros(3, dtype=torch.long)  # samples, real tokens, padded positions (this process)
        self.dropped_in_training: dict[str, list[tuple[int, str]]] = {}  # reason -> (row id, problem)
        self.empty_batches = 0
        self.distributed: dict | None = None  # {strategy, world_size}, read from the prepared model (strategy_of)
        self._skip_batch = False
        self._staging: Path | None = None
        self._last_log: tuple[float, torch.Tensor] | None = None  # (time, all ranks' counts) at the previous log
        self._paused = 0.0  # seconds since then spent outside training (generation evals), not counted
        self.packed_attention = {"varlen": 0, "per_sample": 0}  # decoder attention calls on packed rows, by path
        self.model_flops = 0.0  # finetune.training.flops, over the batches trained (this process)
        self._shape = None
        self.matmul_rate: float | None = None  # FLOP/s, measured on CUDA before the first step (the MFU denominator)
        super().__init__(*args, **kwargs)
        if isinstance(stream, (StreamingRows, PackedRows)):
            self.train_dataset = stream
        self.add_callback(self.interrupt)
        self.add_callback(DistributedCheck(self))
        if self.callback_handler.pop_callback(ProgressCallback) is not None:
            self.add_callback(NumericProgress)

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        if enable_fsdp_on_cpu(self.accelerator, self.args):  # accelerate turns FSDP on for GPUs only
            self.is_fsdp_enabled = True

    # --- counting and guarding every batch ---------------------------------------------------------------------

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self._last_log is None:  # the first batch: throughput is measured from here
            self._last_log = (time.perf_counter(), torch.zeros_like(self.seen))
        self._skip_batch = self._take_dropped(inputs)
        # Counted where batches arrive (the collator may run in dataloader workers, whose counts would be lost).
        mask = inputs["attention_mask"]
        counts = [mask.shape[0], int(mask.sum()), mask.numel()]
        # MFU is counted for SFT batches (labels over the rows): a DPO or GRPO step's work has another shape.
        if not self._skip_batch and self.args.device.type == "cuda" and self.family is not None and "labels" in inputs:
            self._count_flops(model, inputs)
        self._packed_tokens = None
        attention = contextlib.nullcontext()
        if "pack_sizes" in inputs:
            inputs, attention = self.pack(model, inputs)
            counts[2] = inputs["input_ids"].numel()
            self._packed_tokens = counts[1]
        if not self._skip_batch:
            self.seen += torch.tensor(counts)
        with attention:
            return super().training_step(model, inputs, num_items_in_batch)

    def pack(self, model, inputs: dict):
        """A collated batch of packs as packed rows (finetune.batching.packing), laid out for this model's attention;
        and the context to train them in (on SDPA: one variable-length kernel call on CUDA, else attention one
        sample at a time: finetune.training.attention)."""
        base = self.accelerator.unwrap_model(model)
        base = base.get_base_model() if hasattr(base, "get_base_model") else base
        return packed_inputs(base, inputs, self.family, self.processing_class.tokenizer.pad_token_id,
                             used=self.packed_attention)

    def _count_flops(self, model, inputs: dict) -> None:
        """Model FLOPs of this batch (finetune.training.flops), for the run's MFU; on the first, the device's bf16
        matmul rate is measured (a few hundred ms, before any training memory is in use)."""
        if self._shape is None:
            base = self.accelerator.unwrap_model(model)
            self._shape = model_shape(base, self.family)
            self.matmul_rate = matmul_rate(self.args.device)
        config = self.accelerator.unwrap_model(model).config
        self.model_flops += batch_flops(self._shape, inputs, config)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        self._take_dropped(inputs)
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)

    def _take_dropped(self, inputs: dict) -> bool:
        """Record the rows the collator left out (images that failed to decode); True for a stand-in batch."""
        for row_id, problem in inputs.pop("dropped_rows", ()):
            self.dropped_in_training.setdefault(problem.partition(": ")[0], []).append((row_id, problem))
        return bool(inputs.pop("skip_batch", False))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        counted = getattr(self, "_total_train_tokens", None)
        with lm_head_on_supervised_positions():
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if not model.training:
            return result
        if self._packed_tokens is not None and counted is not None:
            # TRL counts a batch without attention mask by its position ids' width; count the real tokens instead.
            real = torch.tensor(self._packed_tokens, device=self.args.device)
            self._total_train_tokens = counted + int(self.accelerator.gather_for_metrics(real).sum())
            self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
        loss = result[0] if return_outputs else result
        # Checked before backward, so a NaN never reaches the gradients; all ranks agree on the verdict. A stand-in
        # batch (no row of it could be decoded) is skipped by every rank together, the same way.
        verdict = torch.tensor([int(torch.isfinite(loss.detach()).all()), int(not self._skip_batch)],
                               dtype=torch.int32, device=loss.device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(verdict, op=torch.distributed.ReduceOp.MIN)
        finite, real = (bool(v) for v in verdict.tolist())
        if finite and real:
            return result
        if not real:
            self.empty_batches += 1
        else:
            local = float(loss.detach().float().sum())
            # Finite here but not on another rank: report NaN, so that every rank stops (or skips) together.
            self.health.check_loss(local if not math.isfinite(local) else float("nan"),
                                   self.state.global_step + 1)  # raises, unless guards.on_nonfinite is skip
        # Skipped: a zero loss that still reaches every trainable weight, so backward gives exactly zero gradients.
        zero = sum((p * 0).sum() for p in model.parameters() if p.requires_grad)
        return (zero, result[1]) if return_outputs else zero

    def dropped_during_training(self) -> dict:
        """Rows left out of their batch because their images failed to decode, over all processes (a collective:
        call on every rank): reason -> {count, row_ids, example}, plus batches skipped whole."""
        local = (self.dropped_in_training, self.empty_batches)
        gathered = [local]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, local)
        merged: dict[str, list] = {}
        for dropped, _ in gathered:
            for reason, rows in dropped.items():
                merged.setdefault(reason, []).extend(rows)
        report = {reason: {"count": len(rows), "row_ids": sorted({r for r, _ in rows})[:50],
                           "example": f"row {rows[0][0]}: {rows[0][1].partition(': ')[2]}"}
                  for reason, rows in merged.items()}
        skipped = sum(n for _, n in gathered)
        return {"rows": report, "skipped_batches": skipped} if report or skipped else {}

    def _get_grad_norm(self, model, grad_norm=None):
        grad_norm = super()._get_grad_norm(model, grad_norm)
        # With fp16 loss scaling an inf norm is routine: the scaler skips that step and lowers the scale itself.
        if self.args.fp16 and grad_norm is not None and not math.isfinite(float(grad_norm)):
            return grad_norm
        if not self.health.check_grad_norm(grad_norm, self.state.global_step + 1):
            model.zero_grad()  # skip: the optimizer steps with zero gradients
        return grad_norm

    # --- atomic checkpoints ------------------------------------------------------------------------------------

    def _get_output_dir(self, trial):
        return str(self._staging) if self._staging is not None else super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial):
        step = self.state.global_step
        refuse_nonfinite_weights(self.model, step)
        run_dir = Path(super()._get_output_dir(trial))
        name = f"{PREFIX_CHECKPOINT_DIR}-{step}"
        staging, final = run_dir / checkpoints.STAGING, run_dir / name
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        self._staging = staging
        try:
            super()._save_checkpoint(model, trial)  # everything lands in .partial/checkpoint-N
            self.accelerator.wait_for_everyone()
            if self.args.should_save:
                checkpoints.commit(staging / name, final)
                shutil.rmtree(staging)
        except OSError as e:
            previous = checkpoints.newest_complete(run_dir)
            if self.args.should_save:
                shutil.rmtree(staging, ignore_errors=True)
            kept = (f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists")
            hint = "free some disk space, then " if e.errno == errno.ENOSPC else ""
            raise checkpoints.CheckpointError(
                f"saving {name} failed ({e.strerror or e}); nothing of it was kept and {kept}. "
                f"{hint}resume with training.resume=auto") from e
        finally:
            self._staging = None
        if self.state.best_model_checkpoint:
            self.state.best_model_checkpoint = self.state.best_model_checkpoint.replace(
                str(staging), str(run_dir))
        if self.args.should_save:
            rotate_checkpoints(output_dir=str(run_dir), save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint)
        self.accelerator.wait_for_everyone()

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The adapter as an ordinary PEFT adapter in every mode (a collective: every rank calls it). Under FSDP and
        DeepSpeed the trainable weights are gathered whole first: transformers writes nothing for a sharded state
        dict, and peft cannot save FSDP2's sharded tensors."""
        if not (self.is_fsdp_enabled or self.is_deepspeed_enabled):
            return super().save_model(output_dir, _internal_call)
        state = full_trainable_state(self.model)
        if self.args.should_save:
            self._save(output_dir or self.args.output_dir, state_dict=state)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        # TRL keeps QLoRA adapters in bfloat16, but peft upcasts adapters it loads to float32; a resumed run must
        # continue in the dtype it was trained in, or it drifts from the uninterrupted one.
        dtypes = {n: p.dtype for n, p in self.model.named_parameters() if p.requires_grad}
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        for name, param in self.model.named_parameters():
            if name in dtypes and param.dtype != dtypes[name]:
                param.data = param.data.to(dtypes[name])

    def create_model_card(self, *args, **kwargs):
        """TRL writes a generic README.md into output_dir at every checkpoint; finetune's card (finetune.export.card) is
        rendered from the run's own facts when it is merged or pushed."""

    # --- reporting and sampling --------------------------------------------------------------------------------

    def log(self, logs: dict, start_time: float | None = None) -> None:
        # Every training log (all ranks log together) carries finetune's throughput since the previous one and the
        # rows dropped so far, so progress lines and trackers (report_to) show them next to the loss.
        if "loss" in logs and self._last_log is not None:
            logs.update(self._interval_facts())
        super().log(logs, start_time)

    @contextlib.contextmanager
    def outside_training(self):
        """Time spent in here (a generation eval mid-run) is left out of the next log's tokens/s."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self._paused += time.perf_counter() - started

    def _interval_facts(self) -> dict:
        """Non-padding tokens/s, samples/s and padding fraction since the previous log, and rows dropped (pre-flight
        scan, and images that failed to decode in training), over all processes."""
        dropped = sum(len(rows) for rows in self.dropped_in_training.values())
        local = torch.cat([self.seen, torch.tensor([dropped])]).to(self.args.device)
        now, totals = time.perf_counter(), self.accelerator.reduce(local, "sum").cpu()
        then, before = self._last_log
        then += self._paused
        self._paused = 0.0
        self._last_log = (now, totals[:3])
        samples, tokens, padded = (int(x) for x in totals[:3] - before)
        seconds = max(now - then, 1e-9)
        facts = {"tokens_per_second": round(tokens / seconds, 1), "samples_per_second": round(samples / seconds, 3),
                 "padding_fraction": round(1 - tokens / padded, 4) if padded else 0.0}
        if self.rows_dropped_in_scan:
            facts["rows_dropped_in_scan"] = self.rows_dropped_in_scan
        if int(totals[3]):
            facts["rows_dropped_in_training"] = int(totals[3])
        return facts

    def throughput(self, seconds: float) -> dict:
        """Samples/s, non-padding tokens/s and padding fraction over all processes; call on every rank."""
        samples, tokens, padded = (int(x) for x in self.accelerator.reduce(self.seen.to(self.args.device), "sum"))
        facts = {"samples": samples, "tokens": tokens, "samples_per_second": round(samples / seconds, 3),
                 "tokens_per_second": round(tokens / seconds, 1),
                 "padding_fraction": round(1 - tokens / padded, 4) if padded else 0.0}
        if sum(self.packed_attention.values()):
            facts["packed_attention_calls"] = dict(self.packed_attention)
        # MFU only where training ran on CUDA: there the denominator is measured on the same card. On a CPU a peak
        # rate depends on threads, precision and whatever else the machine runs, so the figure would mean nothing.
        if self.args.device.type == "cuda" and self.matmul_rate:
            flops = float(self.accelerator.reduce(torch.tensor(self.model_flops, device=self.args.device), "sum"))
            facts.update(mfu_facts(flops, seconds, self.matmul_rate, self.accelerator.num_processes))
        return facts

    def get_train_dataloader(self):
        if not isinstance(self.train_dataset, StreamingRows):
            return super().get_train_dataloader()
        # The stream is split across ranks and batched by finetune.batching.streaming itself: accelerate must not shard
        # it again (it would read every row on every rank and keep every world_size-th batch).
        args = self.args
        return torch.utils.data.DataLoader(
            self.train_dataset, batch_size=None, collate_fn=self.train_dataset.collate,
            num_workers=args.dataloader_num_workers, pin_memory=args.dataloader_pin_memory and torch.cuda.is_available(),
            persistent_workers=args.dataloader_persistent_workers and args.dataloader_num_workers > 0,
            prefetch_factor=args.dataloader_prefetch_factor if args.dataloader_num_workers > 0 else None,
            # Its own generator: a new iterator must not draw from the global RNG, or a resumed run (which restores
            # that RNG before creating the iterator) would continue with other dropout masks.
            generator=torch.Generator().manual_seed(args.seed))

    def _get_train_sampler(self, train_dataset=None):
        if self.args.train_sampling_strategy != "group_by_length" or self.lengths is None:
            return super()._get_train_sampler(train_dataset)
        return EpochSeededLengthGroupedSampler(self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                               lengths=self.lengths, seed=self.args.data_seed or self.args.seed)


@contextlib.contextmanager
def lm_head_on_supervised_positions():
    """TRL's fused LM head projects only the positions whose next token carries a label, but only on Triton devices:
    elsewhere (CPU, MPS) it projects every position, so that XLA compilers see fixed tile shapes. With assistant-only
    labels that is 5-6x the work of the supervised positions at a 152k vocabulary (the largest single cost of a CPU
    step); finetune does not run on XLA, so the head scores the supervised positions on every other device too."""
    import trl.trainer.utils as trl_utils

    decide = getattr(trl_utils, "_use_triton", None)
    if decide is None:  # a TRL without the switch: nothing to change (tests/test_training.py notices)
        yield
        return
    trl_utils._use_triton = lambda device: device.type != "xla" or decide(device)
    try:
        yield
    finally:
        trl_utils._use_triton = decide


class DistributedCheck(TrainerCallback):
    """Once the model is prepared: read how it is distributed, stop if that is not what the run asked for, say it."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        ran = self.trainer.distributed = strategy_of(self.trainer)
        refuse_fallback(requested_strategy(args), ran)
        if state.is_world_process_zero:
            print(f"[finetune] distributed: {ran['strategy']}, world size {ran['world_size']}", flush=True)


class NumericProgress(ProgressCallback):
    """transformers 5's progress bar, but its log lines print numbers (`'loss': 7.54`), not strings (`'7.54'`)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None:
            self.training_bar.write(str({k: rounded(v) for k, v in (logs or {}).items() if k != "total_flos"}))


class EpochSeededLengthGroupedSampler(LengthGroupedSampler):
    """The order of epoch e depends only on (seed, e), so a run resumed mid-training sees the same batches."""

    def __init__(self, batch_size: int, lengths: list[int], seed: int):
        self.seed = seed
        super().__init__(batch_size, lengths=lengths, generator=torch.Generator().manual_seed(seed))

    def set_epoch(self, epoch: int) -> None:
        self.generator.manual_seed(self.seed + epoch)
