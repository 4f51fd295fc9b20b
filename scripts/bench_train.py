"""Training throughput, side by side: the cookbook pipeline vs finetune's defaults, same model, data and seed.

    python scripts/bench_train.py                  # zoo Qwen2-VL "bench" preset (~26M params), 160 samples
    python scripts/bench_train.py --samples 64 --preset tiny --repeats 1   # a quick look

(a) cookbook: TRL SFTTrainer with its default vision collator, random batches padded to the longest, TRL's
    defaults (gradient checkpointing on), batch 8.
(b) finetune: finetune.pipeline.prepare() on a recipe with the same batch, learning rate and steps: assistant-only
    labels, batches grouped by true length after image expansion (from the pre-flight scan), micro-batch 4 with
    gradient accumulation 2 (same effective batch), gradient checkpointing off.

Each side runs in its own subprocess (so peak RSS is its own), `--repeats` times; the table shows medians.
Both sides see every sample exactly once (one epoch). Training losses are over different tokens (the cookbook
trains on prompt and image tokens too), so both adapters are also scored on the same held-out batch with
assistant-only labels: `eval loss`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = ("the chart shows a bar line value of red blue green yellow with two three four five high low trend over "
         "year month share percent total largest smallest increase decrease between compared").split()


def make_data(folder: Path, n: int, seed: int) -> Path:
    """Chat rows with a realistic spread: image sizes, images per row, turns and answer lengths all vary."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    (folder / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        kind = rng.choices(["chartqa", "caption", "multiturn", "multiimage"], [0.4, 0.3, 0.2, 0.1])[0]
        n_images = 2 if kind == "multiimage" else 1
        paths = []
        for k in range(n_images):
            w, h = rng.randint(112, 448), rng.randint(112, 448)
            img = Image.new("RGB", (w, h), "white")
            d = ImageDraw.Draw(img)
            for _ in range(rng.randint(2, 6)):
                x0, y0 = rng.randrange(w - 20), rng.randrange(h - 20)
                d.rectangle([x0, y0, x0 + rng.randint(10, 60), y0 + rng.randint(10, 60)],
                            fill=tuple(rng.randrange(256) for _ in range(3)))
            path = f"img/{i}-{k}.png"
            img.save(folder / path)
            paths.append(path)

        def words(lo, hi):
            return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))

        user = [{"type": "image"}] * n_images + [{"type": "text", "text": words(5, 15) + "?"}]
        answer_len = {"chartqa": (1, 3), "caption": (20, 60), "multiturn": (5, 20), "multiimage": (5, 30)}[kind]
        messages = [{"role": "user", "content": user},
                    {"role": "assistant", "content": [{"type": "text", "text": words(*answer_len)}]}]
        if kind == "multiturn":
            for _ in range(rng.randint(1, 2)):
                messages += [{"role": "user", "content": [{"type": "text", "text": words(4, 10) + "?"}]},
                             {"role": "assistant", "content": [{"type": "text", "text": words(3, 15)}]}]
        rows.append({"messages": messages, "images": paths})
    path = folder / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


class Meter:
    """Wraps a collator: counts real and padded tokens and the time spent building batches."""

    def __init__(self, collator):
        self.collator, self.tokens, self.padded, self.samples, self.seconds = collator, 0, 0, 0, 0.0

    def __call__(self, rows):
        start = time.perf_counter()
        batch = self.collator(rows)
        self.seconds += time.perf_counter() - start
        self.tokens += int(batch["attention_mask"].sum())
        self.padded += batch["input_ids"].numel()
        self.samples += len(rows)
        return batch

    def __getattr__(self, name):  # the trainer may read collator attributes
        return getattr(self.collator, name)


def run_side(side: str, data: Path, model_path: str, args) -> dict:
    """One training run; returns its measurements."""
    import torch
    from transformers import AutoProcessor, TrainerCallback

    torch.manual_seed(args.seed)
    processor = AutoProcessor.from_pretrained(model_path)
    image_size = {"shortest_edge": 56 * 56, "longest_edge": args.max_pixels}
    first_step = {}

    class FirstStep(TrainerCallback):
        # Throughput is measured after the first optimizer step: that one also pays one-off lazy imports.
        def on_step_end(self, a, state, control, **kw):
            if "t" not in first_step:
                first_step.update(t=time.perf_counter(), tokens=meter.tokens, samples=meter.samples)

    if side == "cookbook":
        from peft import LoraConfig
        from transformers import AutoModelForImageTextToText
        from trl import SFTConfig, SFTTrainer

        import datasets

        processor.image_processor.size = image_size
        rows = [json.loads(line) for line in data.read_text().splitlines()]
        rows = [{**r, "images": [str(data.parent / p) for p in r["images"]]} for r in rows]
        # Images as the Image feature, decoded lazily on access: how hub datasets arrive in the cookbook.
        ds = datasets.Dataset.from_list(rows).cast_column("images", datasets.List(datasets.Image()))
        model = AutoModelForImageTextToText.from_pretrained(model_path, dtype=torch.float32)
        config = SFTConfig(output_dir=args.tmp + "/cookbook", per_device_train_batch_size=args.batch,
                           num_train_epochs=1, learning_rate=args.lr, logging_steps=1, save_strategy="no",
                           report_to="none", bf16=False, use_cpu=True, max_length=None, seed=args.seed,
                           dataloader_num_workers=0, disable_tqdm=True)
        lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                          target_modules=r"model\.language_model.*\.(q|k|v|o|gate|up|down)_proj")
        trainer = SFTTrainer(model=model, args=config, train_dataset=ds, processing_class=processor,
                             peft_config=lora, callbacks=[FirstStep()])
    else:
        from finetune.pipeline import prepare
        from finetune.recipe import load_recipe

        recipe = load_recipe({
            "model": {"name_or_path": model_path, "dtype": "float32"},
            "data": {"path": str(data), "format": "messages"},
            "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "targets": ["decoder"]},
            "evaluation": {"enabled": False},
            "training": {"output_dir": args.tmp + "/finetune", "per_device_train_batch_size": args.batch // 2,
                         "gradient_accumulation_steps": 2, "num_train_epochs": 1, "learning_rate": args.lr,
                         "logging_steps": 1, "save_strategy": "no", "bf16": False, "seed": args.seed,
                         "max_length": None, "activation_checkpointing": False, "dataloader_num_workers": 0,
                         "train_sampling_strategy": "group_by_length", "disable_tqdm": True},
        })
        import finetune.pipeline

        load_processor = finetune.pipeline.load_processor

        def sized_processor(*a, **k):  # the same image budget as the cookbook side
            proc = load_processor(*a, **k)
            proc.image_processor.size = image_size
            return proc

        finetune.pipeline.load_processor = sized_processor
        run = prepare(recipe)
        trainer = run.trainer
        trainer.add_callback(FirstStep())
    meter = Meter(trainer.data_collator)
    trainer.data_collator = meter
    start = time.perf_counter()
    result = trainer.train()
    end = time.perf_counter()
    seconds = end - start
    steady = end - first_step["t"]
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return {
        "side": side, "seconds": seconds, "tokens_per_s": (meter.tokens - first_step["tokens"]) / steady,
        "samples_per_s": (meter.samples - first_step["samples"]) / steady,
        "padding": 1 - meter.tokens / max(1, meter.padded),
        "first_step_s": first_step.get("t", start) - start, "data_wait": meter.seconds / seconds,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, "samples": meter.samples,
        "train_loss": result.training_loss, "final_loss": losses[-1] if losses else None,
        "eval_loss": held_out_loss(trainer.model, processor, data, model_path, image_size),
    }


def held_out_loss(model, processor, data: Path, model_path: str, image_size: dict) -> float:
    """Assistant-only loss on the first 16 rows, with finetune's collator: comparable across both sides."""
    import copy

    import torch

    from finetune.collate import ChatCollator
    from finetune.data import load_image
    from finetune.modeling import load_family
    from finetune.recipe import ModelConfig

    _, family = load_family(ModelConfig(name_or_path=model_path))
    processor = copy.deepcopy(processor)
    processor.image_processor.size = image_size
    rows = [json.loads(line) for line in data.read_text().splitlines()[:16]]
    collator = ChatCollator(processor, family)
    model.eval()
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(rows), 4):
            batch = collator([{"messages": r["messages"], "images": [load_image(p, data.parent) for p in r["images"]]}
                              for r in rows[i:i + 4]])
            total += float(model(**batch).loss)
    return total / 4


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="bench", help="zoo size preset: tiny, small, bench")
    p.add_argument("--samples", type=int, default=160)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--max-pixels", type=int, default=448 * 448, help="image budget (up to 256 tokens per image)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--side", help=argparse.SUPPRESS)  # internal: run one side in this process
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--tmp", help=argparse.SUPPRESS)
    args = p.parse_args()

    from finetune import zoo

    model_path = str(zoo.ensure("qwen2_vl", args.preset))
    if args.side:
        print("RESULT " + json.dumps(run_side(args.side, Path(args.data), model_path, args)))
        return 0

    with tempfile.TemporaryDirectory() as tmp:
        data = make_data(Path(tmp) / "data", args.samples, args.seed)
        results: dict[str, list[dict]] = {"cookbook": [], "finetune": []}
        for repeat in range(args.repeats):
            for side in results:
                cmd = [sys.executable, __file__, "--side", side, "--data", str(data), "--tmp", tmp,
                       "--preset", args.preset, "--batch", str(args.batch), "--lr", str(args.lr),
                       "--max-pixels", str(args.max_pixels), "--seed", str(args.seed)]
                out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS": "2"})
                line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
                if out.returncode or not line:
                    print(out.stderr[-3000:], file=sys.stderr)
                    return 1
                results[side].append(json.loads(line[0][7:]))
                print(f"  run {repeat + 1}/{args.repeats} {side}: {results[side][-1]['tokens_per_s']:.0f} tok/s",
                      file=sys.stderr)

    def med(side, key):
        return statistics.median(r[key] for r in results[side])

    rows = [("non-padding tokens/s", "tokens_per_s", "{:.0f}"), ("samples/s", "samples_per_s", "{:.2f}"),
            ("padding fraction", "padding", "{:.2f}"), ("time to first step (s)", "first_step_s", "{:.2f}"),
            ("fraction of time building batches", "data_wait", "{:.2f}"), ("peak RSS (GB)", "peak_rss_gb", "{:.2f}"),
            ("train loss (own labels)", "train_loss", "{:.3f}"), ("eval loss (assistant-only, same batch)",
                                                                   "eval_loss", "{:.3f}")]
    print(f"\nqwen2_vl zoo preset '{args.preset}', {args.samples} samples, 1 epoch, batch {args.batch}, "
          f"median of {args.repeats}\n")
    print("| metric | cookbook (a) | finetune (b) | b/a |\n|---|---|---|---|")
    for name, key, fmt in rows:
        a, b = med("cookbook", key), med("finetune", key)
        print(f"| {name} | {fmt.format(a)} | {fmt.format(b)} | {b / a:.2f}x |" if a else
              f"| {name} | {fmt.format(a)} | {fmt.format(b)} | |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
