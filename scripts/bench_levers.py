"""The lever sweep of `scripts/bench_gpu.py --compare` (imported by bench_compare.py; not run on its own): after the
headline runs, finetune's best over a few steps, then each lever off (or Liger's kernels on) one at a time, put back
afterwards, within the --deadline-s budget. scripts/bench_compare.py lists the levers and says how they are timed.
"""

from __future__ import annotations

import contextlib
import copy
import sys

import torch

from bench_sides import Side, loss_of, timed


def set_upcast(model, on: bool) -> None:
    """peft's prepare_model_for_kbit_training upcast (every non-4-bit weight to fp32; finetune did this before) or
    its undoing (bf16, as TRL leaves them): in place, exact both ways (bf16 -> fp32 -> bf16 is lossless)."""
    for p in model.parameters():
        if p.requires_grad or p.__class__.__name__ == "Params4bit" or not p.is_floating_point():
            continue
        p.data = p.data.to(torch.float32 if on else torch.bfloat16)


@contextlib.contextmanager
def liger_applied(model):
    """Liger's kernels on this model (fused cross-entropy off, as TRL applies them), undone on exit: Liger replaces
    classes and functions in transformers' modeling modules, which would reach every model built afterwards."""
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    modules = [m for name, m in list(sys.modules.items())
               if name.startswith("transformers.models.") and ".modeling_" in name]
    saved = [(m, dict(vars(m))) for m in modules]
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    _apply_liger_kernel_to_instance(model=base, fused_linear_cross_entropy=False, cross_entropy=False)
    try:
        yield
    finally:
        for m, attrs in saved:
            for k in set(vars(m)) - set(attrs):
                delattr(m, k)
            for k, v in attrs.items():
                setattr(m, k, v)

def sweep(report, mode, model, family, best: Side, short: dict, optimizer, device, shape, rate, frozen, save,
          time_left, step_s: float):
    """finetune's best over a few steps, then one lever off (or Liger on) at a time, each put back afterwards.
    LoRA: every lever. QLoRA: what differs from LoRA (the fp32 upcast, tokens per step) and Liger; the others are
    the same code on the same shapes. A lever that would not finish in `time_left()` (at twice the best step time)
    is recorded as skipped. Returns the frozen-tower wrapping in place at the end."""
    from finetune.models.frozen import run_frozen_without_autograd
    from finetune.training.flops import batch_flops
    from finetune.training.kernels import liger_support

    config = model.get_base_model().config
    k = len(short["half"])
    entries = report["sweep"].setdefault(mode, [])

    def measure(label: str, side: Side, batches: list[dict]) -> None:
        if time_left() < 2 * (len(batches) + 1) * step_s + 5:
            entries.append({"lever": label, "skipped": "out of time (--deadline-s)"})
            save()
            print(f"[bench] {mode} sweep: {label}: skipped, out of time", flush=True)
            return
        try:
            r = timed(side, model, batches, optimizer, device, [batch_flops(shape, b, config) for b in batches], rate)
            r["lever"] = label
        except Exception as e:  # noqa: BLE001 - one lever failing must not cost the others
            r = {"lever": label, "error": f"{type(e).__name__}: {str(e)[:300]}"}
        entries.append(r)
        save()
        print(f"[bench] {mode} sweep: {label}: " + (f"{r['tokens_per_s']:.0f} tokens/s" if "error" not in r
                                                    else r["error"]), flush=True)

    def variant(**changes) -> Side:
        side = copy.copy(best)
        side.used = {"varlen": 0, "per_sample": 0}
        for key, value in changes.items():
            setattr(side, key, value)
        return side

    measure("finetune (best)", variant(), best.batches[:k])
    if mode == "lora":
        measure("packing off (length-grouped batches of 4)", variant(packed=False), short["grouped"])
        if best.kernel != "per_sample":
            measure("decoder varlen off (per-sample SDPA)", variant(kernel="per_sample"), best.batches[:k])
        if best.vision_varlen:
            measure("vision varlen off (SDPA per window)", variant(vision_varlen=False), best.batches[:k])
        frozen.undo()
        measure("frozen tower with autograd", variant(), best.batches[:k])
        frozen = run_frozen_without_autograd(model, family)
        model.gradient_checkpointing_disable()
        measure("gradient checkpointing off", variant(), best.batches[:k])
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        set_upcast(model, True)
        measure("fp32 upcast of the non-4-bit weights (finetune before)", variant(), best.batches[:k])
        set_upcast(model, False)
        half = max(report["pack_length"] // 2, report["row_tokens"]["max"])
        measure(f"packs of {half} tokens", variant(), short["half"])
        measure(f"packs of {report['pack_length'] * 2} tokens", variant(), short["double"])
    probe = report["probes"].setdefault(f"liger_{mode}", {})
    if liger_support() is None:
        probe.update(status="liger-kernel not installed (or no Triton)", ok=False)
        save()
        return frozen
    try:  # Liger last: measured after a probe of its loss against the unpatched one, then undone
        before = loss_of(best, model, best.batches[0], device)
        with liger_applied(model):
            after = loss_of(best, model, best.batches[0], device)
            ok = abs(after - before) <= 2e-2 * abs(before)
            probe.update(status="passed" if ok else "failed", ok=ok, loss=before, loss_with_liger=after)
            save()
            if ok:
                measure("Liger on (RoPE, RMSNorm, SwiGLU)", variant(), best.batches[:k])
    except Exception as e:  # noqa: BLE001 - a broken lever is recorded, not a crash
        probe.update(status=f"failed: {type(e).__name__}: {str(e)[:300]}", ok=False)
        save()
    return frozen
