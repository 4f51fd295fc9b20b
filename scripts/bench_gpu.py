"""LoRA / QLoRA training throughput at real model shapes, with random weights (no download, no network).

    python scripts/bench_gpu.py                               # on a GPU: the full-size shapes below
    python scripts/bench_gpu.py --preset tiny                 # anywhere (CPU): zoo-sized models, same code path
    python scripts/bench_gpu.py --models qwen2_5_vl_7b --modes qlora --batch 2 --steps 10

Each model is built from its published config with random weights, saved as safetensors to a temporary folder
and loaded back through finetune's own loader (`finetune.modeling.load_model`, so QLoRA quantizes exactly as a
recipe would), LoRA is placed by the family table on decoder + projector, and a few optimizer steps run on
synthetic batches laid out as the real processor would (image tokens per image, tiles, patches).

Printed per run: tokens/s (all tokens in the batch, image tokens included), peak GPU memory and model FLOPs
utilisation. FLOPs per step count 2 x params x tokens for each forward matmul, the decoder twice more for the
backward pass (activation gradients only: its weights are frozen) and the vision encoder once (frozen, and no
gradient flows into it); attention score FLOPs are left out, so MFU is slightly understated.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time

import torch

# Published shapes (config.json of each hub model); weights are random.
FULL = {
    "qwen2_5_vl_7b": dict(
        family="qwen2_5_vl", image_px=448,
        config=lambda T: T.Qwen2_5_VLConfig(
            text_config=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                             num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768,
                             rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24],
                                              "rope_theta": 1e6}),
            vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                               patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                               fullatt_block_indexes=[7, 15, 23, 31], in_channels=3),
            image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653)),
    "smolvlm_2b": dict(
        family="smolvlm", tiles=5,  # a 2x2 split plus the global image
        config=lambda T: T.SmolVLMConfig(
            text_config=dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                             num_attention_heads=32, num_key_value_heads=32, vocab_size=49280,
                             max_position_embeddings=16384, rope_theta=273768.0),
            vision_config=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                               image_size=384, patch_size=14),
            scale_factor=3, image_token_id=49190)),
    "llama_3_2_11b_vision": dict(
        family="mllama", tiles=4,
        config=lambda T: T.MllamaConfig(
            text_config=dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=40, num_attention_heads=32,
                             num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072,
                             cross_attention_layers=[3, 8, 13, 18, 23, 28, 33, 38], rope_theta=500000.0),
            vision_config=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_global_layers=8,
                               attention_heads=16, image_size=560, patch_size=14, max_num_tiles=4,
                               intermediate_layers_indices=[3, 7, 15, 23, 30], vision_output_dim=7680,
                               supported_aspect_ratios=[[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1],
                                                        [4, 1]]),
            image_token_index=128256)),
}
# The zoo's tiny checkpoints of the same families: the whole script runs on a CPU in seconds.
TINY = {"qwen2_5_vl_7b": dict(family="qwen2_5_vl", image_px=56), "smolvlm_2b": dict(family="smolvlm", tiles=5),
        "llama_3_2_11b_vision": dict(family="mllama", tiles=2)}

# Dense bf16 peak (FLOP/s) by device-name substring, for MFU.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "L4": 121e12}


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


def parameter_counts(model, family) -> tuple[int, int]:
    """(decoder + lm_head, vision tower + projector) parameters that do matmuls (input embeddings excluded)."""
    from finetune.families import matches

    embed = model.get_input_embeddings().weight
    text = vision = 0
    for name, p in model.named_parameters():
        if p is embed or "lora_" in name:
            continue
        n = p.numel() * (2 if p.dtype == torch.uint8 else 1)  # 4-bit: two weights per byte
        if matches(family.vision, name.removeprefix("base_model.model.")) or \
                matches(family.projector, name.removeprefix("base_model.model.")):
            vision += n
        else:
            text += n
    return text, vision


def run_one(name: str, spec: dict, mode: str, args, device) -> dict:
    import transformers as T
    from peft import get_peft_model

    from finetune.modeling import load_family, load_model, plan_lora
    from finetune.recipe import LoraConfig, ModelConfig, QuantizationConfig
    from finetune import zoo

    dtype = "bfloat16" if device.type == "cuda" else "float32"
    with tempfile.TemporaryDirectory() as tmp:
        if args.preset == "full":
            torch.manual_seed(0)
            model = T.AutoModelForImageTextToText.from_config(spec["config"](T), dtype=getattr(torch, dtype))
            model.save_pretrained(tmp)  # safetensors, like a hub checkpoint
            del model
            gc.collect()
            path = tmp
        else:
            path = str(zoo.ensure(spec["family"], "tiny"))
        model_cfg = ModelConfig(name_or_path=path, dtype=dtype)
        _, family = load_family(model_cfg)
        model = load_model(path, model_cfg, QuantizationConfig(load_in_4bit=mode == "qlora"), family)
    if mode == "lora":
        model.to(device)
    plan = plan_lora(model, family, LoraConfig(r=16, alpha=32, dropout=0.0))
    model = get_peft_model(model, plan.peft_config(LoraConfig(r=16, alpha=32, dropout=0.0)))
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    config = model.base_model.model.config
    batch, n_patches = synthetic_batch(spec["family"], config, spec, args.batch, args.text_tokens, device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(args.warmup + args.steps):
        sync()
        start = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    tokens = batch["input_ids"].numel()
    text_params, vision_params = parameter_counts(model, family)
    flops = 4 * text_params * tokens + 2 * vision_params * n_patches
    peak = next((f for k, f in PEAK_FLOPS.items() if k in torch.cuda.get_device_name()), None) \
        if device.type == "cuda" else None
    result = {"model": name, "mode": mode, "params_m": (text_params + vision_params) / 1e6, "tokens": tokens,
              "step_s": step_s, "tokens_per_s": tokens / step_s, "loss": loss.item(),
              "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
              "mfu": flops / step_s / peak if peak else None}
    del model, optimizer, batch
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=["full", "tiny"], default="full" if torch.cuda.is_available() else "tiny")
    p.add_argument("--models", nargs="+", default=list(FULL), choices=list(FULL))
    p.add_argument("--modes", nargs="+", default=["qlora", "lora"], choices=["qlora", "lora"])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--text-tokens", type=int, default=512, help="text tokens per sample, besides the image's")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false")
    args = p.parse_args()
    if args.preset == "tiny":
        args.text_tokens = min(args.text_tokens, 64)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    specs = FULL if args.preset == "full" else TINY
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}; preset {args.preset}; "
          f"batch {args.batch} x ({args.text_tokens} text tokens + image); gradient checkpointing "
          f"{'on' if args.gradient_checkpointing else 'off'}; median of {args.steps} steps after {args.warmup} warm-up")
    print("\n| model | mode | params (M) | tokens/step | step (s) | tokens/s | peak GPU mem (GiB) | MFU |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.models:
        for mode in args.modes:
            r = run_one(name, specs[name], mode, args, device)
            mem = f"{r['peak_mem_gb']:.1f}" if r["peak_mem_gb"] is not None else "-"
            mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
            print(f"| {name} | {mode} | {r['params_m']:,.1f} | {r['tokens']} | {r['step_s']:.3f} | "
                  f"{r['tokens_per_s']:.0f} | {mem} | {mfu} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
