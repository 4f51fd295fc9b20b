"""Streaming training data (`data.streaming: true`): rows are read as they arrive and never listed up front.

Each rank reads the stream and keeps every world_size-th row (row id = position in the stream). Every row is checked
as it arrives, with the pre-flight scan's header check and lengths (finetune.batching.lengths) and the same drop reasons,
counted through the trainer like rows that fail to decode. Kept rows fill a shuffle buffer that is cut into
length-grouped batches; images are decoded per batch, in the dataloader workers. The batch order depends only on
(seed, epoch), so a resumed run replays the stream's rows (header checks and lengths, no image decoding) up to the
checkpoint's batch and continues from the very next sample. The stream repeats (epoch + 1) until
`training.max_steps`.
"""

from __future__ import annotations

import itertools
import os
import random

import torch

from ..data.formats import expand_captions
from ..data.rows import ROW_ID, RowReader, load_rows, read_row, rename_columns
from .scan import NO_SUPERVISED, DataRefused, decide, measure_list, measure_sample, too_long

#: Batches are grouped by length within chunks of this many batches (as transformers' LengthGroupedSampler).
GROUP_BATCHES = 16


def stream_rows(cfg, split: str):
    """The split as a `datasets.IterableDataset` of source rows (columns renamed, captions expanded)."""
    rows = load_rows(cfg.path, split, cfg.max_samples, streaming=True)
    rows = rename_columns(rows, cfg, split)
    if cfg.expand_captions:
        rows = rows.map(expand_captions, batched=True)
    return rows


class StreamingRows(torch.utils.data.IterableDataset):
    """Length-grouped batches of checked rows, for this rank; each item is a batch the `collate` method encodes."""

    def __init__(self, rows, reader: RowReader, measurer, collator, max_length: int | None, batch_size: int,
                 buffer_size: int, seed: int, start_batch: int = 0):
        self.rows, self.reader, self.measurer, self.collator = rows, reader, measurer, collator
        self.max_length, self.batch_size, self.buffer_size = max_length, batch_size, max(buffer_size, batch_size)
        self.seed, self.start_batch = seed, start_batch
        self.rank, self.world_size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        pending: list[tuple[int, str]] = []  # rows dropped since the previous batch: reported with the next one
        index = itertools.count()
        for epoch in itertools.count():
            batches = 0
            for batch, dropped in self.batches(epoch):
                pending += dropped
                if not batch:  # drops at the end of a pass: reported with the next batch
                    continue
                batches += 1
                k = next(index)
                if k < self.start_batch:  # resuming: these batches were trained before the checkpoint
                    continue
                if k % workers == worker:  # dataloader workers take turns, so batches keep their order
                    yield {"rows": batch, "dropped": pending}
                pending = []
            if not batches:
                reasons = sorted({problem.partition(": ")[0] for _, problem in pending})
                raise DataRefused(f"data.streaming: no trainable row in the stream for rank {self.rank} "
                                  f"({len(pending)} rows dropped: {', '.join(reasons) or 'the stream is empty'})")

    def batches(self, epoch: int):
        """(rows of one batch, rows dropped while reading them) for one pass over this rank's share."""
        rng = random.Random(self.seed * 100_003 + epoch)
        buffer, dropped = [], []
        for position, row in enumerate(self.source()):
            if position % self.world_size != self.rank:
                continue
            kept, problem = self.check(row)
            if problem:
                dropped.append((position, problem))
                continue
            buffer.append((kept, position, row))
            if len(buffer) == self.buffer_size:
                for batch in self.grouped(buffer, rng):
                    yield batch, dropped
                    dropped = []
                buffer = []
        for batch in self.grouped(buffer, rng):
            yield batch, dropped
            dropped = []
        if dropped:
            yield [], dropped

    def source(self):
        """The stream's rows, all of them, in every dataloader worker. (Iterating the `datasets` stream directly
        would hand each worker only some of its file shards, and none to workers beyond the shard count.)"""
        for batch in self.rows.iter(batch_size=256):
            keys = list(batch)
            for values in zip(*batch.values()):
                yield dict(zip(keys, values))

    def check(self, row: dict) -> tuple[int, str | None]:
        """(length, None) for a trainable row, else (0, "reason: detail") with the pre-flight scan's reasons."""
        sample, problem = read_row(self.reader.sized, dict(row))
        if problem:
            return 0, problem
        length, supervised, problem = measure_sample(self.measurer.measure, sample)
        if problem:
            return 0, problem
        if self.max_length is not None and length > self.max_length:
            return 0, f"{too_long(self.max_length)}: {length} tokens after image expansion"
        if supervised == 0:
            return 0, f"{NO_SUPERVISED}: nothing for the assistant to learn"
        return length, None

    def grouped(self, buffer: list, rng: random.Random) -> list[list]:
        """The buffer shuffled, cut into batches of similar length, in shuffled order."""
        rng.shuffle(buffer)
        chunk = self.batch_size * GROUP_BATCHES
        batches = []
        for start in range(0, len(buffer), chunk):
            ordered = sorted(buffer[start:start + chunk], key=lambda item: -item[0])
            batches += [ordered[i:i + self.batch_size] for i in range(0, len(ordered), self.batch_size)]
        rng.shuffle(batches)
        return [[(position, row) for _, position, row in batch] for batch in batches]

    def collate(self, item: dict) -> dict:
        """Decode the batch's images and encode it (ChatCollator); rows dropped on the way travel with it."""
        rows = []
        for position, row in item["rows"]:
            sample, problem = read_row(self.reader.decoded, dict(row))
            rows.append({**sample, ROW_ID: position, "problem": problem})
        rows += [{"messages": [], "images": [], "videos": [], ROW_ID: position, "problem": problem}
                 for position, problem in item["dropped"]]
        return self.collator(rows)

    def dataloader(self, args) -> torch.utils.data.DataLoader:
        """The loader of this stream under TrainingArguments `args`. The stream is split across ranks and batched
        here: accelerate must not shard it again (it would read every row on every rank and keep every
        world_size-th batch)."""
        workers = args.dataloader_num_workers
        return torch.utils.data.DataLoader(
            self, batch_size=None, collate_fn=self.collate, num_workers=workers,
            pin_memory=args.dataloader_pin_memory and torch.cuda.is_available(),
            persistent_workers=args.dataloader_persistent_workers and workers > 0,
            prefetch_factor=args.dataloader_prefetch_factor if workers > 0 else None,
            # Its own generator: a new iterator must not draw from the global RNG, or a resumed run (which restores
            # that RNG before creating the iterator) would continue with other dropout masks.
            generator=torch.Generator().manual_seed(args.seed))


def streamed(recipe, family, collator, measurer, start_step: int = 0):
    """The training stream for `recipe`, and the pre-flight report and chat rows of its first `data.preview_rows`
    rows (the report is for information: the whole stream is checked as it is read)."""
    cfg, training = recipe.data, recipe.training
    reader = RowReader(cfg, videos_as_images=not family.video_input)
    rows = stream_rows(cfg, cfg.train_split)
    preview = [{**row, ROW_ID: i} for i, row in enumerate(itertools.islice(rows, cfg.preview_rows))]
    report = decide(measure_list(preview, reader, measurer), training.max_length, "drop", cfg.on_bad_image)
    stream = StreamingRows(rows, reader, measurer, collator, training.max_length,
                           training.per_device_train_batch_size, cfg.shuffle_buffer,
                           training.data_seed or training.seed,
                           start_batch=start_step * training.gradient_accumulation_steps)
    return stream, report, PreviewRows([preview[i] for i in report.kept], reader)


class PreviewRows:
    """The preview's kept rows as decoded chat rows (what evaluation's baselines read from the training data)."""

    def __init__(self, rows: list[dict], reader: RowReader):
        self.rows, self.reader = rows, reader

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        row = dict(self.rows[i])
        row_id = row.pop(ROW_ID)
        sample, problem = read_row(self.reader.decoded, row)
        return {**sample, ROW_ID: row_id, "problem": problem}
