"""Model FLOPs of a LoRA / QLoRA training step, and MFU: the one formula scripts/bench_gpu.py and the trainer's
run_summary.json both use.

Per step, over the real (non-padding) tokens only; recomputation under gradient checkpointing is not counted (model
FLOPs, not hardware FLOPs), and a 4-bit weight counts as the matmul it stands for:

  decoder     4 * N_dec * T           forward 2N per token, backward 2N (activation gradients only: frozen weights)
  lm_head     4 * N_head * S          only the S supervised positions are scored (TRL's fused head, finetune's too)
  LoRA        6 * N_lora * tokens     forward, activation and weight gradients of the adapters, per token they see
  attention   3 * 2*L*H*d * sum n(n+1) causal: n(n+1)/2 query-key pairs per sample of n tokens, QK^T and AV 2 FLOPs
                                      each per head dim; backward twice the forward
  vision      2 * N_vis * P + 4*d_v * sum_images (full layers * p^2 + windowed layers * p * w)
                                      forward only while the tower is frozen (x2 for the linears, x3 for attention
                                      when LoRA trains it); Qwen2.5-VL's windowed layers see w = (window/patch)^2
                                      patches, its full-attention layers the whole image
  projector   2 * N_proj * M          forward per merged image token; x2 when LoRA trains it (gradients through it)

T real tokens, S supervised positions, P image patches, M image tokens in the text. MFU = model FLOPs / seconds /
the bf16 dense matmul rate measured on the same device (`matmul_rate`), never a datasheet figure.
Cross-attention to images (Mllama) is not counted: its MFU is understated.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..models.families import Family, image_token_id, matches


@dataclass
class ModelShape:
    """What the formula needs of a model, read once: matmul parameters per part and the attention shapes."""

    decoder: int
    head: int
    vision: int
    projector: int
    lora: dict[str, int]  # trainable adapter parameters per part
    layers: int
    attention_width: int  # query heads x head dim
    vision_width: int
    vision_layers: int
    vision_full_layers: int  # layers attending over the whole image (the rest over windows of `window` patches)
    window: int
    merge: int  # patches per image token along each side (Qwen: 2)
    image_token_id: int | None

    @property
    def vision_trained(self) -> bool:
        return self.lora.get("vision", 0) > 0

    @property
    def projector_trained(self) -> bool:
        return self.lora.get("projector", 0) > 0


def model_shape(model, family: Family) -> ModelShape:
    """The shape of a (peft-wrapped) model; embeddings are lookups, not matmuls, and are left out."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    embed = base.get_input_embeddings().weight
    head = base.get_output_embeddings()
    counts = {"decoder": 0, "head": 0, "vision": 0, "projector": 0}
    lora = {"decoder": 0, "vision": 0, "projector": 0}
    for name, p in base.named_parameters():
        if p is embed:
            continue
        part = ("projector" if matches(family.projector, name) else "vision" if matches(family.vision, name)
                else "decoder")
        if "lora_" in name:
            lora[part] += p.numel()
        elif head is not None and p is head.weight:
            counts["head"] += p.numel()
        else:
            counts[part] += p.numel() * (2 if p.dtype == torch.uint8 else 1)  # 4-bit: two weights per byte
    text, vision = base.config.get_text_config(), getattr(base.config, "vision_config", None)
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    vision_layers = vision_width = full = window = 0
    merge = 1
    if vision is not None:
        vision_layers = getattr(vision, "depth", None) or getattr(vision, "num_hidden_layers", 0)
        vision_width = getattr(vision, "hidden_size", None) or getattr(vision, "embed_dim", 0)
        full_layers = getattr(vision, "fullatt_block_indexes", None)
        full = len(full_layers) if full_layers is not None and getattr(vision, "window_size", None) else vision_layers
        if full < vision_layers:
            window = (vision.window_size // vision.patch_size) ** 2
        merge = getattr(vision, "spatial_merge_size", 1) or 1
    return ModelShape(decoder=counts["decoder"], head=counts["head"], vision=counts["vision"],
                      projector=counts["projector"], lora=lora, layers=text.num_hidden_layers,
                      attention_width=heads * head_dim, vision_width=vision_width, vision_layers=vision_layers,
                      vision_full_layers=full, window=window, merge=merge,
                      image_token_id=image_token_id(base.config))


def image_patches(batch: dict, config) -> list[int]:
    """Patches per image the vision tower sees in this batch: Qwen-VL's grids exactly; otherwise one entry per
    non-empty image (or tile) of `pixel_values` at the vision config's patch size (all-zero padding images left out)."""
    if batch.get("image_grid_thw") is not None:
        return batch["image_grid_thw"].prod(-1).tolist()
    pixels = batch.get("pixel_values")
    vision = getattr(config, "vision_config", None)
    if pixels is None or vision is None or pixels.dim() < 4:
        return []
    images = pixels.flatten(0, -4)  # (images or tiles, channels, height, width)
    real = int((images.flatten(1).abs().amax(1) > 0).sum())
    patch = vision.patch_size
    return [(images.shape[-2] // patch) * (images.shape[-1] // patch)] * real


def step_flops(shape: ModelShape, sample_tokens: list[int], supervised: int, patches: list[int],
               image_tokens: int) -> float:
    """Model FLOPs of one training micro-step (the module docstring's formula)."""
    tokens = sum(sample_tokens)
    flops = 4 * shape.decoder * tokens + 4 * shape.head * supervised + 6 * shape.lora["decoder"] * tokens
    flops += 3 * 2 * shape.layers * shape.attention_width * sum(n * (n + 1) for n in sample_tokens)
    if patches:
        linear = 2 * shape.vision * sum(patches)
        full = sum(p * p for p in patches) * shape.vision_full_layers
        windowed = sum(p * min(p, shape.window) for p in patches) * (shape.vision_layers - shape.vision_full_layers)
        attention = 4 * shape.vision_width * (full + windowed)
        if shape.vision_trained:
            linear, attention = 2 * linear, 3 * attention
        flops += linear + attention + 6 * shape.lora["vision"] * sum(patches)
        projector = 2 * shape.projector * image_tokens
        flops += (2 * projector if shape.projector_trained else projector) + 6 * shape.lora["projector"] * image_tokens
    return float(flops)


def batch_flops(shape: ModelShape, batch: dict, config) -> float:
    """`step_flops` of a collated (unpacked, right- or left-padded) batch: per-sample lengths from its attention
    mask, supervised positions from its labels, images from its pixel inputs."""
    mask = batch["attention_mask"]
    labels = batch.get("labels")
    supervised = int((labels[:, 1:] != -100).sum()) if labels is not None else 0
    ids = batch.get("input_ids")
    image_tokens = int((ids == shape.image_token_id).sum()) if ids is not None and shape.image_token_id is not None \
        else 0
    return step_flops(shape, mask.sum(1).tolist(), supervised, image_patches(batch, config), image_tokens)


def matmul_rate(device: torch.device, n: int = 8192, repeats: int = 10) -> float | None:
    """The bf16 dense matmul rate (FLOP/s) of `device`, measured on an n^3 product (the MFU denominator); None off
    CUDA, where MFU is not reported (a CPU's rate depends on threads, precision and the other work on the machine,
    so a CPU MFU would not compare with anything)."""
    if device.type != "cuda":
        return None
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(2):
        a @ b
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize(device)
    rate = repeats * 2 * n ** 3 / (time.perf_counter() - start)
    del a, b
    return rate


def mfu_facts(flops: float, seconds: float, rate: float, processes: int = 1) -> dict:
    """What a run reports: model FLOP/s and MFU over all processes (`flops` summed over them, `rate` one device's
    measured bf16 matmul rate), and how the denominator was obtained."""
    per_second = flops / seconds
    return {"model_flops_per_second": round(per_second), "mfu": round(per_second / (rate * processes), 4),
            "mfu_denominator": f"bf16 8192^3 matmul measured at the start of this run: {rate / 1e12:.0f} TFLOP/s per "
                               "device",
            "mfu_formula": "finetune.training.flops (model FLOPs over real tokens, recomputation not counted)"}
