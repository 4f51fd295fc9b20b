"""Processor and base model (optionally 4-bit), driven by the model-family table.

`cfg` is the recipe's `model:` section and `quant` its `quantization:` section, read field by field.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from ..errors import RecipeError, not_found
from . import zoo
from .families import Family, family_for
from .refusals import refusal_for_config

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_path(name_or_path: str) -> str:
    """`zoo:<family>[:<preset>]` or `zoo:<folder of hub files>[:<preset>]` builds (once, cached) a tiny local
    checkpoint; anything else is passed through."""
    if not name_or_path.startswith("zoo:"):
        return name_or_path
    return str(zoo.resolve(name_or_path))


def load_family(cfg) -> tuple[str, Family]:
    """The model's path and its family-table entry, from the config alone (cheap: no weights are read)."""
    from transformers import AutoConfig

    path = resolve_model_path(cfg.name_or_path)
    try:
        config = AutoConfig.from_pretrained(path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    except OSError as e:  # transformers' words for a typo, no network and offline mode alike
        raise not_found("model.name_or_path", cfg.name_or_path, e) from e
    family = family_for(config.model_type, why=lambda: refusal_for_config(config))
    for package, extra in family.requires:
        if importlib.util.find_spec(package) is None:
            raise RecipeError(f"model.name_or_path: {family.name} needs the '{package}' package (its model classes "
                              f"import it): pip install \"finetune[{extra}]\", or bash scripts/setup.sh")
    return path, family


def stored_dtype(cfg) -> str:
    """The dtype the checkpoint's weights are stored in, from its config.json (float32 when it does not say)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(resolve_model_path(cfg.name_or_path), revision=cfg.revision,
                                        trust_remote_code=cfg.trust_remote_code)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    name = str(dtype).removeprefix("torch.") if dtype is not None else "float32"
    return name if name in DTYPES else "float32"


PIXEL_LIMITS = {"min_pixels": "shortest_edge", "max_pixels": "longest_edge"}


def load_processor(path: str, cfg, image_settings: dict | None = None, family: Family | None = None):
    """The model's processor, with `data.image_processor` settings applied (saved with it, so inference agrees),
    and the chat template training and inference render with (see `choose_chat_template`)."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    choose_chat_template(processor, cfg, family)
    image_processor = getattr(processor, "image_processor", None)
    for key, value in (image_settings or {}).items():
        size, edge = getattr(image_processor, "size", None), PIXEL_LIMITS.get(key)
        if edge and not hasattr(image_processor, key) and size is not None and (
                size.get(edge) if isinstance(size, dict) else getattr(size, edge, None)) is not None:
            # Qwen-VL's min/max pixels live in `size` (shortest_edge/longest_edge count pixels) in transformers 5.
            if isinstance(size, dict):
                image_processor.size = {**size, edge: value}
            else:
                setattr(size, edge, value)
            continue
        if image_processor is None or not hasattr(image_processor, key):
            known = sorted(k for k in vars(image_processor or object()) if not k.startswith("_"))
            raise RecipeError(f"data.image_processor.{key}: not a setting of "
                              f"{type(image_processor).__name__} (it has: {', '.join(known)})")
        setattr(image_processor, key, value)
    return processor


def choose_chat_template(processor, cfg, family: Family | None) -> None:
    """`model.chat_template` (a file) if set; else the checkpoint's own; else the family's documented default
    (PaliGemma ships none). The choice is stored on the processor, which every run saves next to its adapter."""
    if cfg.chat_template is not None:
        path = Path(cfg.chat_template).expanduser()
        if not path.is_file():
            raise RecipeError(f"model.chat_template: {path}: file not found")
        processor.chat_template = path.read_text(encoding="utf-8")
    elif not getattr(processor, "chat_template", None):
        if family is not None and family.default_chat_template:
            processor.chat_template = family.default_chat_template
        else:
            name = family.name if family is not None else type(processor).__name__
            raise RecipeError(
                f"model.chat_template: {cfg.name_or_path} has no chat template and finetune has no default one for "
                f"{name}; write the prompt format as a Jinja template file and set model.chat_template to its path")
    if cfg.chat_template_kwargs:
        processor.chat_template = pin_template_variables(processor.chat_template, cfg.chat_template_kwargs)
    # The tokenizer keeps its own copy; one template for both, so no code path can render with another.
    processor.tokenizer.chat_template = processor.chat_template


def pin_template_variables(template: str, variables: dict) -> str:
    """The template with `model.chat_template_kwargs` set at its top (`{%- set enable_thinking = false -%}`), so
    the run's saved template renders as trained wherever it goes: predict, serve, merged exports, vLLM, llama.cpp.
    A variable set here wins over one passed at render time. Setting the same variables again changes nothing."""
    import json

    header = "".join(f"{{%- set {key} = {json.dumps(value)} -%}}\n" for key, value in sorted(variables.items()))
    return template if template.startswith(header) else header + template


def with_default_system(template: str, prompt: str | None) -> str:
    """The template with `prompt` as the system message of a conversation that has none (an OpenAI-style client
    that sends no system message gets what training used, not the template's own default, e.g. Qwen's "You are a
    helpful assistant."). The message is the one `finetune predict` sends, so both render the same tokens; a
    conversation with its own system message renders as before. Applying it again changes nothing."""
    import json

    if not prompt:
        return template
    message = {"role": "system", "content": [{"type": "text", "text": prompt}]}
    header = ("{%- if not messages or messages[0]['role'] != 'system' -%}\n"
              f"{{%- set messages = [{json.dumps(message)}] + messages -%}}\n"
              "{%- endif -%}\n")
    return template if template.startswith(header) else header + template


def compute_dtype(name: str) -> torch.dtype:
    if name != "auto":
        return DTYPES[name]
    return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32


def load_model(path: str, cfg, quant, family: Family):
    """The base model; with `quant.load_in_4bit` the decoder is NF4 and vision tower, projector, lm_head are not."""
    from transformers import AutoModelForImageTextToText, BitsAndBytesConfig

    kwargs = dict(revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    kwargs["dtype"] = "auto" if cfg.dtype == "auto" else DTYPES[cfg.dtype]
    if quant.load_in_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quant.quant_type,
            bnb_4bit_use_double_quant=quant.double_quant,
            bnb_4bit_compute_dtype=compute_dtype(quant.compute_dtype),
            bnb_4bit_quant_storage=torch.uint8 if quant.quant_storage == "uint8" else DTYPES[quant.quant_storage],
            # bitsandbytes quantizes every Linear unless told otherwise; the vision side is small and sensitive.
            llm_int8_skip_modules=family.quantization_skip(),
        )
        if torch.cuda.is_available():
            kwargs["device_map"] = {"": torch.cuda.current_device()}
    model = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
    if quant.load_in_4bit:
        freeze_keeping_dtypes(model)
        training_kernels(model)
    return model


def freeze_keeping_dtypes(model):
    """Freeze every base weight of a 4-bit model, as peft's `prepare_model_for_kbit_training` does, but without its
    upcast of every weight that is not 4-bit (vision tower, projector, embeddings, norms, lm_head: about 1.8B
    parameters of Qwen2.5-VL-7B) to float32. Under bf16 autocast every matmul casts those weights back to bf16 on
    each call, the fp32 embeddings carry an fp32 residual stream through the decoder, and the fp32 copies take
    ~3.6 GB more; TRL (the cookbook's path) never upcasts them. The adapters are set to bf16 by TRL, as before.
    Checkpointing is switched on by the trainer from `training.activation_checkpointing`, not here."""
    for param in model.parameters():
        param.requires_grad = False
    return model


def training_kernels(model):
    """Make bitsandbytes 4-bit layers compute as in training, also in eval mode.

    On CPUs with AVX512-BF16, bitsandbytes repacks a Linear4bit's weight on its first eval-mode forward and from
    then on multiplies in bfloat16 (measured: 6e-3 off per layer vs the training path), and the repacking is lossy
    (2e-4 on the dequantized weight). Training never takes that path, so neither do the parity check and the merge.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model
