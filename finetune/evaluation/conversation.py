"""`finetune predict` and `finetune chat`: answers from a run folder, merged export or base model."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TextIO

from ..data.formats import CHARTQA_SYSTEM_PROMPT
from ..data.images import load_image
from .inference import Target, generate, load_target


def system_prompt(target: Target) -> str | None:
    """The system prompt training used (None for a base model without a recipe)."""
    return recipe_system_prompt(target.recipe) if target.recipe is not None else None


def recipe_system_prompt(recipe) -> str | None:
    """The recipe's `data.system_prompt`, else the data format's default (ChartQA has one); None for none."""
    if recipe.data.system_prompt is not None:
        return recipe.data.system_prompt or None
    return CHARTQA_SYSTEM_PROMPT if recipe.data.format == "chartqa" else None


def open_image(target: Target, path: str, root: Path | None = None):
    """An image the user named, resized as training resized them (`data.max_pixels` of the run's recipe)."""
    max_pixels = target.recipe.data.max_pixels if target.recipe is not None else None
    return load_image(path, root, max_pixels=max_pixels, allow_external=True)


def user_turn(text: str, n_images: int) -> dict:
    return {"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": text}]}


def start(target: Target) -> list[dict]:
    prompt = system_prompt(target)
    return [{"role": "system", "content": [{"type": "text", "text": prompt}]}] if prompt else []


def predict(target: str | Path | Target, prompt: str, images: list[str] = (), max_new_tokens: int = 32) -> str:
    """One answer to a prompt about zero or more images (paths)."""
    if not isinstance(target, Target):
        target = load_target(target)
    messages = start(target) + [user_turn(prompt, len(images))]
    return generate(target, [messages], [[open_image(target, p) for p in images]], max_new_tokens)[0]


def predict_file(target: str | Path | Target, rows_path: str | Path, out_path: str | Path,
                 max_new_tokens: int = 32, batch_size: int = 8) -> Path:
    """Answer every row of a JSONL file (`{"prompt": ..., "images": [paths]}`, image paths relative to it)."""
    if not isinstance(target, Target):
        target = load_target(target)
    rows_path = Path(rows_path)
    rows = [json.loads(line) for line in rows_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    out_path = Path(out_path)
    with open(out_path, "w", encoding="utf-8") as f:
        for i in range(0, len(rows), batch_size):
            chunk = rows[i:i + batch_size]
            images = [[open_image(target, p, rows_path.parent) for p in row.get("images", [])] for row in chunk]
            conversations = [start(target) + [user_turn(row["prompt"], len(imgs))] for row, imgs in zip(chunk, images)]
            for row, answer in zip(chunk, generate(target, conversations, images, max_new_tokens)):
                f.write(json.dumps({**row, "prediction": answer}) + "\n")
    return out_path


HELP = "commands: /image PATH (attach to your next message), /reset, /exit"


def chat(target: str | Path | Target, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout,
         max_new_tokens: int = 64) -> list[dict]:
    """An interactive multi-turn session; images are attached by path. Returns the conversation."""
    if not isinstance(target, Target):
        target = load_target(target)
    messages, images, pending = start(target), [], []
    print(f"chatting with {target.name} ({target.family.name}). {HELP}", file=stdout, flush=True)
    while True:
        print("you> ", end="", file=stdout, flush=True)
        line = stdin.readline()
        if not line or line.strip() == "/exit":
            break
        line = line.strip()
        if not line:
            continue
        if line == "/reset":
            messages, images, pending = start(target), [], []
            continue
        if line.startswith("/image "):
            path = line.split(" ", 1)[1].strip()
            try:
                pending.append(open_image(target, path))
            except (OSError, ValueError) as e:  # BadMedia says why (missing, not an image, too many pixels)
                print(f"cannot open {path}: {e}", file=stdout, flush=True)
            continue
        messages.append(user_turn(line, len(pending)))
        images += pending
        pending = []
        answer = generate(target, [messages], [images], max_new_tokens)[0]
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        print(f"model> {answer}", file=stdout, flush=True)
    return messages
