"""Why a model type without a family row is refused: read off its own module layout, so every image-text-to-text
type transformers knows gets a specific answer instead of a traceback.

The layout finetune adapts is a vision tower, a projector and a decoder-only language model under `model.` (the
family table's rows all have it). A type with that layout still needs a row: its image tokens, end of turn and
label layout are facts of its checkpoint, and unverified ones could put loss on image tokens or prompts.
"""

from __future__ import annotations

#: Submodules under `model.` that hold each part, as the installed transformers names them.
VISION = ("vision_tower", "visual", "vision_model", "vision_encoder", "image_tower")
PROJECTOR = ("multi_modal_projector", "projector", "connector", "merger", "mm_projector", "aligner",
             "vision_projection", "resampler_model")
DECODER = ("language_model", "text_model")


def layout(model) -> dict[str, list[str]]:
    """The model's parts by role: {"vision": [...], "projector": [...], "decoder": [...], "other": [...]}, from
    the direct children of `model.` (a Qwen-style merger inside the vision tower counts as its projector)."""
    inner = getattr(model, "model", None)
    names = [name for name, _ in inner.named_children()] if inner is not None else []
    parts = {"vision": [n for n in names if n in VISION], "projector": [n for n in names if n in PROJECTOR],
             "decoder": [n for n in names if n in DECODER]}
    for tower in parts["vision"]:
        if not parts["projector"] and hasattr(getattr(inner, tower), "merger"):
            parts["projector"].append(f"{tower}.merger")
    parts["other"] = [n for n in names if not any(n in v for v in parts.values())]
    return parts


def refusal(model) -> str:
    """The reason finetune does not train this model (built on the meta device from its config)."""
    parts = layout(model)
    cls = type(model).__name__
    config = getattr(model, "config", None)
    text = getattr(config, "text_config", None)
    if getattr(config, "is_encoder_decoder", False) or getattr(text, "is_encoder_decoder", False) or (
            not parts["decoder"] and any(n in ("encoder", "decoder") for n in parts["other"])):
        return f"{cls} is an encoder-decoder model; finetune trains decoder-only VLMs from their chat template"
    if getattr(model, "model", None) is None:
        children = ", ".join(n for n, _ in model.named_children()) or "none"
        return (f"{cls} keeps its parts at the top level ({children}), not under `model.` where finetune's module "
                "paths (and transformers 5's VLM classes) have them")
    if not parts["decoder"]:
        found = ", ".join(f"model.{n}" for n in parts["other"]) or "none"
        return (f"{cls} has no separate language model under `model.` (its parts: {found}); finetune adapts a "
                "vision tower, a projector and a decoder-only language model")
    if not parts["vision"]:
        return f"{cls} has no vision tower under `model.` that finetune recognises (parts: {_parts(parts)})"
    if not parts["projector"]:
        return f"{cls} has no projector between vision tower and language model (parts: {_parts(parts)})"
    return (f"{cls} has the layout finetune adapts ({_parts(parts)}) but no row in its family table: its image "
            "tokens, end of turn and label layout are unverified, so training it could put loss on image or prompt "
            "tokens")


def refusal_for_config(config) -> str:
    """`refusal` for a checkpoint's config (the model built on the meta device: no weights, no memory)."""
    import torch
    from transformers import AutoModelForImageTextToText

    try:
        with torch.device("meta"):
            model = AutoModelForImageTextToText.from_config(config)
    except ValueError as e:  # transformers' words for a config of another task (a text-only model)
        return f"it is not an image-text-to-text model ({str(e).splitlines()[0][:200]})"
    except Exception as e:  # noqa: BLE001 - a class that cannot be built from this config: say so, never a traceback
        return f"transformers cannot build it from its config ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
    return refusal(model)


def _parts(parts: dict[str, list[str]]) -> str:
    return "; ".join(f"{role} model.{', model.'.join(names)}" for role, names in parts.items()
                     if names and role != "other")
