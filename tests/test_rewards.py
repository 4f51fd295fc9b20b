"""GRPO rewards: task metrics on the extracted answer, the format and length rewards, the user's own, and every
reward's output checked (count, finite numbers) with its name in the error."""

import math

import pytest

from finetune.evaluation.rewards import Layout, RewardError, build, checked, text_of

THINK = Layout(reasoning=True)


def test_metric_rewards_score_the_extracted_answer():
    relaxed = build("relaxed_accuracy", "rewards[0]", Layout())
    assert relaxed(prompts=[None] * 3, completions=["12", " 12.4 ", "red"], answers=[["12"], ["12"], ["blue"]]) \
        == [1.0, 1.0, 0.0]  # 12.4 is within 5 % of 12
    tagged = build("exact_match", "rewards[0]", THINK)
    completions = ["<think>the bar is tall</think><answer>Red</answer>", "Red", "<answer>blue</answer>"]
    assert tagged(prompts=[None] * 3, completions=completions, answers=[["red"]] * 3) == [1.0, 0.0, 0.0]


def test_conversational_completions_are_read_as_their_text():
    message = [{"role": "assistant", "content": "<answer>4</answer>"}]
    parts = [{"role": "assistant", "content": [{"type": "text", "text": "4"}]}]
    assert text_of(message) == "<answer>4</answer>" and text_of(parts) == "4"


def test_format_and_length_rewards():
    fmt = build("format", "rewards[1]", THINK)
    assert fmt(prompts=[None] * 3, completions=["<think>a</think> <answer>b</answer>", "<answer>b</answer>",
                                                 "<think>a</think><answer>b</answer> and more"]) == [1.0, 0.0, 0.0]
    length = build("length", "rewards[2]", Layout(), length_target=10)
    assert length(prompts=[None] * 3, completions=["x" * 5, "x" * 15, "x" * 40]) == [0.0, -0.5, -1.0]


def test_users_own_reward_and_import_errors(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def short(prompts, completions, **kw):\n    return [1.0 if len(c) < 4 else 0.0 for c in completions]\n"
        "def broken(prompts, completions, **kw):\n    return [1.0]\n"
        "def nan(prompts, completions, **kw):\n    return [float('nan')] * len(completions)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    short = build("my_rewards:short", "rewards[0]", Layout())
    assert short(prompts=[None] * 2, completions=["abc", "abcdef"]) == [1.0, 0.0]
    with pytest.raises(RewardError, match=r"rewards\[0\]: cannot import reward 'my_rewards:missing'"):
        build("my_rewards:missing", "rewards[0]", Layout())
    with pytest.raises(RewardError, match=r"rewards\[1\]: cannot import reward 'nowhere:f'"):
        build("nowhere:f", "rewards[1]", Layout())
    with pytest.raises(RewardError, match=r"rewards\[0\]: unknown reward 'relaxed_acuracy'"):
        build("relaxed_acuracy", "rewards[0]", Layout())
    broken = build("my_rewards:broken", "rewards[0]", Layout(), step=lambda: 7)
    with pytest.raises(RewardError, match=r"reward 'my_rewards:broken' at step 7 returned 1 values for 2"):
        broken(prompts=[None] * 2, completions=["a", "b"])
    nan = build("my_rewards:nan", "rewards[0]", Layout())
    with pytest.raises(RewardError, match=r"reward 'my_rewards:nan' returned nan for completion 0"):
        nan(prompts=[None], completions=["a"])


def test_none_means_not_applicable_and_is_kept():
    maybe = checked(lambda prompts, completions, **_: [None, 0.5], "maybe")
    assert maybe(prompts=[None] * 2, completions=["a", "b"]) == [None, 0.5]
    assert not math.isnan(maybe(prompts=[None] * 2, completions=["a", "b"])[1])
