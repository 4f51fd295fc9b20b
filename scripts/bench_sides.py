"""How each side of `scripts/bench_gpu.py --compare` trains and is measured (imported by bench_compare.py and
bench_levers.py; not run on its own): a Side lays out and trains its batches, `timed` runs them for throughput,
memory and MFU, `probe_varlen` and `loss_of` check that a lever computes what the path it replaces computes before
it is timed, `profile` lists the operations that take the device's time. scripts/bench_compare.py says what is
compared and how.
"""

from __future__ import annotations

import contextlib
import math
import time

import torch

from bench_common import peak_gib, reset_peak, sync


# --- the model as each side trains it ----------------------------------------------------------------------------


class Side:
    """How one side lays out and trains its batches."""

    def __init__(self, name: str, batches: list[dict], family, pad_id: int, packed: bool, kernel: str = "auto",
                 supervised_head: bool = False, vision_varlen: bool = False):
        self.name, self.batches, self.family, self.pad_id = name, batches, family, pad_id
        self.packed, self.kernel, self.supervised_head = packed, kernel, supervised_head
        self.vision_varlen = vision_varlen  # the Qwen tower's windows through the varlen kernel
        self.used = {"varlen": 0, "per_sample": 0}

    def step(self, model, batch: dict, optimizer, device) -> torch.Tensor:
        from finetune.training.attention import packed_inputs
        from finetune.training.trainer import lm_head_on_supervised_positions

        batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        attention = contextlib.nullcontext()
        if self.packed:
            base = model.get_base_model()
            batch, attention = packed_inputs(base, batch, self.family, self.pad_id, self.kernel, self.used)
        head = lm_head_on_supervised_positions() if self.supervised_head else contextlib.nullcontext()
        with attention, head:  # the backward too: gradient checkpointing runs the attention again there
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                out = model(**batch, use_cache=False, fused_lm_head=True)  # TRL's loss: its fused LM head
                loss = -out.log_probs.sum() / out.label_mask.sum().clamp(min=1)
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()


def real_tokens(batch: dict) -> int:
    return int(batch["attention_mask"].sum())


def positions(batch: dict) -> int:
    """Positions the model computes: a packed batch's packs, each as long as its longest (one pack per row here)."""
    if "pack_sizes" not in batch:
        return batch["attention_mask"].numel()
    per_pack = [int(t.sum()) for t in batch["attention_mask"].sum(1).split(batch["pack_sizes"])]
    return len(per_pack) * max(per_pack)


def timed(side: Side, model, batches: list[dict], optimizer, device, flops: list[float], peak: float | None) -> dict:
    """One warm-up step on the first batch (untimed), then every batch once; throughput, memory, MFU."""
    from finetune.training.attention import use_vision_varlen

    use_vision_varlen(model, False)
    vision_varlen = side.vision_varlen and use_vision_varlen(model)
    side.step(model, batches[0], optimizer, device)
    sync(device)
    reset_peak(device)
    start = time.perf_counter()
    losses = [side.step(model, b, optimizer, device) for b in batches]
    sync(device)
    seconds = time.perf_counter() - start
    losses = [float(x) for x in losses]
    if not all(math.isfinite(x) for x in losses):
        raise RuntimeError(f"{side.name}: non-finite training loss: {losses}")
    tokens = sum(real_tokens(b) for b in batches)
    samples = sum(len(b["input_ids"]) for b in batches)
    r = {"pipeline": side.name, "steps": len(batches), "samples": samples, "tokens": tokens,
         "seconds": round(seconds, 2), "tokens_per_s": tokens / seconds, "samples_per_s": samples / seconds,
         "step_s": seconds / len(batches), "tokens_per_step": tokens / len(batches),
         "padding": round(1 - tokens / sum(positions(b) for b in batches), 3),
         "first_loss": losses[0], "last_loss": losses[-1], "model_tflop": round(sum(flops) / 1e12, 2),
         "mfu": sum(flops) / seconds / peak if peak else None, **peak_gib(device)}
    if side.packed:
        r["attention_calls"] = dict(side.used)
    r["vision_varlen"] = vision_varlen
    return r


# --- probes: a lever is measured only after it computes what the path it replaces computes -----------------------


def probe_varlen(device) -> dict:
    """The varlen kernel against per-segment SDPA on random bf16 tensors (forward and input gradients)."""
    from finetune.training.attention import varlen_kernel

    kernel = varlen_kernel()
    if kernel is None:
        return {"status": "not available here", "ok": False}
    try:
        g = torch.Generator(device="cpu").manual_seed(0)
        segments, heads, kv_heads, dim = [300, 250, 150, 1, 1], 28, 4, 128
        shape = (1, heads, sum(segments), dim)
        q = torch.randn(shape, generator=g).to(device, torch.bfloat16).requires_grad_()
        k, v = (torch.randn(1, kv_heads, sum(segments), dim, generator=g).to(device, torch.bfloat16).requires_grad_()
                for _ in range(2))
        out = kernel(q, k, v, segments, dim ** -0.5)
        ref, start = [], 0
        for n in segments:
            s = slice(start, start + n)
            ref.append(torch.nn.functional.scaled_dot_product_attention(
                q[:, :, s], k[:, :, s], v[:, :, s], is_causal=True, enable_gqa=True).transpose(1, 2))
            start += n
        ref = torch.cat(ref, 1)
        grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
        ref_grads = torch.autograd.grad(ref.float().square().sum(), (q, k, v))
        diff = max([float((out - ref).detach().abs().max())]
                   + [float((a - b).abs().max() / b.abs().max()) for a, b in zip(grads, ref_grads)])
        return {"status": "passed" if diff < 3e-2 else "failed", "ok": diff < 3e-2, "max_difference": diff,
                "kernel": getattr(kernel.args[0], "__module__", "?") + "." + kernel.args[0].__name__}
    except Exception as e:  # noqa: BLE001 - a broken kernel is a finding, not a crash
        return {"status": f"failed: {type(e).__name__}: {str(e)[:300]}", "ok": False}


def loss_of(side: Side, model, batch: dict, device) -> float:
    """The side's loss on a batch, without training (the probes compare these)."""
    from finetune.training.attention import packed_inputs, use_vision_varlen

    use_vision_varlen(model, False)
    if side.vision_varlen:
        use_vision_varlen(model)
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    attention = contextlib.nullcontext()
    if side.packed:
        batch, attention = packed_inputs(model.get_base_model(), batch, side.family, side.pad_id, side.kernel,
                                         side.used)
    training = model.training
    model.eval()  # no dropout: the two losses a probe compares differ by the lever alone
    try:
        with torch.no_grad(), attention, torch.autocast(device.type, dtype=torch.bfloat16,
                                                        enabled=device.type == "cuda"):
            out = model(**batch, use_cache=False, fused_lm_head=True)
            return float(-out.log_probs.sum() / out.label_mask.sum().clamp(min=1))
    finally:
        model.train(training)


def profile(side: Side, model, batches: list[dict], optimizer, device, top: int = 15) -> list[dict]:
    """torch.profiler over a few steps: the operations with the most self time on the device (CPU in a dry run)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as profiler

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profiler(activities=activities) as prof:
        for b in batches:
            side.step(model, b, optimizer, device)
        if device.type == "cuda":
            torch.cuda.synchronize()
    events = prof.key_averages()

    def self_time(e) -> float:  # microseconds; the attribute names moved between torch versions
        if device.type != "cuda":
            return e.self_cpu_time_total
        return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)

    total = sum(self_time(e) for e in events) or 1
    rows = sorted(events, key=self_time, reverse=True)[:top]
    return [{"op": e.key[:80], "calls": e.count, "ms": round(self_time(e) / 1e3, 1),
             "share": round(self_time(e) / total, 3)} for e in rows]
