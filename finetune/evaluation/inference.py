"""Load what a run produced (run folder = base + adapter, merged export, or a plain base model) and generate.

Generation uses the same chat template, system prompt and processor settings as training: the processor saved
in the run folder, and the recipe saved beside it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from ..batching.encoding import encode
from ..batching.template import render
from ..console import quiet_library_warnings
from ..models.families import Family
from ..models.loading import load_family, load_model, load_processor, resolve_model_path
from ..recipe import ModelConfig, QuantizationConfig, Recipe, load_recipe


@dataclass
class Target:
    """A model ready to answer: model, its processor and family, and the recipe it came from (if any)."""

    model: object
    processor: object
    family: Family
    recipe: Recipe | None
    kind: str  # "adapter", "merged" or "base"
    name: str


def load_target(target: str | Path, recipe: Recipe | None = None) -> Target:
    """A run folder (adapter + recipe.yaml), a merged export, a local model folder, a hub id or `zoo:<family>`."""
    quiet_library_warnings()
    path = Path(str(target))
    if recipe is None and (path / "recipe.yaml").is_file():
        recipe = load_recipe(path / "recipe.yaml")
    if (path / "adapter_config.json").is_file():
        if recipe is None:
            raise FileNotFoundError(f"{path}: an adapter folder needs its recipe.yaml to know the base model")
        from peft import PeftModel

        base_path, family = load_family(recipe.model)
        base = load_model(base_path, recipe.model, recipe.quantization, family)
        model = PeftModel.from_pretrained(base, str(path))
        # Saved by the run: the template and image settings it trained with (a model.chat_template file is
        # already in it, and need not exist here any more).
        processor = load_processor(str(path), dataclasses.replace(recipe.model, chat_template=None), family=family)
        kind = "adapter"
    else:
        cfg = ModelConfig(name_or_path=str(target), dtype="float32" if not torch.cuda.is_available() else "auto")
        model_path, family = load_family(cfg)
        model = load_model(model_path, cfg, QuantizationConfig(), family)
        processor = load_processor(model_path, cfg, family=family)
        kind = "merged" if (path / "config.json").is_file() and recipe is not None else "base"
    if torch.cuda.is_available() and model.device.type == "cpu":
        model.to("cuda")  # a 16-bit model loads on the CPU (a 4-bit one is placed on the GPU by its device_map)
    model.eval()
    processor.tokenizer.padding_side = "left"  # generation continues every row from its last prompt token
    return Target(model, processor, family, recipe, kind, str(target))


def base_of(run_dir: str | Path) -> str:
    """The base model a run folder was trained from, as a loadable path."""
    return resolve_model_path(load_recipe(Path(run_dir) / "recipe.yaml").model.name_or_path)


def prompt_messages(messages: list[dict]) -> list[dict]:
    """The conversation up to (not including) its final assistant reply."""
    end = len(messages)
    while end and messages[end - 1]["role"] == "assistant":
        end -= 1
    return messages[:end]


def stop_token_ids(model, processor, family: Family) -> list[int]:
    """Where generation stops: the checkpoint's own EOS ids, the tokenizer's EOS (the token finetune appends to
    replies of templates without an end-of-turn) and the family's end-of-turn, which is what training labelled."""
    configured = model.generation_config.eos_token_id
    ids = list(configured) if isinstance(configured, (list, tuple)) else [configured]
    tokenizer = processor.tokenizer
    vocab = tokenizer.get_vocab()
    ids += [tokenizer.eos_token_id, vocab.get(family.end_of_turn)]
    return list(dict.fromkeys(i for i in ids if i is not None))


def prompt_batch(processor, family: Family, conversations: list[list[dict]], images: list[list],
                 videos: list[list] | None = None):
    """Prompts (each conversation ends with a user turn) rendered and tokenised exactly as training renders them.
    `videos`: per conversation, its videos (each a list of frames), in the order the conversation shows them."""
    texts = [render(processor, m, family, generation_prompt=True) for m in conversations]
    flat = [list(v) for row in (videos or []) for v in row]  # the processor takes one list over the batch
    return encode(processor, family, texts, [list(i) for i in images], flat or None)


@torch.no_grad()
def generate(target: Target, conversations: list[list[dict]], images: list[list], max_new_tokens: int = 32,
             videos: list[list] | None = None) -> list[str]:
    """Greedy answers, one per conversation (each ends with a user turn), in one left-padded batch."""
    processor = target.processor
    batch = prompt_batch(processor, target.family, conversations, images, videos).to(target.model.device)
    prompt_length = batch["input_ids"].shape[1]
    output = target.model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                   eos_token_id=stop_token_ids(target.model, processor, target.family),
                                   pad_token_id=processor.tokenizer.pad_token_id)
    return [text.strip() for text in processor.batch_decode(output[:, prompt_length:], skip_special_tokens=True)]
