"""Preference tuning (DPO): finetune builds the chosen/rejected batches, TRL's DPOTrainer computes loss and logs.

Which tokens are scored is finetune's decision, not TRL's. A preference row (prompt messages with its images, and two
replies) becomes two chat rows, prompt + chosen and prompt + rejected, collated by `ChatCollator` exactly as SFT rows
are (same template rendering, image expansion and reply spans): `completion_mask` is the SFT label mask, i.e. the
reply's tokens and its end-of-turn, never an image, prompt or padding token. The batch is laid out
[chosen_1..n, rejected_1..n], as TRL expects.

Why TRL's DPOTrainer fits unchanged: on a dataset with images it skips its own tokenisation and feeds the data
collator's batch to the model, summing per-token log-probabilities only where `completion_mask` is 1 (its fused LM
head zeroes every other position). So `DPOTrainer` below only mixes in finetune's guards (finetune.trainer.Guarded);
the loss types, rewards and metrics (`rewards/margins`, `rewards/accuracies`, `logps/chosen`, ...) are TRL's.

The reference model is never a second copy: with a fresh adapter it is the base with the adapter disabled (TRL, when
given a `peft_config`); continuing from an adapter (`model.adapter`, e.g. an SFT run), TRL keeps a frozen copy of
the starting adapter's weights (adapter "ref", a few MB) and the reference is the model as the SFT run left it. That
copy is not saved with the run (`save_adapter`).
"""

from __future__ import annotations

import contextlib
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import trl

from .collate import IGNORE_INDEX, ChatCollator
from .data import PAIR_KEYS, with_reply
from .trainer import Guarded

REFERENCE_ADAPTER = "ref"  # the name TRL gives the frozen copy of a starting adapter


@dataclass
class PreferenceCollator(ChatCollator):
    """Preference rows (`messages` = the prompt, `images`, `chosen`, `rejected`) -> one batch of 2n sequences with
    `completion_mask` (1 on the reply's tokens and end-of-turn only)."""

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


class DPOTrainer(Guarded, trl.DPOTrainer):
    """TRL's DPOTrainer fed by `PreferenceCollator`, with finetune's guards, atomic checkpoints and throughput
    (counted in sequences: each pair is two)."""


def continue_from(model, adapter: str | Path, base: str):
    """The model (`base`: the recipe's model.name_or_path) with the adapter of a run folder loaded, trainable
    (`model.adapter`)."""
    from peft import PeftModel

    from .recipe import RecipeError

    folder = Path(adapter)
    if not (folder / "adapter_config.json").is_file():
        raise RecipeError(f"model.adapter: {folder}: no adapter_config.json (give the folder of a finished run)")
    if (folder / "recipe.yaml").is_file():  # a finetune run: its adapter belongs to the base it names
        from .recipe import load_recipe

        trained_on = load_recipe(folder / "recipe.yaml").model.name_or_path
        if trained_on != base:
            raise RecipeError(f"model.adapter: {folder} was trained on {trained_on}, not on "
                              f"{base} (model.name_or_path)")
    return PeftModel.from_pretrained(model, str(folder), is_trainable=True)


def save_adapter_cleanup(out: Path) -> None:
    """peft saves every adapter of a model, the non-default ones in subfolders; the reference copy is not part of
    the trained result (merge and push read the default adapter only)."""
    shutil.rmtree(out / REFERENCE_ADAPTER, ignore_errors=True)


def reference(model):
    """Context in which `model` is the DPO reference: the starting adapter's frozen copy, or no adapter."""
    from trl.trainer.utils import use_adapter

    if not hasattr(model, "peft_config"):
        return contextlib.nullcontext()
    return use_adapter(model, REFERENCE_ADAPTER if REFERENCE_ADAPTER in model.peft_config else None)


# --- evaluation -------------------------------------------------------------------------------------------------


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


def before_after(run, out: Path) -> dict:
    """Reference (base, or the starting adapter) vs the DPO-trained policy on the held-out split: preference
    accuracy, and generation accuracy with the chosen reply as the reference answer. Writes eval/ and report.md."""
    from .evaluation import examples, generation_target, metric_for, score, write_eval

    cfg = run.recipe.evaluation
    model = run.trainer.model
    model.eval()
    collator = PreferenceCollator(run.processor, run.family)
    rows = run.eval_data.select(range(min(cfg.limit or len(run.eval_data), len(run.eval_data))))
    with reference(model):
        pref_before = preference_accuracy(model, collator, rows, cfg.batch_size)
    pref_after = preference_accuracy(model, collator, rows, cfg.batch_size)

    metric = metric_for(run.recipe, None)
    items = examples(rows)  # the prompts, with the chosen reply as the reference answer
    target = generation_target(run)
    with reference(model):
        gen_before, _ = score(target, items, metric, cfg.batch_size, cfg.max_new_tokens, desc="eval reference")
    gen_after, records = score(target, items, metric, cfg.batch_size, cfg.max_new_tokens, desc="eval dpo")
    start = run.recipe.model.adapter or "base (no adapter)"
    result = {"split": run.recipe.data.eval_split, "n": len(items), "reference": start,
              "preference_accuracy": {"before": pref_before["accuracy"], "after": pref_after["accuracy"]},
              "logp_margin": {"before": pref_before["mean_margin"], "after": pref_after["mean_margin"]},
              "metric": metric, "generation": {"before": gen_before, "after": gen_after}}
    write_eval(out, records, result)
    table = (f"| held-out ({result['split']}, n={len(items)}) | before: {start} | after DPO |\n|---|---|---|\n"
             f"| preference accuracy (chosen likelier) | {pref_before['accuracy']:.3f} | "
             f"{pref_after['accuracy']:.3f} |\n"
             f"| mean log-prob margin chosen - rejected | {pref_before['mean_margin']:.2f} | "
             f"{pref_after['mean_margin']:.2f} |\n"
             f"| generation {metric} | {gen_before:.3f} | {gen_after:.3f} |")
    (out / "report.md").write_text(
        f"# DPO run: {run.recipe.model.name_or_path}\n\n{table}\n\nTraining curves (rewards, margins, log-probs): "
        "dpo_curves.png; figures per step in run_summary.json under `dpo`.\n", encoding="utf-8")
    print(f"\n{table}\n\n[finetune] report: {out / 'report.md'}")
    return result


# --- what the run folder records --------------------------------------------------------------------------------

CURVES = ("rewards/margins", "rewards/accuracies", "rewards/chosen", "rewards/rejected", "logps/chosen",
          "logps/rejected")


def summary(log_history: list[dict]) -> dict:
    """TRL's logged DPO metrics per step, for run_summary.json."""
    rows = [e for e in log_history if "step" in e and "rewards/margins" in e]
    return {"curves": [{"step": e["step"], **{k: e[k] for k in CURVES if k in e}} for e in rows],
            "final": {k: rows[-1][k] for k in CURVES if k in rows[-1]} if rows else {}}


def plot_curves(log_history: list[dict], path: Path, title: str) -> None:
    """Reward margin with reward accuracy on a second axis, and the chosen/rejected log-probs, per logged step."""
    from .plots import Line, Panel, panels_figure, series

    margins = Panel("reward margin (chosen - rejected)", [Line("margin", series(log_history, "rewards/margins"),
                                                                smooth=True)],
                    right=[Line("reward accuracy", series(log_history, "rewards/accuracies"))],
                    right_label="reward accuracy", right_limits=(-0.02, 1.02))
    logps = Panel("log-prob of the reply", [Line("chosen", series(log_history, "logps/chosen")),
                                             Line("rejected", series(log_history, "logps/rejected"))])
    panels_figure(path, [margins, logps], title)
