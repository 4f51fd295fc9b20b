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
matmul rate measured in this run).
"""

from __future__ import annotations

import contextlib
import copy
import math
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

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


# --- the model as each side trains it ----------------------------------------------------------------------------


def set_upcast(model, on: bool) -> None:
    """peft's prepare_model_for_kbit_training upcast (every non-4-bit weight to fp32; finetune did this before) or
    its undoing (bf16, as TRL leaves them): in place, exact both ways (bf16 -> fp32 -> bf16 is lossless)."""
    for p in model.parameters():
        if p.requires_grad or p.__class__.__name__ == "Params4bit" or not p.is_floating_point():
            continue
        p.data = p.data.to(torch.float32 if on else torch.bfloat16)


@contextlib.contextmanager
def liger_applied(model):
    """Liger's kernels on this model (fused cross-entropy off, as TRL applies them), undone on exit: Liger replaces
    classes and functions in transformers' modeling modules, which would reach every model built afterwards."""
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    modules = [m for name, m in list(sys.modules.items())
               if name.startswith("transformers.models.") and ".modeling_" in name]
    saved = [(m, dict(vars(m))) for m in modules]
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    _apply_liger_kernel_to_instance(model=base, fused_linear_cross_entropy=False, cross_entropy=False)
    try:
        yield
    finally:
        for m, attrs in saved:
            for k in set(vars(m)) - set(attrs):
                delattr(m, k)
            for k, v in attrs.items():
                setattr(m, k, v)


class Side:
    """How one side lays out and trains its batches."""

    def __init__(self, name: str, batches: list[dict], family, pad_id: int, packed: bool, kernel: str = "auto",
                 supervised_head: bool = False, vision_varlen: bool = False):
        self.name, self.batches, self.family, self.pad_id = name, batches, family, pad_id
        self.packed, self.kernel, self.supervised_head = packed, kernel, supervised_head
        self.vision_varlen = vision_varlen  # the Qwen tower's windows through the varlen kernel
        self.used = {"varlen": 0, "per_sample": 0}

    def step(self, model, batch: dict, optimizer, device) -> torch.Tensor:
        from finetune.training.attention import packed_inputs
        from finetune.training.trainer import lm_head_on_supervised_positions

        batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        attention = contextlib.nullcontext()
        if self.packed:
            base = model.get_base_model()
            batch, attention = packed_inputs(base, batch, self.family, self.pad_id, self.kernel, self.used)
        head = lm_head_on_supervised_positions() if self.supervised_head else contextlib.nullcontext()
        with attention, head:  # the backward too: gradient checkpointing runs the attention again there
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                out = model(**batch, use_cache=False, fused_lm_head=True)  # TRL's loss: its fused LM head
                loss = -out.log_probs.sum() / out.label_mask.sum().clamp(min=1)
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()


def real_tokens(batch: dict) -> int:
    return int(batch["attention_mask"].sum())


def positions(batch: dict) -> int:
    """Positions the model computes: a packed batch's packs, each as long as its longest (one pack per row here)."""
    if "pack_sizes" not in batch:
        return batch["attention_mask"].numel()
    per_pack = [int(t.sum()) for t in batch["attention_mask"].sum(1).split(batch["pack_sizes"])]
    return len(per_pack) * max(per_pack)


def timed(side: Side, model, batches: list[dict], optimizer, device, flops: list[float], peak: float | None) -> dict:
    """One warm-up step on the first batch (untimed), then every batch once; throughput, memory, MFU."""
    from bench_gpu import peak_gib, reset_peak, sync

    from finetune.training.attention import use_vision_varlen

    use_vision_varlen(model, False)
    vision_varlen = side.vision_varlen and use_vision_varlen(model)
    side.step(model, batches[0], optimizer, device)
    sync(device)
    reset_peak(device)
    start = time.perf_counter()
    losses = [side.step(model, b, optimizer, device) for b in batches]
    sync(device)
    seconds = time.perf_counter() - start
    losses = [float(x) for x in losses]
    if not all(math.isfinite(x) for x in losses):
        raise RuntimeError(f"{side.name}: non-finite training loss: {losses}")
    tokens = sum(real_tokens(b) for b in batches)
    samples = sum(len(b["input_ids"]) for b in batches)
    r = {"pipeline": side.name, "steps": len(batches), "samples": samples, "tokens": tokens,
         "seconds": round(seconds, 2), "tokens_per_s": tokens / seconds, "samples_per_s": samples / seconds,
         "step_s": seconds / len(batches), "tokens_per_step": tokens / len(batches),
         "padding": round(1 - tokens / sum(positions(b) for b in batches), 3),
         "first_loss": losses[0], "last_loss": losses[-1], "model_tflop": round(sum(flops) / 1e12, 2),
         "mfu": sum(flops) / seconds / peak if peak else None, **peak_gib(device)}
    if side.packed:
        r["attention_calls"] = dict(side.used)
    r["vision_varlen"] = vision_varlen
    return r


# --- probes: a lever is measured only after it computes what the path it replaces computes -----------------------


def probe_varlen(device) -> dict:
    """The varlen kernel against per-segment SDPA on random bf16 tensors (forward and input gradients)."""
    from finetune.training.attention import varlen_kernel

    kernel = varlen_kernel()
    if kernel is None:
        return {"status": "not available here", "ok": False}
    try:
        g = torch.Generator(device="cpu").manual_seed(0)
        segments, heads, kv_heads, dim = [300, 250, 150, 1, 1], 28, 4, 128
        shape = (1, heads, sum(segments), dim)
        q = torch.randn(shape, generator=g).to(device, torch.bfloat16).requires_grad_()
        k, v = (torch.randn(1, kv_heads, sum(segments), dim, generator=g).to(device, torch.bfloat16).requires_grad_()
                for _ in range(2))
        out = kernel(q, k, v, segments, dim ** -0.5)
        ref, start = [], 0
        for n in segments:
            s = slice(start, start + n)
            ref.append(torch.nn.functional.scaled_dot_product_attention(
                q[:, :, s], k[:, :, s], v[:, :, s], is_causal=True, enable_gqa=True).transpose(1, 2))
            start += n
        ref = torch.cat(ref, 1)
        grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
        ref_grads = torch.autograd.grad(ref.float().square().sum(), (q, k, v))
        diff = max([float((out - ref).detach().abs().max())]
                   + [float((a - b).abs().max() / b.abs().max()) for a, b in zip(grads, ref_grads)])
        return {"status": "passed" if diff < 3e-2 else "failed", "ok": diff < 3e-2, "max_difference": diff,
                "kernel": getattr(kernel.args[0], "__module__", "?") + "." + kernel.args[0].__name__}
    except Exception as e:  # noqa: BLE001 - a broken kernel is a finding, not a crash
        return {"status": f"failed: {type(e).__name__}: {str(e)[:300]}", "ok": False}


def loss_of(side: Side, model, batch: dict, device) -> float:
    """The side's loss on a batch, without training (the probes compare these)."""
    from finetune.training.attention import packed_inputs, use_vision_varlen

    use_vision_varlen(model, False)
    if side.vision_varlen:
        use_vision_varlen(model)
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    attention = contextlib.nullcontext()
    if side.packed:
        batch, attention = packed_inputs(model.get_base_model(), batch, side.family, side.pad_id, side.kernel,
                                         side.used)
    training = model.training
    model.eval()  # no dropout: the two losses a probe compares differ by the lever alone
    try:
        with torch.no_grad(), attention, torch.autocast(device.type, dtype=torch.bfloat16,
                                                        enabled=device.type == "cuda"):
            out = model(**batch, use_cache=False, fused_lm_head=True)
            return float(-out.log_probs.sum() / out.label_mask.sum().clamp(min=1))
    finally:
        model.train(training)


def profile(side: Side, model, batches: list[dict], optimizer, device, top: int = 15) -> list[dict]:
    """torch.profiler over a few steps: the operations with the most self time on the device (CPU in a dry run)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as profiler

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profiler(activities=activities) as prof:
        for b in batches:
            side.step(model, b, optimizer, device)
        if device.type == "cuda":
            torch.cuda.synchronize()
    events = prof.key_averages()

    def self_time(e) -> float:  # microseconds; the attribute names moved between torch versions
        if device.type != "cuda":
            return e.self_cpu_time_total
        return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)

    total = sum(self_time(e) for e in events) or 1
    rows = sorted(events, key=self_time, reverse=True)[:top]
    return [{"op": e.key[:80], "calls": e.count, "ms": round(self_time(e) / 1e3, 1),
             "share": round(self_time(e) / total, 3)} for e in rows]


def copy_rows(rows):
    return [copy.copy(r) for r in rows]


# --- the comparison ----------------------------------------------------------------------------------------------


def compare(name: str, args, device) -> dict:
    from bench_gpu import (FULL, MARKER, TINY, device_name, load_for_mode, model_source, optimizer_for, release,
                           write_json)

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
    from bench_gpu import cookbook_batches
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
              "checkpoint": __import__("json").loads(marker.read_text()) if marker.is_file() else None,
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


def sweep(report, mode, model, family, best: Side, short: dict, optimizer, device, shape, rate, frozen, save,
          time_left, step_s: float):
    """finetune's best over a few steps, then one lever off (or Liger on) at a time, each put back afterwards.
    LoRA: every lever. QLoRA: what differs from LoRA (the fp32 upcast, tokens per step) and Liger; the others are
    the same code on the same shapes. A lever that would not finish in `time_left()` (at twice the best step time)
    is recorded as skipped. Returns the frozen-tower wrapping in place at the end."""
    from finetune.models.frozen import run_frozen_without_autograd
    from finetune.training.flops import batch_flops
    from finetune.training.kernels import liger_support

    config = model.get_base_model().config
    k = len(short["half"])
    entries = report["sweep"].setdefault(mode, [])

    def measure(label: str, side: Side, batches: list[dict]) -> None:
        if time_left() < 2 * (len(batches) + 1) * step_s + 5:
            entries.append({"lever": label, "skipped": "out of time (--deadline-s)"})
            save()
            print(f"[bench] {mode} sweep: {label}: skipped, out of time", flush=True)
            return
        try:
            r = timed(side, model, batches, optimizer, device, [batch_flops(shape, b, config) for b in batches], rate)
            r["lever"] = label
        except Exception as e:  # noqa: BLE001 - one lever failing must not cost the others
            r = {"lever": label, "error": f"{type(e).__name__}: {str(e)[:300]}"}
        entries.append(r)
        save()
        print(f"[bench] {mode} sweep: {label}: " + (f"{r['tokens_per_s']:.0f} tokens/s" if "error" not in r
                                                    else r["error"]), flush=True)

    def variant(**changes) -> Side:
        side = copy.copy(best)
        side.used = {"varlen": 0, "per_sample": 0}
        for key, value in changes.items():
            setattr(side, key, value)
        return side

    measure("finetune (best)", variant(), best.batches[:k])
    if mode == "lora":
        measure("packing off (length-grouped batches of 4)", variant(packed=False), short["grouped"])
        if best.kernel != "per_sample":
            measure("decoder varlen off (per-sample SDPA)", variant(kernel="per_sample"), best.batches[:k])
        if best.vision_varlen:
            measure("vision varlen off (SDPA per window)", variant(vision_varlen=False), best.batches[:k])
        frozen.undo()
        measure("frozen tower with autograd", variant(), best.batches[:k])
        frozen = run_frozen_without_autograd(model, family)
        model.gradient_checkpointing_disable()
        measure("gradient checkpointing off", variant(), best.batches[:k])
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        set_upcast(model, True)
        measure("fp32 upcast of the non-4-bit weights (finetune before)", variant(), best.batches[:k])
        set_upcast(model, False)
        half = max(report["pack_length"] // 2, report["row_tokens"]["max"])
        measure(f"packs of {half} tokens", variant(), short["half"])
        measure(f"packs of {report['pack_length'] * 2} tokens", variant(), short["double"])
    probe = report["probes"].setdefault(f"liger_{mode}", {})
    if liger_support() is None:
        probe.update(status="liger-kernel not installed (or no Triton)", ok=False)
        save()
        return frozen
    try:  # Liger last: measured after a probe of its loss against the unpatched one, then undone
        before = loss_of(best, model, best.batches[0], device)
        with liger_applied(model):
            after = loss_of(best, model, best.batches[0], device)
            ok = abs(after - before) <= 2e-2 * abs(before)
            probe.update(status="passed" if ok else "failed", ok=ok, loss=before, loss_with_liger=after)
            save()
            if ok:
                measure("Liger on (RoPE, RMSNorm, SwiGLU)", variant(), best.batches[:k])
    except Exception as e:  # noqa: BLE001 - a broken lever is recorded, not a crash
        probe.update(status=f"failed: {type(e).__name__}: {str(e)[:300]}", ok=False)
        save()
    return frozen
