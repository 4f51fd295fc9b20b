"""Generate data/chartqa-tiny-dpo: preference pairs derived from the bundled chart sample (data/chartqa-tiny).

Each row: `image` (a path under data/chartqa-tiny), `prompt` (the question), `chosen` (the correct answer) and
`rejected` (a plausible wrong one: for colour questions the colour of another bar in the same chart, read off the
image, else another answer of the same question type; for bar counts another count). Deterministic.

    python scripts/make_chartqa_preference.py            # (re)write data/chartqa-tiny-dpo
    python scripts/make_chartqa_preference.py --check    # exit 1 if the files on disk differ
"""
import argparse
import json
import random
import sys
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_chartqa_sample import BOTTOM, COLORS, COUNTS, PALETTE  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "data" / "chartqa-tiny"


def colours_in(image_path: Path) -> list[str]:
    """The palette colours of the bars, left to right (read just above the x axis, where every bar is drawn)."""
    image = Image.open(image_path).convert("RGB")
    found = []
    for x in range(image.width):
        name = next((n for n, rgb in PALETTE.items() if image.getpixel((x, BOTTOM - 2)) == rgb), None)
        if name and name not in found:
            found.append(name)
    return found


def rejected_for(row: dict, rng: random.Random) -> str:
    answer = row["label"][0]
    if answer in COUNTS:
        return rng.choice([c for c in COUNTS if c != answer])
    others = [c for c in colours_in(SOURCE / row["image"]) if c != answer]
    return rng.choice(others or [c for c in COLORS if c != answer])


def pairs(split: str, seed: int) -> list[dict]:
    rng = random.Random(f"{seed}-{split}")
    rows = [json.loads(line) for line in (SOURCE / f"{split}.jsonl").read_text().splitlines()]
    return [{"image": r["image"], "prompt": r["query"], "chosen": r["label"][0], "rejected": rejected_for(r, rng)}
            for r in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "data" / "chartqa-tiny-dpo"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    out = Path(args.out)
    stale = False
    for split in ("train", "test"):
        text = "".join(json.dumps(p) + "\n" for p in pairs(split, args.seed))
        path = out / f"{split}.jsonl"
        if args.check:
            stale |= not path.is_file() or path.read_text() != text
        else:
            out.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if args.check:
        print("stale" if stale else "up to date")
        sys.exit(1 if stale else 0)


if __name__ == "__main__":
    main()
