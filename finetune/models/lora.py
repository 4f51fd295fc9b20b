"""Where LoRA adapters go: the recipe's `lora.targets` (decoder, projector, vision) resolved to this model's modules
through the family table, and trainable parameters counted per group. `cfg` is the recipe's `lora:` section."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..errors import RecipeError
from .families import LORA_GROUPS, Family, matches


@dataclass
class LoraPlan:
    """Where the adapters go: exact module names per group, and raw parameters (Gemma3's projector)."""

    modules: dict[str, list[str]]
    parameters: list[str]

    def peft_config(self, cfg):
        from peft import LoraConfig as PeftLoraConfig

        return PeftLoraConfig(
            r=cfg.r,
            lora_alpha=cfg.alpha,
            lora_dropout=cfg.dropout,
            target_modules=[name for names in self.modules.values() for name in names],
            target_parameters=self.parameters or None,
            task_type="CAUSAL_LM",
        )


def plan_lora(model, family: Family, cfg) -> LoraPlan:
    """Resolve `lora.targets` (decoder/projector/vision) to exact module paths of this model."""
    linear = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    if cfg.target_modules is not None:
        pattern = cfg.target_modules if isinstance(cfg.target_modules, str) else None
        chosen = [n for n in linear if (re.fullmatch(pattern, n) if pattern else
                                         any(n == t or n.endswith("." + t) for t in cfg.target_modules))]
        if not chosen:
            raise RecipeError(f"lora.target_modules: matches no Linear module of this {family.name} model")
        return LoraPlan(modules=_group(chosen, family), parameters=[])
    modules: dict[str, list[str]] = {}
    parameters: list[str] = []
    if cfg.experts:
        if not family.experts:
            raise RecipeError(f"lora.experts: {family.name} has no mixture-of-experts layers; remove lora.experts")
        if cfg.dropout:
            raise RecipeError("lora.dropout: the fused experts are raw 3-D weights, which peft adapts "
                              "(target_parameters) only without dropout; set lora.dropout: 0 with lora.experts")
        modules["experts"] = [n for n in linear if group_of(n, family) == "experts"]
        parameters = expert_parameters(model, family)
    for group in cfg.targets:
        names = [n for n in linear if group_of(n, family) == group]
        if group == "projector" and family.projector_parameters:
            if cfg.dropout:
                raise RecipeError(
                    f"lora.dropout: {family.name}'s projector is a raw weight, which peft adapts (target_parameters) "
                    f"only without dropout; set lora.dropout: 0, or leave projector out of lora.targets")
            parameters += list(family.projector_parameters)
        elif not names:
            raise RecipeError(f"lora.targets: '{group}' matches no Linear module of this {family.name} model")
        modules[group] = names
    return LoraPlan(modules=modules, parameters=parameters)


def expert_parameters(model, family: Family) -> list[str]:
    """Full names of the fused 3-D expert weights (peft `target_parameters`), read off the model."""
    return [name for name, _ in model.named_parameters()
            if name.rpartition(".")[2] in family.expert_parameters and matches(family.experts, name.rpartition(".")[0])]


def group_of(module_name: str, family: Family) -> str | None:
    """router / experts / decoder / projector / vision / None for a module path (projector wins over vision: it
    may live inside it; routers and experts over the decoder they live in)."""
    if family.router and matches(family.router, module_name):
        return "router"
    if family.experts and matches(family.experts, module_name):
        return "experts"
    if family.audio and matches(family.audio, module_name):
        return "audio"
    if matches(family.projector, module_name):
        return "projector"
    if matches(family.vision, module_name):
        return "vision"
    if matches(family.decoder, module_name):
        if family.decoder_linears and not re.search(rf"\.(?:{family.decoder_linears})(?:\.|$)", module_name):
            return None
        return "decoder"
    return None


def _group(names: list[str], family: Family) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for n in names:
        out.setdefault(group_of(n, family) or "other", []).append(n)
    return out


def trainable_by_group(model, family: Family) -> dict[str, int]:
    """Trainable parameter counts per group, read off the (peft-wrapped) model."""
    counts = {g: 0 for g in LORA_GROUPS + (("experts",) if family.experts else ())}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        base = re.sub(r"^base_model\.model\.", "", name)
        group = group_of(base, family) or "other"
        counts[group] = counts.get(group, 0) + param.numel()
    return counts
