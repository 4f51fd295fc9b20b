"""Training through the real pipeline (recipe -> SFTTrainer) on every zoo family, LoRA and QLoRA."""

import bitsandbytes as bnb
import pytest
import torch

from conftest import ROOT
from finetune import zoo
from finetune.modeling import group_of
from finetune.recipe import load_recipe
from finetune.pipeline import prepare


def tiny_recipe(family, tmp_path, *extra):
    return load_recipe({
        "model": {"name_or_path": f"zoo:{family}", "dtype": "float32"},
        "data": {"path": str(ROOT / "data/chartqa-tiny"), "format": "chartqa", "max_samples": 4, "system_prompt": ""},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "training": {"output_dir": str(tmp_path / "run"), "max_steps": 3, "per_device_train_batch_size": 2,
                     "learning_rate": 1e-2, "logging_steps": 1, "save_strategy": "no", "bf16": False,
                     "activation_checkpointing": False, "report_to": "none", "seed": 0,
                     "dataloader_num_workers": 0},
    }, list(extra))


def base_name(name):
    return name.removeprefix("base_model.model.")


@pytest.mark.parametrize("family", zoo.FAMILIES)
def test_lora_on_decoder_and_projector_trains_only_the_adapters(family, tmp_path):
    run = prepare(tiny_recipe(family, tmp_path))
    model = run.trainer.model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    run.trainer.train()
    after = dict(model.named_parameters())

    lora = {n for n, p in after.items() if p.requires_grad}
    assert lora and all("lora_" in n for n in lora), "only LoRA tensors are trainable"
    changed = {n for n in lora if not torch.equal(before[n], after[n].detach())}
    # Every LoRA B (initialised to zero) moved; so did the A matrices feeding them.
    assert {n for n in lora if "lora_B" in n} <= changed
    frozen_changed = [n for n, p in after.items() if n not in lora and not torch.equal(before[n], p.detach())]
    assert frozen_changed == [], "base weights must not change"

    groups = {group_of(base_name(n), run.family) for n in changed}
    assert groups == {"decoder", "projector"}, groups
    projector = [n for n in changed if group_of(base_name(n), run.family) == "projector"]
    assert projector, "the projector's adapters trained"
    assert not any(group_of(base_name(n), run.family) == "vision" for n in lora), "vision tower untouched"


def test_lora_targets_can_include_the_vision_tower(tmp_path):
    run = prepare(tiny_recipe("qwen2_vl", tmp_path, "lora.targets=[decoder, projector, vision]"))
    groups = {group_of(base_name(n), run.family) for n, p in run.trainer.model.named_parameters() if p.requires_grad}
    assert groups == {"decoder", "projector", "vision"}
    # Anchored patterns: the vision blocks' fc1/fc2 are vision, the merger's mlp.0/mlp.2 are projector.
    assert run.lora.modules["projector"] == ["model.visual.merger.mlp.0", "model.visual.merger.mlp.2"]
    assert all(n.startswith("model.visual.blocks.") for n in run.lora.modules["vision"])


def test_qlora_quantizes_the_decoder_only_and_learns(tmp_path):
    run = prepare(tiny_recipe("llava", tmp_path, "quantization.load_in_4bit=true", "training.max_steps=12",
                              "training.per_device_train_batch_size=4", "training.learning_rate=1e-2"))
    model = run.trainer.model
    four_bit = {base_name(n): group_of(base_name(n), run.family)
                for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert four_bit and set(four_bit.values()) == {"decoder"}
    decoder_linear = {base_name(n) for n, m in model.named_modules()
                      if isinstance(m, torch.nn.Linear) and group_of(base_name(n), run.family) == "decoder"
                      and "lora_" not in n and "base_layer" not in n}
    assert decoder_linear <= set(four_bit) | {n.removesuffix(".base_layer") for n in four_bit}
    full = [n for n, m in model.named_modules() if type(m) is torch.nn.Linear and "lora_" not in n
            and group_of(base_name(n.removesuffix(".base_layer")), run.family) in ("vision", "projector")]
    assert full, "vision tower and projector stay full-precision Linear layers"
    assert type(model.get_output_embeddings()) is torch.nn.Linear, "lm_head is not quantized"

    run.trainer.train()  # 4 samples, batch 4: every step sees the same batch
    losses = [e["loss"] for e in run.trainer.state.log_history if "loss" in e]
    assert len(losses) == 12 and losses[-1] < losses[0] - 0.5, losses
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
