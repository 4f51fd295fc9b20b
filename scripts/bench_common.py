"""What the GPU benchmarks share (scripts/bench_gpu.py and the modes it runs: bench_compare.py for --compare,
bench_memory.py for --recipe-memory): the models at published shapes with random weights, built once into a
checkpoint and loaded back through finetune's own loader, the optimizer, device synchronisation and peak memory,
and the results file every measurement is merged into. Imported, not run.
"""

from __future__ import annotations

import atexit
import gc
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

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

# Qwen2.5-VL's config keys for the tokens its processor inserts, and those tokens.
QWEN_TOKENS = {"image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
               "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>"}
# Qwen2.5-VL's own image limits (its preprocessor_config.json): a ChartQA chart keeps its size.
QWEN_PIXELS = {"min_pixels": 3136, "max_pixels": 12845056}
MARKER = "bench-checkpoint.json"  # written last: a folder holding it is a complete checkpoint
GIB = 2 ** 30


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


# --- the optimizer, the device, the results file ------------------------------------------------------------------


def optimizer_for(model, device: torch.device):
    """AdamW over the adapters, fused on a GPU (transformers' default optimizer there)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda")


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


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
