"""Training through the real pipeline (recipe -> SFTTrainer) on every zoo family, LoRA and QLoRA."""

import bitsandbytes as bnb
import pytest
import torch
import trl.trainer.utils as trl_utils

import conftest
from finetune import zoo
from finetune.models.lora import group_of
from finetune.recipe import load_recipe
from finetune.training.pipeline import prepare


def tiny_recipe(family, tmp_path, *extra):
    return load_recipe(conftest.tiny_recipe(
        tmp_path / "run", without=["evaluation"], model={"name_or_path": f"zoo:{family}"},
        data={"system_prompt": ""}, training={"max_steps": 3, "report_to": "none"}), list(extra))


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


@pytest.mark.parametrize("family", zoo.FAMILIES)
def test_the_lm_head_runs_only_where_the_loss_is_with_the_full_loss_and_gradients(family, tmp_path):
    """The trainer's loss (TRL's fused LM head: the head projects only positions whose next token carries a label)
    equals cross-entropy over the full logits, and so do the LoRA gradients (fp32, tolerance 1e-5 relative)."""
    run = prepare(tiny_recipe(family, tmp_path))
    trainer, model = run.trainer, run.trainer.model
    for name, p in model.named_parameters():  # LoRA B starts at zero; give every adapter a non-trivial value
        if p.requires_grad:
            torch.manual_seed(len(name))
            p.data.normal_(0, 0.02)
    batch = trainer.data_collator([run.train_data[i] for i in range(2)])
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]

    head = model.get_output_embeddings()

    def full_logits(*args, **kwargs):
        raise AssertionError("the LM head module ran: full (batch, length, vocabulary) logits were built")

    head.forward = full_logits  # the fused head reads the weight for the supervised positions only
    projected = []  # rows of hidden states the fused head projected, per call
    kernel = trl_utils._ChunkedLogProbFunction
    trl_utils._ChunkedLogProbFunction = type("Spy", (), {"apply": lambda h, *a: projected.append(len(h))
                                                        or kernel.apply(h, *a)})
    try:
        fused = trainer.compute_loss(model, dict(batch))
    finally:
        trl_utils._ChunkedLogProbFunction = kernel
    del head.forward
    fused_grads = torch.autograd.grad(fused, params)

    inputs = {k: v for k, v in batch.items() if k != "labels"}
    moe = bool(run.family.experts)
    outputs = model(**inputs, use_cache=False, **({"output_router_logits": True} if moe else {}))
    logits = outputs.logits.float()
    labels = batch["labels"][:, 1:]
    full = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                             ignore_index=-100)
    if moe:  # the router's load-balancing loss is trained, at the config's coefficient
        assert trainer.router_aux_loss_coef == model.config.get_text_config().router_aux_loss_coef == 0.001
        full = full + trainer.router_aux_loss_coef * outputs.aux_loss
    full_grads = torch.autograd.grad(full, params)

    supervised = int((labels != -100).sum())
    assert 0 < supervised < labels.numel() // 4, "most positions carry no loss"
    assert projected == [supervised], "on the CPU too, the head projects the supervised positions only"
    assert torch.allclose(fused, full, rtol=1e-5, atol=1e-6), (fused.item(), full.item())
    for g_fused, g_full in zip(fused_grads, full_grads):
        # to 1e-5 of the tensor's largest gradient (elementwise rtol fails on float32 noise near zero: Gemma 4)
        assert (g_fused - g_full).abs().max() <= 1e-5 * g_full.abs().max() + 1e-9


def test_a_run_continued_from_an_adapter_reports_that_adapter_as_its_before(tmp_path):
    """The held-out report of a continued run scores the starting adapter too (loaded beside the trained one): it
    equals what the first run scored for it."""
    import json

    import finetune

    evaluation = ["data.eval_split=test", "evaluation.limit=16", "data.max_samples=16"]
    first = finetune.train(tiny_recipe("qwen2_vl", tmp_path / "a", *evaluation))
    second = finetune.train(tiny_recipe("qwen2_vl", tmp_path / "b", *evaluation, f"model.adapter={first}",
                                        "training.max_steps=1"))
    before = json.loads((first / "eval" / "metrics.json").read_text())
    after = json.loads((second / "eval" / "metrics.json").read_text())
    assert after["start"] == {"adapter": str(first), "score": before["tuned"]}
    assert after["base"] == before["base"]
    assert f"| starting adapter ({first}) | {before['tuned']:.3f} |" in (second / "report.md").read_text()
