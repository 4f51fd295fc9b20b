"""What finetune adds to every TRL trainer it uses (`Guarded`, mixed in before TRL's class by each method module:
finetune.training.sft, finetune.training.dpo): length-grouped batches from the scan's lengths, health guards, atomic
checkpoints, throughput counted over real tokens, packed rows laid out on the device, streams served as they are
read."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from transformers.trainer_callback import TrainerCallback
from transformers.trainer_pt_utils import LengthGroupedSampler

from ..batching.packing import PackedRows
from ..batching.streaming import StreamingRows
from . import checkpoints
from .attention import packed_inputs
from .dropped import DroppedRows
from .guards import STAND_IN, HealthMonitor, SaveOnInterrupt, must_skip, refuse_nonfinite_weights, zero_loss
from .progress import LogFile, show_progress
from .sharding import enable_fsdp_on_cpu, full_trainable_state, refuse_fallback, requested_strategy, strategy_of
from .throughput import Throughput


class Guarded:
    """What finetune adds to a TRL trainer (mixed in before it: `class Trainer(Guarded, SFTTrainer)`).

    `lengths` are the token counts the pre-flight scan measured, one per training sample, in dataset order: with
    `training.train_sampling_strategy: group_by_length`, transformers would read a length column of the dataset
    (decoding every image to build it) or guess from `input_ids`. `progress`: the method's figures shown on each
    progress line (finetune.recipe.methods).
    """

    def __init__(self, *args, lengths: list[int] | None = None, health: HealthMonitor | None = None,
                 rows_dropped_in_scan: int = 0, family=None, progress: tuple[str, ...] = (), **kwargs):
        stream = kwargs.get("train_dataset")
        served_later = isinstance(stream, (StreamingRows, PackedRows))
        if served_later:
            kwargs["train_dataset"] = placeholder_for_trl()
        self.lengths, self.family = lengths, family  # the family (finetune.models.families) lays packed rows out
        self.rows_dropped_in_scan = rows_dropped_in_scan  # reported with the loss, for trackers
        self.health = health or HealthMonitor("stop", None)
        self.interrupt = SaveOnInterrupt()
        self.counts = Throughput()
        self.dropped = DroppedRows()
        self.distributed: dict | None = None  # {strategy, world_size}, read from the prepared model (strategy_of)
        self._stand_in = False  # the current batch is a stand-in (no row of it could be decoded)
        self._packed_tokens: int | None = None  # real tokens of the current packed batch (TRL counts positions)
        self._staging: Path | None = None
        super().__init__(*args, **kwargs)
        if served_later:
            self.train_dataset = stream
        for callback in (self.interrupt, DistributedCheck(self), LogFile()):
            self.add_callback(callback)
        show_progress(self.callback_handler, progress)

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        if enable_fsdp_on_cpu(self.accelerator, self.args):  # accelerate turns FSDP on for GPUs only
            self.is_fsdp_enabled = True

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.counts.start()
        self._stand_in = self.dropped.take(inputs)
        # Counted where batches arrive (the collator may run in dataloader workers, whose counts would be lost).
        mask = inputs["attention_mask"]
        counts = [mask.shape[0], int(mask.sum()), mask.numel()]
        # MFU is counted for SFT batches (labels over the rows): a DPO or GRPO step's work has another shape.
        if not self._stand_in and self.args.device.type == "cuda" and self.family is not None and "labels" in inputs:
            self.counts.count_flops(self.accelerator.unwrap_model(model), inputs, self.family, self.args.device)
        self._packed_tokens, attention = None, contextlib.nullcontext()
        if "pack_sizes" in inputs:
            inputs, attention = self.pack(model, inputs)
            counts[2], self._packed_tokens = inputs["input_ids"].numel(), counts[1]
        if not self._stand_in:
            self.counts.count(*counts)
        with attention:
            return super().training_step(model, inputs, num_items_in_batch)

    def pack(self, model, inputs: dict):
        """A collated batch of packs as packed rows laid out for this model's attention, and the context to train
        them in (finetune.training.attention)."""
        base = self.accelerator.unwrap_model(model)
        base = base.get_base_model() if hasattr(base, "get_base_model") else base
        return packed_inputs(base, inputs, self.family, self.processing_class.tokenizer.pad_token_id,
                             used=self.counts.packed_attention)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        self.dropped.take(inputs)
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)

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
        skip = must_skip(result[0] if return_outputs else result, self._stand_in, self.health,
                         self.state.global_step + 1)
        if skip is None:
            return result
        self.dropped.skipped_batches += skip == STAND_IN
        return (zero_loss(model), result[1]) if return_outputs else zero_loss(model)

    def _get_grad_norm(self, model, grad_norm=None):
        # Private: the only place the step's gradient norm is seen before the optimizer applies it.
        grad_norm = super()._get_grad_norm(model, grad_norm)
        if not self.health.check_grad_norm(grad_norm, self.state.global_step + 1, loss_scaled=self.args.fp16):
            model.zero_grad()  # skip: the optimizer steps with zero gradients
        return grad_norm

    def _get_output_dir(self, trial):
        # Private: where transformers writes a checkpoint; the staging folder while one is written.
        return str(self._staging) if self._staging is not None else super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial):
        # Private: transformers writes a checkpoint in place; finetune's appear whole or not at all (checkpoints).
        refuse_nonfinite_weights(self.model, self.state.global_step)
        with checkpoints.staged(self, Path(super()._get_output_dir(trial))) as self._staging:
            try:
                super()._save_checkpoint(model, trial)  # everything lands in .partial/checkpoint-N
            finally:
                self._staging = None

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The adapter as an ordinary PEFT adapter in every mode (a collective). Under FSDP and DeepSpeed the
        trainable weights are gathered whole first: transformers writes nothing for a sharded state dict and peft
        cannot save FSDP2's sharded tensors."""
        if not (self.is_fsdp_enabled or self.is_deepspeed_enabled):
            return super().save_model(output_dir, _internal_call)
        state = full_trainable_state(self.model)
        if self.args.should_save:
            self._save(output_dir or self.args.output_dir, state_dict=state)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        # Private: the only point between peft loading the adapter and the optimizer state being loaded onto it.
        with checkpoints.trainable_dtypes_kept(self.model):
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def create_model_card(self, *args, **kwargs):
        """None: finetune's card (finetune.export.card) is rendered from the run's facts at merge or push."""

    def log(self, logs: dict, start_time: float | None = None) -> None:
        # Every training log (all ranks log together) carries finetune's throughput since the previous one and the
        # rows dropped so far, so progress lines and trackers (report_to) show them next to the loss.
        if "loss" in logs and self.counts.started:
            logs.update(self.counts.interval(self.accelerator.reduce, self.args.device, self.dropped.count(),
                                             self.rows_dropped_in_scan))
        super().log(logs, start_time)

    def throughput(self, seconds: float) -> dict:
        """Samples/s, non-padding tokens/s, padding fraction (and MFU on CUDA) of the run; call on every rank."""
        return self.counts.totals(self.accelerator.reduce, self.args.device, seconds, self.accelerator.num_processes)

    def get_train_dataloader(self):
        if isinstance(self.train_dataset, StreamingRows):
            return self.train_dataset.dataloader(self.args)
        return super().get_train_dataloader()

    def _get_train_sampler(self, train_dataset=None):
        # Private: transformers' only seam for the sampler; the scan's lengths instead of a decoded length column.
        if self.args.train_sampling_strategy != "group_by_length" or self.lengths is None:
            return super()._get_train_sampler(train_dataset)
        return EpochSeededLengthGroupedSampler(self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                               lengths=self.lengths, seed=self.args.data_seed or self.args.seed)


def placeholder_for_trl():
    """TRL accepts only `datasets` datasets and peeks at one sample (to see images). A stream or packed rows are
    not one, and peeking would read them: TRL is set up on this placeholder, and the rows are put in place after."""
    import datasets

    return datasets.Dataset.from_dict({"images": [[]], "messages": [[]]})


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


class EpochSeededLengthGroupedSampler(LengthGroupedSampler):
    """The order of epoch e depends only on (seed, e), so a run resumed mid-training sees the same batches."""

    def __init__(self, batch_size: int, lengths: list[int], seed: int):
        self.seed = seed
        super().__init__(batch_size, lengths=lengths, generator=torch.Generator().manual_seed(seed))

    def set_epoch(self, epoch: int) -> None:
        self.generator.manual_seed(self.seed + epoch)
