"""What a run counts as it trains, for its logs and run_summary.json: samples, real (non-padding) tokens and padded
positions of every batch, the model FLOPs of SFT batches on CUDA (finetune.training.flops), and the time spent
outside training (generation evals mid-run), which tokens/s leaves out."""

from __future__ import annotations

import contextlib
import time

import torch

from .flops import batch_flops, matmul_rate, mfu_facts, model_shape


class Throughput:
    """This process's counts; the figures (`interval`, `totals`) are over all processes: every rank calls them."""

    def __init__(self):
        self.seen = torch.zeros(3, dtype=torch.long)  # samples, real tokens, padded positions (this process)
        self.model_flops = 0.0  # over the batches trained (this process)
        self.matmul_rate: float | None = None  # FLOP/s, measured on CUDA before the first step (the MFU denominator)
        self.packed_attention = {"varlen": 0, "per_sample": 0}  # decoder attention calls on packed rows, by path
        self._shape = None
        self._last_log: tuple[float, torch.Tensor] | None = None  # (time, all ranks' counts) at the previous log
        self._paused = 0.0  # seconds since then spent outside training, not counted

    def start(self) -> None:
        """The first batch arrives: throughput is measured from here."""
        if self._last_log is None:
            self._last_log = (time.perf_counter(), torch.zeros_like(self.seen))

    @property
    def started(self) -> bool:
        return self._last_log is not None

    def count(self, samples: int, tokens: int, positions: int) -> None:
        self.seen += torch.tensor([samples, tokens, positions])

    def count_flops(self, model, inputs: dict, family, device) -> None:
        """Model FLOPs of this batch (`model` unwrapped), for the run's MFU; on the first, the device's bf16 matmul
        rate is measured (a few hundred ms, before any training memory is in use)."""
        if self._shape is None:
            self._shape = model_shape(model, family)
            self.matmul_rate = matmul_rate(device)
        self.model_flops += batch_flops(self._shape, inputs, model.config)

    @contextlib.contextmanager
    def outside_training(self):
        """Time spent in here is left out of the next interval's tokens/s."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self._paused += time.perf_counter() - started

    def interval(self, reduce, device, dropped: int, dropped_in_scan: int) -> dict:
        """Non-padding tokens/s, samples/s and padding fraction since the previous call, over all processes
        (`reduce`: accelerate's sum over ranks), and rows dropped so far: by the pre-flight scan, and in training
        (`dropped`: this rank's count; images that failed to decode)."""
        local = torch.cat([self.seen, torch.tensor([dropped])]).to(device)
        now, totals = time.perf_counter(), reduce(local, "sum").cpu()
        then, before = self._last_log
        then += self._paused
        self._paused = 0.0
        self._last_log = (now, totals[:3])
        samples, tokens, padded = (int(x) for x in totals[:3] - before)
        seconds = max(now - then, 1e-9)
        facts = {"tokens_per_second": round(tokens / seconds, 1), "samples_per_second": round(samples / seconds, 3),
                 "padding_fraction": round(1 - tokens / padded, 4) if padded else 0.0}
        if dropped_in_scan:
            facts["rows_dropped_in_scan"] = dropped_in_scan
        if int(totals[3]):
            facts["rows_dropped_in_training"] = int(totals[3])
        return facts

    def totals(self, reduce, device, seconds: float, processes: int) -> dict:
        """Samples/s, non-padding tokens/s and padding fraction over the whole run and all processes."""
        samples, tokens, padded = (int(x) for x in reduce(self.seen.to(device), "sum"))
        facts = {"samples": samples, "tokens": tokens, "samples_per_second": round(samples / seconds, 3),
                 "tokens_per_second": round(tokens / seconds, 1),
                 "padding_fraction": round(1 - tokens / padded, 4) if padded else 0.0}
        if sum(self.packed_attention.values()):
            facts["packed_attention_calls"] = dict(self.packed_attention)
        # MFU only where training ran on CUDA: there the denominator is measured on the same card. On a CPU a peak
        # rate depends on threads, precision and whatever else the machine runs, so the figure would mean nothing.
        if device.type == "cuda" and self.matmul_rate:
            flops = float(reduce(torch.tensor(self.model_flops, device=device), "sum"))
            facts.update(mfu_facts(flops, seconds, self.matmul_rate, processes))
        return facts
