"""Each hub fixture (tests/fixtures/hub) equals the published values written down beside it (PUBLISHED.json: the
repository, its revision, where each value was confirmed): special tokens and their ids, bos/eos/pad/unk, the image
token id, the generation config's eos ids and the chat template. A fixture edited away from the hub, or a value
re-transcribed differently, fails here: the guarantees tested on the replicas hold for the real checkpoints."""

import hashlib
import json
from pathlib import Path

import pytest

HUB = Path(__file__).parent / "fixtures" / "hub"
FIXTURES = sorted(p for p in HUB.iterdir() if p.is_dir())


def test_every_fixture_has_its_published_values():
    assert len(FIXTURES) == 21
    assert all((folder / "PUBLISHED.json").is_file() for folder in FIXTURES)


@pytest.mark.parametrize("folder", FIXTURES, ids=lambda p: p.name)
def test_fixture_equals_the_published_checkpoint(folder):
    published = json.loads((folder / "PUBLISHED.json").read_text())
    assert published["repo"] == folder.name.replace("__", "/") and published["revision"]
    tc = json.loads((folder / "tokenizer_config.json").read_text())
    config = json.loads((folder / "config.json").read_text())

    def token(key):
        value = tc.get(key)
        return value.get("content") if isinstance(value, dict) else value

    assert {k: token(k) for k in published["tokens"]} == published["tokens"]
    assert tc.get("add_bos_token") == published["add_bos_token"]
    added = {k: v["content"] for k, v in (tc.get("added_tokens_decoder") or {}).items()}
    if "special_tokens_sha256" in published:
        # Gemma 3n's 6,670 entries: the ones that are not reserved <unused...> placeholders, and a hash of them all
        assert len(added) == published["special_tokens_count"]
        assert hashlib.sha256(json.dumps(added, sort_keys=True, ensure_ascii=False).encode()).hexdigest() \
            == published["special_tokens_sha256"]
        assert {k: v for k, v in added.items() if not v.startswith("<unused")} == published["special_tokens"]
    else:
        assert added == published["special_tokens"]
    assert sorted(tc.get("additional_special_tokens", [])) == sorted(published["additional_special_tokens"])
    image_id = next((config[k] for k in ("image_token_id", "image_token_index") if k in config), None)
    assert image_id == published["image_token_id"]
    generation = folder / "generation_config.json"
    eos = json.loads(generation.read_text())["eos_token_id"] if generation.is_file() else None
    assert eos == published["generation_eos_token_id"]
    template = folder / "chat_template.jinja"
    digest = hashlib.sha256(template.read_bytes()).hexdigest() if template.is_file() else None
    assert digest == published["chat_template_sha256"]
    # Every id a generation config stops at, and the pad token, is a token of the fixture's tokenizer. A transformers
    # 5 tokenizer_config.json (Gemma 4) names its special tokens (`*_token` keys) without ids: nothing to map there.
    if "added_tokens_decoder" not in tc:
        assert published["special_tokens"] == {} and token("pad_token") and token("eos_token")
        return
    for i in eos or []:
        assert str(i) in added, f"generation eos id {i} has no token in added_tokens_decoder"
    if token("pad_token"):
        assert token("pad_token") in added.values()


def test_the_values_issue_29_checked_against_the_hub():
    def published(name):
        return json.loads((HUB / name / "PUBLISHED.json").read_text())

    idefics = published("HuggingFaceM4__Idefics3-8B-Llama3")
    assert idefics["tokens"]["eos_token"] == "<|end_of_text|>"
    assert set(idefics["special_tokens"].values()) - {"<|begin_of_text|>", "<|end_of_text|>",
                                                      "<|reserved_special_token_0|>"} \
        == {"<fake_token_around_image>", "<image>", "<end_of_utterance>"}
    assert idefics["additional_special_tokens"] == []  # <global-img>, <row_i_col_j>: plain text
    llava_next = published("llava-hf__llava-v1.6-mistral-7b-hf")
    assert llava_next["tokens"]["pad_token"] == "<pad>" and llava_next["special_tokens"]["32001"] == "<pad>"
    assert published("google__gemma-3-4b-it")["generation_eos_token_id"] == [1, 106]
    assert published("google__paligemma2-3b-pt-448")["generation_eos_token_id"] == [1, 107]
