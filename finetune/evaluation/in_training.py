"""Evaluation of the model being trained: every N steps during the run (logged with the loss, optionally keeping
the best adapter), and the base model against the fine-tuned one once training ends (report.md)."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

from .heldout import Example, breakdown, examples, grouping, majority_baselines, metric_for, score, write_eval
from .inference import Target
from .report import write_report


class GenerationEvalCallback:
    """Every N steps: a small generation-based eval, logged with the loss; optionally keeps the best adapter."""

    def __init__(self, target: Target, items: list[Example], metric: str, every: int, keep_best_dir: Path | None,
                 batch_size: int, max_new_tokens: int):
        self.target, self.items, self.metric, self.every = target, items, metric, every
        self.keep_best_dir, self.batch_size, self.max_new_tokens = keep_best_dir, batch_size, max_new_tokens
        self.trainer = None  # set once the trainer exists; the callback logs through it
        self.best: float | None = None

    def as_trainer_callback(self):
        from transformers import TrainerCallback

        outer = self

        class _Callback(TrainerCallback):
            def on_step_end(self, args, state, control, model=None, **kwargs):
                if state.global_step % outer.every == 0:
                    outer.run(state.global_step, model)

        return _Callback()

    def run(self, step: int, model) -> float:
        model.eval()
        with self.trainer.counts.outside_training():
            value, _ = score(self.target, self.items, self.metric, self.batch_size, self.max_new_tokens,
                             desc=f"eval @ step {step}")
        # Logged in eval mode, so TRL does not move the training step's own metrics (entropy, token accuracy)
        # into this entry; and logging clears the trainer's should_log, which would drop this step's loss log.
        should_log = self.trainer.control.should_log
        self.trainer.log({f"eval_{self.metric}": value})
        self.trainer.control.should_log = should_log
        model.train()
        if (self.keep_best_dir is not None and self.trainer.is_world_process_zero()
                and (self.best is None or value > self.best)):
            self.best = value
            _save_adapter_atomically(self.trainer, self.keep_best_dir, {"step": step, self.metric: value})
        return value


def _save_adapter_atomically(trainer, final: Path, meta: dict) -> None:
    """Write to a temporary sibling, then swap it in, so `best/` is always a complete adapter."""
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    trainer.model.save_pretrained(str(tmp))
    (tmp / "best.json").write_text(json.dumps(meta) + "\n")
    old = final.with_name(final.name + ".old")
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def generation_target(run) -> Target:
    """The model being trained, with its own left-padding copy of the processor, as an evaluation target."""
    processor = copy.deepcopy(run.processor)
    processor.tokenizer.padding_side = "left"
    return Target(run.trainer.model, processor, run.family, run.recipe, "adapter", run.recipe.training.output_dir)


def during_training(run) -> GenerationEvalCallback:
    """Attach the every-N-steps generation eval to the run's trainer."""
    cfg = run.recipe.evaluation
    out = Path(run.recipe.training.output_dir)
    callback = GenerationEvalCallback(
        generation_target(run), examples(run.eval_data, cfg.during_limit), metric_for(run.recipe, None),
        cfg.every_n_steps, out / "best" if cfg.keep_best else None, cfg.batch_size, cfg.max_new_tokens)
    callback.trainer = run.trainer
    run.trainer.add_callback(callback.as_trainer_callback())
    return callback


def before_after(run, out: Path) -> dict:
    """Score the base model (adapters disabled) and the fine-tuned one on the held-out split; write report.md."""
    cfg = run.recipe.evaluation
    metric = metric_for(run.recipe, None)
    target = generation_target(run)
    items = examples(run.eval_data, cfg.limit)
    model = run.trainer.model
    model.eval()
    with model.disable_adapter():
        base, base_records = score(target, items, metric, cfg.batch_size, cfg.max_new_tokens, desc="eval base")
    start = None
    if run.recipe.model.adapter:  # continued training: the adapter it started from is the "before" that matters
        start = {"adapter": str(run.recipe.model.adapter),
                 "score": starting_adapter_score(model, run.recipe.model.adapter, target, items, metric, cfg)}
    tuned, records = score(target, items, metric, cfg.batch_size, cfg.max_new_tokens, desc="eval tuned")
    baselines = majority_baselines(examples(run.train_data, 2000), items, metric)
    split = run.recipe.data.eval_split
    result = {"metric": metric, "split": split, "n": len(items), "base": base, **({"start": start} if start else {}),
              "tuned": tuned, **baselines,
              "breakdown": breakdown(base_records, records, *grouping(run.recipe, split, records))}
    write_eval(out / "eval", records, result)
    # The headline numbers go to the run's trackers (report_to) too, beside the during-training metric.
    run.trainer.log({f"eval_{metric}_base": base, f"eval_{metric}_tuned": tuned})
    table = write_report(out, run, result, records)
    print(f"\n{table}\n\n[finetune] report: {out / 'report.md'}")
    return result


STARTING = "starting"  # the name the starting adapter is loaded under, beside the trained one, for its score


def starting_adapter_score(model, adapter, target, items, metric, cfg) -> float:
    """The held-out score of the adapter a run started from (`model.adapter`), loaded beside the trained one (no
    second model in memory) and removed again."""
    from trl.trainer.utils import use_adapter

    model.load_adapter(str(adapter), adapter_name=STARTING)
    try:
        with use_adapter(model, STARTING):
            value, _ = score(target, items, metric, cfg.batch_size, cfg.max_new_tokens, desc="eval start")
    finally:
        model.delete_adapter(STARTING)
    return value
