"""Chat rows -> model inputs whose labels are the assistant replies (each closed by its end-of-turn token) only.

How the labels are found, the same way for every family:
1. The chat template is rendered for the conversation, and for each assistant turn also for the conversation up to
   that turn with the generation prompt; the difference is the reply, as characters of the rendered text. A
   template whose renderings are not prefixes of each other is refused rather than guessed at.
2. The processor expands image placeholders and tokenises, returning token character offsets and where each
   placeholder was expanded (`return_text_replacement_offsets`); reply spans are shifted past the expansions.
3. A token carries loss when it overlaps a reply span. Image tokens and padding are forced to -100 regardless.

Tokens are exactly those `processor.apply_chat_template(..., tokenize=True)` gives at inference time.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass

import torch

from .families import Family

IGNORE_INDEX = -100


class TemplateError(ValueError):
    """The chat template renders a conversation in a way labels cannot be derived from."""


def render_with_spans(processor, messages: list[dict], family: Family) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of every assistant reply (with its end-of-turn)."""

    def render(msgs: list[dict], generation_prompt: bool = False) -> str:
        return processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)

    full = render(messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render(messages[:i], generation_prompt=True)
        upto = render(messages[: i + 1])
        if not (upto.startswith(prompt) and full.startswith(upto)):
            raise TemplateError(
                f"assistant turn {i}: the chat template does not render the conversation up to this turn as a prefix "
                "of the whole conversation, so reply tokens cannot be located"
            )
        reply = upto[len(prompt):].rstrip()
        if not reply.endswith(family.end_of_turn):
            raise TemplateError(
                f"assistant turn {i}: the rendered reply does not end with the end-of-turn token "
                f"{family.end_of_turn!r}: {reply[-60:]!r}"
            )
        spans.append((len(prompt), len(prompt) + len(reply)))
    if family.bos_after_images:
        spans = _shift_for_bos_after_images(full, spans, processor)
    return full, spans


def _shift_for_bos_after_images(text: str, spans: list[tuple[int, int]], processor) -> list[tuple[int, int]]:
    # PaliGemma's processor inserts <bos> after the last image token before tokenising; spans after it move.
    image_token = processor.image_token
    if image_token not in text:
        return spans
    at = text.rfind(image_token) + len(image_token)
    n = len(processor.tokenizer.bos_token)
    return [(s + n if s >= at else s, e + n if e >= at else e) for s, e in spans]


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
        texts, spans = zip(*(render_with_spans(self.processor, row["messages"], self.family) for row in rows))
        images = [list(row["images"]) for row in rows]
        bos = self.processor.tokenizer.bos_token
        kwargs = dict(padding=True, return_tensors="pt", return_offsets_mapping=True,
                      return_text_replacement_offsets=True)
        if bos and all(t.startswith(bos) for t in texts):
            kwargs["add_special_tokens"] = False  # the template wrote <bos>; don't add a second (as transformers)
        batch = self.processor(text=list(texts), images=images if any(images) else None, **kwargs)
        offsets = batch.pop("offset_mapping")
        replacements = batch.pop("text_replacement_offsets", None) or [[] for _ in rows]
        batch.pop("labels", None)  # PaliGemma's processor makes its own (wrong for chat) labels

        labels = torch.full_like(batch["input_ids"], IGNORE_INDEX)
        for i, row_spans in enumerate(spans):
            mask = _span_mask(offsets[i], _shift_spans(row_spans, replacements[i]))
            labels[i, mask] = batch["input_ids"][i, mask]
        labels[torch.isin(batch["input_ids"], torch.tensor(self.image_token_ids))] = IGNORE_INDEX
        labels[batch["attention_mask"] == 0] = IGNORE_INDEX
        if self.family.prefix_lm:
            batch["token_type_ids"] = _causal_from_first_answer(labels, batch["attention_mask"])
        batch["labels"] = labels
        return batch


def _shift_spans(spans, replacements) -> list[tuple[int, int]]:
    """Map character spans of the template text onto the text after image placeholders were expanded."""
    ends = [r["span"][1] for r in replacements]
    gained = [0]
    for r in replacements:
        gained.append(r["new_span"][1] - r["span"][1])
    return [tuple(c + gained[bisect.bisect_right(ends, c)] for c in span) for span in spans]


def _span_mask(offsets: torch.Tensor, spans) -> torch.Tensor:
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
