"""Sample lengths and supervised-token counts from image sizes alone: what the collator would produce, without
decoding or resizing a pixel.

The processor's own steps are followed, only the image processor is left out: the chat template is rendered with
the collator's reply spans, the processor lays the text out (PaliGemma's `<bos>` and trailing newline), each image
placeholder is replaced by the text the processor would put there for an image of that size (token counts from
the processor's own formulas, as vLLM uses them), and the result is tokenised with the processor's text settings.
Labels follow from the same spans and image-token rule as in finetune.batching.collate. Rows with videos, and image settings
the formulas cannot see (Gemma 3 pan-and-scan), are measured by collating them for real.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from .collate import IGNORE_INDEX, ChatCollator, shift_spans, span_mask
from .encoding import tokenizer_kwargs
from .template import render_with_spans


class Measurer:
    """`measure(sample) -> (tokens, supervised tokens)` for chat rows whose images are (width, height) sizes or
    PIL images; equal to `ChatCollator([sample])`'s attention-mask and label counts."""

    def __init__(self, processor, family):
        self.processor = processor
        self.family = family
        self.collator = ChatCollator(processor, family)
        self.image_token_ids = torch.tensor(self.collator.image_token_ids)
        self._replacements: dict[tuple[int, int], str] = {}
        image_processor = getattr(processor, "image_processor", None)
        # Pan-and-scan crops depend on the image content's layout rules, not on a size formula we can call.
        self.sizes_suffice = not getattr(image_processor, "do_pan_and_scan", False)

    def measure(self, sample: dict) -> tuple[int, int]:
        if sample["videos"] or not sample["images"] or not self.sizes_suffice:
            return self.collated(sample)  # text-only rows cost nothing to collate
        text, spans = render_with_spans(self.processor, sample["messages"], self.family)
        sizes = [image.size if isinstance(image, Image.Image) else tuple(image) for image in sample["images"]]
        texts = self._layout(text, len(sizes))
        replacements = [self._replacement(size) for size in sizes]
        texts, offsets = self.processor.get_text_with_replacements(texts, images_replacements=replacements)
        encoded = self.processor.tokenizer(texts, **self.text_kwargs(text))
        ids = torch.from_numpy(np.asarray(encoded["input_ids"][0], dtype=np.int64))
        token_offsets = torch.from_numpy(np.asarray(encoded["offset_mapping"][0], dtype=np.int64).reshape(-1, 2))
        mask = span_mask(token_offsets, shift_spans(spans, offsets[0]))
        mask &= ~torch.isin(ids, self.image_token_ids)
        return len(ids), int(mask.sum())

    def collated(self, sample: dict) -> tuple[int, int]:
        """The exact figures from the collator itself (needs decoded images)."""
        batch = self.collator([sample])
        return int(batch["attention_mask"].sum()), int((batch["labels"] != IGNORE_INDEX).sum())

    def _layout(self, text: str, images: int) -> list[str]:
        # The processor's own text layout step, with 1-pixel stand-ins: it only counts and nests the images.
        stand_ins = [Image.new("RGB", (1, 1))] * images or None
        return list(self.processor.prepare_inputs_layout(images=stand_ins, text=[text])[1])

    def prepare(self, sizes) -> None:
        """Work out the image text of many (width, height) sizes in one call (the processor's per-call setup costs
        more than the formula); `measure` then finds them ready."""
        self._add_replacements([tuple(size) for size in sizes])

    def _replacement(self, size: tuple[int, int]) -> str:
        """The text an image of `size` (width, height) becomes in the prompt; how is the family table's entry."""
        if size not in self._replacements:
            self._add_replacements([size])
        return self._replacements[size]

    def _add_replacements(self, sizes: list[tuple[int, int]]) -> None:
        sizes = list(dict.fromkeys(s for s in sizes if s not in self._replacements))
        if not sizes:
            return
        processor, how = self.processor, self.family.image_expansion
        if how in ("count", "soft_tokens"):
            counts = processor._get_num_multimodal_tokens(image_sizes=[(h, w) for w, h in sizes])["num_image_tokens"]
            texts = [processor.image_token * int(count) if how == "count" else
                     processor.replace_image_token({"num_soft_tokens_per_image": [int(count)]}, 0) for count in counts]
        elif how == "tiles":
            patches = [processor.image_processor.get_number_of_image_patches(h, w, {}) for w, h in sizes]
            texts = [processor.replace_image_token({"rows": [[rows]], "cols": [[cols]]}, 0) for _, rows, cols in patches]
        else:  # "fixed": the same text for every image
            texts = [processor.replace_image_token({"num_crops": [0]}, 0)] * len(sizes)
        self._replacements.update(zip(sizes, texts))

    def text_kwargs(self, text: str) -> dict:
        """The collator's tokenizer settings for `text`, with character offsets.

        The processors' own text defaults (padding off, token-type ids) do not change which tokens come out, so they
        are not merged in: `_merge_kwargs` is private and changed signature between transformers 5.17 and 5.24.
        """
        return {"return_offsets_mapping": True, **tokenizer_kwargs(self.processor, [text])}
