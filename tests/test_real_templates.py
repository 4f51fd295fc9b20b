"""The conformance table: every family with a real checkpoint's own chat template and image settings.

The checkpoints are zoo replicas built from the hub files kept in tests/fixtures/hub (see each SOURCE.md): the real
processor class, template, special tokens and image settings, tiny weights. For each of them and each conversation
shape (system prompt + two turns, no system prompt, several images over two turns, text only):
- the labelled tokens decode to exactly each reply followed by its end-of-turn (or the EOS finetune appends);
- no image token and no padding carries loss;
- the tokens before each reply are exactly `processor.apply_chat_template(..., add_generation_prompt=True,
  tokenize=True)` of the conversation up to it;
- the pre-flight scan's length of each row equals its collated length, at the real image settings;
- the model runs on the batch (image features match image tokens: the replica's geometry is the checkpoint's).
"""

import datetime
import json
import shutil

import pytest
import torch
from transformers import AutoModelForImageTextToText

from conftest import ROOT, image
from finetune import zoo
from finetune.batching.collate import IGNORE_INDEX, ChatCollator
from finetune.batching.lengths import Measurer
from finetune.batching.template import prepare_messages, render, template_kwargs, template_traits
from finetune.models.families import FAMILIES, PALIGEMMA_TEMPLATE
from finetune.evaluation.inference import prompt_batch, stop_token_ids
from finetune.models.loading import load_processor
from finetune.recipe import ModelConfig, RecipeError
from finetune.batching.scan import scan

HUB = ROOT / "tests" / "fixtures" / "hub"

# One replica per distinct (template, image settings); siblings with identical files are checked further down.
TABLE = {
    "llava-hf__llava-1.5-7b-hf": "llava",
    "llava-hf__llava-v1.6-mistral-7b-hf": "llava_next",
    "HuggingFaceM4__Idefics3-8B-Llama3": "idefics3",
    "HuggingFaceTB__SmolVLM-256M-Instruct": "idefics3",  # SmolVLM (v1) checkpoints are Idefics3 models
    "HuggingFaceTB__SmolVLM-Instruct": "idefics3",
    "HuggingFaceTB__SmolVLM2-2.2B-Instruct": "smolvlm",
    "Qwen__Qwen2-VL-2B-Instruct": "qwen2_vl",
    "Qwen__Qwen2.5-VL-3B-Instruct": "qwen2_5_vl",
    "Qwen__Qwen3-VL-2B-Instruct": "qwen3_vl",
    "google__paligemma2-3b-pt-448": "paligemma",
    "google__gemma-3-4b-it": "gemma3",
    "meta-llama__Llama-3.2-11B-Vision-Instruct": "mllama",
    "Qwen__Qwen3.5-9B": "qwen3_5",
    "Qwen__Qwen3.5-35B-A3B": "qwen3_5_moe",
    "Qwen__Qwen3-VL-30B-A3B-Instruct": "qwen3_vl_moe",
    "google__gemma-4-E2B-it": "gemma4",
    "google__gemma-3n-E4B-it": "gemma3n",
}
SIBLINGS = {"HuggingFaceTB__SmolVLM-500M-Instruct": "HuggingFaceTB__SmolVLM-256M-Instruct",
            "Qwen__Qwen2.5-VL-7B-Instruct": "Qwen__Qwen2.5-VL-3B-Instruct",
            "Qwen__Qwen3-VL-4B-Instruct": "Qwen__Qwen3-VL-2B-Instruct",
            "Qwen__Qwen3-VL-8B-Instruct": "Qwen__Qwen3-VL-2B-Instruct"}

# Image tokens per image on the real checkpoints, from their documented geometry (the count for a chart of any
# size where it does not depend on the size).
FIXED_IMAGE_TOKENS = {
    "llava-hf__llava-1.5-7b-hf": ("<image>", (336 // 14) ** 2),  # 576, CLS dropped
    "google__paligemma2-3b-pt-448": ("<image>", (448 // 14) ** 2),  # 1024
    "google__gemma-3-4b-it": ("<image_soft_token>", 256),  # 64 x 64 patches pooled to 16 x 16
    "meta-llama__Llama-3.2-11B-Vision-Instruct": ("<|image|>", 1),  # cross-attention: one token, tiles aside
    "google__gemma-3n-E4B-it": ("<image_soft_token>", 256),  # MobileNetV5 features fused to 16 x 16
}

CHART = (640, 480)  # a ChartQA-like chart; small images are upscaled or tiled as the real processors do


def text(t):
    return {"type": "text", "text": t}


def conversation(shape: str, later_images: bool = True) -> tuple[list[dict], list]:
    """Messages and their images, in order. `later_images`: the multi-image conversation also shows an image in its
    second turn (not for PaliGemma, whose prompt puts every image first: not a chat model)."""
    system = [{"role": "system", "content": [text("Answer briefly.")]}]
    if shape == "system_two_turns":
        return system + [
            {"role": "user", "content": [{"type": "image"}, text("What color is the tallest bar?")]},
            {"role": "assistant", "content": [text("The tallest bar is red.")]},
            {"role": "user", "content": [text("How many bars are there?")]},
            {"role": "assistant", "content": [text("There are 4 bars.")]},
        ], [image(0, CHART)]
    if shape == "no_system":
        return [
            {"role": "user", "content": [{"type": "image"}, text("What color is the tallest bar?")]},
            {"role": "assistant", "content": [text("The tallest bar is red.")]},
        ], [image(1, (300, 500))]
    if shape == "multi_image":
        first, second = ([{"type": "image"}] * 2, [{"type": "image"}]) if later_images else ([{"type": "image"}] * 3, [])
        return system + [
            {"role": "user", "content": first + [text("Which chart has more bars?")]},
            {"role": "assistant", "content": [text("The second one.")]},
            {"role": "user", "content": second + [text("And this one?")]},
            {"role": "assistant", "content": [text("Three bars.")]},
        ], [image(2, (112, 112)), image(3, CHART), image(4, (200, 120))]
    if shape == "text_only":
        return system + [
            {"role": "user", "content": [text("Name a color.")]},
            {"role": "assistant", "content": [text("Red.")]},
            {"role": "user", "content": [text("Another one?")]},
            {"role": "assistant", "content": [text("Blue.")]},
        ], []
    raise ValueError(shape)


SHAPES = ["system_two_turns", "no_system", "multi_image", "text_only"]


@pytest.fixture(scope="session")
def replica():
    cache = {}

    def get(name):
        if name not in cache:
            path = zoo.ensure_like(HUB / name)
            family = FAMILIES[zoo.info(path)["family"]]
            cache[name] = (path, load_processor(str(path), ModelConfig(name_or_path=str(path)), family=family),
                           family)
        return cache[name]

    return get


def reply_texts(messages):
    return ["".join(p["text"] for p in m["content"] if p["type"] == "text") for m in messages if m["role"] == "assistant"]


def labelled_runs(ids, labels):
    """Token ids of each contiguous labelled run, with the position it starts at."""
    runs, current = [], None
    for pos, (token, label) in enumerate(zip(ids.tolist(), labels.tolist())):
        if label == IGNORE_INDEX:
            current = None
            continue
        if current is None:
            current = (pos, [])
            runs.append(current)
        current[1].append(token)
    return runs


def with_images(messages, images):
    """The messages with each image part carrying its image, as apply_chat_template(tokenize=True) takes them."""
    it = iter(images)
    return [dict(m, content=[dict(p, image=next(it)) if p["type"] == "image" else p for p in m["content"]])
            if not isinstance(m["content"], str) else m for m in messages]


def row(messages, images, row_id=0):
    return {"messages": messages, "images": images, "videos": [], "row_id": row_id, "problem": None}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", list(TABLE))
def test_conformance(name, shape, replica):
    path, processor, family = replica(name)
    assert family is FAMILIES[TABLE[name]]
    collator = ChatCollator(processor, family)
    traits = template_traits(processor, family)
    messages, images = conversation(shape, later_images=family.default_chat_template is None)
    batch = collator([row(messages, images)])
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    tok = processor.tokenizer

    # Exactly each reply and its end-of-turn (a template may put a space before the reply, generated by the model)
    # (after the template's reply lead: Qwen3.5's closed think block, generated by the model at inference); a
    # template that rewrites replies in history (Qwen3.5) supervises the final reply only.
    runs = labelled_runs(ids, labels)
    decoded = [tok.decode(r) for _, r in runs]
    expected = [reply + traits.end_token for reply in reply_texts(messages)][-1 if traits.rewrites_history else 0:]
    assert all(d.startswith(traits.reply_lead) for d in decoded), decoded
    decoded = [d.removeprefix(traits.reply_lead) for d in decoded]
    assert [d[1:] if d.startswith(" ") else d for d in decoded] == expected, decoded

    # No image token and no padding carries loss
    image_ids = torch.tensor(collator.image_token_ids)
    assert not torch.isin(labels[labels != IGNORE_INDEX], image_ids).any()
    if images:
        assert int(torch.isin(ids, image_ids).sum()) >= len(images)

    # The tokens before each reply are those apply_chat_template gives for the conversation up to it
    prepared = prepare_messages(processor, messages, family)
    if not traits.appends_eos and not traits.string_roles:
        assert prepared == messages, "the template takes the conversation as it is"
    replies = [i for i, m in enumerate(messages) if m["role"] == "assistant"][-len(runs):]
    for (start, _), i in zip(runs, replies):
        before = prepared[:i]
        shown = sum(p["type"] == "image" for m in before if not isinstance(m["content"], str) for p in m["content"])
        if family.processor_adds_bos_and_newline and not shown:
            continue  # PaliGemma's processor takes no prompt without an image (finetune's layout: test_mixed_batches)
        reference = processor.apply_chat_template(
            with_images(before, images[:shown]), add_generation_prompt=True, tokenize=True, return_dict=True,
            return_tensors="pt", **template_kwargs(processor, family))["input_ids"][0]
        assert ids[:start].tolist() == reference.tolist(), (name, shape, i)

    # The scan's length of the row is its collated length, and so is its length inside a padded batch
    other_messages, other_images = conversation("text_only" if shape != "text_only" else "no_system")
    rows = [row(messages, images, 0), row(other_messages, other_images, 1)]
    report = scan(rows, collator, max_length=None)
    together = collator(rows)
    assert report.lengths == [int(collator([r])["attention_mask"].sum()) for r in rows]
    assert report.lengths == together["attention_mask"].sum(1).tolist()
    assert (together["labels"][together["attention_mask"] == 0] == IGNORE_INDEX).all()
    assert report.lengths[0] == len(ids)
    # ... in either order (text-only rows beside image rows), with the labels the row has alone
    swapped = collator(rows[::-1])
    assert swapped["attention_mask"].sum(1).tolist() == report.lengths[::-1]
    for i, j in ((0, 1), (1, 0)):
        n = report.lengths[i]
        assert together["labels"][i][:n].tolist() == swapped["labels"][j][:n].tolist()


@pytest.mark.parametrize("name", list(TABLE))
def test_the_replica_runs_at_the_real_image_settings(name, replica):
    """Image features match image tokens (the model raises otherwise): the geometry is the checkpoint's."""
    path, processor, family = replica(name)
    model = AutoModelForImageTextToText.from_pretrained(path)
    messages, images = conversation("system_two_turns")
    batch = ChatCollator(processor, family)([row(messages, images)])
    with torch.no_grad():
        loss = model(**batch).loss
    assert torch.isfinite(loss)


@pytest.mark.parametrize("name", list(TABLE) + list(SIBLINGS))
def test_the_replica_has_the_checkpoints_interface(name, replica):
    path, processor, family = replica(name)
    folder = HUB / name
    config = json.loads((folder / "config.json").read_text())
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    # transformers 5 checkpoints (Gemma 4) keep the image processor's settings inside processor_config.json
    preprocessor = (json.loads((folder / "preprocessor_config.json").read_text())
                    if (folder / "preprocessor_config.json").is_file() else
                    dict(json.loads((folder / "processor_config.json").read_text())["image_processor"],
                         processor_class=json.loads((folder / "processor_config.json").read_text())["processor_class"]))
    assert zoo.info(path)["family"] == config["model_type"]
    assert type(processor).__name__ == preprocessor.get("processor_class", tokenizer_config["processor_class"])
    template = folder / "chat_template.jinja"
    assert processor.chat_template == (template.read_text() if template.is_file() else PALIGEMMA_TEMPLATE)
    tok = processor.tokenizer
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        if tokenizer_config.get(key):
            assert getattr(tok, key) == tokenizer_config[key], key
    for key in ("size", "max_image_size", "max_image_tiles", "image_grid_pinpoints", "patch_size", "merge_size",
                "min_pixels", "max_pixels", "do_image_splitting", "image_seq_length"):
        if key not in preprocessor:
            continue
        if key in ("min_pixels", "max_pixels"):  # transformers 5 keeps Qwen2's pixel bounds in `size`
            value = processor.image_processor.size["shortest_edge" if key == "min_pixels" else "longest_edge"]
        else:
            value = getattr(processor.image_processor, key)
        if hasattr(value, "items"):
            value = {k: v for k, v in value.items() if v is not None}
        assert value == preprocessor[key], key
    if name in FIXED_IMAGE_TOKENS:
        token, count = FIXED_IMAGE_TOKENS[name]
        batch = ChatCollator(processor, family)([row(*conversation("no_system"))])
        assert int((batch["input_ids"] == tok.convert_tokens_to_ids(token)).sum()) == count
    if name in SIBLINGS:
        sibling = replica(SIBLINGS[name])[1]
        assert processor.chat_template == sibling.chat_template
        messages, images = conversation("system_two_turns")
        one = ChatCollator(processor, family)([row(messages, images)])
        two = ChatCollator(sibling, family)([row(messages, images)])
        assert one["input_ids"].tolist() == two["input_ids"].tolist()


def test_token_counts_at_the_real_image_settings(replica):
    """Image tokens for a 640 x 480 chart, as the real checkpoints expand it."""
    counts = {}
    for name in ("Qwen__Qwen2.5-VL-3B-Instruct", "Qwen__Qwen3-VL-2B-Instruct", "HuggingFaceM4__Idefics3-8B-Llama3",
                 "HuggingFaceTB__SmolVLM-256M-Instruct"):
        _, processor, family = replica(name)
        batch = ChatCollator(processor, family)([row(*conversation("system_two_turns"))])
        pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>" if "Qwen" in name else "<image>")
        counts[name] = int((batch["input_ids"] == pad).sum())
    # Qwen2.5-VL: 640 x 480 -> 644 x 476 (multiples of 28) -> 23 x 17 merged patches
    assert counts["Qwen__Qwen2.5-VL-3B-Instruct"] == 23 * 17
    # Qwen3-VL: multiples of 32 -> 640 x 480 -> 20 x 15
    assert counts["Qwen__Qwen3-VL-2B-Instruct"] == 20 * 15
    # Idefics3: longest edge resized to 1456 (4 x 364) -> 1456 x 1092 -> 4 x 3 tiles + the global image, 169 each
    assert counts["HuggingFaceM4__Idefics3-8B-Llama3"] == (4 * 3 + 1) * 169
    # SmolVLM-256M: longest edge 2048 (4 x 512) -> 2048 x 1536 -> 4 x 3 tiles + global, 64 each
    assert counts["HuggingFaceTB__SmolVLM-256M-Instruct"] == (4 * 3 + 1) * 64


# --- what each real template does, and how training and inference agree on it ----------------------------------


def test_llava15_replies_get_the_eos_the_template_does_not_write(replica):
    _, processor, family = replica("llava-hf__llava-1.5-7b-hf")
    traits = template_traits(processor, family)
    assert traits.appends_eos and traits.end_token == "</s>"
    messages, images = conversation("system_two_turns")
    raw = processor.apply_chat_template(messages, tokenize=False)
    assert "The tallest bar is red. USER:" in raw  # the hub template: a space, no end-of-turn
    trained = render(processor, messages, family)
    assert "The tallest bar is red.</s> USER:" in trained and trained.endswith("There are 4 bars.</s> ")
    # A chat's later prompt renders the earlier reply as training saw it
    assert render(processor, messages[:4], family, generation_prompt=True).endswith(
        "red.</s> USER: How many bars are there? ASSISTANT:")
    # The first prompt is the template's own, and generation stops at the EOS the replies were trained with
    assert render(processor, messages[:2], family, generation_prompt=True) == processor.apply_chat_template(
        messages[:2], tokenize=False, add_generation_prompt=True)
    model = AutoModelForImageTextToText.from_pretrained(replica("llava-hf__llava-1.5-7b-hf")[0])
    assert processor.tokenizer.convert_tokens_to_ids("</s>") in stop_token_ids(model, processor, family)


def test_qwen2_default_system_prompt_renders_in_training_and_inference(replica):
    _, processor, family = replica("Qwen__Qwen2-VL-2B-Instruct")
    messages, _ = conversation("no_system")
    default = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    assert render(processor, messages, family).startswith(default)
    assert render(processor, messages[:1], family, generation_prompt=True).startswith(default)


def test_llama32_date_preamble_is_pinned_and_system_text_read_as_a_string(replica):
    _, processor, family = replica("meta-llama__Llama-3.2-11B-Vision-Instruct")
    assert template_traits(processor, family).string_roles == {"system"}
    messages, _ = conversation("text_only")
    trained = render(processor, messages, family)
    prompt = render(processor, messages[:2], family, generation_prompt=True)
    preamble = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
                "Today Date: 26 Jul 2024\n\nAnswer briefly.<|eot_id|>")
    assert trained.startswith(preamble) and prompt.startswith(preamble)
    # Left to itself the template writes today's date: a run would render differently on another day
    today = datetime.date.today().strftime("%d %b %Y")
    assert f"Today Date: {today}" in processor.apply_chat_template(prepare_messages(processor, messages, family),
                                                                    tokenize=False)
    # With an image and no system message the template writes no preamble, in training and inference alike
    messages, _ = conversation("no_system")
    assert render(processor, messages, family).startswith("<|begin_of_text|><|start_header_id|>user")


def test_gemma3_folds_the_system_prompt_into_the_first_user_turn(replica):
    _, processor, family = replica("google__gemma-3-4b-it")
    messages, _ = conversation("system_two_turns")
    trained = render(processor, messages, family)
    assert trained.startswith("<bos><start_of_turn>user\nAnswer briefly.\n\n<start_of_image>What color")
    assert "<start_of_turn>system" not in trained
    assert render(processor, messages[:2], family, generation_prompt=True).endswith("<start_of_turn>model\n")


@pytest.mark.parametrize("name, stops", [("google__gemma-3-4b-it", ["<eos>", "<end_of_turn>"]),  # [1, 106]
                                         ("google__paligemma2-3b-pt-448", ["<eos>", "<end_of_turn>"])])  # [1, 107]
def test_generation_stops_at_each_eos_of_the_published_generation_config(name, stops, replica):
    path, processor, family = replica(name)
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    tok = processor.tokenizer
    ids = [tok.convert_tokens_to_ids(t) for t in stops]
    assert model.generation_config.eos_token_id == ids  # the published list, mapped to the tiny vocabulary
    stop = stop_token_ids(model, processor, family)
    assert set(ids) <= set(stop)
    # Forced to write "red" then each stop token, generation ends right there (and not at the other).
    red = tok("red", add_special_tokens=False)["input_ids"]
    batch = tok(["What color?"], return_tensors="pt")
    for token in ids:
        forced = red + [token]
        out = model.generate(**batch, max_new_tokens=8, do_sample=False, eos_token_id=stop,
                             pad_token_id=tok.pad_token_id,
                             prefix_allowed_tokens_fn=lambda _, sent, f=forced, n=batch["input_ids"].shape[1]:
                             [f[min(len(sent) - n, len(f) - 1)]])
        assert out[0, batch["input_ids"].shape[1]:].tolist() == forced


def test_llava_next_pads_with_its_own_pad_token_which_never_touches_a_real_token(replica):
    path, processor, family = replica("llava-hf__llava-v1.6-mistral-7b-hf")
    tok = processor.tokenizer
    assert tok.pad_token == "<pad>" and tok.pad_token_id not in (tok.unk_token_id, tok.eos_token_id, tok.bos_token_id)
    rows = [row(*conversation("system_two_turns")), row(*conversation("text_only"), row_id=1)]
    batch = ChatCollator(processor, family)(rows)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert (mask == 0).any()  # the text-only row is padded
    assert (ids[mask == 0] == tok.pad_token_id).all()  # every padded position holds <pad> ...
    assert not (ids[mask == 1] == tok.pad_token_id).any()  # ... and no real token is <pad>
    assert (labels[mask == 0] == IGNORE_INDEX).all()
    model = AutoModelForImageTextToText.from_pretrained(path)
    assert model.config.get_text_config().pad_token_id == tok.pad_token_id


def test_idefics3_tile_markers_are_plain_text_and_counted_as_the_tokens_they_become(replica):
    """The published Idefics3 tokenizer adds only <fake_token_around_image>, <image> and <end_of_utterance>:
    <global-img> and <row_i_col_j> are text, several tokens each, and lengths count every one of them."""
    _, processor, family = replica("HuggingFaceM4__Idefics3-8B-Llama3")
    tok = processor.tokenizer
    assert tok.eos_token == "<|end_of_text|>"
    assert len(tok("<row_1_col_1>", add_special_tokens=False)["input_ids"]) > 1
    assert len(tok("<global-img>", add_special_tokens=False)["input_ids"]) > 1
    collator = ChatCollator(processor, family)
    assert sorted(tok.convert_ids_to_tokens(collator.image_token_ids)) == ["<fake_token_around_image>", "<image>"]
    messages, images = conversation("system_two_turns")
    batch = collator([row(messages, images)])
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    # 640 x 480: 4 x 3 tiles + the global image, 169 <image> tokens each; the markers around them are many more
    # tokens than the 13 + 13 single ones a tokenizer with marker tokens would give.
    assert int((ids == tok.convert_tokens_to_ids("<image>")).sum()) == 13 * 169
    measurer = Measurer(processor, family)
    markers = len(tok(measurer._replacement(CHART), add_special_tokens=False)["input_ids"]) - 13 * 169
    assert markers > 2 * 13 + 12
    assert measurer.measure({"messages": messages, "images": [CHART], "videos": []}) == \
        (len(ids), int((labels != IGNORE_INDEX).sum()))
    # Each reply's labels end with <end_of_utterance>, and generation stops there.
    supervised = tok.decode(ids[labels != IGNORE_INDEX])
    assert supervised.count("<end_of_utterance>") == 2 and supervised.endswith("<end_of_utterance>")


def test_paligemma_has_no_template_and_uses_finetunes_documented_one(replica, tmp_path):
    path, processor, family = replica("google__paligemma2-3b-pt-448")
    from transformers import AutoProcessor

    assert AutoProcessor.from_pretrained(path).chat_template is None  # as on the hub
    assert processor.chat_template == PALIGEMMA_TEMPLATE
    messages, images = conversation("no_system")
    assert render(processor, messages, family) == "<image>What color is the tallest bar?\nThe tallest bar is red.<eos>"
    ids = prompt_batch(processor, family, [messages[:1]], [images])["input_ids"][0]
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert int((ids == image_id).sum()) == 1024
    assert processor.tokenizer.decode(ids[ids != image_id]) == "<bos>What color is the tallest bar?\n"


def test_a_model_without_template_and_without_a_family_default_is_refused_naming_the_key(tmp_path):
    hub = tmp_path / "llava-no-template"
    shutil.copytree(HUB / "llava-hf__llava-1.5-7b-hf", hub)
    (hub / "chat_template.jinja").unlink()
    path = zoo.ensure_like(hub)
    cfg = ModelConfig(name_or_path=f"zoo:{hub}")
    with pytest.raises(RecipeError, match=r"model\.chat_template"):
        load_processor(str(path), cfg, family=FAMILIES["llava"])
    template = tmp_path / "vicuna.jinja"
    template.write_text((HUB / "llava-hf__llava-1.5-7b-hf" / "chat_template.jinja").read_text())
    processor = load_processor(str(path), ModelConfig(name_or_path=cfg.name_or_path, chat_template=str(template)),
                               family=FAMILIES["llava"])
    assert processor.chat_template == template.read_text()
    with pytest.raises(RecipeError, match=r"model\.chat_template: .*file not found"):
        load_processor(str(path), ModelConfig(name_or_path="x", chat_template=str(tmp_path / "missing.jinja")))
