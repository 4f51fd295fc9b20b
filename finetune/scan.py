"""Pre-flight scan: encode every sample once, exactly as training will, and decide which ones can be trained.

A sample longer than `training.max_length` after image expansion is dropped or refused (never truncated: that
would cut image tokens and crash mid-run), and a sample with no supervised token is dropped (its loss is NaN).
"""

from __future__ import annotations

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

    def summary(self) -> dict:
        lengths = sorted(self.lengths)
        pct = (lambda q: lengths[min(len(lengths) - 1, int(q * len(lengths)))]) if lengths else (lambda q: 0)
        return {
            "rows": self.rows,
            "kept": len(self.kept),
            "dropped": {reason: {"count": len(ids), "row_ids": ids[:50]} for reason, ids in self.dropped.items()},
            "tokens_per_sample": {"min": pct(0), "median": pct(0.5), "p90": pct(0.9), "max": pct(1.0)},
            "supervised_tokens": self.supervised_tokens,
        }

    def describe(self) -> str:
        s = self.summary()
        t = s["tokens_per_sample"]
        lines = [f"{s['rows']} rows, {s['kept']} trainable; tokens per sample after image expansion: "
                 f"min {t['min']}, median {t['median']}, p90 {t['p90']}, max {t['max']}; "
                 f"{s['supervised_tokens']} supervised tokens"]
        for reason, info in s["dropped"].items():
            lines.append(f"  dropped {info['count']} ({reason}): row ids {info['row_ids'][:10]}"
                         + (" ..." if info["count"] > 10 else ""))
        return "\n".join(lines)


def scan(dataset, collator, max_length: int | None, on_too_long: str = "drop") -> ScanReport:
    """Encode each sample of a ChatDataset with the training collator; record lengths and what must be dropped."""
    report = ScanReport(rows=len(dataset))
    dropped: dict[str, list[int]] = {}
    for i in range(len(dataset)):
        sample = dataset[i]
        batch = collator([sample])
        length = int(batch["attention_mask"].sum())
        supervised = int((batch["labels"] != -100).sum())
        if max_length is not None and length > max_length:
            dropped.setdefault(f"longer than training.max_length={max_length}", []).append(sample["row_id"])
        elif supervised == 0:
            dropped.setdefault("no supervised tokens", []).append(sample["row_id"])
        else:
            report.kept.append(i)
            report.images_per_row[sample["row_id"]] = len(sample["images"])
            report.lengths.append(length)
            report.supervised_tokens += supervised
    report.dropped = dropped
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

