"""GRPO (training.method: grpo): the recipe's rewards validated at load, prompts rendered as inference renders them
(per family, through TRL's own tokenisation), a tiny run that trains the adapter, and reward errors naming the
reward and the step."""

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import finetune
from conftest import ROOT, image, tiny_recipe
from finetune.batching.collate import ChatCollator
from finetune.batching.template import prepare_messages, template_kwargs
from finetune.evaluation.inference import prompt_batch
from finetune.evaluation.rewards import RewardError
from finetune.models import zoo
from finetune.models.families import FAMILIES
from finetune.models.loading import load_processor
from finetune.recipe import ModelConfig, RecipeError, load_recipe


def recipe(out=None, *overrides, **training):
    return load_recipe(tiny_recipe(
        out or "runs/grpo", without=["evaluation"], data={"max_samples": 8, "eval_split": None},
        lora={"r": 8, "alpha": 16}, rewards={"functions": ["length"], "length_target": 12},
        training={"method": "grpo", "per_device_train_batch_size": 4, "num_generations": 4,
                  "max_completion_length": 8, "disable_tqdm": True, **training}), list(overrides))


@pytest.mark.parametrize("overrides, message", [
    (["rewards.functions=[]"], "rewards.functions: training.method grpo needs at least one reward"),
    (["rewards.functions=[relaxed_acuracy]"],
     "rewards.functions[0]: unknown reward 'relaxed_acuracy' (did you mean 'relaxed_accuracy'?)"),
    (["training.reward_weights=[1.0, 0.5]"], "training.reward_weights: 2 weights for 1 rewards (length)"),
    (["training.num_generation=4"], "training.num_generation: unknown key (did you mean 'num_generations'?)"),
    (["rewards.answer_tags=[<answer>]"], "rewards.answer_tags: two non-empty tags"),
    (["data.format=preference"], "data.format: preference rows train with training.method: dpo"),
])
def test_grpo_recipes_are_validated_at_load(overrides, message):
    with pytest.raises(RecipeError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                       .replace("]", r"\]").replace("?", r"\?")):
        recipe(None, *overrides)


def test_rewards_belong_to_grpo():
    with pytest.raises(RecipeError, match="rewards.functions: used only with training.method: grpo"):
        load_recipe({"model": {"name_or_path": "zoo:qwen2_vl"}, "data": {"path": "data/chartqa-tiny"},
                     "rewards": {"functions": ["relaxed_accuracy"]}})


FAMILIES_WITH_GRPO = ["qwen2_vl", "qwen2_5_vl", "idefics3", "smolvlm", "gemma3", "llava", "llava_next", "qwen3_5",
                      "qwen3_5_moe", "qwen3_vl_moe", "gemma4", "gemma3n"]


@pytest.mark.parametrize("family", FAMILIES_WITH_GRPO)
def test_the_prompt_trained_on_is_the_prompt_served(family):
    """TRL tokenises GRPO prompts itself (`_tokenize_prompts`, the code its trainer runs); given finetune's prepared
    messages and template variables, it gives exactly the ids finetune's inference prompts with."""
    import trl
    from trl.data_utils import prepare_multimodal_messages

    path = zoo.ensure(family, "tiny")
    fam = FAMILIES[family]
    processor = load_processor(str(path), ModelConfig(name_or_path=str(path)), family=fam)
    messages = [{"role": "system", "content": [{"type": "text", "text": "Answer briefly."}]},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is the value?"}]}]
    images = [image(0, (64, 48))]
    trainer = SimpleNamespace(processing_class=processor, _is_vlm=True, environment_factories=None, tools=None,
                              chat_template=None, chat_template_kwargs=template_kwargs(processor, fam))
    prompt = prepare_multimodal_messages(prepare_messages(processor, messages, fam), images)
    ids, _, fields = trl.GRPOTrainer._tokenize_prompts(trainer, [prompt])
    served = prompt_batch(processor, fam, [messages], [images])
    assert list(ids[0]) == served["input_ids"][0][served["attention_mask"][0] == 1].tolist()
    pixels = fields["pixel_values"]
    pixels = torch.stack([torch.as_tensor(p) for p in pixels]) if isinstance(pixels, (list, tuple)) else pixels
    assert torch.equal(pixels.reshape(-1), served["pixel_values"].reshape(-1))


def test_a_tiny_grpo_run_trains_the_adapter_and_reports_its_rewards(tmp_path):
    out = finetune.train(recipe(tmp_path / "run"))
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["method"] == "grpo" and summary["steps"] == 2
    curves = summary["rewards"]["curves"]
    assert [c["step"] for c in curves] == [1, 2] and "rewards/length/mean" in curves[0]
    # Completions of different lengths score differently, so the advantages are not all zero and LoRA B moved.
    assert any(c["reward_std"] > 0 for c in curves)
    adapter = load_file(out / "adapter_model.safetensors")
    assert max(t.abs().max().item() for n, t in adapter.items() if "lora_B" in n) > 0
    assert (out / "adapter_config.json").is_file() and summary["throughput"] is None
    # The reward panel of grpo_curves.png: the total and each reward function, per logged step.
    from finetune.training.grpo import plot_curves

    figure = plot_curves(curves, ["length"], None, "GRPO")
    drawn = {line.get_label(): line.get_xydata()[:, 1].tolist() for line in figure.axes[0].get_lines()}
    assert drawn["length"] == [c["rewards/length/mean"] for c in curves] and (out / "grpo_curves.png").is_file()
    # `finetune merge` takes a GRPO run folder as it takes an SFT one.
    parity = json.loads((finetune.merge(out, dtype="float32") / "parity.json").read_text())
    assert parity["passed"] and parity["max_abs_diff"] < 1e-4


def test_families_trl_cannot_feed_images_to_are_refused_by_check(capsys):
    from finetune.cli import main

    assert main(["check", str(ROOT / "recipes/tiny-chartqa.yaml"), "--no-data"]) == 0  # the recipe is fine
    with pytest.raises(RecipeError, match=r"training.method: grpo is not supported for Llama 3.2 Vision \(Mllama\): "
                                          "TRL's GRPOTrainer does not pass aspect_ratio_ids"):
        finetune.check(recipe(None, "model.name_or_path=zoo:mllama"))


def test_a_reward_that_returns_the_wrong_count_stops_the_run_naming_it(tmp_path, monkeypatch):
    (tmp_path / "bad_rewards.py").write_text("def one(prompts, completions, **kw):\n    return [1.0]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(RewardError, match=r"reward 'bad_rewards:one' at step 1 returned 1 values for 4 completions"):
        finetune.train(recipe(tmp_path / "run", "rewards.functions=[bad_rewards:one]"))


HUB = ROOT / "tests/fixtures/hub"


@pytest.mark.parametrize("model", [f"zoo:{family}" for family in FAMILIES_WITH_GRPO + ["paligemma"]] + [
    f"zoo:{HUB / name}" for name in ("HuggingFaceM4__Idefics3-8B-Llama3", "llava-hf__llava-v1.6-mistral-7b-hf",
                                     "google__gemma-3-4b-it", "Qwen__Qwen2.5-VL-3B-Instruct")],
    ids=lambda m: m.rpartition("/")[2])
def test_completions_end_at_the_end_of_turn_token(model, tmp_path):
    """TRL ends each completion's mask (what carries gradient) at its first eos id: the family's end-of-turn must
    be one of them, also where the checkpoint's generation config names only the tokenizer's EOS (the Idefics3
    replica: eos <|end_of_text|>, turns end with <end_of_utterance>)."""
    from finetune.training.pipeline import prepare

    run = prepare(recipe(tmp_path / "run", f"model.name_or_path={model}"))
    tok = run.processor.tokenizer
    end_of_turn = tok.convert_tokens_to_ids(run.family.end_of_turn)
    assert end_of_turn in run.trainer.eos_token_ids and tok.eos_token_id in run.trainer.eos_token_ids
    # (What TRL does with them, generation and mask, is checked through its own code below.)


def test_resuming_from_a_grpo_checkpoint_samples_and_scores_the_same(tmp_path):
    import shutil

    steps = ["training.max_steps=4", "training.save_strategy=steps", "training.save_steps=2"]
    first = finetune.train(recipe(tmp_path / "a", *steps))
    resumed = tmp_path / "b"
    shutil.copytree(first / "checkpoint-2", resumed / "checkpoint-2")
    finetune.train(recipe(resumed, *steps, "training.resume=auto"))

    def after_the_checkpoint(out):
        summary = json.loads((out / "run_summary.json").read_text())
        curves = [(c["step"], c["reward"], c["reward_std"]) for c in summary["rewards"]["curves"]]
        return curves[2:], [p["loss"] for p in summary["loss_curve"]][2:]

    (curves, losses), (again, losses_again) = after_the_checkpoint(first), after_the_checkpoint(resumed)
    assert [c[0] for c in curves] == [3, 4] and any(c[2] > 0 for c in curves)  # completions that differ
    assert again == curves and losses_again == pytest.approx(losses, abs=1e-7)


def test_rows_whose_prompt_and_completion_budget_do_not_fit_are_dropped_with_their_ids(tmp_path):
    """A GRPO row is its prompt (images expanded) plus max_completion_length generated tokens: the scan measures the
    prompt as the row less its reference reply, and drops what would not fit training.max_length."""
    from finetune.batching.lengths import Measurer
    from finetune.training.pipeline import load_processing, scanned

    r = recipe(tmp_path / "run", "data.max_samples=32")
    _, family, processor, collator = load_processing(r)
    chat, _ = scanned(r, "train", family, collator)
    measurer = Measurer(processor, family)
    prompts = {chat[i]["row_id"]: (lambda n, s: n - s)(*measurer.measure(chat[i])) for i in range(len(chat))}
    limit = min(prompts.values()) + 8  # the shortest prompts fit with max_completion_length 8; longer ones do not
    assert len(set(prompts.values())) > 1
    _, report = scanned(load_recipe(r.to_dict(), [f"training.max_length={limit}"]), "train", family, collator)
    dropped = [row for row, n in prompts.items() if n + 8 > limit]
    assert report.dropped == {f"longer than training.max_length={limit}": dropped} and dropped
    assert len(report.kept) == len(prompts) - len(dropped)


@pytest.mark.parametrize("model", [f"zoo:{family}" for family in FAMILIES_WITH_GRPO] + [
    f"zoo:{HUB / 'HuggingFaceM4__Idefics3-8B-Llama3'}"], ids=lambda m: m.rpartition("/")[2])
def test_only_the_completion_up_to_its_end_of_turn_carries_loss(model, tmp_path):
    """Through TRL's own generation and scoring (`_generate_and_score_completions`), with the model forced to write
    " red" until a per-row step and then the family's end-of-turn: each completion is exactly what was written (no
    prompt or image token in it), and its loss mask covers it up to and including the end-of-turn, never the
    padding after it."""
    from finetune.training.pipeline import prepare

    run = prepare(recipe(tmp_path / "run", f"model.name_or_path={model}", "training.num_generations=2",
                         "training.per_device_train_batch_size=2"))
    trainer, tok = run.trainer, run.processor.tokenizer
    word = tok(" red", add_special_tokens=False)["input_ids"][-1]
    end = tok.convert_tokens_to_ids(run.family.end_of_turn)
    ends_at = [1, 3]  # row 0 writes " red" then the end-of-turn; row 1 " red" x3 then it
    calls = []

    def force(module, inputs, output):
        step = len(calls)
        calls.append(step)
        forced = torch.full_like(output[:, -1], -1e4)
        for row in range(output.shape[0]):
            forced[row, end if step == ends_at[row % 2] else word] = 1e4
        output[:, -1] = forced
        return output

    rows = [run.trainer.train_dataset[0]] * 2  # one prompt, two generations
    trainer.model.eval()
    handle = trainer.model.get_output_embeddings().register_forward_hook(force)
    try:
        batch = trainer._generate_and_score_completions(rows)
    finally:
        handle.remove()
    ids, mask = batch["completion_ids"], batch["completion_mask"]
    assert ids[0, :2].tolist() == [word, end] and ids[1, :4].tolist() == [word, word, word, end]
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert (ids[0, 2:] == tok.pad_token_id).all()
    image_ids = torch.tensor(ChatCollator(run.processor, run.family).image_token_ids)
    assert not torch.isin(ids, image_ids).any()


def first_character(prompts, completions, **_):
    from finetune.evaluation.rewards import text_of

    return [float(ord((text_of(c) or " ")[0]) % 7) for c in completions]


@pytest.mark.parametrize("family", ["qwen3_5", "qwen3_5_moe", "qwen3_vl_moe", "gemma4", "gemma3n"])
def test_grpo_trains_the_flagship_families(family, tmp_path):
    """TRL's GRPOTrainer samples, scores and trains these families (their image inputs reach the model)."""
    # A reward that tells completions apart by their first token, so a group's advantages are not all zero
    out = finetune.train(recipe(tmp_path / "run", f"model.name_or_path=zoo:{family}", "training.max_steps=1",
                                "rewards.functions=[test_grpo:first_character]"))
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["steps"] == 1 and summary["rewards"]["curves"][0]["reward_std"] > 0
    adapter = load_file(out / "adapter_model.safetensors")
    assert max(t.abs().max().item() for n, t in adapter.items() if "lora_B" in n) > 0
