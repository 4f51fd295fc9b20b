"""Generate data/chartqa-tiny: a small, deterministic bar-chart QA set in the ChartQA schema.

Rows look like HuggingFaceM4/ChartQA (`image`, `query`, `label` = [answer], `human_or_machine` = 0),
with `image` a PNG path relative to the output folder. Every question needs the image, answers are
single words, and answers are balanced so that a "most common answer" baseline scores low.

    python scripts/make_chartqa_sample.py            # (re)write data/chartqa-tiny
    python scripts/make_chartqa_sample.py --check    # exit 1 if the files on disk differ
"""
import argparse
import collections
import filecmp
import json
import random
import sys
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw

SIZE = 112  # saved as-is, so nothing is lost to later downscaling
# Flat, saturated colours far apart in RGB, so they stay distinct when resized.
PALETTE = {
    "red": (220, 20, 20), "green": (20, 160, 40), "blue": (30, 70, 230),
    "orange": (255, 140, 0), "purple": (140, 40, 180), "yellow": (240, 210, 0),
}
COLORS = list(PALETTE)
COUNTS = ["2", "3", "4"]
TEMPLATES = {  # question type -> (query, possible answers)
    "tallest": ("Which color is the tallest bar?", COLORS),
    "count": ("How many bars are in the chart?", COUNTS),
    "leftmost": ("What color is the leftmost bar?", COLORS),
}
LEFT, RIGHT, TOP, BOTTOM = 10, SIZE - 4, 6, SIZE - 10  # plot area inside the axes
AXIS = BOTTOM - TOP  # full bar height in pixels



def make_bars(kind, answer, rng):
    """Build (colours, heights) for a chart whose correct answer to `kind` is `answer`."""
    n = int(answer) if kind == "count" else rng.randint(2, 4)
    colors = rng.sample(COLORS, n)  # distinct colours, so colour answers are unambiguous
    if kind != "count" and answer not in colors:
        colors[rng.randrange(n)] = answer
    if kind == "leftmost":
        i = colors.index(answer)
        colors[0], colors[i] = colors[i], colors[0]
    lo, hi = round(0.08 * AXIS), AXIS
    heights = [rng.randint(lo, hi) for _ in range(n)]
    if kind == "tallest":
        target = colors.index(answer)
        heights = [rng.randint(round(0.1 * AXIS), round(0.5 * AXIS)) for _ in range(n)]
        heights[target] = rng.randint(round(0.85 * AXIS), AXIS)
    return colors, heights


def draw_chart(colors, heights):
    img = Image.new("RGB", (SIZE, SIZE), "white")
    d = ImageDraw.Draw(img)
    slot = (RIGHT - LEFT) / len(colors)
    width = slot * 0.8  # leave visible gaps so bars can be counted
    for i, (c, h) in enumerate(zip(colors, heights)):
        x0 = round(LEFT + i * slot + (slot - width) / 2)
        d.rectangle([x0, BOTTOM - h, round(x0 + width) - 1, BOTTOM - 1], fill=PALETTE[c])
    d.line([(LEFT - 2, BOTTOM), (RIGHT, BOTTOM)], fill="black", width=1)  # x axis
    d.line([(LEFT - 2, TOP), (LEFT - 2, BOTTOM)], fill="black", width=1)  # y axis
    return img


def make_split(out, split, n, seed):
    rng = random.Random(f"{seed}:{split}")  # str seeds hash with sha512: stable across runs
    # Balance question types (round-robin), and answers within each type (cycle a shuffled list).
    plan, queue = [], {kind: [] for kind in TEMPLATES}
    for i in range(n):
        kind = list(TEMPLATES)[i % len(TEMPLATES)]
        if not queue[kind]:
            queue[kind] = rng.sample(TEMPLATES[kind][1], len(TEMPLATES[kind][1]))
        plan.append((kind, queue[kind].pop()))
    rng.shuffle(plan)
    rows = []
    for i, (kind, answer) in enumerate(plan):
        name = f"images/{split}-{i:04d}.png"
        draw_chart(*make_bars(kind, answer, rng)).save(out / name, optimize=True)
        rows.append({"image": name, "query": TEMPLATES[kind][0], "label": [answer],
                     "human_or_machine": 0})
    with open(out / f"{split}.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return collections.Counter(r["label"][0] for r in rows)


def generate(out, n_train, n_test, seed):
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    for old in (out / "images").glob("*.png"):  # drop images left over from a larger run
        old.unlink()
    lines = []
    for split, n in (("train", n_train), ("test", n_test)):
        dist = make_split(out, split, n, seed)
        top = max(dist.values()) / n if n else 0.0
        lines.append(f"- **{split}** ({n} rows, majority-answer accuracy {top:.1%}): "
                     + ", ".join(f"{a} {c}" for a, c in sorted(dist.items())))
    (out / "README.md").write_text(
        "# chartqa-tiny\n\nA tiny synthetic bar-chart QA set in the schema of HuggingFaceM4/ChartQA "
        "(`image`, `query`, `label` = [answer], `human_or_machine` = 0), for smoke-testing "
        "fine-tuning end to end. `image` is a 112x112 RGB PNG path relative to this folder. "
        "Questions: tallest bar colour, number of bars, leftmost bar colour (one per image, types "
        "balanced; the tallest bar reaches 85-100% of the axis, every other bar 10-50%).\n\n"
        f"Generated (deterministically) with:\n\n    python scripts/make_chartqa_sample.py "
        f"--train {n_train} --test {n_test} --seed {seed}\n\n"
        "Check that it is up to date with `--check`.\n\nAnswer distribution:\n\n"
        + "\n".join(lines) + "\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="data/chartqa-tiny")
    p.add_argument("--train", type=int, default=1000)
    p.add_argument("--test", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--check", action="store_true", help="compare a fresh run against --out")
    args = p.parse_args(argv)
    if not args.check:
        generate(args.out, args.train, args.test, args.seed)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        generate(tmp, args.train, args.test, args.seed)
        new = {q.relative_to(tmp) for q in Path(tmp).rglob("*") if q.is_file()}
        old = {q.relative_to(args.out) for q in Path(args.out).rglob("*") if q.is_file()}
        bad = sorted(new ^ old) + sorted(
            q for q in new & old if not filecmp.cmp(Path(tmp) / q, Path(args.out) / q, shallow=False))
    for q in bad:
        print(f"differs: {q}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
