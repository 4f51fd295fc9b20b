"""`training.packing: true`: whole samples packed into rows of up to `training.max_length` tokens, each attending only
to itself, with the positions, labels and image inputs it has when trained alone.

How, for every family the same way (the per-family facts are fields of finetune.models.families.Family):
1. `plan_packs`: the scan's lengths are packed best-fit-decreasing into packs once (deterministic, and stored by
   `cached_plan`, so a resumed run and every rank see the same packs); the trainer shuffles packs per epoch. A pack
   is one dataset item.
2. `PackCollator`: a batch of packs is collated as the samples it holds (the ordinary collator: same labels, same
   image tensors), plus how many samples each pack holds.
3. `pack_batch` (on the device, in the training step): each sample's position ids are taken as the model itself
   computes them unpacked (Qwen-VL's multimodal rope via the model's own `get_rope_index`, in
   finetune.training.attention, which also attends one sample at a time on SDPA), then each pack's
   samples are concatenated without padding. There is no attention mask: transformers finds sample boundaries where
   the text positions restart and isolates samples (block-diagonal mask on SDPA/eager; on flash-attention the
   packs go into one row, where the kernel takes boundaries from the positions), keeping per sample the
   bidirectional blocks PaliGemma's prefix and Gemma 3's images have. Each sample's first token carries no label
   (unpacked it is never a target either), so no sample learns to predict the next one.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence

from ..models.families import Family
from .collate import IGNORE_INDEX, ChatCollator

#: Inputs with one value per token (concatenated per pack; anything else is per image, or per row when the family
#: lists it in `packed_row_inputs`).
TOKEN_INPUTS = ("input_ids", "labels", "token_type_ids", "mm_token_type_ids")


def refusal(family: Family, attn_implementation: str | None) -> str | None:
    """Why this family cannot be packed exactly (with this attention), or None."""
    if family.no_packing:
        return family.no_packing
    flash = (attn_implementation or "").startswith("flash")
    if flash and (family.prefix_lm or family.bidirectional_images):
        return (f"{family.name} attends bidirectionally within its prefix or images, which flash-attention cannot "
                "express per packed sample; use model.attn_implementation sdpa (or eager) to pack")
    return None


def plan_packs(lengths, max_length: int) -> list[list[int]]:
    """Sample indices grouped into packs of at most `max_length` tokens, best-fit decreasing (the longest sample not
    yet packed goes into the fullest pack it fits). Samples within a pack keep their dataset order."""
    lengths = [int(n) for n in lengths]
    too_long = [i for i, n in enumerate(lengths) if n > max_length or n < 1]
    if too_long:
        raise ValueError(f"sample {too_long[0]} has {lengths[too_long[0]]} tokens, which does not fit a pack of "
                         f"training.max_length={max_length}")
    free = _Capacities(max_length)  # remaining capacity -> packs with exactly that much room
    packs: list[list[int]] = []
    by_room: dict[int, list[int]] = {}
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        n = lengths[i]
        room = free.smallest_at_least(n)
        if room is None:
            packs.append([i])
            p = len(packs) - 1
        else:
            p = by_room[room].pop()
            if not by_room[room]:
                free.remove(room)
            packs[p].append(i)
            n += max_length - room
        left = max_length - n
        if left > 0:
            if not by_room.setdefault(left, []):
                free.add(left)
            by_room[left].append(p)
    return [sorted(pack) for pack in packs]


#: Bump when plan_packs would plan the same lengths differently; stored plans of other versions are not used.
PLAN_VERSION = "1"


def cached_plan(lengths, max_length: int, folder: Path) -> list[list[int]]:
    """`plan_packs`, stored in `folder` under the lengths and max_length it was planned from: at 1M rows planning
    takes seconds (about 4 s measured), and every start, resume and rank of a run needs the same plan."""
    lengths = np.asarray(lengths, dtype=np.int64)
    key = hashlib.sha256(lengths.tobytes() + f"/{max_length}/{PLAN_VERSION}".encode()).hexdigest()[:32]
    path = folder / f"{key}.npz"
    if path.exists():
        stored = np.load(path)
        members, ends = stored["members"].tolist(), stored["ends"].tolist()
        return [members[start:end] for start, end in zip([0] + ends, ends)]
    packs = plan_packs(lengths, max_length)
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".plan-", suffix=".npz")
    members, ends = flattened(packs)
    with os.fdopen(fd, "wb") as f:
        np.savez(f, members=members, ends=ends)
    os.replace(tmp, path)  # atomic: a process reading the plan never sees half of it
    return packs


def flattened(packs: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """The packs' sample indices back to back, and where each pack ends among them."""
    return (np.fromiter((i for p in packs for i in p), np.int64),
            np.cumsum([len(p) for p in packs], dtype=np.int64))


class _Capacities:
    """The set of remaining capacities in 1..size; `smallest_at_least` in O(log size) (a max segment tree)."""

    def __init__(self, size: int):
        self.leaves = 1 << max(size - 1, 0).bit_length()
        self.tree = [0] * (2 * self.leaves)

    def _set(self, value: int, present: bool) -> None:
        i = self.leaves + value - 1
        self.tree[i] = value if present else 0
        while i > 1:
            i >>= 1
            left, right = self.tree[2 * i], self.tree[2 * i + 1]
            self.tree[i] = left if left >= right else right

    def add(self, value: int) -> None:
        self._set(value, True)

    def remove(self, value: int) -> None:
        self._set(value, False)

    def smallest_at_least(self, value: int) -> int | None:
        if self.tree[1] < value:
            return None
        i = 1
        while i < self.leaves:
            i = 2 * i if self.tree[2 * i] >= value else 2 * i + 1
        return self.tree[i]


class PackedRows(torch.utils.data.Dataset):
    """The training rows, served a pack (a list of rows) at a time."""

    def __init__(self, rows, packs: list[list[int]], lengths):
        self.rows, self.packs = rows, packs
        members, ends = flattened(packs)
        tokens = np.asarray(lengths, np.int64)[members]
        starts = np.concatenate(([0], ends[:-1]))
        self.lengths = np.add.reduceat(tokens, starts).tolist() if packs else []  # tokens per pack

    def __len__(self) -> int:
        return len(self.packs)

    def __getitem__(self, i: int) -> list[dict]:
        return [self.rows[j] for j in self.packs[i]]

    def summary(self) -> dict:
        return {"packs": len(self.packs), "samples": sum(len(p) for p in self.packs),
                "tokens_per_pack_max": max(self.lengths, default=0)}

    def describe(self, max_length: int) -> str:
        samples = sum(len(p) for p in self.packs)
        fill = sum(self.lengths) / (len(self.packs) * max_length) if self.packs else 0.0
        return (f"packing {samples} samples into {len(self.packs)} rows of up to {max_length} tokens "
                f"({samples / max(len(self.packs), 1):.1f} samples per row, {fill:.0%} full)")


@dataclass
class PackCollator:
    """Collates a batch of packs as the samples they hold (the ordinary collator), with `pack_sizes`. Evaluation
    batches (rows, not packs) are collated as they are."""

    collator: ChatCollator

    def __call__(self, items: list) -> dict:
        if not items or not isinstance(items[0], list):
            return self.collator(items)
        batch = self.collator([row for pack in items for row in pack])
        if batch.get("skip_batch"):
            sizes = [len(batch["input_ids"])]  # the stand-in: one row, nothing labelled
        else:
            sizes = [n for n in (sum(not row.get("problem") for row in pack) for pack in items) if n]
        batch["pack_sizes"] = sizes
        return batch


def pack_batch(batch: dict, family: Family, pad_token_id: int, rope: torch.Tensor | None = None,
               one_row: bool = False) -> dict:
    """A collated batch of packs (right-padded samples plus `pack_sizes`) as packed rows: no padding between the
    samples of a pack, per-sample position ids, no attention mask. `rope` (3, samples, length): multimodal rope
    positions of the unpacked samples. `one_row`: every pack in a single row (flash-attention)."""
    batch = dict(batch)
    sizes = batch.pop("pack_sizes")
    mask = batch.pop("attention_mask").bool()
    n, length = mask.shape
    if sum(sizes) != n:
        raise ValueError(f"pack sizes {sizes} do not add up to the batch's {n} samples")
    tokens = mask.sum(1)
    if not torch.equal(mask, torch.arange(length, device=mask.device) < tokens[:, None]):
        raise ValueError("packing needs right-padded samples")
    if one_row:
        sizes = [n]
    per_pack = torch.stack([t.sum() for t in tokens.split(sizes)]).tolist()

    def packed(values: torch.Tensor, fill: int) -> torch.Tensor:
        """(samples, length, ...) -> (packs, longest pack, ...): each pack's real tokens back to back."""
        return pad_sequence(values[mask].split(per_pack), batch_first=True, padding_value=fill)

    first = torch.cat([tokens.new_zeros(1), tokens.cumsum(0)[:-1]])  # each sample's first token, in the flat order
    out = {}
    for key in TOKEN_INPUTS:
        if key not in batch:
            continue
        values = batch.pop(key)
        if key == "labels":
            values = values[mask]
            values[first] = IGNORE_INDEX  # never a target unpacked; packed it would follow the previous sample
            out[key] = pad_sequence(values.split(per_pack), batch_first=True, padding_value=IGNORE_INDEX)
        else:
            out[key] = packed(values, pad_token_id if key == "input_ids" else 0)
    text = torch.arange(length, device=mask.device).expand(n, length) + family.first_position
    # Padding after the last sample gets position 0: every padding token is then a sequence of its own.
    positions = packed(text, 0)
    if rope is not None:
        rope = torch.stack([packed(r, 0) for r in rope])
        positions = torch.cat([positions[None], rope])  # row 0 = text positions (sample boundaries), then t/h/w
    out["position_ids"] = positions
    for key in family.packed_row_inputs:
        if key in batch:
            values = batch.pop(key)  # (samples, images, ...), all-zero images are padding the model leaves out
            out[key] = pad_sequence([v.flatten(0, 1) for v in values.split(sizes)], batch_first=True)
    out.update(batch)  # per-image inputs: the samples' images stay in the same order
    return out


def row_segments(batch: dict) -> list[list[int]]:
    """Per packed row, the token counts of its samples in order, then of its padding (if any): the blocks its
    attention mask is block-diagonal over. `batch`: a collated batch of packs, as `pack_batch` takes it."""
    rows = [t.tolist() for t in batch["attention_mask"].sum(1).split(batch["pack_sizes"])]
    length = max(sum(r) for r in rows)
    return [r + [length - sum(r)] if sum(r) < length else r for r in rows]
