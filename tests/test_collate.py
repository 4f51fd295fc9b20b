"""Labels: for every family, exactly the assistant replies and their end-of-turn token carry loss."""

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from conftest import REPLIES, image, two_turn
from finetune import zoo
from finetune.batching.collate import IGNORE_INDEX, ChatCollator
from finetune.batching.template import template_traits
from finetune.models.families import FAMILIES


def collate(family, rows):
    processor = AutoProcessor.from_pretrained(zoo.ensure(family))
    collator = ChatCollator(processor, FAMILIES[family])
    return processor, collator, collator(rows)


def reply_ids(tokenizer, reply, eot, lead=""):
    """A reply's tokens + end-of-turn, for each way a template may render it: bare, or after a space, after what
    the template writes between generation prompt and reply (Qwen3.5's closed think block)."""
    return [tokenizer.encode(lead + text, add_special_tokens=False) + [eot] for text in (reply, " " + reply)]


@pytest.mark.parametrize("family", zoo.FAMILIES)
def test_only_assistant_replies_and_end_of_turn_carry_loss(family):
    rows = [{"messages": two_turn(), "images": [image(0)]},
            {"messages": two_turn()[:3], "images": [image(1, (48, 80))]}]  # shorter: padded, other image size
    processor, collator, batch = collate(family, rows)
    tok = processor.tokenizer
    eot = tok.convert_tokens_to_ids(FAMILIES[family].end_of_turn)
    ids, labels, attention = batch["input_ids"], batch["labels"], batch["attention_mask"]
    traits = template_traits(processor, FAMILIES[family])
    # A template that rewrites replies in history (Qwen3.5) supervises a conversation's final reply only.
    expected = [REPLIES[1:], REPLIES[:1]] if traits.rewrites_history else [REPLIES, REPLIES[:1]]

    for row, replies in enumerate(expected):
        supervised = labels[row] != IGNORE_INDEX
        assert torch.equal(labels[row][supervised], ids[row][supervised])
        # The exact token sequence of each reply, tokenised as the template renders it (some templates put a
        # space before the reply), followed by the end-of-turn token; nothing else.
        positions = supervised.nonzero().flatten().tolist()
        runs = [[]]
        for a, b in zip(positions, positions[1:] + [None]):
            runs[-1].append(int(ids[row, a]))
            if b is not None and b != a + 1:
                runs.append([])
        assert len(runs) == len(replies), tok.decode(labels[row][supervised])
        for run, reply in zip(runs, replies):
            assert run in reply_ids(tok, reply, eot, traits.reply_lead), (tok.decode(run), reply)

    image_ids = torch.tensor(collator.image_token_ids)
    assert torch.isin(ids, image_ids).any(), "the batch must contain image tokens for this test to mean anything"
    assert not torch.isin(labels[labels != IGNORE_INDEX], image_ids).any()
    assert (attention[1] == 0).any(), "row 1 must be padded for this test to mean anything"
    assert (labels[attention == 0] == IGNORE_INDEX).all()


@pytest.mark.parametrize("family", zoo.FAMILIES)
def test_training_tokens_equal_inference_tokens(family):
    """What the collator trains on is exactly what apply_chat_template gives at inference."""
    messages = two_turn()
    processor, _, batch = collate(family, [{"messages": messages, "images": [image(0)]}])
    with_image = [dict(m, content=[dict(c, image=image(0)) if c["type"] == "image" else c for c in m["content"]])
                  for m in messages]
    reference = processor.apply_chat_template(with_image, tokenize=True, return_dict=True, return_tensors="pt")
    assert torch.equal(reference["input_ids"], batch["input_ids"])


def test_paligemma_answer_tokens_never_see_later_answer_tokens():
    family = "paligemma"
    path = zoo.ensure(family)
    model = AutoModelForImageTextToText.from_pretrained(path).train()  # train mode: the mask used for training
    torch.manual_seed(0)
    _, _, batch = collate(family, [{"messages": two_turn(), "images": [image(0)]}])
    batch.pop("labels")
    answer = (batch["token_type_ids"][0] == 1).nonzero().flatten()
    assert len(answer) > 4
    first_answer = int(answer[0])

    def logits(token_type_ids, changed_position):
        ids = batch["input_ids"].clone()
        ids[0, changed_position] = (ids[0, changed_position] + 1) % model.config.text_config.vocab_size
        with torch.no_grad():
            base = model(**(batch | {"token_type_ids": token_type_ids})).logits
            changed = model(**(batch | {"input_ids": ids, "token_type_ids": token_type_ids})).logits
        return (base - changed)[0, :changed_position].abs().max().item()

    for position in (int(answer[-2]), int(answer[len(answer) // 2]), first_answer + 1):
        assert logits(batch["token_type_ids"], position) == 0.0
    # What TRL's collator produces (all zeros) lets the prompt attend to the answer: the check can fail.
    assert logits(torch.zeros_like(batch["token_type_ids"]), first_answer + 1) > 0.0
