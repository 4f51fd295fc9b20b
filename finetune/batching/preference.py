"""Preference rows (DPO) as batches: a row's prompt with its chosen reply and with its rejected reply, collated by the
SFT collator, so the tokens that enter the log-probabilities are exactly the tokens SFT would put loss on."""

from __future__ import annotations

from dataclasses import dataclass

from ..data.rows import PAIR_KEYS, with_reply
from .collate import IGNORE_INDEX, ChatCollator


@dataclass
class PreferenceCollator(ChatCollator):
    """Preference rows (`messages` = the prompt, `images`, `chosen`, `rejected`) -> one batch of 2n sequences,
    [chosen_1..n, rejected_1..n] as TRL expects, with `completion_mask` (1 on the reply's tokens and end-of-turn
    only: never an image, prompt or padding token)."""

    def encode_batch(self, rows: list[dict]) -> dict:
        return self.encode_pairs(rows)

    def unsupervise(self, batch: dict) -> None:
        batch["completion_mask"][:] = 0

    def encode_pairs(self, rows: list[dict]) -> dict:
        chats = [with_reply(row, key) for key in PAIR_KEYS for row in rows]  # all chosen, then all rejected
        batch = self.encode_rows(chats)
        labels = batch.pop("labels")
        batch["completion_mask"] = (labels != IGNORE_INDEX).long()
        return batch
