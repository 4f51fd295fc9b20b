"""Mixture-of-experts families (Qwen3.5-MoE, Qwen3-VL-MoE): expert LoRA through peft `target_parameters`, routers
never trained and never quantized, the load-balancing loss trained and logged, trainable parameters per group."""

import json
import re

import bitsandbytes as bnb
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText

import finetune
from finetune.models.families import FAMILIES, matches
from finetune.recipe import RecipeError
from finetune.training.pipeline import prepare
from test_training import base_name, tiny_recipe

MOE = [f for f, family in FAMILIES.items() if family.experts]


def test_the_moe_families():
    assert MOE == ["qwen3_vl_moe", "qwen3_5_moe"]


@pytest.mark.parametrize("family", MOE)
def test_lora_experts_trains_the_fused_experts_and_never_the_router(family, tmp_path):
    run_dir = finetune.train(tiny_recipe(family, tmp_path, "lora.experts=true", "training.max_steps=2",
                                         "training.logging_steps=1"))
    table = FAMILIES[family]
    adapter = load_file(run_dir / "adapter_model.safetensors")
    names = {re.sub(r"^base_model\.model\.", "", k) for k in adapter}
    fused = [k for k in adapter if re.search(r"mlp\.experts\.(?:base_layer\.)*lora_[AB]", k)]
    # peft adapts each 3-D weight with its own A/B pair; both fused weights of every MoE layer are adapted
    layers = json.loads((run_dir / "adapter_config.json").read_text())["target_parameters"]
    assert sorted({p.rpartition(".")[2] for p in layers}) == ["down_proj", "gate_up_proj"]
    assert fused and all(adapter[k].abs().sum() > 0 for k in fused if "lora_B" in k), "expert LoRA B trained"
    assert not [n for n in names if matches(table.router, n.split(".lora_")[0])], "nothing of the router"
    if family == "qwen3_5_moe":  # the shared expert's Linear modules are adapted too
        assert any(".mlp.shared_expert." in n and "lora_B" in n for n in names)
    summary = json.loads((run_dir / "run_summary.json").read_text())
    assert summary["trainable_parameters"]["experts"] > 0
    log = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    aux = [e["aux_loss"] for e in log if "aux_loss" in e]
    assert len(aux) == 2 and all(a > 0 for a in aux), "the load-balancing loss is trained and logged every step"
    # The expert adapters merge into the fused weights: the merged model answers as base + adapter.
    merged_dir = finetune.merge(run_dir, dtype="float32")
    parity = json.loads((merged_dir / "parity.json").read_text())
    assert parity["passed"] and parity["max_abs_diff"] < 1e-4, parity
    # (read back through transformers: it saves Qwen3-VL-MoE's fused experts one expert at a time, as the hub has them)
    weights = [AutoModelForImageTextToText.from_pretrained(path).model.language_model.layers[0].mlp.experts.gate_up_proj
               for path in (merged_dir, finetune.zoo.ensure(family))]
    assert (weights[0] - weights[1]).abs().max() > 1e-6, "the expert LoRA is in the merged fused weights"


@pytest.mark.parametrize("family", MOE)
def test_without_lora_experts_the_experts_and_router_stay_frozen(family, tmp_path):
    run = prepare(tiny_recipe(family, tmp_path))
    table = run.family
    trainable = [base_name(n) for n, p in run.trainer.model.named_parameters() if p.requires_grad]
    assert trainable and not [n for n in trainable if matches(table.experts, n) or matches(table.router, n)]
    assert run.trainer.router_aux_loss_coef == 0.001  # the config's coefficient
    assert prepare(tiny_recipe(family, tmp_path / "x", "training.router_aux_loss_coef=0.05")
                   ).trainer.router_aux_loss_coef == 0.05  # TRL's key, verbatim, overrides it


def test_lora_experts_on_a_dense_family_or_with_dropout_is_refused(tmp_path):
    with pytest.raises(RecipeError, match=r"lora.experts: Qwen3.5 has no mixture-of-experts layers"):
        prepare(tiny_recipe("qwen3_5", tmp_path, "lora.experts=true"))
    with pytest.raises(RecipeError, match=r"lora.dropout: the fused experts .* set lora.dropout: 0"):
        prepare(tiny_recipe("qwen3_5_moe", tmp_path / "x", "lora.experts=true", "lora.dropout=0.1"))


@pytest.mark.parametrize("family", MOE)
def test_qlora_keeps_routers_vision_projector_and_head_full_and_experts_16_bit(family, tmp_path):
    run = prepare(tiny_recipe(family, tmp_path, "quantization.load_in_4bit=true", "lora.experts=true"))
    model, table = run.trainer.model, run.family
    four_bit = [base_name(n) for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert four_bit and not [n for n in four_bit if not matches(table.decoder, n) or matches(table.router, n)
                             or matches(table.projector, n) or matches(table.vision, n)]
    routers = [n for n, m in model.named_modules() if matches(table.router, base_name(n)) and list(m.parameters())]
    assert routers and all(p.dtype.is_floating_point for n in routers for p in model.get_submodule(n).parameters())
    experts = [p for n, p in model.named_parameters() if re.search(r"mlp\.experts\.(?:base_layer\.)*(?:gate_up|down)"
                                                                    r"_proj$", n)]
    assert experts and all(p.dim() == 3 and p.dtype.is_floating_point for p in experts), "bitsandbytes: Linear only"
    run.trainer.train()
    losses = [e["loss"] for e in run.trainer.state.log_history if "loss" in e]
    assert losses and all(torch.isfinite(torch.tensor(losses)))


def test_check_prints_the_base_memory_by_part_and_moe_experts_stay_16_bit(tmp_path, capsys):
    """At the published Qwen3.5-35B-A3B config (meta device): under QLoRA the fused experts (32.2B of its 35B
    parameters) stay bfloat16, so the base takes ~63 GiB, not the ~18 GiB of a 4-bit 35B model."""
    import json as _json

    from transformers import AutoConfig

    from conftest import ROOT
    from finetune.models.memory import base_memory, describe

    raw = _json.loads((ROOT / "tests/fixtures/hub/Qwen__Qwen3.5-35B-A3B/config.json").read_text())
    memory = base_memory(AutoConfig.for_model(**raw), FAMILIES["qwen3_5_moe"], load_in_4bit=True)
    fused = 40 * 256 * 3 * 512 * 2048  # layers x experts x (gate, up, down) x moe_intermediate x hidden
    assert memory["experts"]["parameters"] - memory["experts"]["4bit"] == fused
    assert memory["experts"]["bytes"] >= fused * 2 and memory["router"]["4bit"] == 0
    assert 60 < sum(f["bytes"] for f in memory.values()) / 2**30 < 70
    assert describe(memory).startswith("63.")

    finetune.check(tiny_recipe("qwen3_5_moe", tmp_path, "quantization.load_in_4bit=true"))
    line = next(l for l in capsys.readouterr().out.splitlines() if "base model weights" in l)
    assert "experts" in line and "router" in line and "decoder" in line and "(partly 4-bit)" in line
