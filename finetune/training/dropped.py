"""Rows left out during training: the collator drops a row whose images fail to decode (naming it in the batch's
`dropped_rows`), and a batch none of whose rows could be decoded is a stand-in (`skip_batch`) every rank skips."""

from __future__ import annotations

import torch


class DroppedRows:
    """What this process's batches reported; `report` gathers every process's (a collective)."""

    def __init__(self):
        self.rows: dict[str, list[tuple[int, str]]] = {}  # reason -> (row id, problem)
        self.skipped_batches = 0

    def take(self, inputs: dict) -> bool:
        """Record the rows the collator left out of `inputs` (removed from it); True for a stand-in batch."""
        for row_id, problem in inputs.pop("dropped_rows", ()):
            self.rows.setdefault(problem.partition(": ")[0], []).append((row_id, problem))
        return bool(inputs.pop("skip_batch", False))

    def count(self) -> int:
        return sum(len(rows) for rows in self.rows.values())

    def report(self) -> dict:
        """Over all processes: reason -> {count, row_ids, example}, plus batches skipped whole ({} when none)."""
        local = (self.rows, self.skipped_batches)
        gathered = [local]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, local)
        merged: dict[str, list] = {}
        for dropped, _ in gathered:
            for reason, rows in dropped.items():
                merged.setdefault(reason, []).extend(rows)
        report = {reason: {"count": len(rows), "row_ids": sorted({r for r, _ in rows})[:50],
                           "example": f"row {rows[0][0]}: {rows[0][1].partition(': ')[2]}"}
                  for reason, rows in merged.items()}
        skipped = sum(n for _, n in gathered)
        return {"rows": report, "skipped_batches": skipped} if report or skipped else {}
