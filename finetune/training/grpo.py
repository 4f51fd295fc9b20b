"""GRPO, reinforcement learning with verifiable rewards: TRL's GRPOTrainer samples `num_generations` completions per
prompt and scores them with the recipe's `rewards:` (finetune.evaluation.rewards), weighted by
`training.reward_weights`.

What finetune decides:
- the prompt is rendered as inference renders it: the conversation up to its last reply, prepared by the same
  `prepare_messages` and template variables (finetune.batching.template), so the prompt trained on is the prompt
  served (TRL then applies the chat template with `add_generation_prompt`);
- the reference answer of each prompt is that last reply (`answers`, a list, passed to every reward);
- the reward functions are checked on every call (count, finite numbers), naming the reward and the step.

What TRL does: generation, advantages, the clipped loss over completion tokens only (its completion mask ends at
the first end-of-sequence token), and the KL term with the reference being the base with the adapter disabled.
"""

from __future__ import annotations

from pathlib import Path

import datasets
import trl

from ..batching.template import prepare_messages, template_kwargs
from ..evaluation import in_training
from ..evaluation.inference import stop_token_ids
from ..evaluation.plots import Line, Panel, panels_figure, series
from ..evaluation.rewards import Layout, build
from .sft import collator  # noqa: F401  (rows are measured as SFT rows, prompt and reply, for the scan)
from .trainer import Guarded

ANSWERS = "answers"  # the column of reference answers every reward receives


class Trainer(Guarded, trl.GRPOTrainer):
    """TRL's GRPOTrainer with finetune's guards and atomic checkpoints; `rewards` is the recipe's section."""

    def __init__(self, *args, rewards=None, data_collator=None, **kwargs):
        # GRPO collates its own prompts; finetune's collator measured the rows for the scan.
        # TRL stops generating, and ends each completion's mask, at the generation config's eos ids (and the
        # tokenizer's EOS). A checkpoint whose config names no end-of-turn would train past it, on padding: use the
        # ids inference stops at, the family's end-of-turn included.
        model = kwargs["model"]
        model.generation_config.eos_token_id = stop_token_ids(model, kwargs["processing_class"], kwargs["family"])
        layout = Layout(rewards.reasoning, tuple(rewards.think_tags), tuple(rewards.answer_tags))
        functions = [build(name, f"rewards.functions[{i}]", layout, rewards.length_target,
                           step=lambda: self.state.global_step + 1) for i, name in enumerate(rewards.functions)]
        super().__init__(*args, reward_funcs=functions, **kwargs)

    def training_step(self, model, inputs, num_items_in_batch=None):
        # The batch is a list of prompt rows (completions are generated inside): nothing collated to count.
        return trl.GRPOTrainer.training_step(self, model, inputs, num_items_in_batch)

    def throughput(self, seconds: float) -> None:
        """Not counted: finetune counts collated batches, and GRPO's are generated (TRL logs `num_tokens`)."""
        return None


def trainer_kwargs(recipe) -> dict:
    return {"rewards": recipe.rewards}


def config_overrides(processor, family) -> dict:
    """The template variables inference renders with (e.g. a pinned date), for TRL's own chat-template call."""
    return {"chat_template_kwargs": template_kwargs(processor, family)}


def rows(chat_rows, processor, family):
    """The scanned chat rows as GRPO's rows: `prompt` (the conversation up to its last reply, as inference renders
    it), `images` (decoded on access) and `answers` (that reply)."""

    def to_prompts(batch: dict) -> dict:
        out = {"prompt": [], "images": [], ANSWERS: []}
        for index in batch["index"]:
            row = chat_rows[index]
            messages = row["messages"]
            last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
            reply = messages[last]["content"]
            answer = reply if isinstance(reply, str) else "".join(p.get("text", "") for p in reply
                                                                    if p["type"] == "text")
            out["prompt"].append(prepare_messages(processor, messages[:last], family))
            out["images"].append(row["images"])
            out[ANSWERS].append([answer])
        return out

    return datasets.Dataset.from_dict({"index": list(range(len(chat_rows)))}).with_transform(to_prompts)


def saved(run, out: Path) -> dict:
    """What run_summary.json adds (the rewards and TRL's reward figures per logged step), and grpo_curves.png."""
    log_history = run.trainer.state.log_history
    plot_curves(log_history, run.recipe.rewards.functions, out / "grpo_curves.png", title="GRPO")
    logged = [e for e in log_history if "step" in e and "reward" in e]
    keys = sorted({k for e in logged for k in e if k.startswith(("reward", "rewards/", "kl", "clip_ratio",
                                                                "completions/"))})
    return {"method": "grpo", "start_adapter": run.recipe.model.adapter,
            "rewards": {"functions": run.recipe.rewards.functions, "weights": run.recipe.training.reward_weights,
                        "curves": [{"step": e["step"], **{k: e[k] for k in keys if k in e}} for e in logged]}}


def before_after(run, out: Path) -> dict:
    """The base (or starting adapter) against the GRPO-trained model on the held-out split, as for SFT."""
    return in_training.before_after(run, out)


def plot_curves(log_history: list[dict], functions: list[str], path: Path | None, title: str):
    """The total reward and each reward function's mean per logged step; completion length beside KL."""
    rewards = Panel("reward (mean over completions)", [Line("total", series(log_history, "reward"), smooth=True)]
                    + [Line(name, series(log_history, f"rewards/{name}/mean")) for name in functions])
    completions = Panel("completion length (tokens)", [Line("mean", series(log_history, "completions/mean_length"))],
                        right=[Line("KL", series(log_history, "kl"))], right_label="KL to the reference")
    return panels_figure(path, [rewards, completions], title)
