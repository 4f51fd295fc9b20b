"""Preference tuning (DPO): finetune builds the chosen/rejected batches, TRL's DPOTrainer computes loss and logs.

Which tokens are scored is finetune's decision, not TRL's. A preference row (prompt messages with its images, and two
replies) becomes two chat rows, prompt + chosen and prompt + rejected, collated exactly as SFT rows are
(finetune.batching.preference): `completion_mask` is the SFT label mask, i.e. the reply's tokens and its end-of-turn,
never an image, prompt or padding token.

Why TRL's DPOTrainer fits unchanged: on a dataset with images it skips its own tokenisation and feeds the data
collator's batch to the model, summing per-token log-probabilities only where `completion_mask` is 1 (its fused LM
head zeroes every other position). So `Trainer` below only mixes in finetune's guards (finetune.training.trainer
.Guarded); the loss types, rewards and metrics (`rewards/margins`, `rewards/accuracies`, `logps/chosen`, ...) are
TRL's.

The reference model is never a second copy: with a fresh adapter it is the base with the adapter disabled (TRL, when
given a `peft_config`); continuing from an adapter (`model.adapter`, e.g. an SFT run), TRL keeps a frozen copy of
the starting adapter's weights (adapter "ref", a few MB) and the reference is the model as the SFT run left it. That
copy is not saved with the run (`saved`).
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import trl

from ..batching.preference import PreferenceCollator
from ..evaluation.heldout import examples, metric_for, score, write_eval
from ..evaluation.in_training import generation_target
from ..evaluation.plots import Line, Panel, panels_figure, series
from ..evaluation.preference import preference_accuracy
from .sft import config_overrides, rows, trainer_kwargs  # noqa: F401  (rows as SFT's: the collator pairs them)
from .trainer import Guarded

REFERENCE_ADAPTER = "ref"  # the name TRL gives the frozen copy of a starting adapter


class Trainer(Guarded, trl.DPOTrainer):
    """TRL's DPOTrainer fed by `PreferenceCollator`, with finetune's guards, atomic checkpoints and throughput
    (counted in sequences: each pair is two)."""


def collator(processor, family) -> PreferenceCollator:
    return PreferenceCollator(processor, family)


def reference(model):
    """Context in which `model` is the DPO reference: the starting adapter's frozen copy, or no adapter."""
    from trl.trainer.utils import use_adapter

    if not hasattr(model, "peft_config"):
        return contextlib.nullcontext()
    return use_adapter(model, REFERENCE_ADAPTER if REFERENCE_ADAPTER in model.peft_config else None)


def saved(run, out: Path) -> dict:
    """After the adapter is saved: the reference copy removed (peft saves every adapter, the non-default ones in
    subfolders; merge and push read the default one only), the curves drawn; what run_summary.json adds."""
    shutil.rmtree(out / REFERENCE_ADAPTER, ignore_errors=True)
    log_history = run.trainer.state.log_history
    plot_curves(log_history, out / "dpo_curves.png", title="DPO")
    return {"method": "dpo", "start_adapter": run.recipe.model.adapter, "dpo": summary(log_history)}


def before_after(run, out: Path) -> dict:
    """Reference (base, or the starting adapter) vs the DPO-trained policy on the held-out split: preference
    accuracy, and generation accuracy with the chosen reply as the reference answer. Writes eval/ and report.md."""
    cfg = run.recipe.evaluation
    model = run.trainer.model
    model.eval()
    if run.recipe.model.adapter and REFERENCE_ADAPTER not in getattr(model, "peft_config", {}):
        # Reloaded from the written adapter (a sharded run, finetune.training.pipeline.reload_adapter): the
        # reference is the starting adapter again.
        model.load_adapter(run.recipe.model.adapter, REFERENCE_ADAPTER)
    pairs = collator(run.processor, run.family)
    held_out = run.eval_data.select(range(min(cfg.limit or len(run.eval_data), len(run.eval_data))))
    with reference(model):
        pref_before = preference_accuracy(model, pairs, held_out, cfg.batch_size)
    pref_after = preference_accuracy(model, pairs, held_out, cfg.batch_size)

    metric = metric_for(run.recipe, None)
    items = examples(held_out)  # the prompts, with the chosen reply as the reference answer
    target = generation_target(run)
    with reference(model):
        gen_before, _ = score(target, items, metric, cfg.batch_size, cfg.max_new_tokens, desc="eval reference")
    gen_after, records = score(target, items, metric, cfg.batch_size, cfg.max_new_tokens, desc="eval dpo")
    start = run.recipe.model.adapter or "base (no adapter)"
    result = {"split": run.recipe.data.eval_split, "n": len(items), "reference": start,
              "preference_accuracy": {"before": pref_before["accuracy"], "after": pref_after["accuracy"]},
              "logp_margin": {"before": pref_before["mean_margin"], "after": pref_after["mean_margin"]},
              "metric": metric, "generation": {"before": gen_before, "after": gen_after}}
    write_eval(out / "eval", records, result)
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
    logged = [e for e in log_history if "step" in e and "rewards/margins" in e]
    return {"curves": [{"step": e["step"], **{k: e[k] for k in CURVES if k in e}} for e in logged],
            "final": {k: logged[-1][k] for k in CURVES if k in logged[-1]} if logged else {}}


def plot_curves(log_history: list[dict], path: Path, title: str) -> None:
    """Reward margin with reward accuracy on a second axis, and the chosen/rejected log-probs, per logged step."""
    margins = Panel("reward margin (chosen - rejected)", [Line("margin", series(log_history, "rewards/margins"),
                                                                smooth=True)],
                    right=[Line("reward accuracy", series(log_history, "rewards/accuracies"))],
                    right_label="reward accuracy", right_limits=(-0.02, 1.02))
    logps = Panel("log-prob of the reply", [Line("chosen", series(log_history, "logps/chosen")),
                                             Line("rejected", series(log_history, "logps/rejected"))])
    panels_figure(path, [margins, logps], title)
