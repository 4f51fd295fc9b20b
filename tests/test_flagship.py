"""The flagship families' own switches and refusals: Qwen3.5's thinking switch pinned into the run's template and
used by predict, packing refused where the DeltaNet state would leak across a pack, audio rows refused by row."""

import json

import pytest
from transformers import AutoProcessor

import finetune
from conftest import ROOT, tiny_recipe
from finetune.batching.collate import ChatCollator, IGNORE_INDEX
from finetune.batching.template import render, template_traits
from finetune.models.families import FAMILIES
from finetune.recipe import RecipeError
from finetune.training.pipeline import prepare

CHART = str(ROOT / "data/chartqa-tiny/images/test-0000.png")


def recipe(family, out, **model):
    return tiny_recipe(out, without=["evaluation"], model={"name_or_path": f"zoo:{family}", **model},
                       training={"max_steps": 1, "report_to": "none"})


def test_enable_thinking_false_is_trained_saved_and_served(tmp_path):
    """Qwen3.5's think template with enable_thinking false: the generation prompt already holds the empty think
    block, so a reply's labels are exactly its text and <|im_end|>; the run's saved template carries the switch, so
    predict renders that same prompt without being told."""
    out = finetune.train(recipe("qwen3_5", tmp_path / "run", chat_template_kwargs={"enable_thinking": False}))
    saved = (out / "chat_template.jinja").read_text()
    assert saved.startswith("{%- set enable_thinking = false -%}\n")
    processor = AutoProcessor.from_pretrained(out)
    family = FAMILIES["qwen3_5"]
    prompt = render(processor, [{"role": "user", "content": [{"type": "text", "text": "Hi?"}]}], family,
                    generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    traits = template_traits(processor, family)
    # history replies still lose their (empty) block: only a conversation's final reply is supervised
    assert traits.reply_lead == "" and traits.rewrites_history
    batch = ChatCollator(processor, family)([{"messages": [
        {"role": "user", "content": [{"type": "text", "text": "Name a color."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Red."}]}], "images": []}])
    labels = batch["labels"][0]
    assert processor.tokenizer.decode(labels[labels != IGNORE_INDEX]) == "Red.<|im_end|>"
    # The default (thinking on): the model learns to close an empty think block, then answer.
    default = AutoProcessor.from_pretrained(finetune.zoo.ensure("qwen3_5"))
    assert template_traits(default, family).reply_lead == "\n</think>\n\n"
    answer = finetune.predict(out, "What is shown?", images=[CHART], max_new_tokens=4)
    assert isinstance(answer, str)


def test_a_bad_template_variable_name_is_refused_naming_the_key(tmp_path):
    with pytest.raises(RecipeError, match=r"model.chat_template_kwargs: 'enable-thinking'"):
        finetune.load_recipe(recipe("qwen3_5", tmp_path, chat_template_kwargs={"enable-thinking": False}))


@pytest.mark.parametrize("family", ["qwen3_5", "qwen3_5_moe"])
def test_packing_is_refused_for_gated_deltanet_decoders(family, tmp_path):
    with pytest.raises(RecipeError, match=r"training.packing.*DeltaNet.*cu_seqlens"):
        prepare(finetune.load_recipe(recipe(family, tmp_path), ["training.packing=true"]))


@pytest.mark.parametrize("family", ["gemma4", "gemma3n"])
def test_rows_with_audio_are_refused_by_row(family, tmp_path, capsys):
    rows = [{"messages": [{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": "Said?"}]},
                          {"role": "assistant", "content": [{"type": "text", "text": "Hello."}]}]},
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "Name a color."}]},
                          {"role": "assistant", "content": [{"type": "text", "text": "Red."}]}]}] * 2
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    r = recipe(family, tmp_path / "run")
    r["data"] = {"path": str(data), "format": "messages", "eval_split": None}
    report = finetune.check(r)
    out = capsys.readouterr().out
    assert "dropped 2 (audio): row ids [0, 2]" in out and "audio is not supported" in out
    assert report["train_data"]["rows"] == 4


def test_gemma3n_without_timm_says_what_to_install(tmp_path, monkeypatch):
    import importlib.util

    finetune.zoo.ensure("gemma3n")  # built while timm is there
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "timm" else find_spec(name, *a))
    with pytest.raises(RecipeError, match=r"model.name_or_path: Gemma 3n needs the 'timm' package .*"
                                          r"finetune\[gemma3n\]"):
        finetune.check(recipe("gemma3n", tmp_path))
