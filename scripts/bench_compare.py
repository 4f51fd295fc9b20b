"""`scripts/bench_gpu.py --compare`: the cookbook pipeline against finetune's, at real ChartQA shape, LoRA and QLoRA,
each lever of finetune's measured on and off in the same run (imported by bench_gpu.py; not run on its own).

Rows: one chart per row (a bar chart drawn at a spread of sizes, so that at Qwen2.5-VL's own pixel limits a row is
~300-1,300 tokens after image expansion; an 800x600 chart is ~610 image tokens), finetune's ChartQA system prompt, a
short question, a one- to three-word answer (finetune.data.formats.chartqa).

Per mode (LoRA bf16, QLoRA NF4), on one model:
  headline   every row once per side, timed after one warm-up step:
             cookbook  TRL's default vision collator over a seeded random order, micro-batch 4 padded to its longest
                       row; what TRL's SFTTrainer does on a GPU (its fused LM head on supervised positions; QLoRA
                       with bf16 frozen weights, as TRL loads them);
             finetune  its best settings: rows packed whole into rows of --pack-length tokens (best-fit decreasing),
                       one packed row per step, attention per sample through the varlen kernel (after an equality
                       probe), the frozen vision tower without autograd, QLoRA without the fp32 upcast;
             (the Qwen tower's windows through the varlen kernel too: one call per layer instead of one per window).
  sweep      --sweep-steps steps each over the first packs / batches: finetune's best, then one lever off at a time
             (LoRA: packing -> length-grouped batches of 4, decoder varlen -> per-sample SDPA, vision varlen -> SDPA
             per window, frozen tower -> autograd through it, gradient checkpointing off; QLoRA: the fp32 upcast
             back, packs of half and double the length), then Liger's kernels on (RoPE, RMSNorm, SwiGLU; when
             liger-kernel is installed and its loss agrees with the unpatched one; undone afterwards).
  profile    torch.profiler over 3 steps of finetune's LoRA side: the top operations by device time.
Both sides: same model, same LoRA (finetune's defaults), gradient checkpointing on, bf16 autocast, fused AdamW, the
same rows. Figures: non-padding tokens/s, samples/s, peak memory, MFU (finetune.training.flops; denominator the bf16
matmul rate measured in this run). Here: the rows, the headline runs and the report; how a side trains, is timed,
probed and profiled: bench_sides.py; the sweep: bench_levers.py; the model and device helpers: bench_common.py.
"""

from __future__ import annotations

import copy
import json
import math
import random
import time

import torch

from bench_common import (FULL, MARKER, TINY, device_name, load_for_mode, model_source, optimizer_for, release,
                          write_json)
from bench_levers import set_upcast, sweep
from bench_sides import Side, loss_of, probe_varlen, profile, timed

#: How many image tokens a chart becomes (log-uniform), and its aspect ratios: ~300-1,300 tokens a row with text.
IMAGE_TOKENS = (240, 1200)
ASPECTS = (0.55, 0.95)
QUESTIONS = ["What is the value of the {c} bar?", "Which bar is the highest?", "How many bars exceed {n}?",
             "What is the difference between the {c} and {d} bars?", "Is the {c} bar taller than the {d} one?"]
COLORS = ["red", "green", "blue", "orange", "purple", "gray", "teal"]


def chart_rows(n: int, seed: int, pixels_per_token: int, max_pixels: int) -> list[dict]:
    """ChartQA-shaped chat rows with decoded PIL charts (finetune's own ChartQA format and system prompt)."""
    from PIL import Image, ImageDraw

    from finetune.data.formats import chartqa

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        tokens = math.exp(rng.uniform(*map(math.log, IMAGE_TOKENS)))
        aspect = rng.uniform(*ASPECTS)
        area = min(tokens * pixels_per_token, max_pixels)
        w = max(28, int(math.sqrt(area / aspect)))
        h = max(28, int(w * aspect))
        img = Image.new("RGB", (w, h), "white")
        draw = ImageDraw.Draw(img)
        bars = rng.randint(3, 7)
        for i in range(bars):
            x = int(w * (0.05 + 0.9 * i / bars))
            draw.rectangle([x, int(h * rng.uniform(0.1, 0.8)), x + int(0.6 * w / bars), int(h * 0.9)],
                           fill=COLORS[i % len(COLORS)])
        question = rng.choice(QUESTIONS).format(c=rng.choice(COLORS), d=rng.choice(COLORS), n=rng.randint(5, 90))
        answer = rng.choice([str(rng.randint(1, 99)), rng.choice(COLORS), "Yes", "No", f"{rng.randint(1, 99)}.5"])
        row = chartqa({"image": "chart.png", "query": question, "label": [answer]}, None)
        rows.append({**row, "images": [img]})
    return rows


def cookbook_batches(rows: list[dict], processor, batch: int, seed: int) -> list[dict]:
    """TRL's default vision collator over a seeded random order: what `SFTTrainer` does out of the box."""
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    collator = DataCollatorForVisionLanguageModeling(processor)  # max_length None: never cut image tokens
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    return [collator([copy.deepcopy(rows[i]) for i in order[k:k + batch]]) for k in range(0, len(order), batch)]


def copy_rows(rows):
    return [copy.copy(r) for r in rows]


# --- the comparison ----------------------------------------------------------------------------------------------


def compare(name: str, args, device) -> dict:
    from finetune.batching.collate import ChatCollator
    from finetune.batching.lengths import Measurer
    from finetune.batching.packing import PackCollator, plan_packs
    from finetune.models.frozen import run_frozen_without_autograd
    from finetune.models.loading import load_family, load_processor
    from finetune.recipe import ModelConfig
    from finetune.training.flops import batch_flops, matmul_rate, model_shape

    started = time.monotonic()  # --deadline-s counts from here
    spec = (FULL if args.preset == "full" else TINY)[name]
    if spec["family"] != "qwen2_5_vl":
        raise SystemExit(f"--compare: {name} is not Qwen2.5-VL (the only family whose processor the random "
                         "checkpoint can borrow from the zoo)")
    path, built = model_source(name, args, device)
    cfg = ModelConfig(name_or_path=str(path))
    _, family = load_family(cfg)
    processor = load_processor(str(path), cfg)
    processor.image_processor.size = {"shortest_edge": 56 * 56, "longest_edge": args.max_pixels}
    vision = processor.image_processor
    per_token = (vision.patch_size * vision.merge_size) ** 2
    rows = chart_rows(args.samples, args.seed, per_token, args.max_pixels)
    pad_id = processor.tokenizer.pad_token_id
    import trl.trainer.sft_trainer  # noqa: F401 - imported before the collation clock starts
    from transformers.trainer_pt_utils import get_length_grouped_indices

    start = time.perf_counter()
    lengths = [Measurer(processor, family).measure(r)[0] for r in rows]
    chat = ChatCollator(copy.deepcopy(processor), family)
    packer = PackCollator(chat)

    def packed_batches(length: int, limit: int | None = None) -> list[dict]:
        packs = plan_packs(lengths, length)
        order = torch.randperm(len(packs), generator=torch.Generator().manual_seed(args.seed)).tolist()
        return [packer([[rows[i] for i in packs[p]]]) for p in order[:limit]]

    collated = {"cookbook": cookbook_batches(copy_rows(rows), copy.deepcopy(processor), args.batch, args.seed),
                "finetune": packed_batches(args.pack_length)}
    collate_s = round(time.perf_counter() - start, 1)
    k = args.sweep_steps
    grouped = get_length_grouped_indices(lengths, args.batch, mega_batch_mult=50,
                                         generator=torch.Generator().manual_seed(args.seed))
    short = {"grouped": [chat([rows[i] for i in grouped[j:j + args.batch]])
                         for j in range(0, min(len(grouped), k * args.batch), args.batch)],
             "half": packed_batches(max(args.pack_length // 2, max(lengths)), k),
             "double": packed_batches(args.pack_length * 2, k)}
    rate = matmul_rate(device)
    marker = path / MARKER
    report = {"model": name, "preset": args.preset, "device": device_name(device), "samples": len(rows),
              "batch": args.batch, "pack_length": args.pack_length, "gradient_checkpointing": True,
              "max_pixels": args.max_pixels, "row_tokens": {"min": min(lengths), "max": max(lengths),
                                                            "mean": round(sum(lengths) / len(lengths))},
              "peak_flops": rate, "matmul_tflops": round(rate / 1e12) if rate else None,
              "mfu_formula": "finetune.training.flops", "collate_s": collate_s,
              "checkpoint": json.loads(marker.read_text()) if marker.is_file() else None,
              "probes": {"varlen_kernel": probe_varlen(device)}, "runs": [], "ratios": {}, "sweep": {}}
    save = lambda: write_json(args.json, "compare", report)  # noqa: E731 - after every measurement
    save()
    print(f"\n{name}: {len(rows)} ChartQA rows of {min(lengths)}-{max(lengths)} tokens (mean "
          f"{report['row_tokens']['mean']}); cookbook micro-batch {args.batch} ({len(collated['cookbook'])} steps), "
          f"finetune packs of {args.pack_length} tokens ({len(collated['finetune'])} steps); varlen probe: "
          f"{report['probes']['varlen_kernel']['status']}\n", flush=True)
    kernel = "auto" if report["probes"]["varlen_kernel"]["ok"] else "per_sample"

    modes = sorted(args.modes, key=lambda m: m != "lora") if built is not None else args.modes
    headline_s = []

    def time_left() -> float:
        """Seconds this mode's sweep may still use: what --deadline-s leaves, less what the modes after it need
        for their headline runs (estimated from this one's, plus a model load)."""
        if not args.deadline_s:
            return float("inf")
        later = len(modes) - len(headline_s)
        return args.deadline_s - (time.monotonic() - started) - later * (1.5 * headline_s[-1] + 40)

    for mode in modes:
        model, family = load_for_mode(path, mode, built if mode == "lora" else None, device, True)
        built = None
        if mode == "qlora":
            set_upcast(model, False)  # finetune's loader no longer upcasts; TRL (the cookbook) never did
        config = model.get_base_model().config
        shape = model_shape(model, family)
        flops = {side: [batch_flops(shape, b, config) for b in batches] for side, batches in collated.items()}
        optimizer = optimizer_for(model, device)
        cookbook = Side("cookbook", collated["cookbook"], family, pad_id, packed=False)
        best = Side("finetune", collated["finetune"], family, pad_id, packed=True, kernel=kernel,
                    supervised_head=True, vision_varlen=kernel != "per_sample")
        if kernel != "per_sample":  # each kernel use on this model: one packed batch, its loss both ways
            first = collated["finetune"][0]
            exact = loss_of(Side("", [], family, pad_id, True, "per_sample"), model, first, device)
            for lever, side in (("decoder", Side("", [], family, pad_id, True, kernel)),
                                ("vision", Side("", [], family, pad_id, True, "per_sample", vision_varlen=True))):
                fast = loss_of(side, model, first, device)
                agree = abs(fast - exact) <= 1e-2 * abs(exact)
                report["probes"][f"varlen_{lever}_{mode}_loss"] = {"sdpa": exact, "varlen": fast, "ok": agree}
                if not agree and lever == "decoder":
                    best.kernel = "per_sample"
                if not agree and lever == "vision":
                    best.vision_varlen = False
            save()
        # Headline: the cookbook (no frozen-tower wrapping, as TRL runs), then finetune's best.
        mode_start = time.monotonic()
        r = timed(cookbook, model, cookbook.batches, optimizer, device, flops["cookbook"], rate)
        add(report, mode, r, save)
        frozen = run_frozen_without_autograd(model, family)
        r = timed(best, model, best.batches, optimizer, device, flops["finetune"], rate)
        add(report, mode, r, save)
        headline_s.append(time.monotonic() - mode_start)
        if mode == "lora" or args.preset == "tiny":
            report.setdefault("profile", {})[mode] = profile(best, model, best.batches[:3], optimizer, device)
            save()
        frozen = sweep(report, mode, model, family, best, short, optimizer, device, shape, rate, frozen, save,
                       time_left, r["step_s"])
        frozen.undo()
        del model, optimizer
        release(device)
    return report


def add(report: dict, mode: str, r: dict, save) -> None:
    r["mode"] = mode
    report["runs"].append(r)
    runs = {x["pipeline"]: x for x in report["runs"] if x["mode"] == mode}
    if "cookbook" in runs and len(runs) > 1:
        fastest = max((x for p, x in runs.items() if p != "cookbook"), key=lambda x: x["tokens_per_s"])
        cook = runs["cookbook"]
        report["ratios"][mode] = {
            "best": fastest["pipeline"], "tokens_per_s": round(fastest["tokens_per_s"] / cook["tokens_per_s"], 2),
            "peak_mem": round(fastest["peak_mem_gib"] / cook["peak_mem_gib"], 2) if cook["peak_mem_gib"] else None}
    save()
    mem = f"{r['peak_mem_gib']:.1f}" if r.get("peak_mem_gib") is not None else "-"
    mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "-"
    print(f"| {mode} | {r['pipeline']} | {r['steps']} | {r['padding']:.2f} | {r['tokens_per_s']:.0f} | "
          f"{r['samples_per_s']:.2f} | {mem} | {mfu} |", flush=True)
