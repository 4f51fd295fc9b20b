"""`finetune merge`: fold a run's LoRA adapter into its base model and save a standalone, checked checkpoint.

    out = finetune.merge("runs/tiny-chartqa", dtype="float32")   # -> runs/tiny-chartqa/merged

The export holds safetensors weights, config and generation config, the processor as trained (tokenizer, chat
template, image-processor settings), the resolved recipe, a model card (README.md) and `parity.json`: the merged
model, reloaded from the export folder alone, against base + adapter on real samples of the run's data.

QLoRA runs are never merged into 4-bit weights. `onto="original"` (default) merges onto the base's 16-bit weights,
which the adapter never saw (the difference to what was trained is the NF4 gap, reported separately);
`onto="dequantized"` merges onto dequantize(quantize(W)), the weights the adapter was trained against.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import torch

from ..batching.collate import ChatCollator
from ..data.rows import DataError, chat_dataset, with_reply
from ..evaluation.conversation import recipe_system_prompt
from ..evaluation.inference import stop_token_ids
from ..models.families import renamed
from ..models.loading import DTYPES, load_family, load_model, load_processor, stored_dtype, with_default_system
from ..recipe import QuantizationConfig, Recipe, load_recipe
from .card import render_card, serving_warnings
from .parity import compare, max_abs_diff, model_outputs

ONTO = ("original", "dequantized")

#: Parity tolerance (max |logit difference| on text positions) per export dtype. The reference is base + adapter in
#: float32, so a 16-bit export also carries its own rounding: 2^-9 (bf16) or 2^-12 (fp16) relative per weight and
#: per activation, compounded over the layers, on logits of magnitude ~30 in real models. Measured on the tiny zoo
#: models: 0.012-0.030 (bf16), 0.001-0.0035 (fp16), 5e-7-2e-6 (fp32); a bf16 run trained and merged on an H200
#: (scripts/gpu-results.md): 0.112, KL mean 3e-5. The 16-bit bounds are set for large models,
#: to catch a wrong or missing merge rather than rounding; KL and greedy agreement are reported beside them.
DEFAULT_TOLERANCE = {"float32": 1e-4, "float16": 0.25, "bfloat16": 1.0}

class ExportError(ValueError):
    """A merge or push that cannot run as asked; the message names the option, file or recipe key."""


class ParityError(ExportError):
    """The merged checkpoint does not reproduce base + adapter within the tolerance."""


def merge(run_dir: str | Path, out: str | Path | None = None, dtype: str | None = None, onto: str = "original",
          parity: bool = True, tolerance: float | None = None, samples: int = 4, max_new_tokens: int = 8,
          overwrite: bool = False, device: str = "cpu") -> Path:
    """Merge the run's adapter into its base model; save to `out` (default RUN_DIR/merged); check parity."""
    run_dir = Path(run_dir)
    recipe = run_recipe(run_dir)
    dtype = dtype or recipe.export.merge_dtype
    if dtype == "auto":  # as the base is stored: a float32 base is never rounded to 16 bits unless asked
        dtype = stored_dtype(recipe.model)
    if dtype not in DTYPES:
        raise ExportError(f"dtype: unknown '{dtype}'; choose from {', '.join(DTYPES)} (recipe key export.merge_dtype)")
    if onto not in ONTO:
        raise ExportError(f"onto: unknown '{onto}'; choose from {', '.join(ONTO)}")
    qlora = recipe.quantization.load_in_4bit
    if onto == "dequantized" and not qlora:
        raise ExportError(f"onto=dequantized: {run_dir} is not a QLoRA run (quantization.load_in_4bit is false); "
                          "its base weights were never quantized")
    tolerance = DEFAULT_TOLERANCE[dtype] if tolerance is None else tolerance
    out = Path(out) if out is not None else run_dir / "merged"

    base_path, family = load_family(recipe.model)
    # The run's copy: the template and image settings trained (a model.chat_template file is already in it).
    processor = load_processor(str(run_dir), dataclasses.replace(recipe.model, chat_template=None), family=family)
    rows = parity_rows(recipe, samples) if parity else []
    claim_folder(out, run_dir, overwrite)  # only once the data for the check is known to be there
    warnings = serving_warnings(run_dir, family)
    for w in warnings:
        print(f"[finetune] warning: {w}")

    from peft import PeftModel

    collator = ChatCollator(processor, family)
    # Weights do not depend on the attention kernel, and float32 rules out flash-attention: use the default one.
    as_trained = dataclasses.replace(recipe.model, attn_implementation=None)
    full = dataclasses.replace(as_trained, dtype="float32")  # merge in float32, round once at the end
    trained = base = None
    if qlora:
        # The model as trained: NF4 decoder + adapter. Its outputs measure the NF4 gap of an "original" merge.
        quantized = PeftModel.from_pretrained(
            load_model(base_path, as_trained, recipe.quantization, family), str(run_dir))
        if rows:
            trained = model_outputs(quantized, collator, rows, max_new_tokens)
        if onto == "dequantized":
            base = dequantize(quantized.unload())
        del quantized
    if base is None:
        base = load_model(base_path, full, QuantizationConfig(), family)
    model = PeftModel.from_pretrained(base.to(device), str(run_dir))
    reference = model_outputs(model, collator, rows, max_new_tokens) if rows else None
    merged = model.merge_and_unload()
    del model, base
    serve_as_trained(merged, processor, family, recipe)
    _save(merged.to(DTYPES[dtype]), processor, run_dir, out)
    del merged
    published_layout(out, family)

    report = {"merge": {"dtype": dtype, "onto": onto if qlora else "original", "qlora": qlora,
                        "family": family.name, "base_model": recipe.model.name_or_path, "run": run_dir.name},
              "serving_warnings": warnings, "checked": bool(rows), "layout": "published"}
    if rows:
        report.update(_check(out, family, rows, reference, trained, dtype, tolerance, max_new_tokens, device,
                             recipe, onto))
    (out / "parity.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")

    (out / "README.md").write_text(render_card(out, kind="merged"), encoding="utf-8")
    if rows:
        _print_parity(report)
        if not report["passed"]:
            raise ParityError(
                f"{out}: merged model differs from base + adapter by {report['max_abs_diff']:.3g} (max |logit "
                f"difference|), above the tolerance {tolerance:g} for {dtype}; details in {out / 'parity.json'}")
    print(f"[finetune] merged {dtype} checkpoint in {out}")
    return out


def serve_as_trained(model, processor, family, recipe: Recipe) -> None:
    """What an engine reading the export alone (vLLM, transformers) needs to answer like `finetune predict`: the
    recipe's system prompt as the template's default, and every token predict stops at as an end of sequence."""
    processor.chat_template = with_default_system(processor.chat_template, recipe_system_prompt(recipe))
    processor.tokenizer.chat_template = processor.chat_template
    model.generation_config.eos_token_id = stop_token_ids(model, processor, family)


def run_recipe(run_dir: Path) -> Recipe:
    """The resolved recipe of a training run folder, with a clear error for anything else."""
    if not (run_dir / "adapter_config.json").is_file():
        raise ExportError(f"{run_dir}: not a training run folder (no adapter_config.json); "
                          "pass the folder `finetune train` wrote (training.output_dir)")
    if not (run_dir / "recipe.yaml").is_file():
        raise ExportError(f"{run_dir}: recipe.yaml is missing; it names the base model the adapter belongs to")
    return load_recipe(run_dir / "recipe.yaml")


def parity_rows(recipe: Recipe, samples: int) -> list[dict]:
    """The first `samples` rows of the run's eval split (train split when there is none), as chat rows."""
    split = recipe.data.eval_split or recipe.data.train_split
    try:
        dataset = chat_dataset(recipe.data, split)
        rows = [row for row in (dataset[i] for i in range(min(4 * samples, len(dataset))))
                if not row["problem"]][:samples]
        if recipe.data.format == "preference":  # a DPO run: checked on the prompt with its chosen reply
            rows = [with_reply(row, "chosen") for row in rows]
    except (DataError, FileNotFoundError, ValueError) as e:
        raise ExportError(f"data.path: the parity check reads samples of the run's data (split '{split}') and "
                          f"could not: {e}; restore the data or skip the check (--no-parity / parity=False)") from e
    if not rows:
        raise ExportError(f"data.path: split '{split}' has no rows for the parity check (samples={samples}); "
                          "skip the check with --no-parity / parity=False")
    return rows


def dequantize(model):
    """Replace every bitsandbytes Linear4bit with a float32 Linear holding dequantize(quantize(W))."""
    import bitsandbytes as bnb

    for name, module in list(model.named_modules()):
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        data, state = module.weight.data, module.weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):  # repacked by an eval forward (see modeling.training_kernels)
            data, state = bnb.functional._convert_weight_packed_for_cpu_inverse(data, state)
        weight = bnb.functional.dequantize_4bit(data, state).float()
        linear = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                                 device="meta")
        linear.weight = torch.nn.Parameter(weight, requires_grad=False)
        if module.bias is not None:
            linear.bias = torch.nn.Parameter(module.bias.data.float(), requires_grad=False)
        model.set_submodule(name, linear)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)  # else save_pretrained writes a 4-bit quantization_config
    return model.to(torch.float32)


def claim_folder(out: Path, source: Path, overwrite: bool) -> None:
    """Make `out` an empty folder for an export of `source`, refusing to replace files unless `overwrite`."""
    if out.resolve() == source.resolve():
        raise ExportError(f"--out: {out} is the folder being exported; choose another folder")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ExportError(f"--out: {out} already holds files; choose another folder or pass --overwrite")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def _save(model, processor, run_dir: Path, out: Path) -> None:
    """Weights (safetensors shards), config, generation config, processor, and the run's recipe and results."""
    model.save_pretrained(out, max_shard_size="5GB", safe_serialization=True)
    if not (out / "generation_config.json").is_file() and getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out)
    processor.save_pretrained(out)
    for name in ("recipe.yaml", "run_summary.json", "loss_curve.png", "eval/metrics.json"):
        if (run_dir / name).is_file():
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(run_dir / name, out / name)


def published_layout(out: Path, family) -> None:
    """Rewrite the saved shards in the published checkpoints' tensor layout where transformers 5 saves another
    (`Family.hub_renames` / `hub_transposed`): vLLM and llama.cpp's converter read the published one, transformers
    both. The parity check that follows reloads these files, so a wrong rewrite fails it."""
    if not family.hub_renames and not family.hub_transposed:
        return
    from safetensors.torch import load_file, save_file

    def transposed(key: str, tensor):
        # transformers tells the two layouts apart by shape (Transpose(check_dims=True)): a square one it would
        # read as saved, so it stays as saved (no published checkpoint has square experts; the tiny zoo does).
        return key.endswith(family.hub_transposed) and tensor.ndim == 3 and tensor.shape[-1] != tensor.shape[-2]

    for shard in sorted(out.glob("*.safetensors")):
        tensors = load_file(shard)
        save_file({renamed(k, family.hub_renames): v.transpose(-1, -2).contiguous() if transposed(k, v) else v
                   for k, v in tensors.items()}, shard, metadata={"format": "pt"})
    index = out / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text(encoding="utf-8"))
        data["weight_map"] = {renamed(k, family.hub_renames): v for k, v in data["weight_map"].items()}
        index.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _check(out: Path, family, rows, reference, trained, dtype, tolerance, max_new_tokens, device, recipe,
           onto) -> dict:
    """Reload the export from its folder alone and compare it with base + adapter (and with the NF4 model)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(out, dtype=DTYPES[dtype]).to(device)
    collator = ChatCollator(AutoProcessor.from_pretrained(out), family)  # the export's processor, not the run's
    merged = model_outputs(model, collator, rows, max_new_tokens)
    del model
    base_note = ("NF4-dequantized base" if onto == "dequantized" else "original full-precision base") \
        if recipe.quantization.load_in_4bit else "base"
    result = {
        "samples": len(rows),
        "split": recipe.data.eval_split or recipe.data.train_split,
        "row_ids": [r["row_id"] for r in rows],
        "max_new_tokens": max_new_tokens,
        "reference": f"{base_note} (float32) + adapter, unmerged",
        "candidate": f"merged export reloaded from its folder ({dtype})",
        "comparison": compare(reference, merged),
        "tolerance": tolerance,
    }
    result["max_abs_diff"] = max_abs_diff(result["comparison"])
    result["passed"] = result["max_abs_diff"] <= tolerance
    if trained is not None:
        result["nf4_gap"] = {
            "what": "the model as trained (NF4 base + adapter) vs the merged export; informational, not checked",
            "comparison": compare(trained, merged),
        }
    return result


def _print_parity(report: dict) -> None:
    c = report["comparison"]
    lines = [f"[finetune] parity on {report['samples']} samples of '{report['split']}': {report['reference']} vs "
             f"{report['candidate']}"]
    if not c.get("inputs_equal"):
        lines.append("  the export's processor tokenizes the samples differently from the run's")
    else:
        for name in ("text_positions", "supervised_positions"):
            s = c[name]
            if s.get("positions"):
                lines.append(f"  {name.replace('_', ' ')} ({s['positions']}): max |logit diff| "
                             f"{s['max_abs_diff']:.3g}, KL mean {s['kl_mean']:.3g} max {s['kl_max']:.3g}")
        g = c["generation"]
        lines.append(f"  greedy generations ({report['max_new_tokens']} tokens): {g['agree']}/{g['total']} identical")
    if "nf4_gap" in report and report["nf4_gap"]["comparison"].get("inputs_equal"):
        gap = report["nf4_gap"]["comparison"]
        lines.append(f"  NF4 gap (as trained vs export): max |logit diff| {gap['text_positions']['max_abs_diff']:.3g}, "
                     f"KL mean {gap['text_positions']['kl_mean']:.3g}, generations "
                     f"{gap['generation']['agree']}/{gap['generation']['total']} identical")
    verdict = "passed" if report["passed"] else "FAILED"
    lines.append(f"  {verdict}: {report['max_abs_diff']:.3g} vs tolerance {report['tolerance']:g}")
    print("\n".join(lines))
