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
        super().__init__(*args, **kwargs)

    def _get_train_sampler(self, train_dataset=None):
        if self.args.train_sampling_strategy != "group_by_length" or self.lengths is None:
            return super()._get_train_sampler(train_dataset)
        generator = torch.Generator().manual_seed(self.args.data_seed or self.args.seed)
        return LengthGroupedSampler(self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                    lengths=self.lengths, generator=generator)
