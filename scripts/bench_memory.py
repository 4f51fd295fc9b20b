"""`scripts/bench_gpu.py --recipe-memory RECIPE`: a recipe's peak GPU memory at its own max_length (imported by
bench_gpu.py; not run on its own).

    python scripts/bench_gpu.py --recipe-memory recipes/qwen2_5-vl-7b-qlora.yaml   # on a GPU, full size
    python scripts/bench_gpu.py --recipe-memory recipes/qwen2_5-vl-7b-qlora.yaml --preset tiny --max-length 1024

The recipe's own settings (quantization, LoRA, batch, max_length, gradient checkpointing, optimizer) go through
finetune's pipeline (`finetune.training.pipeline.prepare` and its trainer) for a few steps, on the random
Qwen2.5-VL-7B checkpoint (scripts/bench_common.py) and rows that fill max_length: an 800x600 chart at Qwen2.5-VL's
own pixel limits plus a question padded with words. Figures: the weights once loaded, peak allocated and reserved
memory, peak on the device (~ what nvidia-smi shows), next to the figure the recipe's header comment states.
"""

from __future__ import annotations

import itertools
import json
import re
import tempfile
import time
from pathlib import Path

import torch

from bench_common import GIB, QWEN_PIXELS, device_name, model_source, peak_gib, release, reset_peak
from bench_train import WORDS

#: The recipe's own memory statement: "~24 GB" before it was measured, "22.6 GB peak" after.
CLAIM = re.compile(r"~?\s*(\d+(?:\.\d+)?)\s*GB(?: peak)?")


def recipe_claim_gb(text: str) -> float | None:
    """The GPU memory a recipe says it needs: the first GB figure of its header comment (its first paragraph),
    or None when the header states none."""
    claim = CLAIM.search(text.split("\n\n")[0])
    return float(claim.group(1)) if claim else None


def chart_image(path: Path, size: tuple[int, int] = (800, 600)) -> Path:
    """A bar chart the size of a ChartQA image."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    for i, color in enumerate(["red", "green", "blue", "orange", "purple"]):
        x = 60 + i * 140
        draw.rectangle([x, 550 - 90 * (i + 1), x + 100, 550], fill=color)
    img.save(path)
    return path


def filled_query(collator, make_row, target: int) -> tuple[str, int]:
    """A question long enough that the collated row is just under `target` tokens; returns it and its length."""

    def length(n: int) -> int:
        return int(collator([make_row(words(n))])["input_ids"].shape[1])

    def words(n: int) -> str:
        return " ".join(itertools.islice(itertools.cycle(WORDS), n))

    low, high = length(50), length(150)
    per_word = max((high - low) / 100, 0.1)
    n = max(1, int(50 + (target - 8 - low) / per_word))
    for _ in range(6):  # tokenisation is near-linear in words: a few corrections land within the margin
        got = length(n)
        if target - 16 <= got <= target:
            return words(n), got
        n = max(1, n + int((target - 8 - got) / per_word))
    raise RuntimeError(f"could not fill a row to {target} tokens (last: {got} with {n} words)")


def recipe_memory(args, device: torch.device) -> dict:
    from finetune.data.formats import chartqa
    from finetune.data.images import load_image
    from finetune.training.pipeline import load_processing, prepare
    from finetune.recipe import load_recipe

    name = "qwen2_5_vl_7b"
    path, built = model_source(name, args, device)
    del built  # the pipeline loads its own copy, as a real run does
    release(device)
    claim = recipe_claim_gb(Path(args.recipe_memory).read_text())
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        data.mkdir()
        image = chart_image(data / "chart.png")
        pixels = ", ".join(f"{k}: {v}" for k, v in QWEN_PIXELS.items())
        overrides = [f"model.name_or_path={path}", f"data.path={data}", "data.format=chartqa", "data.eval_split=",
                     f"data.image_processor={{{pixels}}}", f"training.output_dir={tmp}/run",
                     f"training.max_steps={args.recipe_steps}", "training.gradient_accumulation_steps=1",
                     "training.logging_steps=1", "training.save_strategy='no'", "training.disable_tqdm=true",
                     "evaluation.enabled=false"]
        if args.max_length:
            overrides.append(f"training.max_length={args.max_length}")
        if device.type != "cuda":  # the dry run: CPU, no bf16 mixed precision
            overrides += ["model.dtype=float32", "quantization.compute_dtype=float32", "training.bf16=false"]
        recipe = load_recipe(args.recipe_memory, overrides)
        t = recipe.training
        _, _, _, collator = load_processing(recipe)

        def make_row(query: str) -> dict:
            row = chartqa({"image": str(image), "query": query, "label": ["blue"]}, recipe.data.system_prompt)
            return {**row, "images": [load_image("chart.png", data)]}

        query, length = filled_query(collator, make_row, t.max_length)
        rows = t.per_device_train_batch_size * t.gradient_accumulation_steps * t.max_steps
        (data / "train.jsonl").write_text("".join(
            json.dumps({"image": "chart.png", "query": query, "label": ["blue"]}) + "\n" for _ in range(rows)))
        run = prepare(recipe)
        loaded = torch.cuda.memory_allocated() / GIB if device.type == "cuda" else None
        reset_peak(device)
        start = time.perf_counter()
        result = run.trainer.train()
        seconds = time.perf_counter() - start
        losses = [e["loss"] for e in run.trainer.state.log_history if "loss" in e]
    out = {"recipe": args.recipe_memory, "model": name, "preset": args.preset, "device": device_name(device),
           "max_length": t.max_length, "batch": t.per_device_train_batch_size,
           "gradient_checkpointing": t.activation_checkpointing, "load_in_4bit": recipe.quantization.load_in_4bit,
           "optim": str(t.optim), "steps": run.trainer.state.global_step, "rows": rows,
           "sample_tokens": {"min": min(run.train_scan.lengths), "max": max(run.train_scan.lengths)},
           "calibrated_tokens": length, "train_s": round(seconds, 1), "losses": losses,
           "train_loss": result.training_loss, "claim_gb": claim,
           "weights_gib": round(loaded, 2) if loaded is not None else None, **peak_gib(device)}
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info()
        context = (total - free) - torch.cuda.memory_reserved()  # CUDA context and libraries, outside the allocator
        out["device_total_gib"] = round(total / GIB, 1)
        out["peak_device_gb"] = round((torch.cuda.max_memory_reserved() + context) / 1e9, 1)  # ~ nvidia-smi at peak
    return out
