"""Packed rows on the device (`training.packing`): the positions each sample has unpacked, and attention that keeps
every sample to itself without computing the other samples' scores.

finetune.batching.packing lays packs out as rows; the trainer's training step (finetune.training.trainer) calls
these (`packed_inputs`) with the model in hand; scripts/bench_sides.py lays out its packed rows the same way.

Attention over packed rows on SDPA, by `kernel`:
  per_sample  SDPA one sample at a time (a Python loop over the samples of every row, in every layer): exact
              everywhere, and the only way for families with bidirectional image or prefix blocks;
  varlen      one variable-length flash-attention call per layer for the whole batch (torch's own
              `torch.nn.attention.varlen.varlen_attn`, else the flash-attn package's `flash_attn_varlen_func`):
              CUDA only, bf16/fp16, causal samples only; any call it cannot take goes to per_sample;
  auto        varlen where it runs, per_sample elsewhere (the CPU).
flex_attention is not used: in torch 2.14 it has no backward on the CPU (so no CPU test could train through it), and
on a GPU it compiles first, which costs a short run more than it saves.
"""

from __future__ import annotations

import contextlib
import functools
import inspect

import torch

from ..batching.packing import pack_batch, row_segments
from ..models.families import FAMILIES


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
def attention_per_sample(rows: list[list[int]], decoder: torch.nn.Module, kernel: str = "per_sample",
                         used: dict | None = None):
    """SDPA attention for packed rows (`rows`: `row_segments`), one sample at a time, or (`kernel` varlen/auto, see
    the module docstring) in one variable-length call. `used` counts the calls each way took (the GPU check reports
    it, and the tests assert which path ran).

    A packed row's mask is block-diagonal (every sample sees only itself), but SDPA with a mask computes the whole
    (row x row) score matrix and masks it: a 1024-token row of 6 samples does ~6x the attention work of its samples.
    Within the context, the decoder's SDPA calls on these rows attend block by block with the same mask's diagonal
    blocks: the same result (every off-diagonal entry is masked anyway), the work of the samples alone. Everything
    else (the vision tower, any module outside `decoder`) goes to transformers' SDPA unchanged. Spans the backward
    too: gradient checkpointing runs the attention again there."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
    used = {"varlen": 0, "per_sample": 0} if used is None else used
    varlen = varlen_kernel() if kernel in ("auto", "varlen") else None
    if kernel == "varlen" and varlen is None:
        raise RuntimeError("packed attention kernel 'varlen': neither torch.nn.attention.varlen nor flash-attn runs "
                           "here (CUDA only)")
    length = sum(rows[0])
    in_decoder = {id(m) for m in decoder.modules()}
    checked: dict[tuple, tuple[torch.Tensor, bool]] = {}  # a mask serves every layer: each block is checked once
    split: dict[tuple, tuple[torch.Tensor, list[int] | None]] = {}  # the same, for the varlen kernel's sequences

    def causal(block: torch.Tensor) -> bool:
        """Whether the block is exactly causal (no bidirectional image or prefix block, no window cutting it)."""
        where = (block.data_ptr(), block.shape, block.stride())
        if where not in checked:
            attends = block if block.dtype == torch.bool else block == 0
            lower = torch.ones(block.shape[-2:], dtype=torch.bool, device=block.device).tril()
            checked[where] = (block, bool((attends == lower).all()))  # keeps the block: its address stays its own
        return checked[where][1]

    def varlen_segments(attention_mask: torch.Tensor) -> list[int] | None:
        """The causal sequences of the whole batch, row after row, if the mask is nothing but those: each block
        causal, or (padding after a row's last sample: every padding token is a sequence of its own) the diagonal."""
        where = (attention_mask.data_ptr(), attention_mask.shape)
        if where not in split:
            segments: list[int] | None = []
            for b, blocks in enumerate(rows):
                mask = attention_mask[b if attention_mask.shape[0] > 1 else 0][None]
                start = 0
                for n in blocks:
                    block = mask[..., start:start + n, start:start + n]
                    attends = block if block.dtype == torch.bool else block == 0
                    if causal(block):
                        segments.append(n)
                    elif bool((attends == torch.eye(n, dtype=torch.bool, device=block.device)).all()):
                        segments += [1] * n
                    else:
                        segments = None
                        break
                    start += n
                if segments is None:
                    break
            split[where] = (attention_mask, segments)
        return split[where][1]

    def attend(module, query, key, value, attention_mask, **kwargs):
        if (id(module) not in in_decoder or attention_mask is None or query.shape[0] != len(rows)
                or query.shape[2] != length or key.shape[2] != length):
            return sdpa(module, query, key, value, attention_mask, **kwargs)
        segments = varlen_segments(attention_mask) if varlen is not None and plain(query, kwargs) else None
        if segments is not None:
            used["varlen"] += 1
            return varlen(query, key, value, segments, kwargs.get("scaling")), None
        used["per_sample"] += 1
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


#: The dtypes the varlen kernels take (flash-attention: half precision only).
VARLEN_DTYPES = (torch.bfloat16, torch.float16)


def plain(query: torch.Tensor, kwargs: dict) -> bool:
    """Whether a call is one the varlen kernel computes as SDPA would: its dtype, no dropout, no window."""
    return query.dtype in VARLEN_DTYPES and not kwargs.get("dropout") and not kwargs.get("sliding_window")


def varlen_kernel():
    """A variable-length attention `(query, key, value, segments, scale) -> output` for SDPA-layout tensors
    (batch, heads, length, head_dim) whose rows are split into causal `segments`, or None where none runs (no CUDA).
    torch's own kernel first (FlashAttention-2 built into torch 2.10+), then the flash-attn package's."""
    if not torch.cuda.is_available():
        return None
    try:
        from torch.nn.attention.varlen import varlen_attn as fn
    except ImportError:
        try:
            from flash_attn import flash_attn_varlen_func as fn
        except ImportError:
            return None
    return functools.partial(call_varlen, fn)


@functools.lru_cache(maxsize=8)
def parameters(fn) -> frozenset[str]:
    """A kernel's keyword names (read once: every layer of every step calls it)."""
    return frozenset(inspect.signature(fn).parameters)


def call_varlen(fn, query, key, value, segments: list[int], scale: float | None, causal: bool = True):
    """`fn` (torch's `varlen_attn` or flash-attn's `flash_attn_varlen_func`) over the flattened batch: every segment a
    sequence of its own, causal or not. Signatures differ by version (torch 2.10 `is_causal`, later `window_size`;
    GQA by `enable_gqa` from torch 2.12, natively in flash-attn): read from `fn`, key/value heads repeated where
    needed."""
    batch, heads, length, dim = query.shape
    params = parameters(fn)
    kwargs = {}
    if "softmax_scale" in params:  # flash-attn: grouped-query attention is native
        kwargs.update(softmax_scale=scale, causal=causal)
    else:
        kwargs["scale"] = scale
        if "is_causal" in params:
            kwargs["is_causal"] = causal
        else:
            kwargs["window_size"] = (-1, 0) if causal else (-1, -1)
        if key.shape[1] != heads:
            if "enable_gqa" in params:
                kwargs["enable_gqa"] = True
            else:
                key, value = (t.repeat_interleave(heads // key.shape[1], dim=1) for t in (key, value))
    cu = torch.tensor([0, *segments], device=query.device, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    longest = max(segments)

    def flat(t):
        return t.transpose(1, 2).reshape(batch * length, t.shape[1], dim)

    out = fn(flat(query), flat(key), flat(value), cu, cu, longest, longest, **kwargs)
    return (out[0] if isinstance(out, tuple) else out).view(batch, length, heads, dim)


#: An attention implementation for Qwen-VL vision towers: with "flash" in its name, their attention hands it the
#: windows and images as cumulative lengths (`cu_seq_lens_q`) in one call; on SDPA they split the patches and
#: call SDPA once per window of 64 patches per layer (an 800x600 chart: ~40 windows in each of 28 layers, one
#: Python-level call each, in the forward and again when checkpointing recomputes).
VISION_VARLEN = "finetune_flash_varlen"


def vision_varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                            cu_seq_lens_q=None, cu_seq_lens_k=None, is_causal=False, **kwargs):
    """One varlen kernel call for all windows or images of the batch (bidirectional within each); for any call the
    kernel cannot take (fp32, dropout) SDPA once per window or image, as the tower's SDPA path computes it."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    kernel = varlen_kernel()
    for key_name in ("max_length_q", "max_length_k"):
        kwargs.pop(key_name, None)
    if cu_seq_lens_q is None:  # called chunk by chunk (a transformers that does not see "flash" in the name)
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      is_causal=is_causal, **kwargs)
    lengths = cu_seq_lens_q.diff().tolist()
    if kernel is not None and query.dtype in VARLEN_DTYPES and not dropout:
        return kernel(query, key, value, lengths, scaling, causal=False), None
    # The tower's own SDPA path: one call per window or image, never across them.
    pieces = [sdpa_attention_forward(module, q, k, v, None, scaling=scaling, dropout=dropout, is_causal=False,
                                     **kwargs)[0]
              for q, k, v in zip(*(t.split(lengths, dim=2) for t in (query, key, value)))]
    return torch.cat(pieces, dim=1), None


def use_vision_varlen(model, on: bool = True) -> bool:
    """Point the vision tower of a Qwen-VL model at `vision_varlen_attention` (or back to SDPA); True when it now
    uses it. Only where a varlen kernel runs (CUDA) and the tower is on SDPA."""
    from transformers import AttentionInterface

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    vision = getattr(base.config, "vision_config", None)
    family = FAMILIES.get(base.config.model_type)
    if vision is None or family is None or not family.vision_varlen:
        return False
    if on and (varlen_kernel() is None or vision._attn_implementation != "sdpa"):
        return False
    if not on and vision._attn_implementation != VISION_VARLEN:
        return False
    configs = {id(vision): vision}  # the tower's modules hold the vision config (or a copy of its class)
    configs.update({id(m.config): m.config for m in base.modules() if type(getattr(m, "config", None)) is type(vision)})
    try:
        AttentionInterface.register(VISION_VARLEN, vision_varlen_attention)
        for config in configs.values():
            config._attn_implementation = VISION_VARLEN if on else "sdpa"
    except Exception:  # noqa: BLE001 - a transformers that refuses the name: the tower stays on SDPA
        for config in configs.values():
            config._attn_implementation = "sdpa"
        return False
    return on


def packed_inputs(model, inputs: dict, family, pad_token_id: int, kernel: str = "auto", used: dict | None = None):
    """A collated batch of packs as packed rows (finetune.batching.packing), laid out for this model's attention,
    and the context to train them in (on SDPA: `attention_per_sample` with `kernel`). `model`: the unwrapped
    transformers model (no peft wrapper)."""
    text_config = model.config.get_text_config()
    attn = str(text_config._attn_implementation)
    one_row = attn.startswith("flash")  # the kernel packs batch size 1 only
    tokens = int(inputs["attention_mask"].sum())
    if attn == "sdpa":
        # Bidirectional image or prefix blocks are never causal: their rows keep the masked per-sample path.
        bidirectional = family.prefix_lm or family.bidirectional_images
        attention = attention_per_sample(row_segments(inputs), model.get_decoder(),
                                         "per_sample" if bidirectional else kernel, used)
    else:
        attention = contextlib.nullcontext()
    packed = pack_batch(inputs, family, pad_token_id, rope_positions(model, inputs), one_row)
    if family.bidirectional_images and "token_type_ids" in packed:
        packed["attention_mask"] = image_block_masks(text_config, packed, model.get_input_embeddings().weight.dtype,
                                                     tokens)
    return packed, attention


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
