"""finetune's SFTTrainer: TRL's, with batches grouped by each sample's true length after image expansion."""

from __future__ import annotations

import torch
from transformers.trainer_pt_utils import LengthGroupedSampler
from trl import SFTTrainer


class Trainer(SFTTrainer):
    """`lengths` are the token counts the pre-flight scan measured, one per training sample, in dataset order.

    With `training.train_sampling_strategy: group_by_length`, transformers would read a length column of the
    dataset (decoding every image to build it) or guess from `input_ids`; the scan already knows the real lengths.
    """

    def __init__(self, *args, lengths: list[int] | None = None, **kwargs):
        self.lengths = lengths
        self.seen = torch.zeros(3, dtype=torch.long)  # samples, real tokens, padded positions (this process)
        super().__init__(*args, **kwargs)

    def training_step(self, model, inputs, num_items_in_batch=None):
        # Counted where batches arrive (the collator may run in dataloader workers, whose counts would be lost).
        mask = inputs["attention_mask"]
        self.seen += torch.tensor([mask.shape[0], int(mask.sum()), mask.numel()])
        return super().training_step(model, inputs, num_items_in_batch)

    def throughput(self, seconds: float) -> dict:
        """Samples/s, non-padding tokens/s and padding fraction over all processes; call on every rank."""
        samples, tokens, padded = (int(x) for x in self.accelerator.reduce(self.seen.to(self.args.device), "sum"))
        return {"samples": samples, "tokens": tokens, "samples_per_second": round(samples / seconds, 3),
                "tokens_per_second": round(tokens / seconds, 1),
                "padding_fraction": round(1 - tokens / padded, 4) if padded else 0.0}

    def _get_train_sampler(self, train_dataset=None):
        if self.args.train_sampling_strategy != "group_by_length" or self.lengths is None:
            return super()._get_train_sampler(train_dataset)
        generator = torch.Generator().manual_seed(self.args.data_seed or self.args.seed)
        return LengthGroupedSampler(self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                    lengths=self.lengths, generator=generator)
