"""Datasets in, chat rows out: `{"messages": [...], "images": [...]}`.

Adapters are small functions from one dataset row to one chat row, chosen by `data.format` from ADAPTERS.
Images stay as references (paths or undecoded bytes) until a batch is built, so nothing is decoded up front.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Callable

from PIL import Image, ImageOps

CHARTQA_SYSTEM_PROMPT = (
    "You are a Vision Language Model specialized in interpreting visual data from chart images. Your task is to "
    "analyze the provided chart image and respond to queries with concise answers, usually a single word, number, "
    "or short phrase. The charts include a variety of types (e.g., line charts, bar charts) and contain colors, "
    "labels, and text. Focus on delivering accurate, succinct answers based on the visual information. Avoid "
    "additional explanation unless absolutely necessary."
)


class DataError(ValueError):
    """A dataset row that cannot become a training sample; the message names the row."""


def _text(text: str) -> dict:
    return {"type": "text", "text": text}


def _system(prompt: str | None) -> list[dict]:
    return [{"role": "system", "content": [_text(prompt)]}] if prompt else []


def chartqa(row: dict, system_prompt: str | None) -> dict:
    """HuggingFaceM4/ChartQA: `image`, `query`, `label` (a list; the first answer is the target)."""
    label = row["label"]
    answer = label[0] if isinstance(label, list) else label
    if system_prompt is None:
        system_prompt = CHARTQA_SYSTEM_PROMPT
    return {
        "messages": _system(system_prompt) + [
            {"role": "user", "content": [{"type": "image"}, _text(row["query"])]},
            {"role": "assistant", "content": [_text(str(answer))]},
        ],
        "images": [row["image"]],
    }


def messages(row: dict, system_prompt: str | None) -> dict:
    """Rows already in chat form (`messages` + `images`), as TRL and llava-instruct-mix style datasets use."""
    msgs = [dict(m, content=[_text(m["content"])] if isinstance(m["content"], str) else m["content"])
            for m in row["messages"]]
    if system_prompt and not (msgs and msgs[0]["role"] == "system"):
        msgs = _system(system_prompt) + msgs
    return {"messages": msgs, "images": list(row.get("images") or [])}


ADAPTERS: dict[str, Callable[[dict, str | None], dict]] = {
    "chartqa": chartqa,
    "messages": messages,
}


def load_rows(path: str, split: str, max_samples: int | None = None):
    """A `datasets.Dataset` for a local folder/file or a hub id, without decoding images."""
    import datasets

    p = Path(path)
    if p.is_file():
        builder = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}.get(p.suffix)
        if builder is None:
            raise DataError(f"data.path: {p}: unsupported file type '{p.suffix}' (use .json, .jsonl, .parquet, .csv)")
        ds = datasets.load_dataset(builder, data_files={split: str(p)}, split=split)
    elif p.is_dir() and any(p.glob(f"{split}.json*")):
        # A folder of `<split>.jsonl` files with images beside them: the layout of the bundled sample data.
        files = sorted(p.glob(f"{split}.json*"))
        ds = datasets.load_dataset("json", data_files={split: [str(f) for f in files]}, split=split)
    else:
        try:
            ds = datasets.load_dataset(str(path), split=split)
        except ValueError as e:
            raise DataError(f"data.path: cannot load split '{split}' from {path}: {e}") from e
    image_columns = [k for k, f in ds.features.items() if type(f).__name__ == "Image"]
    for column in image_columns:  # keep images as bytes/paths; they are decoded per batch
        ds = ds.cast_column(column, datasets.Image(decode=False))
    if max_samples is not None:
        ds = ds.select(range(min(max_samples, len(ds))))
    return ds


def load_image(ref: Any, root: Path | None) -> Image.Image:
    """Decode one image reference (path, `{"bytes", "path"}` dict, or PIL image) to an RGB PIL image."""
    if isinstance(ref, Image.Image):
        image = ref
    elif isinstance(ref, dict) and ref.get("bytes"):
        image = Image.open(io.BytesIO(ref["bytes"]))
    else:
        path = ref.get("path") if isinstance(ref, dict) else ref
        if not isinstance(path, str) or not path:
            raise DataError(f"not an image reference: {ref!r}")
        full = Path(path) if root is None else root / path
        image = Image.open(full)
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


ROW_ID = "row_id"


def chat_dataset(cfg, split: str):
    """One split of the recipe's `data` as a `datasets.Dataset` of chat rows (`messages`, `images`, `row_id`).

    Rows are adapted and images decoded on access (a datasets transform), so decoding happens per batch in the
    dataloader workers; `row_id` is the row's index in the source split, for reports.
    """
    rows = load_rows(cfg.path, split, cfg.max_samples)
    rows = rows.add_column(ROW_ID, list(range(len(rows))))
    root = Path(cfg.image_root) if cfg.image_root else (Path(cfg.path) if Path(cfg.path).is_dir()
                                                        else Path(cfg.path).parent)
    adapter = ADAPTERS[cfg.format]

    def to_chat(batch: dict) -> dict:
        out: dict[str, list] = {"messages": [], "images": [], ROW_ID: []}
        for values in zip(*batch.values()):
            row = dict(zip(batch.keys(), values))
            row_id = row.pop(ROW_ID)
            try:
                sample = adapter(row, cfg.system_prompt)
                images = [load_image(ref, root) for ref in sample["images"]]
            except (KeyError, OSError, DataError) as e:
                raise DataError(f"{cfg.path} split '{split}' row {row_id}: {type(e).__name__}: {e}") from e
            out["messages"].append(sample["messages"])
            out["images"].append(images)
            out[ROW_ID].append(row_id)
        return out

    return rows.with_transform(to_chat)
