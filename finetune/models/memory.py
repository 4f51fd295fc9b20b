"""What the base model's weights take in memory, by part, before training starts: read off the model built on the
meta device (no weights read), with bitsandbytes' rule for what QLoRA quantizes (`nn.Linear` modules outside the
family's skip list). The reason to print it: a mixture-of-experts base keeps its fused 3-D experts in 16-bit under
QLoRA, so Qwen3.5-35B-A3B's base takes about 63 GiB, not the ~18 GiB a 4-bit 35B model would."""

from __future__ import annotations

import re

import torch

from .families import Family, matches
from .lora import group_of

#: bitsandbytes NF4: 4 bits a weight plus one absmax per block of 64 (8-bit with double quantization, else 32-bit).
NF4_BYTES = {True: 0.5 + 1 / 64 + 4 / (64 * 256), False: 0.5 + 4 / 64}

PARTS = ("decoder", "experts", "router", "embeddings", "projector", "vision", "audio", "other")


def base_memory(config, family: Family, load_in_4bit: bool, double_quant: bool = True,
                dtype_bytes: int = 2) -> dict[str, dict]:
    """{part: {"parameters": n, "bytes": b, "4bit": parameters stored in 4 bit}} for the base model of `config`."""
    from transformers import AutoModelForImageTextToText

    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    skip = family.quantization_skip()
    out = {part: {"parameters": 0, "bytes": 0.0, "4bit": 0} for part in PARTS}
    seen = set()
    for name, module in model.named_modules():
        quantized = (load_in_4bit and isinstance(module, torch.nn.Linear)
                     and not any(matches(p, name) for p in skip))
        for pname, param in module.named_parameters(recurse=False):
            if id(param) in seen:  # tied weights count once
                continue
            seen.add(id(param))
            part = _part(f"{name}.{pname}" if name else pname, name, family)
            four_bit = quantized and pname == "weight"
            out[part]["parameters"] += param.numel()
            out[part]["bytes"] += param.numel() * (NF4_BYTES[double_quant] if four_bit else dtype_bytes)
            out[part]["4bit"] += param.numel() if four_bit else 0
    return {part: figures for part, figures in out.items() if figures["parameters"]}


def _part(full_name: str, module_name: str, family: Family) -> str:
    if re.search(r"(?:^|\.)(?:embed_tokens|embed_tokens_per_layer|lm_head)(?:\.|$)", full_name):
        return "embeddings"
    return group_of(module_name, family) or group_of(full_name, family) or "other"


def describe(memory: dict[str, dict]) -> str:
    """One line: total and each part, largest first, saying which parts are 4-bit."""
    total = sum(f["bytes"] for f in memory.values())
    parts = sorted(memory.items(), key=lambda kv: -kv[1]["bytes"])
    shown = ", ".join(f"{part} {f['bytes'] / 2**30:.2f} GiB" + (" (4-bit)" if f["4bit"] and f["4bit"] == f["parameters"]
                                                                else " (partly 4-bit)" if f["4bit"] else "")
                      for part, f in parts)
    return f"{total / 2**30:.2f} GiB: {shown}"
