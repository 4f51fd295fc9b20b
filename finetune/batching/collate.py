"""Chat rows -> model inputs whose labels are the assistant replies (each closed by its end-of-turn token) only.

How the labels are found, the same way for every family:
1. The chat template is rendered for the conversation, and for each assistant turn also for the conversation up to
   that turn with the generation prompt; the difference is the reply, as characters of the rendered text. A
   template whose renderings are not prefixes of each other is refused rather than guessed at.
2. The processor expands image placeholders and tokenises, returning token character offsets and where each
   placeholder was expanded (`return_text_replacement_offsets`); reply spans are shifted past the expansions.
3. A token carries loss when it overlaps a reply span. Image tokens and padding are forced to -100 regardless.

Tokens are exactly those `processor.apply_chat_template(..., tokenize=True)` gives at inference time, with the
two documented exceptions of finetune.batching.template, applied identically in training and inference.

What the pre-flight scan and inference share with training: `render_with_spans` (text + reply spans) and `render`
(a prompt) from finetune.batching.template, and `encode` (text + images -> tensors) from finetune.batching.encoding.
`ChatCollator` is only these plus the label mask.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass

import torch

from ..data.rows import DataError
from ..models.families import Family
from .encoding import encode
from .template import TemplateError, render_with_spans

IGNORE_INDEX = -100


@dataclass
class ChatCollator:
    """Batches chat rows (`messages`, `images`) into padded tensors with assistant-only labels."""

    processor: object
    family: Family

    def __post_init__(self):
        tokenizer = self.processor.tokenizer
        tokenizer.padding_side = "right"  # training pads after the reply; generation uses left padding
        pattern = re.compile(rf"^(?:{self.family.image_tokens})$")
        vocab = tokenizer.get_vocab()
        self.image_token_ids = sorted(i for t, i in vocab.items() if pattern.match(t))
        if not self.image_token_ids:
            raise TemplateError(f"no token of the tokenizer matches the image tokens of {self.family.name}")

    def __call__(self, rows: list[dict]) -> dict:
        """A training batch. Rows whose images failed to decode (a truncated file the header check could not see, or
        one broken since the scan) are left out and listed under `dropped_rows` as (row id, problem); a batch with no
        row left is a stand-in (the last good row, nothing labelled) marked `skip_batch`, which every rank skips
        together (finetune.training.trainer), so a bad file never stops a run."""
        good = [row for row in rows if not row.get("problem")]
        dropped = [(row.get("row_id"), row["problem"]) for row in rows if row.get("problem")]
        if good:
            batch = self.encode_batch(good)
            self._stand_in = good[:1]
        elif getattr(self, "_stand_in", None):
            batch = self.encode_batch(self._stand_in)
            self.unsupervise(batch)
            batch["skip_batch"] = True
        else:
            raise DataError("no row of this batch could be loaded: " + "; ".join(
                f"row {row_id}: {problem}" for row_id, problem in dropped))
        if dropped:
            batch["dropped_rows"] = dropped
        return batch

    def encode_batch(self, rows: list[dict]) -> dict:
        """The training batch of rows that all loaded (a subclass encodes its own kind of row here)."""
        return self.encode_rows(rows)

    def unsupervise(self, batch: dict) -> None:
        """Nothing in `batch` carries loss (a stand-in batch)."""
        batch["labels"][:] = IGNORE_INDEX

    def encode_rows(self, rows: list[dict]) -> dict:
        """Padded tensors with assistant-only labels for rows whose images are decoded."""
        for row in rows:
            if row.get("problem"):
                raise DataError(f"row {row.get('row_id')}: {row['problem']}")
        texts, spans = zip(*(render_with_spans(self.processor, row["messages"], self.family) for row in rows))
        images = [list(row["images"]) for row in rows]
        videos = [list(v) for row in rows for v in row.get("videos") or []]
        batch = encode(self.processor, self.family, list(texts), images, videos, offsets=True)
        offsets = batch.pop("offset_mapping")
        replacements = batch.pop("text_replacement_offsets")

        labels = torch.full_like(batch["input_ids"], IGNORE_INDEX)
        for i, row_spans in enumerate(spans):
            mask = span_mask(offsets[i], shift_spans(row_spans, replacements[i]))
            labels[i, mask] = batch["input_ids"][i, mask]
        labels[torch.isin(batch["input_ids"], torch.tensor(self.image_token_ids))] = IGNORE_INDEX
        labels[batch["attention_mask"] == 0] = IGNORE_INDEX
        if self.family.prefix_lm:
            batch["token_type_ids"] = _causal_from_first_answer(labels, batch["attention_mask"])
        batch["labels"] = labels
        return batch


def shift_spans(spans, replacements) -> list[tuple[int, int]]:
    """Map character spans of the template text onto the text after image placeholders were expanded."""
    ends = [r["span"][1] for r in replacements]
    gained = [0]
    for r in replacements:
        gained.append(r["new_span"][1] - r["span"][1])
    return [tuple(c + gained[bisect.bisect_right(ends, c)] for c in span) for span in spans]


def span_mask(offsets: torch.Tensor, spans) -> torch.Tensor:
    starts, ends = offsets[:, 0], offsets[:, 1]
    mask = torch.zeros(len(offsets), dtype=torch.bool)
    for start, end in spans:
        mask |= (starts < end) & (ends > start)  # zero-width tokens (padding, added <bos>) never overlap
    return mask


def _causal_from_first_answer(labels: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    # Prefix-LM: 0 = bidirectional prefix (image + prompt), 1 = causal. Everything from the first answer token on
    # is causal, so no position can attend to a later answer token (TRL leaves all zeros here).
    supervised = labels != IGNORE_INDEX
    first = torch.where(supervised.any(1), supervised.int().argmax(1), torch.full((len(labels),), labels.shape[1]))
    positions = torch.arange(labels.shape[1]).unsqueeze(0)
    return ((positions >= first.unsqueeze(1)) & (attention_mask == 1)).long()
