"""The tiny-model zoo: real classes, real token layout, loadable from disk, deterministic and cached."""

import math
import shutil

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from conftest import REPLIES, image, two_turn
from finetune import zoo
from finetune.batching.template import template_traits
from finetune.models.families import FAMILIES

QWEN_IDS = {"image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
            "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>"}
# family -> (processor class, model class, config attribute -> the token it must name)
EXPECTED = {
    "llava": ("LlavaProcessor", "LlavaForConditionalGeneration", {"image_token_id": "<image>"}),
    "llava_next": ("LlavaNextProcessor", "LlavaNextForConditionalGeneration", {"image_token_id": "<image>"}),
    "idefics3": ("Idefics3Processor", "Idefics3ForConditionalGeneration", {"image_token_id": "<image>"}),
    "smolvlm": ("SmolVLMProcessor", "SmolVLMForConditionalGeneration", {"image_token_id": "<image>"}),
    "qwen2_vl": ("Qwen2VLProcessor", "Qwen2VLForConditionalGeneration", QWEN_IDS),
    "qwen2_5_vl": ("Qwen2_5_VLProcessor", "Qwen2_5_VLForConditionalGeneration", QWEN_IDS),
    "qwen3_vl": ("Qwen3VLProcessor", "Qwen3VLForConditionalGeneration", QWEN_IDS),
    "paligemma": ("PaliGemmaProcessor", "PaliGemmaForConditionalGeneration", {"image_token_id": "<image>"}),
    "gemma3": ("Gemma3Processor", "Gemma3ForConditionalGeneration",
               {"image_token_id": "<image_soft_token>", "boi_token_index": "<start_of_image>",
                "eoi_token_index": "<end_of_image>"}),
    "mllama": ("MllamaProcessor", "MllamaForConditionalGeneration", {"image_token_id": "<|image|>"}),
    "qwen3_vl_moe": ("Qwen3VLProcessor", "Qwen3VLMoeForConditionalGeneration", QWEN_IDS),
    "qwen3_5": ("Qwen3VLProcessor", "Qwen3_5ForConditionalGeneration", QWEN_IDS),
    "qwen3_5_moe": ("Qwen3VLProcessor", "Qwen3_5MoeForConditionalGeneration", QWEN_IDS),
    "gemma3n": ("Gemma3nProcessor", "Gemma3nForConditionalGeneration",
                {"image_token_id": "<image_soft_token>", "boi_token_id": "<start_of_image>",
                 "eoi_token_id": "<end_of_image>", "audio_token_id": "<audio_soft_token>"}),
    "gemma4": ("Gemma4Processor", "Gemma4ForConditionalGeneration",
               {"image_token_id": "<|image|>", "boi_token_id": "<|image>", "eoi_token_id": "<image|>",
                "video_token_id": "<|video|>"}),
}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("zoo")


def with_images(messages):
    return [dict(m, content=[dict(c, image=image(0)) if c["type"] == "image" else c for c in m["content"]])
            for m in messages]


def test_family_list_matches_builders():
    assert set(EXPECTED) == set(zoo.FAMILIES) == set(zoo.BUILDERS)


@pytest.mark.parametrize("family", zoo.FAMILIES)
def test_saved_checkpoint_loads_as_the_real_family(family, cache):
    path = zoo.ensure(family, cache_dir=cache)
    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path)
    proc_cls, model_cls, token_ids = EXPECTED[family]
    assert (type(processor).__name__, type(model).__name__) == (proc_cls, model_cls)
    assert model.config.model_type == family
    params = sum(p.numel() for p in model.parameters())
    info = zoo.info(path)
    assert params < 5_000_000 and (info["family"], info["preset"], info["params"]) == (family, "tiny", params)

    # Token ids in the config are the tokenizer's; generation stops at the end-of-turn token.
    tok = processor.tokenizer
    for attr, token in token_ids.items():
        assert getattr(model.config, attr) == tok.convert_tokens_to_ids(token), attr
    text_config = model.config.get_text_config()
    assert text_config.vocab_size == len(tok)
    assert (text_config.eos_token_id, text_config.pad_token_id) == (tok.eos_token_id, tok.pad_token_id)
    assert text_config.max_position_embeddings >= 2048
    eot = tok.convert_tokens_to_ids(FAMILIES[family].end_of_turn)
    assert eot in model.generation_config.eos_token_id and model.generation_config.pad_token_id == tok.pad_token_id

    # The template renders system + two turns with one image; each reply is closed by the end-of-turn token.
    messages = two_turn()
    text = processor.apply_chat_template(messages, tokenize=False)
    assert "Answer briefly." in text and text.count(processor.image_token) == 1
    for reply in REPLIES:
        assert reply + FAMILIES[family].end_of_turn in text
    # The generation prompt is exactly what precedes the last reply (after the template's reply lead: Qwen3.5's
    # closed think block, which the model generates).
    prompt = processor.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    lead = template_traits(processor, FAMILIES[family]).reply_lead
    assert text.startswith(prompt) and text[len(prompt):].lstrip().removeprefix(lead.lstrip()).startswith(REPLIES[-1])

    inputs = processor.apply_chat_template(with_images(messages), tokenize=True, return_dict=True,
                                           return_tensors="pt")
    inputs.pop("labels", None)  # PaliGemma's processor adds its own
    with torch.no_grad():
        loss = model(**inputs, labels=inputs["input_ids"]).loss
    assert math.isfinite(loss.item()) and abs(loss.item() - math.log(len(tok))) < 1.5  # random init: ~ln(vocab)


@pytest.mark.parametrize("family", ["llava", "paligemma", "mllama"])
def test_own_templates_take_string_content(family):
    _, processor = zoo.build(family)
    as_lists = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                {"role": "user", "content": [{"type": "text", "text": "How many bars?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "4"}]}]
    as_strings = [{"role": m["role"], "content": m["content"][0]["text"]} for m in as_lists]
    for gen in (False, True):
        assert (processor.apply_chat_template(as_strings, tokenize=False, add_generation_prompt=gen)
                == processor.apply_chat_template(as_lists, tokenize=False, add_generation_prompt=gen))


@pytest.mark.parametrize("family", zoo.FAMILIES)
def test_build_is_deterministic(family):
    model_a, proc_a = zoo.build(family)
    model_b, proc_b = zoo.build(family)
    a, b = model_a.state_dict(), model_b.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert proc_a.tokenizer.get_vocab() == proc_b.tokenizer.get_vocab()
    assert proc_a.chat_template == proc_b.chat_template


def test_second_ensure_is_a_cache_hit(cache, monkeypatch):
    path = zoo.ensure("llava", cache_dir=cache)
    stamp = (path / "model.safetensors").stat().st_mtime_ns

    def fail(*args, **kwargs):
        raise AssertionError("rebuilt a cached checkpoint")

    monkeypatch.setattr(zoo, "build", fail)
    assert zoo.ensure("llava", cache_dir=cache) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp
    assert path.name == f"llava-tiny-{zoo.version_tag()}"
    monkeypatch.setattr(zoo, "ZOO_VERSION", zoo.ZOO_VERSION + "-next")  # a new zoo version never reuses the old one
    assert zoo.version_tag() not in path.name


def test_ensure_losing_a_race_uses_the_winners_copy(cache, tmp_path, monkeypatch):
    winner = zoo.ensure("llava", cache_dir=cache)
    real_build = zoo.build

    def build_while_another_process_finishes(family, preset):
        shutil.copytree(winner, tmp_path / winner.name)  # the other process renames its complete copy into place
        return real_build(family, preset)

    monkeypatch.setattr(zoo, "build", build_while_another_process_finishes)
    path = zoo.ensure("llava", cache_dir=tmp_path)
    assert path == tmp_path / winner.name and zoo.info(path) == zoo.info(winner)
    assert [p.name for p in tmp_path.iterdir()] == [winner.name]  # the loser's temporary folder is gone


def test_presets_change_sizes_not_token_layout():
    messages = with_images(two_turn())
    counts, ids = {}, {}
    for preset in ("tiny", "small", "bench"):
        model, processor = zoo.build("qwen2_vl", preset)
        counts[preset] = sum(p.numel() for p in model.parameters())
        ids[preset] = processor.apply_chat_template(messages, tokenize=True, return_dict=True,
                                                    return_tensors="pt")["input_ids"]
    assert counts["tiny"] < 1e6 and 1.5e6 < counts["small"] < 5e6 and 1e7 < counts["bench"] < 1e8
    assert torch.equal(ids["tiny"], ids["small"]) and torch.equal(ids["tiny"], ids["bench"])


def test_gemma3_projector_is_a_raw_parameter():
    model, _ = zoo.build("gemma3")
    assert "model.multi_modal_projector.mm_input_projection_weight" in dict(model.named_parameters())
    assert model.config.vision_config.vision_use_head is False


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(ValueError, match="qwen2_vl"):
        zoo.build("qwen")
    with pytest.raises(ValueError, match="small"):
        zoo.ensure("llava", "huge")
