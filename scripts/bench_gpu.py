"""LoRA / QLoRA training throughput and memory at real model shapes, with random weights (no download, no network).

    python scripts/bench_gpu.py                               # on a GPU: the full-size shapes below
    python scripts/bench_gpu.py --preset tiny                 # anywhere (CPU): zoo-sized models, same code path
    python scripts/bench_gpu.py --models qwen2_5_vl_7b --modes qlora --batch 2 --steps 10
    python scripts/bench_gpu.py --models qwen2_5_vl_7b --compare           # cookbook vs finetune pipelines
    python scripts/bench_gpu.py --recipe-memory recipes/qwen2_5-vl-7b-qlora.yaml   # that recipe's peak memory

Each model is built from its published config with random weights (on the GPU, in bf16), saved as safetensors
(`--checkpoint-dir` keeps the folder for the next call) and loaded back through finetune's own loader
(`finetune.models.loading.load_model`), so QLoRA quantizes exactly as a recipe would. A bf16 LoRA run uses the model
as built when it is still in memory (the loader would return the same weights; re-reading 16 GB only costs
time). LoRA takes finetune's defaults (r 16, alpha 32, dropout 0.05 on decoder + projector, placed by the
family table). Steps run under bf16 autocast on a GPU, as the trainer's `bf16: true` does, with fused AdamW.

Default: a few optimizer steps on synthetic batches laid out as the real processor would (image tokens per
image, tiles, patches); tokens/s counts every token.

--compare (Qwen2.5-VL): the cookbook pipeline against finetune's at real ChartQA shape (rows of ~300-1,300 tokens,
one chart each), LoRA and QLoRA, with each of finetune's levers measured on and off, and a profile of finetune's
LoRA steps: scripts/bench_compare.py says how.

--recipe-memory RECIPE: the recipe's own settings (quantization, LoRA, batch, max_length, gradient checkpointing,
optimizer) through finetune's pipeline (`finetune.training.pipeline.prepare` and its trainer) on rows that fill
max_length (an 800x600 chart at Qwen2.5-VL's own pixel limits, plus text), for a few steps: peak GPU memory
(scripts/bench_memory.py). The models, optimizer and device helpers all three share: scripts/bench_common.py.

MFU: model FLOPs by finetune.training.flops (the formula is written out there: decoder forward and activation
backward, LoRA, causal attention per sample, vision tower and projector; recomputation not counted) over the bf16
dense matmul rate measured on the same device in the same run (finetune.training.flops.matmul_rate).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from bench_common import (FULL, QWEN_PIXELS, TINY, device_name, load_for_mode, model_source, optimizer_for, peak_gib,
                          release, reset_peak, sync, write_json)
from bench_compare import compare
from bench_memory import recipe_memory

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing


# --- default: synthetic batches -----------------------------------------------------------------------------------


def synthetic_batch(family: str, config, spec: dict, batch: int, text_tokens: int, device) -> tuple[dict, int]:
    """Inputs laid out as the family's processor lays them out (one image per sample); returns (batch, patches)."""
    g = torch.Generator().manual_seed(0)
    vocab = config.text_config.vocab_size

    def ids(n):
        return torch.randint(10, min(vocab, 32000) - 10, (batch, n), generator=g)

    if family == "qwen2_5_vl":
        v = config.vision_config
        side = spec["image_px"] // v.patch_size  # patches per side
        patches = side * side
        image = torch.full((batch, patches // v.spatial_merge_size ** 2), config.image_token_id)
        start, end = torch.full((batch, 1), config.vision_start_token_id), torch.full((batch, 1), config.vision_end_token_id)
        input_ids = torch.cat([start, image, end, ids(text_tokens)], 1)
        extra = dict(pixel_values=torch.randn(batch * patches, 3 * v.temporal_patch_size * v.patch_size ** 2),
                     image_grid_thw=torch.tensor([[1, side, side]] * batch))
        n_patches = batch * patches
    elif family == "smolvlm":
        v = config.vision_config
        per_tile = (v.image_size // v.patch_size) ** 2 // config.scale_factor ** 2
        image = torch.full((batch, per_tile * spec["tiles"]), config.image_token_id)
        input_ids = torch.cat([image, ids(text_tokens)], 1)
        extra = dict(pixel_values=torch.randn(batch, spec["tiles"], 3, v.image_size, v.image_size))
        n_patches = batch * spec["tiles"] * (v.image_size // v.patch_size) ** 2
    elif family == "mllama":
        v, tiles = config.vision_config, spec["tiles"]
        input_ids = torch.cat([torch.full((batch, 1), config.image_token_index), ids(text_tokens)], 1)
        seq = input_ids.shape[1]
        extra = dict(pixel_values=torch.randn(batch, 1, v.max_num_tiles, 3, v.image_size, v.image_size),
                     aspect_ratio_ids=torch.full((batch, 1), 1 + [list(a) for a in v.supported_aspect_ratios].index(
                         [1, tiles])),
                     aspect_ratio_mask=torch.tensor([[[1] * tiles + [0] * (v.max_num_tiles - tiles)]] * batch),
                     cross_attention_mask=torch.tensor([1] * tiles + [0] * (v.max_num_tiles - tiles)).expand(
                         batch, seq, 1, v.max_num_tiles).contiguous())
        n_patches = batch * v.max_num_tiles * ((v.image_size // v.patch_size) ** 2 + 1)
    else:
        raise ValueError(family)
    labels = input_ids.clone()
    labels[input_ids >= vocab] = -100
    for key in ("image_token_id", "image_token_index", "vision_start_token_id", "vision_end_token_id"):
        if getattr(config, key, None) is not None:
            labels[input_ids == getattr(config, key)] = -100
    out = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), labels=labels, **extra)
    return {k: v.to(device) for k, v in out.items()}, n_patches


def train_step(model, batch: dict, optimizer, device: torch.device) -> torch.Tensor:
    """One optimizer step; bf16 autocast on a GPU as the trainer's `bf16: true` (QLoRA keeps the tower in fp32)."""
    batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        loss = model(**batch, use_cache=False).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def run_one(name: str, mode: str, args, device: torch.device, path: Path, built) -> dict:
    from finetune.training.flops import batch_flops, matmul_rate, model_shape

    spec = (FULL if args.preset == "full" else TINY)[name]
    model, family = load_for_mode(path, mode, built, device, args.gradient_checkpointing)
    del built
    config = model.base_model.model.config
    batch, _ = synthetic_batch(spec["family"], config, spec, args.batch, args.text_tokens, device)
    optimizer = optimizer_for(model, device)
    times = []
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            reset_peak(device)
        sync(device)
        start = time.perf_counter()
        loss = train_step(model, batch, optimizer, device)
        sync(device)
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    tokens = batch["input_ids"].numel()
    shape = model_shape(model, family)
    peak = matmul_rate(device)
    params = shape.decoder + shape.head + shape.vision + shape.projector
    result = {"model": name, "mode": mode, "params_m": params / 1e6, "tokens": tokens,
              "step_s": step_s, "tokens_per_s": tokens / step_s, "loss": loss.item(), **peak_gib(device),
              "mfu": batch_flops(shape, batch, config) / step_s / peak if peak else None}
    del model, optimizer, batch
    release(device)
    return result


def synthetic(args, device: torch.device) -> int:
    print("\n| model | mode | params (M) | tokens/step | step (s) | tokens/s | peak GPU mem (GiB) | MFU |")
    print("|---|---|---|---|---|---|---|---|")
    results = []
    for name in args.models:
        path, built = model_source(name, args, device)
        modes = sorted(args.modes, key=lambda m: m != "lora") if built is not None else args.modes
        for mode in modes:
            r = run_one(name, mode, args, device, path, built if mode == "lora" else None)
            built = None  # it carries adapters now (or was never built here): free it before the next load
            release(device)
            results.append(r)
            write_json(args.json, "synthetic", results)
            mem = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] is not None else "-"
            mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
            print(f"| {name} | {mode} | {r['params_m']:,.1f} | {r['tokens']} | {r['step_s']:.3f} | "
                  f"{r['tokens_per_s']:.0f} | {mem} | {mfu} |", flush=True)
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=["full", "tiny"], default="full" if torch.cuda.is_available() else "tiny")
    p.add_argument("--models", nargs="+", default=list(FULL), choices=list(FULL))
    p.add_argument("--modes", nargs="+", default=["qlora", "lora"], choices=["qlora", "lora"])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--text-tokens", type=int, default=512, help="synthetic: text tokens per sample besides the image")
    p.add_argument("--steps", type=int, default=5, help="synthetic: timed steps")
    p.add_argument("--warmup", type=int, default=2, help="synthetic: untimed steps first")
    p.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false")
    p.add_argument("--compare", action="store_true", help="cookbook vs finetune pipelines on chat rows (Qwen2.5-VL)")
    p.add_argument("--samples", type=int, default=128, help="--compare: ChartQA rows (one epoch per pipeline)")
    p.add_argument("--max-pixels", type=int, default=QWEN_PIXELS["max_pixels"],
                   help="--compare: the image processor's pixel limit (default Qwen2.5-VL's own)")
    p.add_argument("--pack-length", type=int, default=2560, help="--compare: finetune's packed row, in tokens")
    p.add_argument("--sweep-steps", type=int, default=6, help="--compare: steps per lever on/off measurement")
    p.add_argument("--deadline-s", type=float, help="--compare: skip lever measurements that would end later")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--recipe-memory", metavar="RECIPE", help="peak memory of this Qwen2.5-VL-7B recipe's settings")
    p.add_argument("--recipe-steps", type=int, default=3, help="--recipe-memory: optimizer steps")
    p.add_argument("--max-length", type=int, help="--recipe-memory: instead of the recipe's training.max_length")
    p.add_argument("--checkpoint-dir", help="keep (and reuse) the random full-size checkpoints here")
    p.add_argument("--json", help="write the results to this JSON file, updated after every measurement")
    args = p.parse_args()
    if args.preset == "tiny":
        args.text_tokens = min(args.text_tokens, 64)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"device: {device_name(device)}; preset {args.preset}; batch {args.batch}; gradient checkpointing "
          f"{'on' if args.gradient_checkpointing else 'off'}", flush=True)
    if args.recipe_memory:
        r = recipe_memory(args, device)
        write_json(args.json, "recipe_memory", r)
        print(json.dumps(r, indent=2))
        return 0
    if args.compare:
        for name in args.models:
            compare(name, args, device)
        return 0
    print(f"synthetic batches: {args.text_tokens} text tokens + image per sample; median of {args.steps} steps "
          f"after {args.warmup} warm-up")
    return synthetic(args, device)


if __name__ == "__main__":
    raise SystemExit(main())
