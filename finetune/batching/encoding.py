"""Rendered texts and their images -> tensors, as the model's processor makes them, including the batches the
processors cannot make themselves (rows with and without images together; Mllama; PaliGemma's text-only rows)."""

from __future__ import annotations

import torch

from ..models.families import Family


def encode(processor, family: Family, texts: list[str], images: list[list], videos: list[list] | None = None,
           offsets: bool = False):
    """Rendered texts and their images -> a BatchFeature of tensors, as the model's processor makes them.

    With `offsets`, also `offset_mapping` (a tensor) and `text_replacement_offsets` (per row, where each image
    placeholder was expanded). Handles what the processors do not: rows with and rows without images in one
    batch (transformers cannot turn the ragged replacement lists into a tensor when the first row has none;
    Mllama's image processor fails then; PaliGemma's processor puts `<bos>` mid-text in a row without `<image>`
    and refuses a batch without images)."""
    from transformers import BatchFeature

    n = len(texts)
    has_image = [bool(i) for i in images]
    if family.processor_adds_bos_and_newline and not all(has_image):
        return _paligemma_mixed(processor, family, texts, images, offsets)
    order = list(range(n))
    if family.image_rows_first and any(has_image) and not all(has_image):
        order = [i for i in order if has_image[i]] + [i for i in order if not has_image[i]]
    texts = [texts[i] for i in order]
    images = [list(images[i]) for i in order]
    kwargs = dict(padding=True, return_tensors=None, **tokenizer_kwargs(processor, texts))
    if offsets:
        kwargs.update(return_offsets_mapping=True, return_text_replacement_offsets=True)
    if videos:
        kwargs["videos"] = videos
    out = processor(text=texts, images=images if any(images) else None, **kwargs)
    replacements = out.pop("text_replacement_offsets", None)
    # Converted here, not by the processor: its conversion trips over ragged replacement lists.
    batch = BatchFeature(dict(out), tensor_type="pt")
    batch.pop("labels", None)  # PaliGemma's processor makes its own (wrong for chat) labels
    if family.image_rows_first:
        _pad_image_rows(batch, n)
    if order != list(range(n)):
        back = sorted(range(n), key=order.__getitem__)
        for key, value in batch.items():
            batch[key] = value[back]
        replacements = [replacements[i] for i in back] if replacements is not None else None
    if offsets:
        batch["text_replacement_offsets"] = replacements or [[] for _ in range(n)]
    return batch


def tokenizer_kwargs(processor, texts: list[str]) -> dict:
    """Tokenizer settings that change which tokens come out (the pre-flight scan measures with them too)."""
    bos = processor.tokenizer.bos_token
    if bos and all(t.startswith(bos) for t in texts):
        return {"add_special_tokens": False}  # the template wrote <bos>; don't add a second (as transformers)
    return {}


def _pad_image_rows(batch, n: int) -> None:
    """Mllama's image processor leaves rows without images out of `aspect_ratio_ids`/`aspect_ratio_mask` (they are
    last here): pad them as it pads a missing image (id 0, first tile unmasked, so no attention row is empty)."""
    for key in ("aspect_ratio_ids", "aspect_ratio_mask"):
        value = batch.get(key)
        if value is None or value.shape[0] == n:
            continue
        pad = torch.zeros((n - value.shape[0], *value.shape[1:]), dtype=value.dtype)
        if key == "aspect_ratio_mask":
            pad[..., 0] = 1
        batch[key] = torch.cat([value, pad])


def _paligemma_mixed(processor, family: Family, texts, images, offsets: bool):
    """PaliGemma with text-only rows: image rows through the processor, text-only rows laid out as the processor
    lays out a prompt without image ("<bos>{text}\\n"), then padded into one batch on the tokenizer's side."""
    from transformers import BatchFeature

    tokenizer = processor.tokenizer
    keys = ["input_ids", "attention_mask", "token_type_ids"] + (["offset_mapping"] if offsets else [])
    rows, replacements, pixel_values = {}, {}, None
    image_rows = [i for i, im in enumerate(images) if im]
    if image_rows:
        enc = encode(processor, family, [texts[i] for i in image_rows], [images[i] for i in image_rows],
                     offsets=offsets)
        pixel_values = enc["pixel_values"]  # one entry per image, in row order: text-only rows add none
        for j, i in enumerate(image_rows):
            real = enc["attention_mask"][j] == 1
            rows[i] = {k: enc[k][j][real] for k in keys}
            replacements[i] = enc["text_replacement_offsets"][j] if offsets else []
    for i, text in enumerate(texts):
        if i not in rows:
            enc = tokenizer(tokenizer.bos_token + text + "\n", add_special_tokens=False, return_tensors="pt",
                            return_offsets_mapping=offsets, return_token_type_ids=True)
            rows[i], replacements[i] = {k: enc[k][0] for k in keys}, []
    length = max(len(r["input_ids"]) for r in rows.values())
    fill = {"input_ids": tokenizer.pad_token_id, "attention_mask": 0, "token_type_ids": 0, "offset_mapping": 0}
    left = tokenizer.padding_side == "left"
    batch = {}
    for k in keys:
        padded = []
        for i in range(len(texts)):
            v = rows[i][k]
            pad = torch.full((length - len(v), *v.shape[1:]), fill[k], dtype=v.dtype)
            padded.append(torch.cat([pad, v] if left else [v, pad]))
        batch[k] = torch.stack(padded)
    if pixel_values is not None:
        batch["pixel_values"] = pixel_values
    if offsets:
        batch["text_replacement_offsets"] = [replacements[i] for i in range(len(texts))]
    return BatchFeature(batch)
