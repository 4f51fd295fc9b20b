"""Pre-flight scan: measure every sample as training will encode it, and decide which ones can be trained.

A sample longer than `training.max_length` after image expansion is dropped or refused (never truncated: that
would cut image tokens and crash mid-run), and a sample with no supervised token is dropped (its loss is NaN).

`scan_rows` is what runs: images are read from their headers only (`data.verify_images: header`) and lengths come
from the processor's own formulas (finetune.batching.lengths), in `data.num_proc` processes, and the measurements are cached
under a fingerprint of the data and processing settings, so a second start, a resume or another rank loads them
in seconds. `scan` is the plain reference: every sample decoded and collated, one by one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..data.rows import PAIR_KEYS, ROW_ID, read_row, with_reply
from .template import TemplateError


class DataRefused(ValueError):
    """The data cannot be trained as configured; the message says which rows and why."""


@dataclass
class ScanReport:
    rows: int = 0
    kept: list[int] = field(default_factory=list)  # positions in the dataset
    lengths: list[int] = field(default_factory=list)  # token length of each kept sample
    supervised_tokens: int = 0
    dropped: dict[str, list[int]] = field(default_factory=dict)  # reason -> row ids
    media: list[int] = field(default_factory=list)  # images + videos of each kept sample
    kept_row_ids: list[int] = field(default_factory=list)  # row id of each kept sample
    examples: dict[str, str] = field(default_factory=dict)  # reason -> the first problem's full message

    @property
    def images_per_row(self) -> dict[int, int]:
        """Row id -> images (and videos) of every kept row."""
        return dict(zip(self.kept_row_ids, self.media))

    def summary(self) -> dict:
        lengths = sorted(self.lengths)
        pct = (lambda q: lengths[min(len(lengths) - 1, int(q * len(lengths)))]) if lengths else (lambda q: 0)
        return {
            "rows": self.rows,
            "kept": len(self.kept),
            "dropped": {reason: {"count": len(ids), "row_ids": ids[:50]} for reason, ids in self.dropped.items()},
            "tokens_per_sample": {"min": pct(0), "median": pct(0.5), "p90": pct(0.9), "max": pct(1.0)},
            "supervised_tokens": self.supervised_tokens,
            "images_per_row": dict(sorted(Counter(self.media).items())),
            "problems": self.examples,
        }

    def describe(self) -> str:
        s = self.summary()
        t = s["tokens_per_sample"]
        lines = [f"{s['rows']} rows, {s['kept']} trainable; tokens per sample after image expansion: "
                 f"min {t['min']}, median {t['median']}, p90 {t['p90']}, max {t['max']}; "
                 f"{s['supervised_tokens']} supervised tokens; images per row: "
                 + (", ".join(f"{n} in {rows} rows" for n, rows in s["images_per_row"].items()) or "none")]
        for reason, info in s["dropped"].items():
            lines.append(f"  dropped {info['count']} ({reason}): row ids {info['row_ids'][:10]}"
                         + (" ..." if info["count"] > 10 else "")
                         + (f"; e.g. {self.examples[reason]}" if reason in self.examples else ""))
        return "\n".join(lines)


def scan(dataset, collator, max_length: int | None, on_too_long: str = "drop",
         on_bad_image: str = "drop") -> ScanReport:
    """The reference scan: each sample of a chat dataset decoded and encoded with the training collator, serially."""
    row_ids, lengths, supervised, media, problems = [], [], [], [], []
    for i in range(len(dataset)):
        sample = dataset[i]
        length = labelled = 0
        if not sample["problem"]:
            batch = collator([sample])
            length, labelled = int(batch["attention_mask"].sum()), int((batch["labels"] != -100).sum())
        row_ids.append(sample["row_id"])
        lengths.append(length)
        supervised.append(labelled)
        media.append(len(sample["images"]) + len(sample["videos"]))
        problems.append(sample["problem"] or "")
    measured = Measured(np.array(row_ids, np.int64), np.array(lengths, np.int32), np.array(supervised, np.int32),
                        np.array(media, np.int16), problems)
    return decide(measured, max_length, on_too_long, on_bad_image)


def refuse_or_report(report: ScanReport, max_length: int | None, on_too_long: str, on_bad_image: str) -> ScanReport:
    """Raise DataRefused where the recipe says `error` (or nothing is left to train); else the report."""
    dropped = report.dropped
    bad = {reason: ids for reason, ids in dropped.items() if reason in report.examples}
    if bad and on_bad_image == "error":
        raise DataRefused(
            f"{sum(map(len, bad.values()))} rows have images, videos or fields that cannot be used; fix them or set "
            "data.on_bad_image=drop:\n" + "\n".join(
                f"  {reason}: {len(ids)} rows (ids {ids[:10]}); e.g. {report.examples[reason]}"
                for reason, ids in bad.items()))
    longer = dropped.get(too_long(max_length))
    if longer and on_too_long == "error":
        raise DataRefused(
            f"{len(longer)} samples are longer than training.max_length={max_length} after image expansion "
            f"(row ids {longer[:10]}); raise training.max_length, lower the image resolution, or set "
            "data.on_too_long=drop"
        )
    if not report.kept:
        raise DataRefused("no trainable samples left:\n" + report.describe())
    return report


#: Bump when a change alters what the scan measures; cached scans of other versions are not used.
SCAN_VERSION = "2"  # 2: llava keeps the spaces around a mid-sentence <image>
SELF_CHECK_ROWS = 8
#: Data settings that decide what happens to measured rows, or where rows come from, but not how they measure.
DECISIONS = ("on_too_long", "on_bad_image", "num_proc", "train_split", "eval_split", "streaming", "preview_rows",
             "shuffle_buffer")


@dataclass
class Measured:
    """Per source row: tokens, supervised tokens, images + videos, and the problem ("reason: detail") or ""."""

    row_ids: np.ndarray
    lengths: np.ndarray
    supervised: np.ndarray
    media: np.ndarray
    problems: list[str]

    def save(self, folder: Path) -> None:
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
        np.savez(tmp / "measured.npz", row_ids=self.row_ids, lengths=self.lengths, supervised=self.supervised,
                 media=self.media)
        (tmp / "problems.json").write_text(json.dumps({i: p for i, p in enumerate(self.problems) if p}))
        try:
            os.replace(tmp, folder)  # atomic: a reader never sees half a cache entry
        except OSError:  # another process stored the same entry first
            shutil.rmtree(tmp, ignore_errors=True)

    @classmethod
    def load(cls, folder: Path) -> "Measured":
        arrays = np.load(folder / "measured.npz")
        problems = [""] * len(arrays["row_ids"])
        for i, problem in json.loads((folder / "problems.json").read_text()).items():
            problems[int(i)] = problem
        return cls(arrays["row_ids"], arrays["lengths"], arrays["supervised"], arrays["media"], problems)


def scan_rows(rows, reader, measurer, max_length: int | None, on_too_long: str = "drop", on_bad_image: str = "drop",
              verify: str = "header", num_proc: int = 1, cache: bool = True, log=print,
              completion_budget: int | None = None) -> ScanReport:
    """Measure the source `rows` (reader: finetune.data.RowReader) and decide which samples train.

    The measurements are cached (see `fingerprint`); the decisions (max_length, on_* settings) are not, so changing
    them never rescans.
    """
    folder = cache_dir() / fingerprint(rows, reader, measurer, verify) if cache else None
    if folder is not None and (folder / "measured.npz").exists():
        started = time.time()
        measured = Measured.load(folder)
        log(f"pre-flight scan of {len(rows)} rows loaded from cache in {time.time() - started:.1f}s ({folder})")
    else:
        started = time.time()
        num_proc = max(1, min(num_proc, len(rows) // 500))  # a worker process costs more than a few hundred rows
        measured = measure_rows(rows, reader, measurer, verify, num_proc)
        if verify == "header" and not self_check(rows, reader, measurer, measured):
            log("WARNING: lengths measured from image headers differ from the collated ones for this processor; "
                "rescanning with decoded images (data.verify_images: decode). Please report this model.")
            measured = measure_rows(rows, reader, measurer, "decode", num_proc)
        seconds = time.time() - started
        log(f"pre-flight scan of {len(rows)} rows ({verify} check, {num_proc} process"
            f"{'es' if num_proc > 1 else ''}): {seconds:.1f}s, {len(rows) / max(seconds, 1e-9):.0f} rows/s")
        if folder is not None:
            folder.parent.mkdir(parents=True, exist_ok=True)
            measured.save(folder)
    return decide(measured, max_length, on_too_long, on_bad_image, completion_budget)


def measure_rows(rows, reader, measurer, verify: str, num_proc: int) -> Measured:
    """Every row of a `datasets.Dataset` measured, in `num_proc` processes."""

    def measure(batch: dict) -> dict:
        samples = [dict(zip(batch.keys(), values)) for values in zip(*batch.values())]
        return measure_batch(samples, reader, measurer, verify)

    result = rows.map(measure, batched=True, batch_size=200, num_proc=num_proc if num_proc > 1 else None,
                      remove_columns=[c for c in rows.column_names if c != ROW_ID], keep_in_memory=True,
                      load_from_cache_file=False, new_fingerprint=f"finetune-scan-{verify}",
                      desc=f"pre-flight scan ({verify})")
    table = result.data  # Arrow: whole columns at once, no per-row Python objects
    column = lambda name, dtype: table.column(name).to_numpy().astype(dtype)  # noqa: E731
    return Measured(column(ROW_ID, np.int64), column("length", np.int32), column("supervised", np.int32),
                    column("media", np.int16), table.column("problem").to_pylist())


def measure_list(rows: list[dict], reader, measurer, verify: str = "header") -> Measured:
    """Rows already in memory (each with its `row_id`), measured in this process."""

    out = measure_batch([dict(row) for row in rows], reader, measurer, verify)
    return Measured(np.array([row[ROW_ID] for row in rows], dtype=np.int64), np.array(out["length"], np.int32),
                    np.array(out["supervised"], np.int32), np.array(out["media"], np.int16), out["problem"])


def measure_batch(rows: list[dict], reader, measurer, verify: str) -> dict[str, list]:
    """Tokens, supervised tokens, media count and problem ("" if none) of each source row."""

    # header: sizes from file headers, lengths from the processor's formulas; decode: the collator itself.
    read, encode = (reader.sized, measurer.measure) if verify == "header" else (reader.decoded, measurer.collated)
    read_rows = []
    for row in rows:
        row.pop(ROW_ID, None)
        read_rows.append(read_row(read, row))
    if verify == "header":
        measurer.prepare(size for sample, _ in read_rows for size in sample["images"])
    out: dict[str, list] = {"length": [], "supervised": [], "media": [], "problem": []}
    for sample, problem in read_rows:
        length = supervised = 0
        if not problem:
            length, supervised, problem = measure_sample(encode, sample)
        out["length"].append(length)
        out["supervised"].append(supervised)
        out["media"].append(len(sample["images"]) + len(sample["videos"]))
        out["problem"].append(problem or "")
    return out


def measure_sample(encode, sample: dict) -> tuple[int, int, str | None]:
    """(tokens, supervised tokens, None), or (0, 0, problem) for a conversation the chat template cannot lay out:
    that row is dropped, not the run."""
    try:
        return (*measure_pair(encode, sample), None)
    except TemplateError as e:
        return 0, 0, f"template cannot render the conversation: {e}"


def measure_pair(measure, sample: dict) -> tuple[int, int]:
    """`measure(chat row) -> (tokens, supervised tokens)` for a row; for a preference row, both replies are measured
    and the pair counts as its longer sequence and its smaller supervised count (so it is dropped when either
    reply does not fit, or either has nothing to score)."""
    if PAIR_KEYS[0] not in sample:
        return measure(sample)
    (a, sa), (b, sb) = (measure(with_reply(sample, key)) for key in PAIR_KEYS)
    return max(a, b), min(sa, sb)


def too_long(max_length: int | None) -> str:
    """The drop reason of a sample longer than `training.max_length` (scan and stream alike)."""
    return f"longer than training.max_length={max_length}"


#: The drop reason of a sample with nothing for the assistant to learn.
NO_SUPERVISED = "no supervised tokens"


def self_check(rows, reader, measurer, measured: Measured) -> bool:
    """Collate a few measured rows for real (decoded images) and compare: a processor whose formulas the header
    path does not follow is caught here, on the user's own data, instead of mid-run."""

    candidates = [i for i in range(len(measured.problems)) if not measured.problems[i] and measured.media[i]]
    picked = candidates[:: max(1, len(candidates) // SELF_CHECK_ROWS)][:SELF_CHECK_ROWS]
    for i in picked:
        row = rows[i]
        row_id = row.pop(ROW_ID)
        sample, problem = read_row(reader.decoded, row)
        if problem:  # broken pixel data behind a good header: training drops it; nothing to compare
            continue
        sample[ROW_ID] = row_id
        if measure_pair(measurer.collated, sample) != (int(measured.lengths[i]), int(measured.supervised[i])):
            return False
    return True


def decide(measured: Measured, max_length: int | None, on_too_long: str, on_bad_image: str,
           completion_budget: int | None = None) -> ScanReport:
    """Which rows train, and every other row with its reason. `completion_budget` (GRPO): a row is its prompt plus
    that many generated tokens, not its reference reply (the prompt: the row less its supervised tokens)."""
    report = ScanReport(rows=len(measured.row_ids))
    dropped: dict[str, list[int]] = {}
    for i, problem in enumerate(measured.problems):
        if problem:
            reason, _, detail = problem.partition(": ")
            dropped.setdefault(reason, []).append(int(measured.row_ids[i]))
            report.examples.setdefault(reason, f"row {measured.row_ids[i]}: {detail}")
    usable = np.array([not p for p in measured.problems], dtype=bool)
    lengths = measured.lengths if completion_budget is None else \
        measured.lengths - measured.supervised + completion_budget
    longer = usable & (lengths > max_length) if max_length is not None else np.zeros_like(usable)
    if longer.any():
        dropped[too_long(max_length)] = measured.row_ids[longer].tolist()
    empty = usable & ~longer & (measured.supervised == 0)
    if empty.any():
        dropped[NO_SUPERVISED] = measured.row_ids[empty].tolist()
    kept = usable & ~longer & ~empty
    report.kept = np.flatnonzero(kept).tolist()
    report.lengths = measured.lengths[kept].tolist()
    report.supervised_tokens = int(measured.supervised[kept].sum())
    report.media = measured.media[kept].tolist()
    report.kept_row_ids = measured.row_ids[kept].tolist()
    report.dropped = dropped
    return refuse_or_report(report, max_length, on_too_long, on_bad_image)


def fingerprint(rows, reader, measurer, verify: str) -> str:
    """Everything a measurement depends on: the rows (datasets' fingerprint of the source and every transform),
    how rows become chat samples (the data section), the processor (tokenizer, chat template, image settings),
    the family and the scan's own code version. Image files are named by the rows, not hashed: replacing an
    image in place keeps its cached measurement (a file broken since then is dropped during training)."""
    processor = measurer.processor
    tokenizer = processor.tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    parts = {
        "version": SCAN_VERSION,
        "rows": rows._fingerprint,
        "data": {k: v for k, v in dataclasses.asdict(reader.cfg).items() if k not in DECISIONS},
        "videos_as_images": reader.videos_as_images,
        "verify": verify,
        "family": measurer.family.name,
        "template": getattr(processor, "chat_template", None) or getattr(tokenizer, "chat_template", None),
        "tokenizer": hashlib.sha256(backend.to_str().encode()).hexdigest() if backend else repr(tokenizer),
        "special": repr(sorted(tokenizer.special_tokens_map.items())),
        "image_processor": _settings(getattr(processor, "image_processor", None)),
        "video_processor": _settings(getattr(processor, "video_processor", None)),
        "processor": {k: repr(v) for k, v in sorted(vars(processor).items())
                      if isinstance(v, (int, float, str, bool, type(None)))},
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=repr).encode()).hexdigest()[:24]


def _settings(component) -> str | None:
    return None if component is None else component.to_json_string()


def cache_dir() -> Path:
    """Where scans are cached: $FINETUNE_CACHE/scans (default ~/.cache/finetune/scans)."""
    env = os.environ.get("FINETUNE_CACHE")
    return (Path(env) if env else Path.home() / ".cache" / "finetune") / "scans"
