"""Verifiable rewards for GRPO (`training.method: grpo`): functions with TRL's reward signature,
`reward(prompts, completions, answers, **columns) -> list[float]`, one score per completion.

- the task metrics (finetune.evaluation.metrics: relaxed_accuracy, exact_match, anls, vqa_accuracy), scored on the
  answer extracted from the completion (inside the answer tags when the layout uses them, else the whole text);
- `format`: 1 when the completion follows the reasoning-then-answer layout (`<think>...</think><answer>...</answer>`,
  tags configurable), else 0;
- `length`: a penalty growing linearly from 0 at `target` characters to -1 at twice that (never a bonus);
- the user's own, named `module:function`, with TRL's signature.

Every reward is wrapped by `checked`: a wrong number of scores, a non-number or a non-finite one stops training with
the reward's name and the step, before any of it reaches the gradients.
"""

from __future__ import annotations

import importlib
import math
import re
from dataclasses import dataclass
from typing import Callable, Sequence

from .metrics import METRICS

#: Rewards finetune provides, besides the task metrics (METRICS) and `module:function` names.
BUILT_IN = ("format", "length")


class RewardError(ValueError):
    """A reward that cannot be used or returned something unusable; the message names the reward."""


@dataclass(frozen=True)
class Layout:
    """Where the answer sits in a completion: inside `answer_tags` when `reasoning` is on, else the whole text."""

    reasoning: bool = False
    think_tags: tuple[str, str] = ("<think>", "</think>")
    answer_tags: tuple[str, str] = ("<answer>", "</answer>")

    def answer(self, completion: str) -> str:
        if not self.reasoning:
            return completion.strip()
        start, end = (re.escape(t) for t in self.answer_tags)
        found = re.search(f"{start}(.*?){end}", completion, re.DOTALL)
        return found.group(1).strip() if found else ""

    def follows(self, completion: str) -> bool:
        (ts, te), (as_, ae) = ([re.escape(t) for t in pair] for pair in (self.think_tags, self.answer_tags))
        return re.fullmatch(rf"\s*{ts}.*?{te}\s*{as_}.*?{ae}\s*", completion, re.DOTALL) is not None


def text_of(completion) -> str:
    """A completion as text: TRL passes conversational completions as [{"role": "assistant", "content": ...}]."""
    if isinstance(completion, str):
        return completion
    content = completion[-1]["content"] if completion else ""
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if part.get("type") == "text")
    return content


def metric_reward(metric: str, layout: Layout) -> Callable:
    score = METRICS[metric]

    def reward(prompts, completions, answers, **_) -> list[float]:
        return [score(layout.answer(text_of(c)), refs) for c, refs in zip(completions, answers)]

    reward.__name__ = metric
    return reward


def format_reward(layout: Layout) -> Callable:
    def reward(prompts, completions, **_) -> list[float]:
        return [float(layout.follows(text_of(c))) for c in completions]

    reward.__name__ = "format"
    return reward


def length_reward(target: int) -> Callable:
    def reward(prompts, completions, **_) -> list[float]:
        return [-min(max(len(text_of(c)) - target, 0) / target, 1.0) for c in completions]

    reward.__name__ = "length"
    return reward


def imported(name: str, key: str) -> Callable:
    """The user's `module:function` (the module importable from where finetune runs)."""
    module, _, function = name.partition(":")
    try:
        found = getattr(importlib.import_module(module), function)
    except (ImportError, AttributeError) as e:
        raise RewardError(f"{key}: cannot import reward '{name}': {e}") from e
    if not callable(found):
        raise RewardError(f"{key}: reward '{name}' is not a function")
    return found


def build(name: str, key: str, layout: Layout, length_target: int = 200,
          step: Callable[[], int] | None = None) -> Callable:
    """The reward function `name` names (a metric, `format`, `length` or `module:function`), checked (`step`: the
    trainer's current step, for the error)."""
    if name in METRICS:
        function = metric_reward(name, layout)
    elif name == "format":
        function = format_reward(layout)
    elif name == "length":
        function = length_reward(length_target)
    elif ":" in name:
        function = imported(name, key)
    else:
        raise RewardError(f"{key}: unknown reward '{name}'; choose from {', '.join([*METRICS, *BUILT_IN])} "
                          "or give your own as module:function")
    return checked(function, name, step)


def checked(function: Callable, name: str, step: Callable[[], int] | None = None) -> Callable:
    """`function` with its output verified: one finite number per completion (None, TRL's "not applicable", kept)."""

    def reward(prompts, completions, **kwargs) -> list[float | None]:
        scores = function(prompts=prompts, completions=completions, **kwargs)
        at = f" at step {step()}" if step is not None else ""
        if not isinstance(scores, Sequence) or len(scores) != len(completions):
            got = len(scores) if isinstance(scores, Sequence) else type(scores).__name__
            raise RewardError(f"reward '{name}'{at} returned {got} values for {len(completions)} completions")
        for i, score in enumerate(scores):
            if score is None:
                continue
            if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
                raise RewardError(f"reward '{name}'{at} returned {score!r} for completion {i}: rewards must be "
                                  "finite numbers (or None where the reward does not apply)")
        return [None if s is None else float(s) for s in scores]

    reward.__name__ = name
    return reward
