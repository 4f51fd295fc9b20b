"""Does a merged checkpoint behave like the adapter it came from? Logits and greedy generations, side by side.

Both models see the same real samples, collated by finetune's own `ChatCollator` (so the same chat template, image
settings and tokens as training). Logits are compared on every text position (padding and image tokens excluded:
an image token's own next-token prediction is never used, while its hidden state reaches every later text position,
which is compared) and, separately, on the supervised positions, the ones whose next token carries loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..batching.collate import IGNORE_INDEX, ChatCollator
from ..evaluation.inference import prompt_batch, prompt_messages, stop_token_ids


@dataclass
class Outputs:
    """What one model produced on the parity samples; logits are float32 on the CPU."""

    input_ids: torch.Tensor
    logits: torch.Tensor  # [batch, seq, vocab]
    text: torch.Tensor  # bool [batch, seq]: non-padding, non-image positions
    supervised: torch.Tensor  # bool [batch, seq]: positions whose next token carries loss
    generated: list[list[int]]  # greedy continuation of each prompt (answer removed), new tokens only
    decoded: list[str]


@torch.no_grad()
def model_outputs(model, collator: ChatCollator, rows: list[dict], max_new_tokens: int = 8) -> Outputs:
    """Logits on the full conversations and greedy continuations of their prompts."""
    model.eval()
    batch = collator(rows)
    labels = batch.pop("labels")
    device = model.device
    logits = model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu()
    ids = batch["input_ids"]
    text = (batch["attention_mask"] == 1) & ~torch.isin(ids, torch.tensor(collator.image_token_ids))
    supervised = torch.zeros_like(text)
    supervised[:, :-1] = labels[:, 1:] != IGNORE_INDEX  # logits at t predict the token at t + 1
    generated = _greedy(model, collator, rows, max_new_tokens)
    decoded = collator.processor.batch_decode(generated, skip_special_tokens=True)
    return Outputs(ids, logits, text, supervised, generated, [d.strip() for d in decoded])


def _greedy(model, collator: ChatCollator, rows: list[dict], max_new_tokens: int) -> list[list[int]]:
    tokenizer = collator.processor.tokenizer
    side, tokenizer.padding_side = tokenizer.padding_side, "left"  # every row continues from its last prompt token
    try:
        batch = prompt_batch(collator.processor, collator.family, [prompt_messages(r["messages"]) for r in rows],
                             [r["images"] for r in rows])
    finally:
        tokenizer.padding_side = side
    batch = batch.to(model.device)
    out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=stop_token_ids(model, collator.processor, collator.family),
                         pad_token_id=tokenizer.pad_token_id)
    return out[:, batch["input_ids"].shape[1]:].cpu().tolist()


def compare(reference: Outputs, candidate: Outputs) -> dict:
    """Max |logit difference| and KL(reference || candidate) per position set, and greedy agreement."""
    if not torch.equal(reference.input_ids, candidate.input_ids):
        # Different tokens (e.g. an export whose processor or chat template differs): logits are not comparable.
        return {"inputs_equal": False}
    result = {"inputs_equal": True}
    for name, mask in (("text_positions", reference.text), ("supervised_positions", reference.supervised)):
        ref, cand = reference.logits[mask].double(), candidate.logits[mask].double()
        if not len(ref):
            result[name] = {"positions": 0}
            continue
        log_p, log_q = torch.log_softmax(ref, -1), torch.log_softmax(cand, -1)
        kl = (log_p.exp() * (log_p - log_q)).sum(-1).clamp_min(0.0)  # tiny negatives are rounding
        result[name] = {
            "positions": len(ref),
            "max_abs_diff": float((ref - cand).abs().max()),
            "kl_mean": float(kl.mean()),
            "kl_max": float(kl.max()),
            "argmax_agreement": float((ref.argmax(-1) == cand.argmax(-1)).double().mean()),
            "reference_max_abs_logit": float(ref.abs().max()),  # the scale the difference is relative to
        }
    same = [a == b for a, b in zip(reference.generated, candidate.generated)]
    result["generation"] = {
        "agree": sum(same),
        "total": len(same),
        "samples": [{"reference": r, "candidate": c, "equal": s}
                    for r, c, s in zip(reference.decoded, candidate.decoded, same)],
    }
    return result


def max_abs_diff(comparison: dict) -> float:
    """The number a parity tolerance is checked against: the worst logit difference over all text positions."""
    if not comparison.get("inputs_equal"):
        return float("inf")
    return comparison["text_positions"].get("max_abs_diff", 0.0)
