"""Sample lengths and supervised-token counts from image sizes alone: what the collator would produce, without
decoding or resizing a pixel.

The processor's own steps are followed, only the image processor is left out: the chat template is rendered with
the collator's reply spans, the processor lays the text out (PaliGemma's `<bos>` and trailing newline), each image
placeholder is replaced by the text the processor would put there for an image of that size (token counts from
the processor's own formulas, as vLLM uses them), and the result is tokenised with the processor's text settings.
Labels follow from the same spans and image-token rule as in `collate.py`. Rows with videos, and image settings
the formulas cannot see (Gemma 3 pan-and-scan), are measured by collating them for real.
"""

from __future__ import annotations

import torch
from PIL import Image

from .collate import IGNORE_INDEX, ChatCollator, _shift_spans, _span_mask, render_with_spans


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
        encoded = self.processor.tokenizer(texts, **self._text_kwargs(text))
        ids = torch.tensor(encoded["input_ids"][0])
        mask = _span_mask(torch.tensor(encoded["offset_mapping"][0]).reshape(-1, 2),
                          _shift_spans(spans, offsets[0]))
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

    def _replacement(self, size: tuple[int, int]) -> str:
        """The text an image of `size` (width, height) becomes in the prompt; how is the family table's entry."""
        if size not in self._replacements:
            width, height = size
            processor, how = self.processor, self.family.image_expansion
            if how == "count":
                count = processor._get_num_multimodal_tokens(image_sizes=[(height, width)])["num_image_tokens"][0]
                text = processor.image_token * int(count)
            elif how == "tiles":
                _, rows, cols = processor.image_processor.get_number_of_image_patches(height, width, {})
                text = processor.replace_image_token({"rows": [[rows]], "cols": [[cols]]}, 0)
            else:  # "fixed": the same text for every image
                text = processor.replace_image_token({"num_crops": [0]}, 0)
            self._replacements[size] = text
        return self._replacements[size]

    def _text_kwargs(self, text: str) -> dict:
        kwargs = self.processor._merge_kwargs(tokenizer_init_kwargs=self.processor.tokenizer.init_kwargs,
                                              **self.collator.text_kwargs([text]))["text_kwargs"]
        for key in ("return_tensors", "padding", "return_text_replacement_offsets", "return_mm_token_type_ids"):
            kwargs.pop(key, None)
        return kwargs
