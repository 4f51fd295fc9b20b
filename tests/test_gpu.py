"""GPU checks (`pytest -m gpu`, run by scripts/gpu_check.sh): finetune's CUDA paths on zoo models.

QLoRA (NF4, double quantization, bf16 compute) leaves vision tower, projector and lm_head unquantized; a bf16 LoRA
run with gradient checkpointing lowers its loss; its bf16 merge reproduces base + adapter; generation after
training runs on the GPU and answers. Skipped without CUDA; `FINETUNE_GPU_CHECK=cpu` runs the same tests on the
CPU (the script's --dry-run): float32 training there, since transformers has no bf16 mixed precision without a
GPU, and bitsandbytes' CPU kernels. Measured figures go to the JSON file `$FINETUNE_GPU_RESULTS` when it is set.
"""

import json
import os
import time
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch

import conftest
from conftest import ROOT
from finetune import zoo
from finetune.batching.collate import ChatCollator
from finetune.data.rows import chat_dataset
from finetune.models.loading import load_family, load_model, load_processor
from finetune.models.lora import group_of
from finetune.recipe import DataConfig, ModelConfig, QuantizationConfig, load_recipe

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = "bfloat16" if CUDA else "float32"
DATA = ROOT / "data/chartqa-tiny"

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not CUDA and os.environ.get("FINETUNE_GPU_CHECK") != "cpu",
                       reason="needs CUDA (FINETUNE_GPU_CHECK=cpu runs these on the CPU)"),
]


@pytest.fixture
def record(request):
    """record(**figures): add this test's measured figures to $FINETUNE_GPU_RESULTS."""

    def put(**figures):
        path = os.environ.get("FINETUNE_GPU_RESULTS")
        if not path:
            return
        results = json.loads(Path(path).read_text()) if Path(path).is_file() else {}
        results.setdefault(request.node.name, {}).update(figures)
        Path(path).write_text(json.dumps(results, indent=2, default=str))

    return put


def chart_rows(n: int, split: str = "train") -> list[dict]:
    """The first n rows of the bundled chart-QA sample as chat rows (decoded images), without a system prompt."""
    dataset = chat_dataset(DataConfig(path=str(DATA), format="chartqa", system_prompt="", max_samples=n), split)
    return [dataset[i] for i in range(n)]


@pytest.mark.parametrize("family", ["qwen2_5_vl", "gemma3", "mllama"])
def test_qlora_nf4_quantizes_the_decoder_only(family, record):
    path = str(zoo.ensure(family))
    cfg = ModelConfig(name_or_path=path, dtype=DTYPE)
    _, fam = load_family(cfg)
    quant = QuantizationConfig(load_in_4bit=True, quant_type="nf4", double_quant=True, compute_dtype=DTYPE)
    model = load_model(path, cfg, quant, fam)

    four_bit = {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    packed = [n for n, p in model.named_parameters() if isinstance(p, bnb.nn.Params4bit)]
    decoder = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and group_of(n, fam) == "decoder"]
    assert four_bit and {group_of(n, fam) for n in four_bit} == {"decoder"}
    assert sorted(four_bit) == sorted(decoder), "every decoder Linear is 4-bit"
    assert {group_of(n.removesuffix(".weight"), fam) for n in packed} == {"decoder"}
    full = {g: [n for n, m in model.named_modules() if type(m) is torch.nn.Linear and group_of(n, fam) == g]
            for g in ("vision", "projector")}
    assert full["vision"], "the vision tower keeps full-precision Linear layers"
    head = model.get_output_embeddings()
    assert type(head) is torch.nn.Linear and not isinstance(head.weight, bnb.nn.Params4bit), "lm_head unquantized"
    states = [m.weight.quant_state for m in four_bit.values()]
    assert {s.quant_type for s in states} == {"nf4"} and all(s.nested for s in states), "NF4, double-quantized"
    assert {m.compute_dtype for m in four_bit.values()} == {getattr(torch, DTYPE)}
    assert {p.device.type for p in model.parameters()} == {DEVICE}

    processor = load_processor(path, cfg)
    batch = ChatCollator(processor, fam)(chart_rows(2))
    with torch.no_grad(), torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=CUDA):
        loss = model(**batch.to(DEVICE)).loss
    assert torch.isfinite(loss), loss
    record(linear4bit=len(four_bit), vision_linear=len(full["vision"]), projector_linear=len(full["projector"]),
           vision_dtype=str(next(p for n, p in model.named_parameters() if group_of(n, fam) == "vision").dtype),
           lm_head_dtype=str(head.weight.dtype), loss=round(float(loss), 4),
           gpu_mem_gib=round(torch.cuda.max_memory_allocated() / 2**30, 3) if CUDA else None)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A LoRA run of the zoo Qwen2.5-VL through finetune's pipeline: bf16 and gradient checkpointing on a GPU."""
    from finetune.training.pipeline import prepare, save

    out = tmp_path_factory.mktemp("gpu") / "run"
    recipe = load_recipe(conftest.tiny_recipe(
        out, model={"name_or_path": "zoo:qwen2_5_vl", "dtype": DTYPE, "attn_implementation": "sdpa"},
        data={"system_prompt": ""}, lora={"r": 8, "alpha": 16},
        # 4 rows, batch 4: every step sees the same batch, so the loss must fall step after step.
        training={"max_steps": 20, "per_device_train_batch_size": 4, "bf16": CUDA, "activation_checkpointing": True}))
    run = prepare(recipe)
    started = time.time()
    result = run.trainer.train()
    run.trainer.save_model(str(out))
    save(run, result, out, started, run.trainer.throughput(result.metrics["train_runtime"]))
    model = run.trainer.model
    facts = {"device": str(next(model.parameters()).device), "args_device": str(run.trainer.args.device),
             "bf16": run.trainer.args.bf16, "base_dtype": str(model.get_input_embeddings().weight.dtype),
             "adapter_dtype": str(next(p for n, p in model.named_parameters() if "lora_" in n).dtype),
             # transformers 5.24's name; 5.17 (the GPU machine) has only is_gradient_checkpointing
             "gradient_checkpointing": bool(getattr(model.base_model.model, "is_activation_checkpointing", None)
                                            or model.base_model.model.is_gradient_checkpointing)}
    del run, model
    if CUDA:
        torch.cuda.empty_cache()
    return out, facts


def test_bf16_lora_training_lowers_the_loss(trained, record):
    out, facts = trained
    summary = json.loads((out / "run_summary.json").read_text())
    losses = [p["loss"] for p in summary["loss_curve"]]
    record(**facts, losses=[round(x, 4) for x in losses], train_runtime_s=summary["train_runtime_s"],
           tokens_per_second=summary["throughput"]["tokens_per_second"])
    assert facts["device"].startswith(DEVICE) and facts["args_device"].startswith(DEVICE)
    assert facts["base_dtype"] == f"torch.{DTYPE}" and facts["bf16"] is CUDA and facts["gradient_checkpointing"]
    assert len(losses) == 20 and torch.isfinite(torch.tensor(losses)).all()
    # lr 1e-2 on one repeated batch: it falls by half and more, with a few bumps on the way (measured on CPU:
    # 7.75 -> 0.91 over 20 steps, 5 of 19 steps up).
    assert losses[-1] < losses[0] / 2, losses
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.0, losses


def test_bf16_merge_reproduces_the_adapter(trained, record):
    """A bf16 export against base + adapter in float32, both on the GPU: the tolerance finetune ships for bf16."""
    from finetune.export.merging import DEFAULT_TOLERANCE, merge

    out, _ = trained
    merged = merge(out, out.parent / "merged", dtype="bfloat16", device=DEVICE)
    parity = json.loads((merged / "parity.json").read_text())
    text = parity["comparison"]["text_positions"]
    gen = parity["comparison"]["generation"]
    record(max_abs_diff=text["max_abs_diff"], kl_mean=text["kl_mean"], kl_max=text["kl_max"],
           argmax_agreement=text["argmax_agreement"], reference_max_abs_logit=text["reference_max_abs_logit"],
           positions=text["positions"], generations_identical=f"{gen['agree']}/{gen['total']}",
           tolerance=parity["tolerance"], passed=parity["passed"])
    assert parity["passed"] and parity["tolerance"] == DEFAULT_TOLERANCE["bfloat16"]
    # bf16 rounding must show (a zero would mean both sides ran in the same precision) and stay small.
    assert 0 < text["max_abs_diff"] <= DEFAULT_TOLERANCE["bfloat16"]
    assert text["kl_mean"] < 1e-3 and text["argmax_agreement"] >= 0.9, text


def test_generation_after_training_on_the_device(trained, record):
    from finetune.evaluation.inference import generate, load_target, prompt_messages

    out, _ = trained
    target = load_target(out)
    rows = chart_rows(4)
    answers = generate(target, [prompt_messages(r["messages"]) for r in rows], [r["images"] for r in rows],
                       max_new_tokens=8)
    expected = [r["messages"][-1]["content"][0]["text"] for r in rows]
    model = target.model
    batch = ChatCollator(target.processor, target.family)(rows).to(model.device)
    with torch.no_grad():
        trained_loss = float(model(**batch).loss)
        with model.disable_adapter():
            base_loss = float(model(**batch).loss)
    record(device=str(model.device), answers=answers, expected=expected,
           exact=sum(a == e for a, e in zip(answers, expected)), loss_with_adapter=round(trained_loss, 4),
           loss_without_adapter=round(base_loss, 4))
    assert model.device.type == DEVICE
    assert all(answers), answers
    assert trained_loss < base_loss - 1.0, (trained_loss, base_loss)
    # The one-word answers of the 4 trained rows come back (4/4 on the CPU in float32; bf16 may lose one or two).
    assert sum(a == e for a, e in zip(answers, expected)) >= 2, (answers, expected)


@pytest.mark.parametrize("attn", ["sdpa", "sdpa_varlen", "flash_attention_2"])
def test_packed_rows_train_as_unpacked_on_the_gpu(attn, tmp_path, record):
    """training.packing on the device: Qwen2.5-VL's packed rows give each sample its unpacked loss and the same
    gradients (fp32 on SDPA; bf16 on the varlen kernel, which SDPA packs take on CUDA in half precision, and on
    flash-attention, where the packs share one row, so bf16 tolerances)."""
    from finetune.training.pipeline import prepare
    from test_packing import check_packing_is_exact
    from test_training import tiny_recipe

    flash, varlen = attn.startswith("flash"), attn.endswith("varlen")
    if flash or varlen:
        if not CUDA:
            pytest.skip(f"{attn} needs CUDA")
    if flash:
        pytest.importorskip("flash_attn")
    if varlen:
        from finetune.training.attention import varlen_kernel
        if varlen_kernel() is None:
            pytest.skip("no varlen kernel in this torch (torch.nn.attention.varlen) and no flash-attn")
    dtype = "bfloat16" if flash or varlen else "float32"
    run = prepare(tiny_recipe("qwen2_5_vl", tmp_path, "training.packing=true",
                              f"model.attn_implementation={attn.removesuffix('_varlen')}", f"model.dtype={dtype}"))
    tolerance = ((2e-2, 2e-2), (5e-2, 1e-3)) if flash or varlen else ((1e-5, 1e-6), (1e-4, 1e-7))
    relative = check_packing_is_exact(run, [2, 1], *tolerance)
    calls = dict(run.trainer.counts.packed_attention)
    if varlen:
        assert calls["varlen"] > 0 and calls["per_sample"] == 0, calls
    record(attn=attn, dtype=dtype, loss_relative_difference=relative, packed_attention_calls=calls)
