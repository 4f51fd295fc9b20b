"""Held-out preference accuracy: how often a model finds the chosen reply likelier than the rejected one (summed
log-probabilities of the reply tokens, exactly the tokens DPO scores: finetune.batching.preference)."""

from __future__ import annotations

import torch

from ..batching.preference import PreferenceCollator


@torch.no_grad()
def pair_logps(model, collator: PreferenceCollator, rows, batch_size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probabilities of the chosen and the rejected reply of each row (completion tokens only)."""
    chosen, rejected = [], []
    device = next(model.parameters()).device
    for start in range(0, len(rows), batch_size):
        batch = collator([rows[i] for i in range(start, min(start + batch_size, len(rows)))])
        batch.pop("dropped_rows", None)
        batch.pop("skip_batch", None)
        mask = batch.pop("completion_mask").to(device)
        inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        logits = model(**inputs, use_cache=False).logits[:, :-1].float()
        ids = inputs["input_ids"][:, 1:]
        token = torch.log_softmax(logits, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1) * mask[:, 1:]
        c, r = token.sum(1).chunk(2)
        chosen.append(c.cpu())
        rejected.append(r.cpu())
    return torch.cat(chosen), torch.cat(rejected)


def preference_accuracy(model, collator, rows, batch_size: int = 8) -> dict:
    """Share of held-out pairs whose chosen reply the model finds likelier than the rejected one (summed
    log-probabilities of the reply tokens), and the mean log-probability margin."""
    chosen, rejected = pair_logps(model, collator, rows, batch_size)
    margin = chosen - rejected
    return {"accuracy": float((margin > 0).float().mean()), "mean_margin": float(margin.mean()), "n": len(margin)}
