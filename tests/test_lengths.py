"""The pre-flight scan's header path: lengths and supervised-token counts from image sizes alone equal what the
collator produces with the decoded images, for every family, across sizes that exercise each family's resizing."""

import pytest
from PIL import Image
from transformers import AutoProcessor

from finetune import zoo
from finetune.models.families import FAMILIES
from finetune.batching.lengths import Measurer

#: Sizes (width, height) across each family's resize rules: tiny, wide, tall, extreme aspect ratios, large.
SIZES = [(1, 1), (64, 64), (200, 90), (37, 500), (800, 600), (3000, 40), (1600, 1200)]

#: Image-processor settings that change how sizes expand: Qwen min/max pixels (the real models' 1003520 cap),
#: Idefics3 / SmolVLM image splitting on and off. Other families use the zoo's (hub-like) settings.
SETTINGS = {
    "qwen2_vl": [{}, {"min_pixels": 3136, "max_pixels": 1003520}],
    "qwen2_5_vl": [{"max_pixels": 1003520}],
    "qwen3_vl": [{}],
    "idefics3": [{"do_image_splitting": True}, {"do_image_splitting": False}],
    "smolvlm": [{"do_image_splitting": True}, {"do_image_splitting": False}],
}


def conversations(family: str) -> list[list[dict]]:
    """Multi-turn with a system prompt and two images in different turns; PaliGemma is single-turn by design."""
    single = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is\n\nthis?"}]},
              {"role": "assistant", "content": [{"type": "text", "text": "A red bar."}]}]
    if family == "paligemma":
        return [single]
    multi = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
             {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Left or right?"}]},
             {"role": "assistant", "content": [{"type": "text", "text": "Left."}]},
             {"role": "user", "content": [{"type": "text", "text": "And here?"}, {"type": "image"}]},
             {"role": "assistant", "content": [{"type": "text", "text": "Right, 42."}]}]
    return [single, multi]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_lengths_from_image_sizes_equal_the_collated_lengths(family):
    checked = 0
    for settings in SETTINGS.get(family, [{}]):
        processor = AutoProcessor.from_pretrained(zoo.ensure(family), **settings)
        measurer = Measurer(processor, FAMILIES[family])
        for messages in conversations(family):
            images = sum(p["type"] == "image" for m in messages for p in m["content"])
            for i, size in enumerate(SIZES):
                sizes = [size, SIZES[(i + 3) % len(SIZES)]][:images]  # two different sizes in one row
                decoded = {"messages": messages, "images": [Image.new("RGB", s, (9, 99, 199)) for s in sizes],
                           "videos": []}
                expected = measurer.collated(decoded)
                assert measurer.measure({**decoded, "images": sizes}) == expected, (settings, sizes)
                assert measurer.measure(decoded) == expected  # decoded images measure the same way
                checked += 1
    assert checked >= len(SIZES)
    assert len(measurer._replacements) > 1 or FAMILIES[family].image_expansion == "fixed"


def test_sizes_change_the_count_where_the_family_resizes():
    """Not a constant in disguise: Qwen's dynamic resolution and LLaVA-NeXT's any-res give size-dependent counts
    that the header path follows."""
    for family, lengths in (("qwen2_vl", {(64, 64): 43, (800, 600): 51, (37, 500): 53}),
                            ("llava_next", {(64, 64): 109, (800, 600): 91, (37, 500): 49})):
        measurer = Measurer(AutoProcessor.from_pretrained(zoo.ensure(family)), FAMILIES[family])
        messages = conversations(family)[0]
        got = {size: measurer.measure({"messages": messages, "images": [size], "videos": []})[0] for size in lengths}
        assert got == lengths


def test_video_rows_are_measured_by_collating_them():
    import numpy as np

    measurer = Measurer(AutoProcessor.from_pretrained(zoo.ensure("qwen2_vl")), FAMILIES["qwen2_vl"])
    frames = [Image.fromarray(np.full((48, 64, 3), 20 * i, np.uint8)) for i in range(4)]
    sample = {"messages": [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What?"}]},
                           {"role": "assistant", "content": [{"type": "text", "text": "Redder."}]}],
              "images": [], "videos": [frames]}
    length, supervised = measurer.measure(sample)
    reply = measurer.processor.tokenizer("Redder.<|im_end|>", add_special_tokens=False)["input_ids"]
    assert (length, supervised) == measurer.collated(sample) and supervised == len(reply)
    assert length > 4 * 2  # the video's tokens are counted (4 frames -> 2 temporal patches, several tokens each)


HUB = __import__("conftest").ROOT / "tests" / "fixtures" / "hub"
#: Replicas of real checkpoints (their processor classes, templates and image settings; tiny weights).
REAL = ["Qwen__Qwen2.5-VL-7B-Instruct", "Qwen__Qwen3-VL-8B-Instruct", "HuggingFaceM4__Idefics3-8B-Llama3",
        "HuggingFaceTB__SmolVLM-256M-Instruct", "HuggingFaceTB__SmolVLM2-2.2B-Instruct",
        "llava-hf__llava-v1.6-mistral-7b-hf", "llava-hf__llava-1.5-7b-hf", "google__paligemma2-3b-pt-448",
        "google__gemma-3-4b-it", "meta-llama__Llama-3.2-11B-Vision-Instruct"]


@pytest.mark.parametrize("name", REAL)
def test_lengths_from_image_sizes_equal_the_collated_lengths_at_real_image_settings(name):
    """Real resolutions: Qwen's 1003520-pixel cap, Idefics3/SmolVLM splitting into 364/512-pixel tiles, LLaVA-NeXT
    any-res grids, 448-pixel PaliGemma, Gemma 3's 256 tokens, Mllama's 560-pixel tiles (one token)."""
    from finetune.models.loading import load_processor
    from finetune.recipe import ModelConfig

    path = zoo.ensure_like(HUB / name)
    model = ModelConfig(name_or_path=str(path))
    family_name = __import__("json").loads((path / "config.json").read_text())["model_type"]
    family = FAMILIES[family_name]
    measurer = Measurer(load_processor(str(path), model, {}, family), family)
    messages = conversations(family_name)[-1]
    images = sum(p["type"] == "image" for m in messages for p in m["content"])
    counts = set()
    for i, size in enumerate([(640, 480), (800, 600), (1200, 300), (300, 1400), (2000, 1500)]):
        sizes = [size, (size[1], size[0])][:images]
        decoded = {"messages": messages, "images": [Image.new("RGB", s, (9, 99, 199)) for s in sizes], "videos": []}
        expected = measurer.collated(decoded)
        assert measurer.measure({**decoded, "images": sizes}) == expected, sizes
        counts.add(expected[0])
    # LLaVA-1.5, PaliGemma, Gemma 3 (no pan-and-scan) and Mllama give every image the same tokens.
    resizes = family_name in ("qwen2_5_vl", "qwen3_vl", "idefics3", "smolvlm", "llava_next")
    assert (len(counts) > 1) == resizes
