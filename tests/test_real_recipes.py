"""Shipped real-model recipes, run on replicas of their checkpoints (scripts/check_real_recipes.py runs all of them).

Some of them here, chosen for what they exercise: PaliGemma 2 (a checkpoint without a chat template: finetune's
goes into the run folder, the merged export and the pushed repository) and Gemma 3 with QLoRA (NF4 on the CPU; a
generation config that names no end-of-turn).
"""

import sys

import pytest
from transformers import AutoProcessor

import finetune
from conftest import ROOT
from finetune.evaluation.conversation import recipe_system_prompt
from finetune.models.families import PALIGEMMA_TEMPLATE
from finetune.models.loading import with_default_system
from finetune.recipe import load_recipe
from hub_server import serve

sys.path.insert(0, str(ROOT / "scripts"))
import check_real_recipes  # noqa: E402

CANARY = "hf_canary_0c1d2e3f4a5b6c7d8e9f0a1b2c3d4e5f6a7b8c9d"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    recipes = check_real_recipes.real_recipes()
    root = tmp_path_factory.mktemp("real-recipes")
    return root, {name: check_real_recipes.run_recipe(name, recipes[name], root) for name in END_TOKENS}


# The recipes run here and the token each stops at; the flagship families' recipes run on replicas of the published
# checkpoints they name (Qwen3.5 with its thinking switch, the MoE ones under QLoRA with 16-bit experts).
END_TOKENS = {"paligemma2-3b-lora": "<eos>", "gemma3-4b-qlora": "<end_of_turn>", "qwen3.5-9b-lora": "<|im_end|>",
              "qwen3.5-35b-a3b-qlora": "<|im_end|>", "qwen3-vl-30b-a3b-qlora": "<|im_end|>",
              "gemma4-e2b-lora": "<turn|>", "gemma3n-e4b-qlora": "<end_of_turn>"}


@pytest.mark.parametrize("name", list(END_TOKENS))
def test_recipe_trains_two_steps_and_predict_stops_at_the_end_of_turn(name, runs):
    result = runs[1][name]
    assert result["train_returncode"] == 0, result.get("error")
    assert result["steps"] == 2 and len(result["loss"]) == 2
    assert result["predict_returncode"] == 0
    assert result["stopped_at_end_token"], result
    assert result["end_token"] == END_TOKENS[name]
    assert result["quantized"] == name.endswith("qlora")


def test_paligemma_template_goes_with_the_run_the_export_and_the_push(runs, monkeypatch):
    run_dir = runs[0] / "paligemma2-3b-lora"
    assert (run_dir / "chat_template.jinja").read_text() == PALIGEMMA_TEMPLATE
    assert AutoProcessor.from_pretrained(run_dir).chat_template == PALIGEMMA_TEMPLATE

    export = finetune.merge(run_dir, dtype="float32", samples=2)
    # the export's default system prompt is the recipe's (finetune.export.merging.serve_as_trained)
    served = with_default_system(PALIGEMMA_TEMPLATE, recipe_system_prompt(load_recipe(run_dir / "recipe.yaml")))
    assert (export / "chat_template.jinja").read_text() == served
    assert AutoProcessor.from_pretrained(export).chat_template == served

    import huggingface_hub.constants

    with serve() as hub:
        monkeypatch.setenv("HF_TOKEN", CANARY)
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        finetune.push(run_dir, "alice/paligemma-adapter")
        finetune.push(run_dir, "alice/paligemma-merged", merged=True)
    adapter, merged = hub.commits
    assert adapter["files"]["chat_template.jinja"].decode() == PALIGEMMA_TEMPLATE
    assert merged["files"]["chat_template.jinja"].decode() == served


def test_llava15_predict_stops_at_the_eos_its_template_does_not_write():
    """llava-hf's LLaVA-1.5 template ends a reply with a space; finetune trains the EOS after each reply and stops
    generation there (the base model here: a replica of the checkpoint)."""
    result = check_real_recipes.forced_stop("zoo:" + str(ROOT / "tests/fixtures/hub/llava-hf__llava-1.5-7b-hf"),
                                            ROOT / "data/chartqa-tiny/images/test-0000.png")
    assert result["end_token"] == "</s>" and result["stopped_at_end_token"], result
