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
max_length (an 800x600 chart at Qwen2.5-VL's own pixel limits, plus text), for a few steps: peak GPU memory.

MFU: model FLOPs by finetune.training.flops (the formula is written out there: decoder forward and activation
backward, LoRA, causal attention per sample, vision tower and projector; recomputation not counted) over the bf16
dense matmul rate measured on the same device in the same run (finetune.training.flops.matmul_rate).
"""

from __future__ import annotations

import argparse
import atexit
import copy
import gc
import itertools
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

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

# Qwen2.5-VL's config keys for the tokens its processor inserts, and those tokens.
QWEN_TOKENS = {"image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
               "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>"}
# Qwen2.5-VL's own image limits (its preprocessor_config.json): a ChartQA chart keeps its size.
QWEN_PIXELS = {"min_pixels": 3136, "max_pixels": 12845056}
MARKER = "bench-checkpoint.json"  # written last: a folder holding it is a complete checkpoint
GIB = 2 ** 30


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


# --- model: build once, load through finetune's loader ------------------------------------------------------------


def build_checkpoint(name: str, spec: dict, folder: Path, device: torch.device) -> tuple[Path, object]:
    """A random-weight checkpoint at the published shape in `folder` (reused when complete); the bf16 model
    too when it was built now (else None). Built directly on `device`: no 16 GB of CPU initialisation."""
    import transformers as T

    marker = folder / MARKER
    if marker.is_file() and json.loads(marker.read_text()).get("model") == name:
        print(f"[bench] reusing the {name} checkpoint in {folder}", flush=True)
        return folder, None
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    config = spec["config"](T)
    processor = None
    if spec["family"] == "qwen2_5_vl":  # --compare and --recipe-memory feed it rows through a real processor
        processor = zoo_processor(spec["family"])
        for key, token in QWEN_TOKENS.items():
            setattr(config, key, processor.tokenizer.convert_tokens_to_ids(token))
    start = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(device):
        model = T.AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
    model.to(device)  # a no-op, unless some part was created outside the device context
    built = time.perf_counter()
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:  # uninitialised memory would make every figure meaningless
        raise RuntimeError(f"{name}: {len(bad)} parameters are not finite after initialisation, e.g. {bad[:3]}")
    model.save_pretrained(folder)
    if processor is not None:
        processor.save_pretrained(folder)
    params = sum(p.numel() for p in model.parameters())
    info = {"model": name, "params": params, "build_s": round(built - start, 1),
            "save_s": round(time.perf_counter() - built, 1)}
    marker.write_text(json.dumps(info))
    print(f"[bench] built {name} ({params / 1e9:.2f}B parameters) on {device} in {info['build_s']} s, "
          f"saved to {folder} in {info['save_s']} s", flush=True)
    return folder, model


def zoo_processor(family: str):
    from transformers import AutoProcessor

    from finetune import zoo
    return AutoProcessor.from_pretrained(zoo.ensure(family, "tiny"))


def model_source(name: str, args, device: torch.device) -> tuple[Path, object]:
    """(checkpoint folder, bf16 model still in memory or None) for a model of the chosen preset."""
    from finetune import zoo
    if args.preset == "tiny":
        return Path(zoo.ensure(TINY[name]["family"], "tiny")), None
    if args.checkpoint_dir:
        folder = Path(args.checkpoint_dir) / name
    else:
        folder = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
        atexit.register(shutil.rmtree, folder, True)
    return build_checkpoint(name, FULL[name], folder, device)


def load_for_mode(path: Path, mode: str, built, device: torch.device, gradient_checkpointing: bool):
    """The model with finetune's default LoRA, as finetune loads it for `mode` (lora: bf16, qlora: NF4)."""
    from peft import get_peft_model

    from finetune.models.loading import load_family, load_model
    from finetune.models.lora import plan_lora
    from finetune.recipe import LoraConfig, ModelConfig, QuantizationConfig

    cfg = ModelConfig(name_or_path=str(path), dtype="bfloat16" if device.type == "cuda" else "float32")
    _, family = load_family(cfg)
    start = time.perf_counter()
    if mode == "lora" and built is not None:
        model = built
    else:
        model = load_model(str(path), cfg, QuantizationConfig(load_in_4bit=mode == "qlora"), family)
        if mode == "lora":
            model.to(device)  # QLoRA is placed on the GPU by the loader's device_map
    from trl.trainer.utils import add_fused_lm_head

    # TRL's SFTTrainer scores through its fused LM head (added before PEFT wraps the model); both sides use it.
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
    lora = LoraConfig()
    model = get_peft_model(model, plan_lora(model, family, lora).peft_config(lora))
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    print(f"[bench] {mode}: model ready in {time.perf_counter() - start:.1f} s", flush=True)
    return model, family


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --- steps and FLOPs ----------------------------------------------------------------------------------------------


def optimizer_for(model, device: torch.device):
    """AdamW over the adapters, fused on a GPU (transformers' default optimizer there)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda")


def train_step(model, batch: dict, optimizer, device: torch.device) -> torch.Tensor:
    """One optimizer step; bf16 autocast on a GPU as the trainer's `bf16: true` (QLoRA keeps the tower in fp32)."""
    batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        loss = model(**batch, use_cache=False).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: torch.device) -> dict:
    if device.type != "cuda":
        return {"peak_mem_gib": None, "peak_reserved_gib": None}
    return {"peak_mem_gib": round(torch.cuda.max_memory_allocated() / GIB, 2),
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / GIB, 2)}


def write_json(path: str | None, key: str, value) -> None:
    """Merge `key` into the JSON file at `path`, atomically (a run cut off mid-write leaves the previous one)."""
    if not path:
        return
    target = Path(path)
    data = json.loads(target.read_text()) if target.is_file() else {}
    data[key] = value
    tmp = target.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, target)


# --- default: synthetic batches -----------------------------------------------------------------------------------


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


# --- --compare: the cookbook pipeline vs finetune's ---------------------------------------------------------------


def cookbook_batches(rows: list[dict], processor, batch: int, seed: int) -> list[dict]:
    """TRL's default vision collator over a seeded random order: what `SFTTrainer` does out of the box."""
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    collator = DataCollatorForVisionLanguageModeling(processor)  # max_length None: never cut image tokens
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    return [collator([copy.deepcopy(rows[i]) for i in order[k:k + batch]]) for k in range(0, len(order), batch)]


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name() if device.type == "cuda" else "cpu"


# --- --recipe-memory: a recipe's peak GPU memory at its max_length ------------------------------------------------


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
    from bench_train import WORDS

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
    text = Path(args.recipe_memory).read_text()
    # The recipe's own memory statement: "~24 GB" before it was measured, "22.6 GB peak" after.
    claim = re.search(r"~?\s*(\d+(?:\.\d+)?)\s*GB(?: peak)?", text.split("\n\n")[0])
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
           "train_loss": result.training_loss, "claim_gb": float(claim.group(1)) if claim else None,
           "weights_gib": round(loaded, 2) if loaded is not None else None, **peak_gib(device)}
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info()
        context = (total - free) - torch.cuda.memory_reserved()  # CUDA context and libraries, outside the allocator
        out["device_total_gib"] = round(total / GIB, 1)
        out["peak_device_gb"] = round((torch.cuda.max_memory_reserved() + context) / 1e9, 1)  # ~ nvidia-smi at peak
    return out


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
        from bench_compare import compare

        for name in args.models:
            compare(name, args, device)
        return 0
    print(f"synthetic batches: {args.text_tokens} text tokens + image per sample; median of {args.steps} steps "
          f"after {args.warmup} warm-up")
    return synthetic(args, device)


if __name__ == "__main__":
    raise SystemExit(main())
