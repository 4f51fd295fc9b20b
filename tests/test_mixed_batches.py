"""Text-only rows and image rows in one batch, in either order, for every family (issue 14's four failures).

Each row of a mixed batch must get exactly the labels it gets alone, and the model must score it exactly as it
scores it alone: a row that picked up another row's image, aspect ratio or `<bos>` would not.
"""

import contextlib
import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from conftest import ROOT, image
from finetune import zoo
from finetune.batching.collate import IGNORE_INDEX, ChatCollator
from finetune.batching.template import template_traits
from finetune.models.families import FAMILIES

TEXT_ROW = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Say a word."}]},
                         {"role": "assistant", "content": [{"type": "text", "text": "ZEBRA text"}]}],
            "images": []}
IMAGE_ROW = {"messages": [{"role": "user", "content": [{"type": "image"},
                                                       {"type": "text", "text": "What color is the bar?"}]},
                          {"role": "assistant", "content": [{"type": "text", "text": "The bar is red."}]}],
             "images": [image(0)]}


@pytest.fixture(scope="module")
def loaded():
    cache = {}

    def get(family):
        if family not in cache:
            path = zoo.ensure(family)
            cache[family] = (AutoProcessor.from_pretrained(path), AutoModelForImageTextToText.from_pretrained(path))
        return cache[family]

    return get


def labelled(processor, batch, row):
    labels = batch["labels"][row]
    return processor.tokenizer.decode(labels[labels != IGNORE_INDEX])


def row_losses(model, batch):
    """Mean cross-entropy per row over its own supervised tokens."""
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    labels = batch["labels"][:, 1:]
    losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2).float(), labels, reduction="none",
                                               ignore_index=IGNORE_INDEX)
    return (losses.sum(1) / (labels != IGNORE_INDEX).sum(1)).tolist()


@pytest.mark.parametrize("order", ["text_first", "image_first"])
@pytest.mark.parametrize("family", zoo.FAMILIES)
def test_text_only_and_image_rows_batch_together(family, order, loaded):
    processor, model = loaded(family)
    collator = ChatCollator(processor, FAMILIES[family])
    rows = [TEXT_ROW, IMAGE_ROW] if order == "text_first" else [IMAGE_ROW, TEXT_ROW]
    batch = collator(rows)
    eot = FAMILIES[family].end_of_turn
    text_i, image_i = rows.index(TEXT_ROW), rows.index(IMAGE_ROW)

    # Exactly the reply and its end-of-turn (some templates put a space before the reply, Qwen3.5 its closed think
    # block), and nothing else.
    lead = template_traits(processor, FAMILIES[family]).reply_lead.strip()
    assert labelled(processor, batch, text_i).strip().removeprefix(lead).strip() == f"ZEBRA text{eot}"
    assert labelled(processor, batch, image_i).strip().removeprefix(lead).strip() == f"The bar is red.{eot}"
    assert labelled(processor, batch, text_i).strip().startswith(lead)
    image_ids = torch.tensor(collator.image_token_ids)
    assert torch.isin(batch["input_ids"][image_i], image_ids).any()
    assert not torch.isin(batch["input_ids"][text_i][batch["attention_mask"][text_i] == 1], image_ids).any()
    assert not torch.isin(batch["labels"], image_ids).any()

    # Each row is encoded and scored exactly as when it is alone.
    for i, row in ((text_i, TEXT_ROW), (image_i, IMAGE_ROW)):
        alone = collator([row])
        length = int(alone["attention_mask"].sum())
        real = batch["attention_mask"][i] == 1
        assert batch["input_ids"][i][real].tolist() == alone["input_ids"][0][:length].tolist()
        assert batch["labels"][i][real].tolist() == alone["labels"][0][:length].tolist()
        with closed_cross_attention(model, family == "mllama" and i == text_i):
            assert row_losses(model, batch)[i] == pytest.approx(row_losses(model, alone)[0], abs=1e-4), (family, i)


@contextlib.contextmanager
def closed_cross_attention(model, close: bool):
    """transformers' Mllama adds the cross-attention output (uniform attention over the batch's vision tokens) to
    text rows that attend to no image; only the MLP is masked (Meta's reference masks both). A text-only row
    beside an image row therefore differs from that row alone by the attention gate's contribution, a property of
    the model code, not of the batch: with the attention gates closed the two agree exactly."""
    gates = [p for n, p in model.named_parameters() if n.endswith("cross_attn_attn_gate")] if close else []
    saved = [g.detach().clone() for g in gates]
    with torch.no_grad():
        for g in gates:
            g.zero_()
    try:
        yield
    finally:
        with torch.no_grad():
            for g, v in zip(gates, saved):
                g.copy_(v)


@pytest.mark.parametrize("family", ["idefics3", "paligemma", "mllama"])
def test_a_batch_of_text_only_rows_only(family, loaded):
    processor, model = loaded(family)
    batch = ChatCollator(processor, FAMILIES[family])([TEXT_ROW, TEXT_ROW])
    assert "pixel_values" not in batch
    assert labelled(processor, batch, 0).strip() == f"ZEBRA text{FAMILIES[family].end_of_turn}"
    loss = model(**batch).loss
    assert torch.isfinite(loss)


def test_paligemma_text_only_row_beside_an_image_row_is_laid_out_as_without_images(loaded):
    """The issue's mislabel: the processor put <bos> at character 6 of a row without <image>; the labels decoded
    to ' word.\\nZEBRA text'. The row must read "<bos>{prompt}\\n{reply}<eos>" as the processor lays out a prompt."""
    processor, _ = loaded("paligemma")
    batch = ChatCollator(processor, FAMILIES["paligemma"])([IMAGE_ROW, TEXT_ROW])
    ids = batch["input_ids"][1][batch["attention_mask"][1] == 1]
    assert processor.tokenizer.decode(ids) == "<bos>Say a word.\nZEBRA text<eos>\n"
    assert labelled(processor, batch, 1) == "ZEBRA text<eos>"
    # prefix-LM: the prompt is bidirectional, the answer causal, in both rows
    types = batch["token_type_ids"][1][batch["attention_mask"][1] == 1]
    assert types.tolist() == [0] * (len(types) - types.sum()) + [1] * int(types.sum())


def write_mixed_data(tmp_path):
    """4 rows, 2 of them text-only, ordered so that a batch of 2 starts with a text-only row."""
    image(0, (64, 64)).save(tmp_path / "a.png")
    rows = []
    for i in range(4):
        with_image = i % 2 == 1
        rows.append({"messages": [{"role": "user", "content": ([{"type": "image"}] if with_image else [])
                                   + [{"type": "text", "text": f"Question {i}?"}]},
                                  {"role": "assistant", "content": [{"type": "text", "text": f"Answer {i}."}]}],
                     "images": ["a.png"] if with_image else []})
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path / "train.jsonl"


@pytest.mark.parametrize("family", ["idefics3", "mllama"])
def test_finetune_train_on_mixed_rows_with_batch_size_2(family, tmp_path):
    """The issue's `finetune train` that exited 1 at step 0: 4 rows, 2 text-only, batch size 2, through the CLI."""
    data = write_mixed_data(tmp_path)
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "finetune", "train", str(ROOT / "recipes/tiny-chartqa.yaml"),
         f"model.name_or_path=zoo:{family}", f"data.path={data}", "data.format=messages", "data.eval_split=null",
         f"training.output_dir={out}", "training.max_steps=2", "training.per_device_train_batch_size=2",
         "training.logging_steps=1", "evaluation.enabled=false"],
        capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["steps"] == 2 and summary["train_data"]["kept"] == 4
    assert summary["train_data"]["images_per_row"] == {"0": 2, "1": 2}
