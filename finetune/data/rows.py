"""Datasets in, chat rows out: `{"messages": [...], "images": [...], "videos": [...]}`.

Rows are read with `datasets` (hub id, folder, JSON/JSONL, parquet, CSV), renamed per `data.columns`, turned into
chat rows by the format's function (finetune.data.formats), and their images and videos decoded on access, per
batch. `cfg` is the recipe's `data:` section, read field by field (the recipe stage sits above this one).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import not_found
from .formats import FORMATS, RowError, expand_captions
from .images import image_size, load_image, load_video


class DataError(ValueError):
    """A dataset row that cannot become a training sample; the message names the row."""


def load_rows(path: str, split: str, max_samples: int | None = None, streaming: bool = False):
    """A `datasets.Dataset` (an `IterableDataset` when streaming) for a local folder/file or a hub id, without
    decoding images."""
    import datasets

    p = Path(path)
    load_dataset = functools.partial(datasets.load_dataset, streaming=streaming)
    if p.is_file():
        builder = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}.get(p.suffix)
        if builder is None:
            raise DataError(f"data.path: {p}: unsupported file type '{p.suffix}' (use .json, .jsonl, .parquet, .csv)")
        ds = load_dataset(builder, data_files={split: str(p)}, split=split)
    elif p.is_dir() and any(p.glob(f"{split}.json*")):
        # A folder of `<split>.jsonl` files with images beside them: the layout of the bundled sample data.
        files = sorted(p.glob(f"{split}.json*"))
        ds = load_dataset("json", data_files={split: [str(f) for f in files]}, split=split)
    else:
        try:
            ds = load_dataset(str(path), split=split)
        except ValueError as e:
            raise DataError(f"data.path: cannot load split '{split}' from {path}: {e}") from e
        except OSError as e:  # ConnectionError and DatasetNotFoundError: a typo, no network or offline mode
            raise not_found("data.path", str(path), e) from e
    for column, feature in (ds.features or {}).items():  # keep images as bytes/paths; they are decoded per batch
        if isinstance(feature, datasets.Image):
            ds = ds.cast_column(column, datasets.Image(decode=False))
        elif isinstance(getattr(feature, "feature", None), datasets.Image):  # a list of images (the_cauldron)
            ds = ds.cast_column(column, datasets.List(datasets.Image(decode=False)))
    if max_samples is not None:
        ds = ds.take(max_samples) if streaming else ds.select(range(min(max_samples, len(ds))))
    return ds


ROW_ID = "row_id"
#: The two replies of a preference row (data.format preference), kept beside its prompt `messages`.
PAIR_KEYS = ("chosen", "rejected")


def source_rows(cfg, split: str):
    """One split as the dataset's own rows (columns renamed per `data.columns`, captions expanded), plus `row_id`:
    the row's index in the source split, for reports."""
    rows = load_rows(cfg.path, split, cfg.max_samples)
    rows = rows.add_column(ROW_ID, list(range(len(rows))))
    rows = rename_columns(rows, cfg, split)
    if cfg.expand_captions:
        rows = rows.map(expand_captions, batched=True, desc="expanding captions")
    return rows


@dataclass
class RowReader:
    """One source row -> one chat row, with its media decoded (`decoded`) or only measured (`sized`).

    Plain data, so `datasets.map` can send it to worker processes.
    """

    cfg: Any  # the recipe's `data:` section (finetune.recipe.DataConfig)
    videos_as_images: bool = False

    @property
    def root(self) -> Path:
        cfg = self.cfg
        if cfg.image_root:
            return Path(cfg.image_root)
        return Path(cfg.path) if Path(cfg.path).is_dir() else Path(cfg.path).parent

    def decoded(self, row: dict) -> dict:
        """`messages`, `images` (RGB PIL images) and `videos` (lists of frames). Raises RowError."""
        sample = FORMATS[self.cfg.format](row, self.cfg.system_prompt)
        images = [load_image(ref, self.root, **self._image_options()) for ref in sample["images"]]
        return self._with_videos(sample, images)

    def sized(self, row: dict) -> dict:
        """Like `decoded`, but each image is its (width, height) read from the file header; videos are decoded
        (their frame count and size come from decoding). Raises RowError for what the header shows."""
        sample = FORMATS[self.cfg.format](row, self.cfg.system_prompt)
        images = [image_size(ref, self.root, **self._image_options()) for ref in sample["images"]]
        return self._with_videos(sample, images)

    def _image_options(self) -> dict:
        cfg = self.cfg
        return dict(max_pixels=cfg.max_pixels, pixel_limit=cfg.pixel_limit, allow_external=cfg.allow_external_paths)

    def _with_videos(self, sample: dict, images: list) -> dict:
        cfg = self.cfg
        videos = [load_video(ref, self.root, cfg.video_frames, cfg.video_fps, **self._image_options())
                  for ref in sample["videos"]]
        pair = {key: sample[key] for key in PAIR_KEYS if key in sample}
        if self.videos_as_images and videos:
            return {**frames_as_images(sample["messages"], images, videos), **pair}
        return {"messages": sample["messages"], "images": images, "videos": videos, **pair}


def read_row(read, row: dict) -> tuple[dict, str | None]:
    """`read(row)` and None, or an empty chat row and the problem ("reason: detail") that makes it unusable."""
    try:
        return read(row), None
    except RowError as e:
        problem = f"{e.reason}: {e}"
    except (KeyError, TypeError, AttributeError) as e:  # a field of another shape than the format expects
        problem = f"malformed row: {type(e).__name__}: {e}"
    return {"messages": [], "images": [], "videos": []}, problem


def chat_dataset(cfg, split: str, videos_as_images: bool = False):
    """One split of the recipe's `data` as a `datasets.Dataset` of chat rows.

    Columns: `messages`, `images` and `videos` (decoded PIL images; a video is a list of frames), `row_id` (the
    row's index in the source split, for reports) and `problem` (None, or "reason: detail" for a row that cannot be
    used; the pre-flight scan drops or refuses those). Rows are adapted and decoded on access (a datasets
    transform), so decoding happens per batch in the dataloader workers. `videos_as_images` turns each video into
    its frames as images, for families without a video input.
    """
    return chat_rows(source_rows(cfg, split), RowReader(cfg, videos_as_images))


def chat_rows(rows, reader: RowReader):
    """Source rows (from `source_rows`) as chat rows, decoded on access; see `chat_dataset`."""

    def to_chat(batch: dict) -> dict:
        keys = ("messages", "images", "videos") + PAIR_KEYS * (reader.cfg.format == "preference")
        out: dict[str, list] = {**{key: [] for key in keys}, ROW_ID: [], "problem": []}
        for values in zip(*batch.values()):
            row = dict(zip(batch.keys(), values))
            row_id = row.pop(ROW_ID)
            sample, problem = read_row(reader.decoded, row)
            out[ROW_ID].append(row_id)
            out["problem"].append(problem)
            for key in keys:
                out[key].append(sample.get(key, ""))
        return out

    return rows.with_transform(to_chat)


def rename_columns(rows, cfg, split: str):
    """Apply `data.columns` (format's column name -> the dataset's), checking the dataset has each one."""
    if not cfg.columns:
        return rows
    for ours, theirs in cfg.columns.items():
        if rows.column_names is not None and theirs not in rows.column_names:
            raise DataError(f"data.columns.{ours}: {cfg.path} split '{split}' has no column '{theirs}' "
                            f"(columns: {', '.join(c for c in rows.column_names if c != ROW_ID)})")
    clashes = [ours for ours, theirs in cfg.columns.items() if ours in (rows.column_names or ()) and ours != theirs]
    rows = rows.remove_columns(clashes)  # the mapped column replaces a same-named one
    return rows.rename_columns({theirs: ours for ours, theirs in cfg.columns.items() if ours != theirs})


def with_reply(sample: dict, key: str) -> dict:
    """A preference row as the chat row of one of its replies (`chosen` or `rejected`): the prompt messages with
    that reply as the final assistant turn, so it renders, measures and collates like any SFT row."""
    reply = {"role": "assistant", "content": [{"type": "text", "text": sample[key]}]}
    return {**{k: v for k, v in sample.items() if k not in PAIR_KEYS}, "messages": list(sample["messages"]) + [reply]}


def frames_as_images(messages: list[dict], images: list, videos: list[list]) -> dict:
    """Replace each video part by its frames as image parts, keeping images and frames in message order."""
    images, videos, flat = iter(images), iter(videos), []
    out = []
    for message in messages:
        content = []
        for part in message["content"]:
            if part["type"] == "video":
                frames = next(videos)
                content += [{"type": "image"} for _ in frames]
                flat += frames
            else:
                if part["type"] == "image":
                    flat.append(next(images))
                content.append(part)
        out.append({**message, "content": content})
    return {"messages": out, "images": flat, "videos": []}
