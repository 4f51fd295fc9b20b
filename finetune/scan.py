"""Pre-flight scan: encode every sample once, exactly as training will, and decide which ones can be trained.

A sample longer than `training.max_length` after image expansion is dropped or refused (never truncated: that
would cut image tokens and crash mid-run), and a sample with no supervised token is dropped (its loss is NaN).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


class DataRefused(ValueError):
    """The data cannot be trained as configured; the message says which rows and why."""


@dataclass
class ScanReport:
    rows: int = 0
    kept: list[int] = field(default_factory=list)  # positions in the dataset
    lengths: list[int] = field(default_factory=list)  # token length of each kept sample
    supervised_tokens: int = 0
    dropped: dict[str, list[int]] = field(default_factory=dict)  # reason -> row ids
    images_per_row: dict[int, int] = field(default_factory=dict)  # row id -> images, for every kept row
    examples: dict[str, str] = field(default_factory=dict)  # reason -> the first problem's full message

    def summary(self) -> dict:
        lengths = sorted(self.lengths)
        pct = (lambda q: lengths[min(len(lengths) - 1, int(q * len(lengths)))]) if lengths else (lambda q: 0)
        return {
            "rows": self.rows,
            "kept": len(self.kept),
            "dropped": {reason: {"count": len(ids), "row_ids": ids[:50]} for reason, ids in self.dropped.items()},
            "tokens_per_sample": {"min": pct(0), "median": pct(0.5), "p90": pct(0.9), "max": pct(1.0)},
            "supervised_tokens": self.supervised_tokens,
            "images_per_row": dict(sorted(Counter(self.images_per_row.values()).items())),
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
    """Encode each sample of a chat dataset with the training collator; record lengths and what must be dropped."""
    report = ScanReport(rows=len(dataset))
    dropped: dict[str, list[int]] = {}
    for i in range(len(dataset)):
        sample = dataset[i]
        if sample["problem"]:
            reason, _, detail = sample["problem"].partition(": ")
            dropped.setdefault(reason, []).append(sample["row_id"])
            report.examples.setdefault(reason, f"row {sample['row_id']}: {detail}")
            continue
        batch = collator([sample])
        length = int(batch["attention_mask"].sum())
        supervised = int((batch["labels"] != -100).sum())
        if max_length is not None and length > max_length:
            dropped.setdefault(f"longer than training.max_length={max_length}", []).append(sample["row_id"])
        elif supervised == 0:
            dropped.setdefault("no supervised tokens", []).append(sample["row_id"])
        else:
            report.kept.append(i)
            report.images_per_row[sample["row_id"]] = len(sample["images"]) + len(sample["videos"])
            report.lengths.append(length)
            report.supervised_tokens += supervised
    report.dropped = dropped
    bad = {reason: ids for reason, ids in dropped.items() if reason in report.examples}
    if bad and on_bad_image == "error":
        raise DataRefused(
            f"{sum(map(len, bad.values()))} rows have images, videos or fields that cannot be used; fix them or set "
            "data.on_bad_image=drop:\n" + "\n".join(
                f"  {reason}: {len(ids)} rows (ids {ids[:10]}); e.g. {report.examples[reason]}"
                for reason, ids in bad.items()))
    too_long = [ids for reason, ids in dropped.items() if reason.startswith("longer")]
    if too_long and on_too_long == "error":
        raise DataRefused(
            f"{len(too_long[0])} samples are longer than training.max_length={max_length} after image expansion "
            f"(row ids {too_long[0][:10]}); raise training.max_length, lower the image resolution, or set "
            "data.on_too_long=drop"
        )
    if not report.kept:
        raise DataRefused("no trainable samples left:\n" + report.describe())
    return report

