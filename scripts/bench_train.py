"""Training throughput, side by side: the cookbook pipeline vs finetune's defaults, same model, data and seed.

    python scripts/bench_train.py                          # zoo Qwen2-VL "bench" preset, Qwen's 151,936 vocabulary
    python scripts/bench_train.py --checkpointing off      # both sides without gradient checkpointing
    python scripts/bench_train.py --samples 64 --preset tiny --vocab 0 --repeats 1   # a quick look

The model is the zoo's Qwen2-VL at the `--preset` size (bench: hidden 512, 8 layers) with its embedding and LM head
resized to `--vocab` rows (random weights), so the LM head costs what it costs at Qwen's real vocabulary.
Gradient checkpointing is the same on every side (`--checkpointing`).

(a) cookbook: TRL SFTTrainer with its default vision collator, random batches padded to the longest, batch 8.
(b) finetune: finetune.training.pipeline.prepare() on a recipe with the same batch, learning rate and steps: assistant-only
    labels (the LM head then projects those positions only: TRL's fused head, which finetune.training.trainer has score
    them on the CPU too), batches grouped by true length after image expansion (from the pre-flight scan),
    micro-batch 4 with gradient accumulation 2 (same effective batch).
(c) finetune packed: (b) with `training.packing: true`: samples packed whole into rows of `--pack-length` tokens,
    `--pack-rows` rows per step.

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
        self.batches: list[tuple[int, int]] = []  # (samples, tokens) of each batch, in the order they were built

    def __call__(self, rows):
        start = time.perf_counter()
        batch = self.collator(rows)
        self.seconds += time.perf_counter() - start
        tokens = batch["attention_mask"].sum(1)
        self.tokens += int(tokens.sum())
        self.samples += len(tokens)
        self.batches.append((len(tokens), int(tokens.sum())))
        if "pack_sizes" in batch:  # trained as packed rows (finetune.batching.packing): each as long as the longest pack
            self.padded += len(batch["pack_sizes"]) * max(int(t.sum()) for t in tokens.split(batch["pack_sizes"]))
        else:
            self.padded += batch["input_ids"].numel()
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
        # Throughput is measured after the first optimizer step: that one also pays one-off lazy imports. What it
        # trained is its first `gradient_accumulation_steps` batches, not what the meter has counted by now: the
        # dataloader has already built the next batch (counting that would undercount sides with fewer, larger
        # steps, such as packed rows).
        def on_step_end(self, a, state, control, **kw):
            if "t" not in first_step:
                trained = meter.batches[:a.gradient_accumulation_steps]
                first_step.update(t=time.perf_counter(), tokens=sum(t for _, t in trained),
                                  samples=sum(n for n, _ in trained))

    checkpointing = args.checkpointing == "on"
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
                           dataloader_num_workers=0, disable_tqdm=True, gradient_checkpointing=checkpointing)
        lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                          target_modules=r"model\.language_model.*\.(q|k|v|o|gate|up|down)_proj")
        trainer = SFTTrainer(model=model, args=config, train_dataset=ds, processing_class=processor,
                             peft_config=lora, callbacks=[FirstStep()])
    else:
        from finetune.training.pipeline import prepare
        from finetune.recipe import load_recipe

        packed = {"packing": True, "max_length": args.pack_length, "per_device_train_batch_size": args.pack_rows,
                  "gradient_accumulation_steps": 1} if side == "packed" else {}
        recipe = load_recipe({
            "model": {"name_or_path": model_path, "dtype": "float32"},
            "data": {"path": str(data), "format": "messages"},
            "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "targets": ["decoder"]},
            "evaluation": {"enabled": False},
            "training": {"output_dir": args.tmp + "/finetune", "per_device_train_batch_size": args.batch // 2,
                         "gradient_accumulation_steps": 2, "num_train_epochs": 1, "learning_rate": args.lr,
                         "logging_steps": 1, "save_strategy": "no", "bf16": False, "seed": args.seed,
                         "max_length": None, "activation_checkpointing": checkpointing,
                         "dataloader_num_workers": 0, "train_sampling_strategy": "group_by_length",
                         "disable_tqdm": True} | packed,
        })
        import finetune.training.pipeline

        load_processor = finetune.training.pipeline.load_processor

        def sized_processor(*a, **k):  # the same image budget as the cookbook side
            proc = load_processor(*a, **k)
            proc.image_processor.size = image_size
            return proc

        finetune.training.pipeline.load_processor = sized_processor
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

    from finetune.batching.collate import ChatCollator
    from finetune.data.rows import load_image
    from finetune.models.loading import load_family
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
    p.add_argument("--checkpointing", choices=["on", "off"], default="on",
                   help="gradient checkpointing, the same on every side (finetune's recipes keep it on)")
    p.add_argument("--vocab", type=int, default=151936, help="LM head rows (0: the zoo tokenizer's ~1.5k)")
    p.add_argument("--pack-length", type=int, default=1024, help="tokens per packed row, side (c)")
    p.add_argument("--pack-rows", type=int, default=2, help="packed rows per step, side (c)")
    p.add_argument("--sides", default="cookbook,finetune,packed")
    p.add_argument("--side", help=argparse.SUPPRESS)  # internal: run one side in this process
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--tmp", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    args = p.parse_args()

    from finetune import zoo
    if args.side:
        print("RESULT " + json.dumps(run_side(args.side, Path(args.data), args.model, args)))
        return 0

    with tempfile.TemporaryDirectory() as tmp:
        model_path = with_vocabulary(str(zoo.ensure("qwen2_vl", args.preset)), args.vocab, Path(tmp) / "model")
        data = make_data(Path(tmp) / "data", args.samples, args.seed)
        results: dict[str, list[dict]] = {side: [] for side in args.sides.split(",")}
        for repeat in range(args.repeats):
            for side in results:
                cmd = [sys.executable, __file__, "--side", side, "--data", str(data), "--tmp", tmp,
                       "--model", model_path, "--preset", args.preset, "--batch", str(args.batch),
                       "--lr", str(args.lr), "--max-pixels", str(args.max_pixels), "--seed", str(args.seed),
                       "--checkpointing", args.checkpointing, "--pack-length", str(args.pack_length),
                       "--pack-rows", str(args.pack_rows)]
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
    vocab = f"vocabulary {args.vocab:,}" if args.vocab else "zoo vocabulary"
    print(f"\nqwen2_vl zoo preset '{args.preset}', {vocab}, {args.samples} samples, 1 epoch, batch {args.batch}, "
          f"gradient checkpointing {args.checkpointing} (all sides), median of {args.repeats}\n")
    names = {"cookbook": "cookbook (a)", "finetune": "finetune (b)", "packed": "finetune packed (c)"}
    sides = list(results)
    base = sides[0]
    print("| metric | " + " | ".join(names[s] for s in sides) + " | " +
          " | ".join(f"{names[s].split()[-1]}/{names[base].split()[-1]}" for s in sides[1:]) + " |")
    print("|---" * (2 * len(sides)) + "|")
    for name, key, fmt in rows:
        values = [med(s, key) for s in sides]
        ratios = [f"{v / values[0]:.2f}x" if values[0] else "" for v in values[1:]]
        print(f"| {name} | " + " | ".join(fmt.format(v) for v in values) + " | " + " | ".join(ratios) + " |")
    for side in sides:
        print(f"{names[side]} non-padding tokens/s per repeat: "
              + ", ".join(f"{r['tokens_per_s']:.0f}" for r in results[side]))
    return 0


def with_vocabulary(model_path: str, vocab: int, folder: Path) -> str:
    """The checkpoint with its embedding and LM head resized to `vocab` rows (random), saved in `folder`."""
    if not vocab:
        return model_path
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(model_path, dtype=torch.float32)
    model.resize_token_embeddings(vocab, mean_resizing=False)
    model.save_pretrained(folder)
    AutoProcessor.from_pretrained(model_path).save_pretrained(folder)
    (folder / "zoo.json").write_text((Path(model_path) / "zoo.json").read_text())  # finetune reads the family
    return str(folder)


if __name__ == "__main__":
    raise SystemExit(main())
