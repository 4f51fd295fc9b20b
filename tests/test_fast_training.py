"""The GPU speed levers of issue 24, checked on the CPU where they run there: the frozen vision tower without
autograd, the varlen attention path for packed rows (its plumbing, through a CPU stand-in for the CUDA kernel),
the FLOPs formula behind MFU, Liger's refusals, and QLoRA without the fp32 upcast."""

import dataclasses
import functools

import pytest
import torch

from finetune import zoo
from finetune.batching.collate import ChatCollator
from finetune.models.families import FAMILIES
from finetune.recipe import RecipeError
from finetune.training import attention, flops, kernels
from finetune.training.pipeline import prepare
from finetune.training.preflight import check
from test_packing import assert_grads_close, randomised_adapters, three_samples
from test_training import tiny_recipe


def batch_of(run, samples):
    return ChatCollator(run.processor, run.family)(samples)


# --- the frozen vision tower ---------------------------------------------------------------------------------------


def test_frozen_tower_runs_without_autograd_with_the_same_loss_and_gradients(tmp_path, monkeypatch):
    """Qwen2.5-VL, LoRA on decoder + projector (the merger, inside model.visual): the tower's blocks run without a
    graph and are not recomputed by gradient checkpointing; the trainable parameters, the loss and every LoRA
    gradient are exactly those of the path with autograd through the tower."""
    run = prepare(tiny_recipe("qwen2_5_vl", tmp_path))
    model = run.trainer.model
    parts = run.trainer.frozen_parts
    assert "model.visual.patch_embed" in parts.names and "model.visual.blocks.0" in parts.names
    assert "model.visual.merger.mlp.1" in parts.names  # downstream of the merger's adapter: keeps autograd per call
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("visual.merger" in n for n in trainable) and not any("visual.blocks" in n for n in trainable)

    randomised_adapters(model)
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()  # as TRL does with checkpointing: the tower's patch embeddings too
    blocks = model.get_base_model().model.visual.blocks
    graphs, runs = [], [0]  # whether each block's output has a graph; attention runs of the tower's blocks
    for block in blocks:
        block.register_forward_hook(lambda m, a, out: graphs.append(
            (out[0] if isinstance(out, tuple) else out).requires_grad))
    attention_forward = type(blocks[0].attn).forward  # counted on the class: recomputation runs no module hooks
    monkeypatch.setattr(type(blocks[0].attn), "forward",
                        lambda *a, **k: runs.__setitem__(0, runs[0] + 1) or attention_forward(*a, **k))
    params = [p for p in model.parameters() if p.requires_grad]
    batch = batch_of(run, three_samples())

    def loss_and_grads():
        runs[0] = 0
        graphs.clear()
        loss = run.trainer.compute_loss(model, dict(batch))
        loss.backward()  # as training does: autograd.grad(loss, params) would prune the tower's path anyway
        grads = [p.grad.clone() for p in params]
        model.zero_grad(set_to_none=True)
        return loss.detach(), grads, runs[0], list(graphs)

    loss, grads, frozen_calls, frozen_graphs = loss_and_grads()
    parts.undo()
    assert not blocks[0]._forward_pre_hooks
    loss_before, grads_before, calls_before, graphs_before = loss_and_grads()

    assert torch.equal(loss, loss_before)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_before))
    assert frozen_graphs == [False] * len(blocks) and graphs_before == [True] * len(blocks)
    # Checkpointing recomputed every block in the backward pass when the tower carried a graph; now never.
    assert frozen_calls == len(blocks) and calls_before == 2 * len(blocks)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == trainable


def test_a_tower_trained_by_lora_keeps_autograd_where_its_gradients_flow(tmp_path):
    """LoRA in the tower: its frozen pieces (norms, base layers) are hooked, but every call downstream of an adapter
    keeps autograd: the vision adapters' gradients are exactly those without the hooks, and not zero."""
    run = prepare(tiny_recipe("qwen2_5_vl", tmp_path, "lora.targets=[decoder,projector,vision]"))
    model = run.trainer.model
    assert not any(n == "model.visual.blocks.0" for n in run.trainer.frozen_parts.names)
    randomised_adapters(model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    vision = [i for i, (n, p) in enumerate((n, p) for n, p in model.named_parameters() if p.requires_grad)
              if "visual.blocks" in n]
    batch = batch_of(run, three_samples())
    hooked = torch.autograd.grad(run.trainer.compute_loss(model, dict(batch)), params)
    run.trainer.frozen_parts.undo()
    plain = torch.autograd.grad(run.trainer.compute_loss(model, dict(batch)), params)
    assert vision and all(hooked[i].abs().sum() > 0 for i in vision)
    assert all(torch.equal(a, b) for a, b in zip(hooked, plain))


def test_a_separate_frozen_projector_runs_without_autograd_too(tmp_path):
    """LLaVA with LoRA on the decoder only: the whole tower and the projector (no adapter in it) are frozen parts."""
    run = prepare(tiny_recipe("llava", tmp_path, "lora.targets=[decoder]"))
    assert run.trainer.frozen_parts.names == ["model.vision_tower", "model.multi_modal_projector"]


# --- packed attention: the varlen path ---------------------------------------------------------------------------


def emulated(signature: str, seen: list):
    """A CPU stand-in for the CUDA varlen kernel, with the signature of torch 2.10 (`is_causal`, no GQA) or 2.14
    (`window_size`, `enable_gqa`): per-segment SDPA over the (tokens, heads, dim) layout, failing like the kernel on
    key/value heads it does not take."""

    def run(q, k, v, cu_q, cu_k, max_q, max_k, scale=None, enable_gqa=False, causal=False):
        seen.append({"heads": q.shape[1], "kv_heads": k.shape[1], "segments": cu_q.diff().tolist(), "gqa": enable_gqa,
                     "causal": causal})
        if k.shape[1] != q.shape[1] and not enable_gqa:
            raise RuntimeError("number of key/value heads must equal the query heads")
        assert torch.equal(cu_q, cu_k) and max_q == max_k == int(cu_q.diff().max())
        out = []
        for a, b in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
            out.append(torch.nn.functional.scaled_dot_product_attention(
                q[a:b].transpose(0, 1), k[a:b].transpose(0, 1), v[a:b].transpose(0, 1), is_causal=causal, scale=scale,
                enable_gqa=enable_gqa).transpose(0, 1))
        return torch.cat(out)

    if signature == "2.10":
        def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, is_causal=False, scale=None):
            return run(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale, causal=is_causal)
    else:
        def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1),
                        enable_gqa=False):
            return run(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale, enable_gqa, window_size == (-1, 0))
    return varlen_attn


@pytest.mark.parametrize("signature", ["2.10", "2.14"])
def test_varlen_path_trains_packed_rows_as_the_per_sample_path(signature, tmp_path, monkeypatch):
    """Qwen2.5-VL (4 query heads, 2 key/value heads), 3 samples in two packed rows (the second padded): one kernel
    call per layer over the whole batch, each sample and each padding token its own causal sequence, grouped-query
    attention by `enable_gqa` or by repeated key/value heads; losses and LoRA gradients equal the per-sample path's."""
    seen = []
    monkeypatch.setattr(attention, "varlen_kernel", lambda: functools.partial(attention.call_varlen,
                                                                              emulated(signature, seen)))
    monkeypatch.setattr(attention, "VARLEN_DTYPES", (torch.float32,))  # the stand-in computes in float32
    run = prepare(tiny_recipe("qwen2_5_vl", tmp_path, "training.packing=true", "training.max_length=2048"))
    trainer, model = run.trainer, run.trainer.model
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop; TRL's MoE aux loss divides by it
    randomised_adapters(model)
    model.train()
    samples = three_samples()
    batch = trainer.data_collator([samples[:2], samples[2:]])
    lengths = batch["attention_mask"].sum(1).tolist()
    params = [p for p in model.parameters() if p.requires_grad]
    base = model.get_base_model()
    pad = run.processor.tokenizer.pad_token_id
    results = {}
    for kernel in ("per_sample", "varlen"):
        used = {"varlen": 0, "per_sample": 0}
        packed, context = attention.packed_inputs(base, dict(batch), run.family, pad, kernel, used)
        with context:
            loss = trainer.compute_loss(model, packed)
            results[kernel] = (loss.detach(), torch.autograd.grad(loss, params), used)
    layers = base.config.get_text_config().num_hidden_layers
    assert results["per_sample"][2] == {"varlen": 0, "per_sample": layers}
    assert results["varlen"][2] == {"varlen": layers, "per_sample": 0}
    decoder = [call for call in seen if call["causal"]]  # (the vision tower's calls are not: prepare() saw a kernel)
    padding = sum(lengths[:2]) - lengths[2]
    assert decoder[0]["segments"] == lengths + [1] * padding and len(decoder) == layers
    assert (decoder[0]["heads"], decoder[0]["kv_heads"], decoder[0]["gqa"]) == (
        (4, 4, False) if signature == "2.10" else (4, 2, True))
    torch.testing.assert_close(results["varlen"][0], results["per_sample"][0], rtol=1e-5, atol=1e-6)
    for a, b in zip(results["varlen"][1], results["per_sample"][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


CAUSAL_PACKABLE = [f for f in zoo.FAMILIES if not (FAMILIES[f].no_packing or FAMILIES[f].prefix_lm
                                                    or FAMILIES[f].bidirectional_images)]


@pytest.mark.parametrize("family", CAUSAL_PACKABLE)
def test_varlen_packed_rows_train_as_unpacked_in_every_causal_family(family, tmp_path, monkeypatch):
    """Through the trainer's own packing step, with the stand-in kernel: every decoder attention call of the packed
    batch goes to the kernel, and the trainer's loss and LoRA gradients equal the unpacked batch's."""
    seen = []
    monkeypatch.setattr(attention, "varlen_kernel", lambda: functools.partial(attention.call_varlen,
                                                                              emulated("2.14", seen)))
    monkeypatch.setattr(attention, "VARLEN_DTYPES", (torch.float32,))
    run = prepare(tiny_recipe(family, tmp_path, "training.packing=true", "training.max_length=2048"))
    trainer, model = run.trainer, run.trainer.model
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop; TRL's MoE aux loss divides by it
    randomised_adapters(model)
    model.train()
    samples = three_samples()
    batch = trainer.data_collator([samples[:2], samples[2:]])
    params = [p for p in model.parameters() if p.requires_grad]
    supervised = int((batch["labels"][:, 1:] != -100).sum())
    unpacked = trainer.compute_loss(model, {k: v for k, v in batch.items() if k != "pack_sizes"},
                                    num_items_in_batch=supervised)
    unpacked_grads = torch.autograd.grad(unpacked, params)
    packed, context = trainer.pack(model, dict(batch))
    with context:
        loss = trainer.compute_loss(model, packed, num_items_in_batch=supervised)
        grads = torch.autograd.grad(loss, params)
    text_config = model.get_base_model().config.get_text_config()
    # Sliding-window layers (Gemma 4) keep the masked per-sample path: the kernel takes no window.
    windowed = (getattr(text_config, "layer_types", None) or []).count("sliding_attention")
    assert trainer.counts.packed_attention == {"varlen": text_config.num_hidden_layers - windowed,
                                               "per_sample": windowed}
    torch.testing.assert_close(loss, unpacked, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, unpacked_grads):
        assert_grads_close(a, b)


def test_qwen_vision_windows_go_to_the_varlen_kernel_in_one_call_per_layer(tmp_path, monkeypatch):
    """Qwen2.5-VL's tower on the varlen implementation: one bidirectional call per layer over every window (window
    layers) or image (full layers) of the batch instead of one SDPA call per window; loss and LoRA gradients equal
    the SDPA path's; switching back restores SDPA; the decoder's implementation is untouched."""
    seen = []
    monkeypatch.setattr(attention, "varlen_kernel", lambda: functools.partial(attention.call_varlen,
                                                                              emulated("2.14", seen)))
    monkeypatch.setattr(attention, "VARLEN_DTYPES", (torch.float32,))
    run = prepare(tiny_recipe("qwen2_5_vl", tmp_path))
    model = run.trainer.model
    vision = model.get_base_model().config.vision_config
    assert vision._attn_implementation == attention.VISION_VARLEN  # prepare() found a kernel: the tower uses it
    attention.use_vision_varlen(model, False)
    randomised_adapters(model)
    batch = batch_of(run, three_samples())
    params = [p for p in model.parameters() if p.requires_grad]
    sdpa_loss = run.trainer.compute_loss(model, dict(batch))
    sdpa_grads = torch.autograd.grad(sdpa_loss, params)
    assert not seen
    assert attention.use_vision_varlen(model)
    loss = run.trainer.compute_loss(model, dict(batch))
    grads = torch.autograd.grad(loss, params)
    images = (batch["image_grid_thw"].prod(-1)).tolist()
    assert len(seen) == vision.depth and not any(call["causal"] for call in seen)
    full = [call["segments"] for i, call in enumerate(seen) if i in vision.fullatt_block_indexes]
    assert full == [images] * len(vision.fullatt_block_indexes)
    windowed = [call["segments"] for i, call in enumerate(seen) if i not in vision.fullatt_block_indexes]
    assert all(sum(w) == sum(images) and len(w) > len(images) for w in windowed)  # windows within the images
    torch.testing.assert_close(loss, sdpa_loss, rtol=1e-6, atol=1e-6)
    for a, b in zip(grads, sdpa_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert model.get_base_model().config.get_text_config()._attn_implementation == "sdpa"
    # A call the kernel cannot take (here: float32) goes to SDPA window by window, never across windows.
    monkeypatch.setattr(attention, "VARLEN_DTYPES", (torch.bfloat16,))
    calls = len(seen)
    fallback = run.trainer.compute_loss(model, dict(batch))
    assert len(seen) == calls and vision._attn_implementation == attention.VISION_VARLEN
    torch.testing.assert_close(fallback, sdpa_loss, rtol=1e-6, atol=1e-6)
    attention.use_vision_varlen(model, False)
    assert vision._attn_implementation == "sdpa"


def test_vision_varlen_needs_a_kernel_and_a_qwen_tower(tmp_path):
    run = prepare(tiny_recipe("qwen2_5_vl", tmp_path / "qwen"))
    assert not attention.use_vision_varlen(run.trainer.model)  # no CUDA here: the tower stays on SDPA
    assert run.trainer.model.get_base_model().config.vision_config._attn_implementation == "sdpa"


def test_bidirectional_families_keep_the_masked_per_sample_path(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(attention, "varlen_kernel", lambda: functools.partial(attention.call_varlen,
                                                                              emulated("2.14", seen)))
    monkeypatch.setattr(attention, "VARLEN_DTYPES", (torch.float32,))
    for family in ("gemma3", "paligemma"):
        run = prepare(tiny_recipe(family, tmp_path / family, "training.packing=true", "training.max_length=2048"))
        batch = run.trainer.data_collator([three_samples()])
        used = {"varlen": 0, "per_sample": 0}
        packed, context = attention.packed_inputs(run.trainer.model.get_base_model(), batch, run.family,
                                                  run.processor.tokenizer.pad_token_id, "auto", used)
        with context, torch.no_grad():
            run.trainer.model(**{k: v for k, v in packed.items() if k != "labels"}, use_cache=False)
        assert used["varlen"] == 0 and used["per_sample"] > 0 and not seen, family  # (no Qwen tower here)


def test_the_varlen_kernel_is_none_without_cuda_and_asking_for_it_there_says_why(tmp_path):
    assert attention.varlen_kernel() is None  # the CPU: training keeps the per-sample path
    with pytest.raises(RuntimeError, match="'varlen'.*CUDA only"):
        with attention.attention_per_sample([[3]], torch.nn.Linear(1, 1), "varlen"):
            pass


# --- FLOPs and MFU ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava"])
def test_step_flops_agree_with_the_matmuls_torch_counts_in_a_training_step(family, tmp_path):
    """The formula against torch's own FLOP counter over the trainer's forward and backward, one sample at a time
    (the formula counts real tokens only, the counter padding too). Qwen2.5-VL: image grids, windowed and full
    vision attention; LLaVA: patches read from pixel_values."""
    from torch.utils.flop_counter import FlopCounterMode

    # Eager attention: torch has no FLOP formula for the CPU's fused attention kernel, and eager's matmuls are the
    # only batched ones (bmm), so attention and the linear layers are measured apart.
    run = prepare(tiny_recipe(family, tmp_path, "model.attn_implementation=eager"))
    model = run.trainer.model.train()
    shape = flops.model_shape(model, run.family)
    without_attention = dataclasses.replace(shape, layers=0, vision_width=0)
    for sample in three_samples():
        batch = batch_of(run, [sample])
        with FlopCounterMode(display=False) as counter:
            run.trainer.compute_loss(model, dict(batch)).backward()
        model.zero_grad(set_to_none=True)
        measured = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
        attention = measured.pop("aten.bmm")
        assert set(measured) <= {"aten.mm", "aten.addmm", "aten.convolution"}, measured
        linear = sum(measured.values())
        formula_linear = flops.batch_flops(without_attention, batch, model.config)
        formula_attention = flops.batch_flops(shape, batch, model.config) - formula_linear
        # The formula counts every parameter as a matmul weight (biases and norm weights too: 1-2% of these tiny
        # models) and an input gradient for every frozen layer (the projector's first takes none: its input comes
        # from the frozen tower), so it may only exceed what runs, and by little.
        assert 0.98 * formula_linear <= linear <= formula_linear, (linear, formula_linear)
        # Eager attention computes all n x n query-key pairs and a causal decoder needs the n(n+1)/2 the formula
        # counts (the vision tower's are all needed): the measured count lies between 1x and 2x the formula's.
        assert formula_attention < attention <= 2 * formula_attention, (attention, formula_attention)


def test_model_shape_counts_every_matmul_weight_once_and_batch_flops_reads_the_batch(tmp_path):
    run = prepare(tiny_recipe("qwen2_5_vl", tmp_path))
    model = run.trainer.model
    shape = flops.model_shape(model, run.family)
    base = model.get_base_model()
    embed = base.get_input_embeddings().weight
    frozen = sum(p.numel() for n, p in base.named_parameters() if "lora_" not in n and p is not embed)
    assert shape.decoder + shape.head + shape.vision + shape.projector == frozen
    assert shape.head == base.lm_head.weight.numel() and shape.lora["vision"] == 0
    assert shape.lora["decoder"] + shape.lora["projector"] == sum(p.numel() for p in model.parameters()
                                                                  if p.requires_grad)
    vision = base.config.vision_config
    assert (shape.vision_layers, shape.vision_full_layers, shape.window) == (
        vision.depth, len(vision.fullatt_block_indexes), (vision.window_size // vision.patch_size) ** 2)
    batch = batch_of(run, three_samples())
    patches = batch["image_grid_thw"].prod(-1).tolist()
    assert flops.image_patches(batch, base.config) == patches and len(patches) == 3
    expected = flops.step_flops(shape, batch["attention_mask"].sum(1).tolist(),
                                int((batch["labels"][:, 1:] != -100).sum()), patches,
                                int((batch["input_ids"] == base.config.image_token_id).sum()))
    assert flops.batch_flops(shape, batch, base.config) == expected > 0


def test_padding_images_are_not_counted_as_patches():
    class Vision:
        patch_size = 14

    class Config:
        vision_config = Vision()

    pixels = torch.zeros(2, 3, 3, 28, 42)  # 2 rows x 3 image slots, the last slot of each all-zero padding
    pixels[:, :2] = 1.0
    assert flops.image_patches({"pixel_values": pixels}, Config()) == [6] * 4


def test_mfu_is_model_flops_per_second_over_the_measured_rate_of_every_device():
    facts = flops.mfu_facts(flops=3.2e15, seconds=4.0, rate=8e14, processes=2)
    assert facts["model_flops_per_second"] == 8e14 and facts["mfu"] == 0.5
    assert "800 TFLOP/s per device" in facts["mfu_denominator"]


def test_no_mfu_off_cuda(tmp_path):
    """MFU's denominator is measured on CUDA only; a CPU run's summary has throughput but no MFU."""
    assert flops.matmul_rate(torch.device("cpu")) is None
    run = prepare(tiny_recipe("qwen2_vl", tmp_path, "training.max_steps=1"))
    run.trainer.train()
    facts = run.trainer.throughput(1.0)
    assert facts["tokens"] > 0 and "mfu" not in facts and run.trainer.counts.model_flops == 0.0


# --- Liger -----------------------------------------------------------------------------------------------------


def test_liger_is_refused_with_the_key_when_it_is_not_installed(tmp_path):
    if kernels.liger_support() is not None:
        pytest.skip("liger-kernel is installed here")
    with pytest.raises(RecipeError, match=r"use_liger_kernel: liger-kernel is not installed.*finetune\[liger\]"):
        prepare(tiny_recipe("qwen2_5_vl", tmp_path, "training.use_liger_kernel=true"))
    with pytest.raises(RecipeError, match="use_liger_kernel: liger-kernel is not installed"):  # finetune check too
        check(tiny_recipe("qwen2_5_vl", tmp_path, "training.use_liger_kernel=true"))


def test_liger_is_refused_for_a_family_it_has_no_kernels_for(tmp_path, monkeypatch):
    monkeypatch.setattr(kernels, "liger_support", lambda: {"qwen2_5_vl": None, "smolvlm": None})
    with pytest.raises(RecipeError, match="training.use_liger_kernel: Liger has no kernels for Idefics3"):
        prepare(tiny_recipe("idefics3", tmp_path, "training.use_liger_kernel=true"))
    with pytest.raises(RecipeError, match="training.liger_kernel_config: fused_linear_cross_entropy"):
        prepare(tiny_recipe("qwen2_5_vl", tmp_path, "training.use_liger_kernel=true",
                            "training.liger_kernel_config={fused_linear_cross_entropy: true}"))


# --- QLoRA ------------------------------------------------------------------------------------------------------


def test_qlora_keeps_the_frozen_weights_in_the_model_dtype(tmp_path):
    """No fp32 upcast of what stays unquantized (peft's prepare_model_for_kbit_training did it): vision tower,
    projector, embeddings and lm_head keep bf16, like TRL's own QLoRA path; every base weight is frozen."""
    import bitsandbytes as bnb

    from finetune.models.loading import load_family, load_model, load_processor

    recipe = tiny_recipe("qwen2_5_vl", tmp_path, "model.dtype=bfloat16", "quantization.load_in_4bit=true",
                         "quantization.compute_dtype=bfloat16")
    path, family = load_family(recipe.model)
    model = load_model(path, recipe.model, recipe.quantization, family)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    floating = {n: p.dtype for n, p in model.named_parameters() if p.is_floating_point()}
    assert floating and set(floating.values()) == {torch.bfloat16}, {d for d in floating.values()}
    assert model.lm_head.weight.dtype == torch.bfloat16 and model.model.visual.blocks[0].mlp.gate_proj.weight.dtype \
        == torch.bfloat16
    assert not any(p.requires_grad for p in model.parameters())
    batch = ChatCollator(load_processor(path, recipe.model), family)([three_samples()[0]])
    with torch.no_grad():
        out = model(**{k: v for k, v in batch.items() if k != "labels"})
    assert torch.isfinite(out.logits).all()
