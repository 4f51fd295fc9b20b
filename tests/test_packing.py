"""`training.packing`: samples packed whole into rows train exactly as they do unpacked, in every family that packs."""

import contextlib

import pytest
import torch

from conftest import image, two_turn
from finetune import zoo
from finetune.models.families import FAMILIES
from finetune.batching.packing import PackedRows, cached_plan, plan_packs
from finetune.training.attention import LayerMasks
from finetune.training.pipeline import prepare
from finetune.recipe import RecipeError
from test_training import tiny_recipe

PACKABLE = [f for f in zoo.FAMILIES if not FAMILIES[f].no_packing]


def user(text, images=1):
    return {"role": "user", "content": [{"type": "image"}] * images + [{"type": "text", "text": text}]}


def reply(text):
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def three_samples():
    """Different lengths and image sizes; the second is multi-turn with a system prompt."""
    return [
        {"messages": [user("Which bar is highest?"), reply("B.")], "images": [image(1, (64, 48))]},
        {"messages": two_turn(), "images": [image(2, (40, 64))]},
        {"messages": [user("Describe the trend of the series over the whole period in one sentence."),
                      reply("It rises steadily from 2010 to 2015, then falls back to its starting level.")],
         "images": [image(3, (64, 64))]},
    ]


def randomised_adapters(model):
    for name, p in model.named_parameters():  # LoRA B starts at zero; give every adapter a non-trivial value
        if p.requires_grad:
            torch.manual_seed(len(name))
            p.data.normal_(0, 0.02)


def assert_grads_close(a, b, rtol=1e-4, atol=1e-7):
    """Elementwise within (rtol, atol), or within rtol of the tensor's largest gradient: float32 summation-order
    noise on elements near zero (Gemma 4's) fails an elementwise bound and means nothing."""
    if (a - b).abs().max() > rtol * b.abs().max():
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def sample_losses(logits, labels, starts, lengths):
    """Mean next-token cross-entropy of each sample, located by its first position and token count."""
    out = []
    for start, n in zip(starts, lengths):
        targets = labels[start + 1:start + n]
        out.append(torch.nn.functional.cross_entropy(logits[start:start + n - 1].float(), targets, ignore_index=-100))
    return torch.stack(out)


@pytest.mark.parametrize("sizes", [[3], [2, 1]], ids=["one-row", "two-rows"])
@pytest.mark.parametrize("family", PACKABLE)
def test_packed_samples_have_their_unpacked_losses_and_gradients(family, sizes, tmp_path):
    """3 samples packed (into one row, or two rows with padding after the shorter) give each sample the loss it
    has alone, and the trainer's loss and LoRA gradients equal the unpacked batch's (fp32; 1e-5 relative on losses,
    1e-4 on gradients)."""
    run = prepare(tiny_recipe(family, tmp_path, "training.packing=true", "training.max_length=2048"))
    check_packing_is_exact(run, sizes)


@pytest.mark.parametrize("family", [f for f in PACKABLE if FAMILIES[f].bidirectional_images])
def test_sliding_window_layers_keep_the_window_and_image_blocks_per_packed_sample(family, tmp_path):
    """Gemma 3 with a sliding window (12) shorter than the samples and longer than an image block (4 tokens)."""
    run = prepare(tiny_recipe(family, tmp_path, "training.packing=true"))
    text_config = run.trainer.model.get_base_model().config.get_text_config()
    assert "sliding_attention" in text_config.layer_types
    text_config.sliding_window = 12
    check_packing_is_exact(run, [2, 1])


def check_packing_is_exact(run, sizes, loss_tolerance=(1e-5, 1e-6), grad_tolerance=(1e-4, 1e-7)):
    """Losses per sample (packed vs alone), and the trainer's loss and LoRA gradients (packed vs unpacked), within
    (rtol, atol). Runs on the model's device; on flash-attention the packs are laid out in one row."""
    trainer, model = run.trainer, run.trainer.model
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop; TRL's MoE aux loss divides by it
    randomised_adapters(model)
    model.train()
    collate = trainer.data_collator

    def on_device(batch):
        return {k: v.to(model.device) if torch.is_tensor(v) else v for k, v in batch.items()}

    samples = three_samples()
    batch = on_device(collate([samples[:sizes[0]], samples[sizes[0]:]] if len(sizes) == 2 else [samples]))
    assert batch["pack_sizes"] == sizes
    lengths = batch["attention_mask"].sum(1).tolist()
    packed, per_sample = trainer.pack(model, dict(batch))
    flash = str(model.config._attn_implementation).startswith("flash")
    if flash:
        sizes = [sum(sizes)]

    # No padding mask: transformers isolates samples by the restarting positions (Gemma 3: finetune's masks).
    assert isinstance(packed.get("attention_mask"), LayerMasks if run.family.bidirectional_images else type(None))
    assert "pack_sizes" not in packed
    rows = packed["input_ids"]
    assert rows.shape == (len(sizes), max(sum(lengths[:sizes[0]]), sum(lengths[sizes[0]:])))
    supervised = int((batch["labels"][:, 1:] != -100).sum())
    assert int((packed["labels"] != -100).sum()) == supervised  # the same tokens carry loss

    alone = []
    for sample in samples:
        one = on_device(collate.collator([sample]))
        logits = model(**{k: v for k, v in one.items() if k != "labels"}, use_cache=False).logits[0]
        alone.append(sample_losses(logits, one["labels"][0], [0], [logits.shape[0]])[0])
    params = [p for p in model.parameters() if p.requires_grad]
    unpacked_loss = trainer.compute_loss(model, {k: v for k, v in batch.items() if k != "pack_sizes"},
                                         num_items_in_batch=supervised)
    unpacked_grads = torch.autograd.grad(unpacked_loss, params)

    # Twice: as the trainer trains the rows (on SDPA, attention one sample at a time), and with the whole row's
    # block-diagonal mask (eager attention, or SDPA outside the trainer).
    for attention in (per_sample, contextlib.nullcontext()):
        queries = []  # lengths of the queries SDPA saw
        sdpa = torch.nn.functional.scaled_dot_product_attention
        unmasked = []  # lengths of the queries SDPA saw without a mask (its causal kernel)
        torch.nn.functional.scaled_dot_product_attention = lambda q, *a, **k: queries.append(q.shape[-2]) or (
            k.get("attn_mask") is None and unmasked.append(q.shape[-2])) or sdpa(q, *a, **k)
        try:
            with attention:
                # Each sample's loss, packed, equals its loss alone.
                logits = model(**{k: v for k, v in packed.items() if k != "labels"}, use_cache=False).logits
                together = []
                row_of = [r for r, n in enumerate(sizes) for _ in range(n)]
                for i, r in enumerate(row_of):
                    start = sum(lengths[j] for j in range(i) if row_of[j] == r)
                    together.append(sample_losses(logits[r], packed["labels"][r], [start], [lengths[i]])[0])
                rtol, atol = loss_tolerance
                torch.testing.assert_close(torch.stack(together), torch.stack(alone), rtol=rtol, atol=atol)

                # The trainer's loss (the LM head only where the loss is: TRL's fused head) and LoRA gradients:
                # packed == unpacked.
                head = model.get_output_embeddings()
                head.forward = lambda *a, **k: pytest.fail("the LM head module ran: full logits were built")
                packed_loss = trainer.compute_loss(model, dict(packed), num_items_in_batch=supervised)
                del head.forward
                packed_grads = torch.autograd.grad(packed_loss, params)
        finally:
            torch.nn.functional.scaled_dot_product_attention = sdpa
        torch.testing.assert_close(packed_loss, unpacked_loss, rtol=rtol, atol=atol)
        rtol, atol = grad_tolerance
        for g_packed, g_unpacked in zip(packed_grads, unpacked_grads):
            assert_grads_close(g_packed, g_unpacked, rtol, atol)
        # On CUDA in half precision the decoder attends through the varlen kernel (finetune.training.attention):
        # SDPA never sees the samples then.
        if not flash and not trainer.counts.packed_attention["varlen"]:  # per sample first, then over whole rows
            assert (set(lengths) <= set(queries)) == (attention is per_sample), (lengths, sorted(set(queries)))
            if rows.shape[1] not in lengths:  # (a row of one sample is as long as that sample)
                assert (rows.shape[1] in queries) == (attention is not per_sample)
            # Per sample, a causal family's samples take SDPA's causal kernel; bidirectional blocks keep their mask.
            causal = not (run.family.prefix_lm or run.family.bidirectional_images)
            assert (set(lengths) <= set(unmasked)) == (causal and attention is per_sample), sorted(set(unmasked))
    return (packed_loss - unpacked_loss).abs().item() / unpacked_loss.abs().item()


def test_qwen_packed_rows_carry_each_samples_own_multimodal_positions(tmp_path):
    run = prepare(tiny_recipe("qwen2_vl", tmp_path, "training.packing=true"))
    batch = run.trainer.data_collator([three_samples()])
    lengths = batch["attention_mask"].sum(1).tolist()
    packed, _ = run.trainer.pack(run.trainer.model, dict(batch))
    positions = packed["position_ids"]
    assert positions.shape == (4, 1, sum(lengths))
    text = positions[0, 0]
    starts = [0, lengths[0], lengths[0] + lengths[1]]
    assert (text[starts] == 0).all() and text.tolist() == [p for n in lengths for p in range(n)]
    # The image's t/h/w positions differ from the text ones and restart per sample, as the model computes them alone.
    base = run.trainer.model.get_base_model()
    for start, n, sample in zip(starts, lengths, three_samples()):
        one = run.trainer.data_collator.collator([sample])
        alone, _ = base.model.get_rope_index(one["input_ids"], one["mm_token_type_ids"], one["image_grid_thw"],
                                             attention_mask=one["attention_mask"])
        assert torch.equal(positions[1:, 0, start:start + n], alone[:, 0])
        assert not torch.equal(alone[1], alone[2])


def test_packs_are_planned_best_fit_decreasing_and_hold_every_sample_once():
    lengths = [700, 300, 500, 200, 900, 100, 400, 1000]
    packs = plan_packs(lengths, 1000)
    assert sorted(i for p in packs for i in p) == list(range(8))
    assert all(sum(lengths[i] for i in p) <= 1000 for p in packs)
    # Largest first, each into the fullest pack it fits: 1000 | 900 | 700+300 | 500+400+100 (100 ties with the
    # 900's room; the pack that got its room last wins) | 200.
    assert packs == [[7], [4], [0, 1], [2, 5, 6], [3]]
    assert plan_packs(lengths, 1000) == packs  # deterministic: a resumed run packs the same
    with pytest.raises(ValueError, match="sample 7 has 1000 tokens"):
        plan_packs(lengths, 999)


def test_a_plan_is_stored_once_and_loaded_by_every_later_start(tmp_path, monkeypatch):
    lengths = [700, 300, 500, 200, 900, 100, 400, 1000]
    assert cached_plan(lengths, 1000, tmp_path) == plan_packs(lengths, 1000)
    assert len(list(tmp_path.iterdir())) == 1
    monkeypatch.setattr("finetune.batching.packing.plan_packs", lambda *a: pytest.fail("planned again"))
    assert cached_plan(lengths, 1000, tmp_path) == [[7], [4], [0, 1], [2, 5, 6], [3]]  # loaded, not planned
    monkeypatch.undo()
    assert cached_plan(lengths, 1100, tmp_path) != cached_plan(lengths, 1000, tmp_path)  # keyed by max_length
    assert cached_plan(lengths[:-1], 1000, tmp_path) == plan_packs(lengths[:-1], 1000)  # and by the lengths
    assert len(list(tmp_path.iterdir())) == 3


def test_packed_rows_serve_packs_and_know_their_lengths():
    rows = [{"i": i} for i in range(4)]
    data = PackedRows(rows, [[0, 3], [1], [2]], [5, 6, 7, 8])
    assert len(data) == 3 and data[0] == [{"i": 0}, {"i": 3}] and data.lengths == [13, 6, 7]
    assert data.describe(16) == "packing 4 samples into 3 rows of up to 16 tokens (1.3 samples per row, 54% full)"


def test_training_with_packing_learns_and_reports_real_tokens(tmp_path):
    run = prepare(tiny_recipe("qwen2_vl", tmp_path, "training.packing=true", "training.max_length=256",
                              "training.per_device_train_batch_size=1", "training.max_steps=4"))
    assert len(run.trainer.train_dataset) < 4  # 4 rows of ~60 tokens fit in fewer packs
    assert run.trainer.train_dataset.summary()["samples"] == 4
    run.trainer.train()
    losses = [e["loss"] for e in run.trainer.state.log_history if "loss" in e]
    assert losses[-1] < losses[0], losses
    samples, tokens, positions = run.trainer.counts.seen.tolist()
    packs = len(run.trainer.train_dataset)
    assert 4 % packs == 0 and samples == 4 * 4 // packs  # 4 steps of one pack: every pack of each epoch
    assert tokens == run.trainer._total_train_tokens  # TRL's num_tokens counts real tokens, not positions
    assert positions == tokens  # batch of one pack: no padding at all


def test_mllama_is_refused_for_packing_with_the_reason(tmp_path):
    with pytest.raises(RecipeError, match="training.packing: not supported for Llama 3.2 Vision.*cross-attention"):
        prepare(tiny_recipe("mllama", tmp_path, "training.packing=true"))


@pytest.mark.parametrize("override, message", [
    ("training.packing_strategy=wrapped", "training.packing_strategy: 'wrapped' is not supported"),
    ("training.max_length=null", "training.max_length: required with training.packing"),
    ("data.streaming=true", "training.packing: not supported with data.streaming"),
])
def test_packing_settings_that_cannot_work_are_refused_at_load(override, message, tmp_path):
    with pytest.raises(RecipeError, match=message):
        tiny_recipe("qwen2_vl", tmp_path, "training.packing=true", override)


def test_flash_attention_packing_is_refused_where_bidirectional_blocks_would_be_lost(tmp_path):
    for family in ("paligemma", "gemma3"):
        with pytest.raises(RecipeError, match="flash-attention cannot express"):
            prepare(tiny_recipe(family, tmp_path, "training.packing=true",
                                "model.attn_implementation=flash_attention_2"))
