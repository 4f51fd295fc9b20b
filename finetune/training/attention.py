"""Packed rows on the device (`training.packing`): the positions each sample has unpacked, and attention that keeps
every sample to itself without computing the other samples' scores.

finetune.batching.packing lays packs out as rows; the trainer's training step (finetune.training.trainer) calls
these with the model in hand.
"""

from __future__ import annotations

import contextlib
import inspect

import torch


def rope_positions(model, batch: dict) -> torch.Tensor | None:
    """The multimodal rope positions (3, samples, length) the model computes for this unpacked batch, or None where
    its positions are 1-D (the model's own `get_rope_index`, so packing can never drift from it)."""
    get_rope_index = getattr(model, "get_rope_index", None) or getattr(getattr(model, "model", None),
                                                                       "get_rope_index", None)
    if get_rope_index is None or not any(k in batch for k in ("image_grid_thw", "video_grid_thw")):
        return None
    accepted = inspect.signature(get_rope_index).parameters
    with torch.no_grad():
        positions, _ = get_rope_index(**{k: v for k, v in batch.items() if k in accepted})
    return positions



@contextlib.contextmanager
def attention_per_sample(rows: list[list[int]], decoder: torch.nn.Module):
    """SDPA attention for packed rows (`rows`: `row_segments`), one sample at a time.

    A packed row's mask is block-diagonal (every sample sees only itself), but SDPA with a mask computes the whole
    (row x row) score matrix and masks it: a 1024-token row of 6 samples does ~6x the attention work of its samples.
    Within the context, the decoder's SDPA calls on these rows attend block by block with the same mask's diagonal
    blocks: the same result (every off-diagonal entry is masked anyway), the work of the samples alone. Everything
    else (the vision tower, any module outside `decoder`) goes to transformers' SDPA unchanged. Spans the backward
    too: gradient checkpointing runs the attention again there."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
    length = sum(rows[0])
    in_decoder = {id(m) for m in decoder.modules()}
    checked: dict[tuple, tuple[torch.Tensor, bool]] = {}  # a mask serves every layer: each block is checked once

    def causal(block: torch.Tensor) -> bool:
        """Whether the block is exactly causal (no bidirectional image or prefix block, no window cutting it)."""
        where = (block.data_ptr(), block.shape, block.stride())
        if where not in checked:
            attends = block if block.dtype == torch.bool else block == 0
            lower = torch.ones(block.shape[-2:], dtype=torch.bool, device=block.device).tril()
            checked[where] = (block, bool((attends == lower).all()))  # keeps the block: its address stays its own
        return checked[where][1]

    def attend(module, query, key, value, attention_mask, **kwargs):
        if (id(module) not in in_decoder or attention_mask is None or query.shape[0] != len(rows)
                or query.shape[2] != length or key.shape[2] != length):
            return sdpa(module, query, key, value, attention_mask, **kwargs)
        pieces = []
        for b, blocks in enumerate(rows):
            mask = attention_mask[b if attention_mask.shape[0] > 1 else 0][None]
            start = 0
            for n in blocks:
                s = slice(start, start + n)
                block = mask[..., s, s]
                if causal(block):  # SDPA's causal kernel: no mask to read, nothing above the diagonal computed
                    block = None
                pieces.append(sdpa(module, query[b:b + 1, :, s], key[b:b + 1, :, s], value[b:b + 1, :, s],
                                   block, **{**kwargs, "is_causal": block is None})[0])
                start += n
        return torch.cat(pieces, dim=1).view(len(rows), length, *pieces[0].shape[2:]), None

    override = ALL_ATTENTION_FUNCTIONS._local_mapping.get("sdpa")
    ALL_ATTENTION_FUNCTIONS["sdpa"] = attend
    try:
        yield
    finally:
        if override is None:
            del ALL_ATTENTION_FUNCTIONS["sdpa"]
        else:
            ALL_ATTENTION_FUNCTIONS["sdpa"] = override


class LayerMasks(dict):
    """Attention masks per layer type, which transformers takes as already built. `sum()` counts the real tokens:
    TRL counts a batch's tokens by summing its attention mask."""

    def __init__(self, masks: dict, tokens: torch.Tensor):
        super().__init__(masks)
        self.tokens = tokens

    def sum(self) -> torch.Tensor:
        return self.tokens


def image_block_masks(config, packed: dict, dtype: torch.dtype, tokens: int) -> LayerMasks:
    """Masks for packed rows of a family whose image tokens attend bidirectionally within each image (Gemma 3).

    transformers detects the packing from the position ids and builds the full-attention layers' mask right, but
    gives its sliding-window layers the image blocks as an or-mask function that it then indexes by position within
    the sample, so they read another token's block. Here both masks take the blocks as `block_sequence_ids`
    (indexed by place in the row) and the sliding window as an and-mask over positions: the same masks as unpacked
    while an image's block is no longer than the window (256 tokens against Gemma 3's 1024)."""
    from transformers.masking_utils import create_causal_mask, sliding_window_overlay

    image = packed["token_type_ids"] == 1
    starts = image & ~torch.nn.functional.pad(image, (1, 0))[:, :-1]
    blocks = torch.where(image, starts.cumsum(1) - 1, -1)
    shape = packed["input_ids"].shape
    kwargs = dict(config=config, inputs_embeds=torch.empty(*shape, 0, dtype=dtype, device=blocks.device),
                  attention_mask=None, cache=None, position_ids=packed["position_ids"], block_sequence_ids=blocks)
    masks = {"full_attention": create_causal_mask(**kwargs)}
    if getattr(config, "sliding_window", None):
        masks["sliding_attention"] = create_causal_mask(
            **kwargs, and_mask_function=sliding_window_overlay(config.sliding_window))
    return LayerMasks(masks, torch.tensor(tokens, device=blocks.device))
