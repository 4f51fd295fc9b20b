"""Pre-flight scan cost at dataset scale: the old full-collate path, the header path cold, and a cache-hit start.

    python scripts/bench_scan.py --rows 20000            # ChartQA-schema rows, 800x600 chart PNGs
    python scripts/bench_scan.py --rows 5000 --kind llava  # LLaVA-style multi-turn rows with 1-3 images each

Model: the zoo's Qwen2-VL processor at Qwen2.5-VL's real resolution (`image_processor: {max_pixels: 1003520}`), so
an 800x600 chart expands to ~600 image tokens as on the hub model. Each path runs in a fresh process (so caches and
peak memory are its own) and prints rows/s, wall seconds, and the peak RSS growth of the scanning process over
its state before the scan (processor loaded), plus the peak RSS of its worker processes. Ratios are to the
full-collate path in the same run; the full-collate path runs on the first `--collate-rows` rows only (it is
slow by design: that is what this replaces).

Images: `--distinct` different chart PNGs (800x600 +-10%, so sizes vary) are written once and every row gets its
own file name, hard-linked to one of them: each row's header is opened and read from its own path, as in a real
dataset, without spending minutes drawing 20,000 charts.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = ["Which color is the tallest bar?", "How many bars are in the chart?", "What is the value of the "
             "leftmost bar?", "Is the red bar higher than the blue one?"]


def make_charts(folder: Path, distinct: int, seed: int = 0) -> list[Path]:
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(distinct):
        w, h = int(800 * rng.uniform(0.9, 1.1)), int(600 * rng.uniform(0.9, 1.1))
        img = Image.new("RGB", (w, h), "white")
        d = ImageDraw.Draw(img)
        bars = rng.randint(2, 8)
        for b in range(bars):
            x0 = 40 + b * (w - 80) // bars
            top = rng.randint(40, h - 60)
            d.rectangle([x0, top, x0 + (w - 80) // bars - 10, h - 40], fill=tuple(rng.randrange(256) for _ in "rgb"))
            d.text((x0, h - 30), f"label {b}", fill="black")
        d.line([(40, h - 40), (w - 40, h - 40)], fill="black", width=2)
        path = folder / f"chart-{i:04d}.png"
        img.save(path)
        paths.append(path)
    return paths


def make_dataset(folder: Path, rows: int, kind: str, distinct: int) -> Path:
    charts = make_charts(folder / "charts", distinct)
    images = folder / "images"
    images.mkdir(exist_ok=True)
    rng = random.Random(1)
    lines = []
    for i in range(rows):
        if kind == "chartqa":
            refs = [f"images/{i:07d}.png"]
            row = {"image": refs[0], "query": rng.choice(QUESTIONS), "label": [str(rng.randint(0, 99))]}
        else:  # llava: 1-3 images placed in the first turn, 1-3 exchanges
            refs = [f"images/{i:07d}-{j}.png" for j in range(rng.randint(1, 3))]
            turns = [{"from": "human", "value": " ".join("<image>" for _ in refs) + " " + rng.choice(QUESTIONS)},
                     {"from": "gpt", "value": f"The answer is {rng.randint(0, 99)}."}]
            for _ in range(rng.randint(0, 2)):
                turns += [{"from": "human", "value": rng.choice(QUESTIONS)},
                          {"from": "gpt", "value": f"It is {rng.choice(['red', 'blue', 'green'])}."}]
            row = {"image": refs, "conversations": turns}
        for ref in refs:
            os.link(rng.choice(charts), folder / ref)
        lines.append(json.dumps(row))
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def recipe(data: Path, kind: str, rows: int | None, verify: str, num_proc: int | None):
    from finetune.recipe import load_recipe

    return load_recipe({
        "model": {"name_or_path": "zoo:qwen2_vl", "dtype": "float32"},
        "data": {"path": str(data), "format": kind, "system_prompt": "", "image_processor": {"max_pixels": 1003520},
                 "max_samples": rows, "verify_images": verify, "num_proc": num_proc},
        "training": {"output_dir": str(data / "run"), "max_length": 4096, "bf16": False},
    })


def rss_mb(who: int = resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # Linux: KiB


def run_one(args) -> dict:
    """One path in this (fresh) process; prints a JSON line."""
    from finetune.training.pipeline import load_processing, scanned
    from finetune.batching.scan import scan

    r = recipe(args.data, args.kind, args.rows, args.verify, args.num_proc)
    _, family, processor, collator = load_processing(r)
    before = rss_mb()
    started = time.time()
    if args.path == "collate":  # the scan as it was: every row decoded and collated, one by one, one process
        from finetune.data.rows import chat_dataset

        report = scan(chat_dataset(r.data, "train"), collator, r.training.max_length)
    else:
        _, report = scanned(r, "train", family, collator)
    seconds = time.time() - started
    rows = report.rows
    return {"path": args.path, "rows": rows, "seconds": round(seconds, 2), "rows_per_s": round(rows / seconds, 1),
            "rss_growth_mb": round(rss_mb() - before, 1), "workers_peak_rss_mb": round(rss_mb(resource.RUSAGE_CHILDREN), 1),
            "median_tokens": report.summary()["tokens_per_sample"]["median"], "kept": len(report.kept)}


def spawn(args, path: str, rows: int | None, cache: Path, verify: str = "header") -> dict:
    command = [sys.executable, __file__, "--run", path, "--data", str(args.data), "--kind", args.kind,
               "--verify", verify] + (["--rows", str(rows)] if rows else []) \
        + (["--num-proc", str(args.num_proc)] if args.num_proc else [])
    env = os.environ | {"FINETUNE_CACHE": str(cache), "HF_DATASETS_CACHE": str(cache / "datasets"),
                        "PYTHONPATH": str(ROOT)}
    out = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    if out.returncode:
        sys.exit(f"{path} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--kind", choices=["chartqa", "llava"], default="chartqa")
    parser.add_argument("--distinct", type=int, default=200, help="distinct chart images behind the rows")
    parser.add_argument("--collate-rows", type=int, default=400, help="rows the old full-collate path scans")
    parser.add_argument("--num-proc", type=int, default=None, help="scan processes (default: all cores)")
    parser.add_argument("--verify", default="header")
    parser.add_argument("--run", help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        args.path = args.run
        print(json.dumps(run_one(args)))
        return

    with tempfile.TemporaryDirectory(prefix="bench-scan-") as tmp:
        tmp = Path(tmp)
        started = time.time()
        args.data = make_dataset(tmp / "data", args.rows, args.kind, args.distinct)
        cache = tmp / "cache"
        print(f"{args.rows} {args.kind} rows ({args.distinct} distinct ~800x600 PNGs) written in "
              f"{time.time() - started:.0f}s; cores available: {len(os.sched_getaffinity(0))}", flush=True)
        spawn(args, "collate", 8, cache)  # builds the zoo model and the datasets Arrow cache, untimed
        results = [spawn(args, "collate", args.collate_rows, cache),
                   spawn(args, "header-cold", None, cache),
                   spawn(args, "cache-hit", None, cache)]
        base = results[0]["rows_per_s"]
        print("\n| path | rows | seconds | rows/s | vs full collate | RSS growth (MB) | workers peak RSS (MB) |")
        print("|---|---|---|---|---|---|---|")
        for r in results:
            print(f"| {r['path']} | {r['rows']} | {r['seconds']} | {r['rows_per_s']:.0f} | "
                  f"{r['rows_per_s'] / base:.1f}x | {r['rss_growth_mb']:.0f} | {r['workers_peak_rss_mb']:.0f} |")
        print(f"\nmedian tokens per row: {results[1]['median_tokens']}; kept {results[1]['kept']} of "
              f"{results[1]['rows']}")


if __name__ == "__main__":
    main()
