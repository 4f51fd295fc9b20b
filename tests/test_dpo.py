"""Preference tuning (DPO): recipe keys, the preference format, which tokens enter the log-probs (per family), and
training through TRL's DPOTrainer with the reference = base with the adapter disabled."""

import json

import pytest
import torch
from transformers import AutoProcessor

from conftest import ROOT, image, tiny_recipe
from finetune import zoo
from finetune.batching.template import template_traits
from finetune.data.rows import RowReader, chat_rows, source_rows
from finetune.batching.preference import PreferenceCollator
from finetune.models.families import FAMILIES
from finetune.data.formats import RowError, preference
from finetune.recipe import RecipeError, load_recipe

PROMPT = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which color is the tallest bar?"}]}]


def dpo_recipe(tmp_path, *extra, data=None, **training):
    # `data` replaces the whole data section: no max_samples unless it says so.
    data = data or {"path": str(ROOT / "data/chartqa-tiny-dpo"), "format": "preference",
                    "image_root": str(ROOT / "data/chartqa-tiny"), "max_samples": 8, "eval_split": "test"}
    return load_recipe(tiny_recipe(
        tmp_path / "dpo", without=["data.max_samples", "evaluation.enabled"], data=data, lora={"r": 8, "alpha": 16},
        training={"method": "dpo", "max_steps": 4, "beta": 0.5, "per_device_train_batch_size": 4,
                  "learning_rate": 5e-3, **training},
        evaluation={"limit": 8, "batch_size": 4, "max_new_tokens": 4}), list(extra))


# --- recipe -----------------------------------------------------------------------------------------------------


def test_dpo_recipe_takes_dpoconfig_keys_and_builds_a_dpoconfig(tmp_path):
    from trl import DPOConfig

    recipe = dpo_recipe(tmp_path, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.2])
    args = recipe.trl_config()
    assert isinstance(args, DPOConfig)
    assert (args.beta, args.loss_type, args.loss_weights, args.remove_unused_columns) == (
        0.5, ["sigmoid", "sft"], [1.0, 0.2], False)
    assert recipe.to_dict()["training"]["method"] == "dpo"


@pytest.mark.parametrize("training, data_format, message", [
    ({"method": "dpo", "packing": True}, "preference", "training.packing: unknown key"),
    ({"beta": 0.1}, "chartqa", "training.beta: unknown key"),
    ({"method": "dpo", "bta": 0.1}, "preference", "did you mean 'beta'?"),
    ({"method": "dpo", "beta": "high"}, "preference", "training.beta: expected float"),
    ({"method": "dpo", "precompute_ref_log_probs": True}, "preference", "training.precompute_ref_log_probs: not "
                                                                         "supported"),
    ({"method": "dpo"}, "chartqa", "training.method: dpo trains on data.format preference"),
    ({}, "preference", "data.format: preference rows train with training.method: dpo"),
    ({"method": "ppo"}, "preference", "training.method: unknown method 'ppo'"),
])
def test_bad_dpo_recipes_name_the_key(training, data_format, message):
    with pytest.raises(RecipeError, match=message.replace("?", r"\?").replace("(", r"\(")):
        load_recipe({"model": {"name_or_path": "zoo:qwen2_vl"}, "data": {"path": "x", "format": data_format},
                     "training": training})


def test_shipped_dpo_recipe_continues_from_the_sft_run():
    recipe = load_recipe(ROOT / "recipes/tiny-chartqa-dpo.yaml")
    assert recipe.training.method == "dpo" and recipe.data.format == "preference"
    assert recipe.model.adapter == "runs/tiny-chartqa"
    assert recipe.data.system_prompt == load_recipe(ROOT / "recipes/tiny-chartqa.yaml").data.system_prompt or (
        recipe.data.system_prompt.startswith("You are a Vision Language Model specialized"))


# --- the preference format --------------------------------------------------------------------------------------


def test_preference_rows_plain_rlaifv_and_trl_conversational():
    plain = preference({"image": "a.png", "prompt": "Q?", "chosen": " yes ", "rejected": "no"}, None)
    assert plain["messages"] == [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q?"}]}]
    assert (plain["images"], plain["chosen"], plain["rejected"]) == (["a.png"], "yes", "no")
    trl_row = {"images": ["a.png", "b.png"], "prompt": [{"role": "user", "content": "Compare."}],
               "chosen": [{"role": "assistant", "content": "Same."}],
               "rejected": [{"role": "assistant", "content": [{"type": "text", "text": "Different."}]}]}
    row = preference(trl_row, "Be brief.")
    assert [m["role"] for m in row["messages"]] == ["system", "user"]
    assert row["messages"][1]["content"] == [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Compare."}]
    assert (row["chosen"], row["rejected"]) == ("Same.", "Different.")
    with pytest.raises(RowError, match="column 'rejected' is empty"):
        preference({"image": "a.png", "prompt": "Q?", "chosen": "yes", "rejected": " "}, None)
    with pytest.raises(RowError, match="no value in column 'chosen'"):
        preference({"image": "a.png", "prompt": "Q?", "rejected": "no"}, None)


def test_rlaifv_columns_map_and_images_stay_inside_the_root(tmp_path):
    image(0).save(tmp_path / "c.png")
    rows = [{"image": "c.png", "question": "What is shown?", "chosen": "A chart.", "rejected": "A cat."},
            {"image": "../outside.png", "question": "Q", "chosen": "a", "rejected": "b"}]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = dpo_recipe(tmp_path, data={"path": str(tmp_path), "format": "preference",
                                        "columns": {"prompt": "question"}})
    chat = chat_rows(source_rows(recipe.data, "train"), RowReader(recipe.data))
    assert chat[0]["problem"] is None and chat[0]["chosen"] == "A chart." and chat[0]["rejected"] == "A cat."
    assert chat[0]["messages"][-1]["content"][-1]["text"] == "What is shown?" and chat[0]["images"][0].size == (64, 64)
    assert chat[1]["problem"].startswith("outside image root: ../outside.png")


def test_scan_measures_both_replies_and_drops_a_pair_whose_longer_reply_does_not_fit(tmp_path):
    from finetune.training.pipeline import load_processing, scanned

    image(0).save(tmp_path / "c.png")
    long = " ".join(["word"] * 60)
    rows = [{"image": "c.png", "prompt": "Q?", "chosen": "short", "rejected": "short too"},
            {"image": "c.png", "prompt": "Q?", "chosen": "short", "rejected": long},
            {"image": "c.png", "prompt": "Q?", "chosen": long, "rejected": "short"}]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = dpo_recipe(tmp_path, data={"path": str(tmp_path), "format": "preference"})
    _, family, processor, collator = load_processing(recipe)
    prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q?"}]}]
    batch = collator([{"messages": prompt, "images": [image(0)], "chosen": "short", "rejected": "short too"}])
    fits = int(batch["attention_mask"].sum(1).max())
    recipe = dpo_recipe(tmp_path, data={"path": str(tmp_path), "format": "preference"}, max_length=fits + 10)
    _, scan = scanned(recipe, "train", family, collator)
    assert scan.kept_row_ids == [0] and scan.lengths == [fits]
    assert scan.dropped == {f"longer than training.max_length={fits + 10}": [1, 2]}


# --- which tokens enter the log-probs ---------------------------------------------------------------------------

DPO_FAMILIES = ["qwen2_vl", "idefics3", "gemma3", "paligemma", "llava", "qwen3_5", "qwen3_5_moe", "qwen3_vl_moe",
                "gemma4", "gemma3n"]


@pytest.mark.parametrize("family", DPO_FAMILIES)
def test_only_completion_tokens_and_end_of_turn_enter_the_logprobs(family):
    processor = AutoProcessor.from_pretrained(zoo.ensure(family))
    collator = PreferenceCollator(processor, FAMILIES[family])
    rows = [{"messages": PROMPT, "images": [image(0)], "chosen": "The tallest bar is red.", "rejected": "Blue."},
            {"messages": PROMPT, "images": [image(1, (48, 80))], "chosen": "Green.",
             "rejected": "It is the purple one, on the left."}]
    batch = collator(rows)
    tok = processor.tokenizer
    traits = template_traits(processor, FAMILIES[family])
    end = traits.end_token
    ids, mask, attention = batch["input_ids"], batch["completion_mask"].bool(), batch["attention_mask"]
    assert ids.shape[0] == 4  # chosen 0, chosen 1, rejected 0, rejected 1
    replies = [rows[0]["chosen"], rows[1]["chosen"], rows[0]["rejected"], rows[1]["rejected"]]
    for i, reply in enumerate(replies):
        scored = ids[i][mask[i]].tolist()
        positions = mask[i].nonzero().flatten()
        assert (positions.diff() == 1).all(), "one contiguous run: the reply"
        # Exactly the reply's tokens as rendered (some templates put a space before it) and the end-of-turn token.
        candidates = [tok.encode(traits.reply_lead + text, add_special_tokens=False) +
                      tok.encode(end, add_special_tokens=False) for text in (reply, " " + reply)]
        assert scored in candidates, (family, tok.decode(scored), reply)
        assert tok.decode(scored[-1:]) == end
        # The same prompt precedes both replies of a pair.
        pair = (i + 2) % 4
        first = int(positions[0])
        assert torch.equal(ids[i][:first], ids[pair][:first])
    image_ids = torch.tensor(collator.image_token_ids)
    assert torch.isin(ids, image_ids).any(), "the batch must hold image tokens for this test to mean anything"
    assert not torch.isin(ids[mask], image_ids).any()
    assert (attention == 0).any() and not mask[attention == 0].any(), "padding never scored"


def test_dpo_trainer_scores_exactly_the_completion_tokens(tmp_path):
    """TRL's log-probs for the collated batch equal the sum of log p(token) over the completion mask computed by
    hand, under the policy and under the reference (base, adapter disabled)."""
    from finetune.evaluation.preference import pair_logps
    from finetune.training.dpo import reference
    from finetune.training.pipeline import prepare

    run = prepare(dpo_recipe(tmp_path))
    trainer, model = run.trainer, run.trainer.model
    with torch.no_grad():  # make the adapter non-zero, so policy and reference differ
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    model.eval()
    rows = [run.train_data[i] for i in range(3)]
    batch = trainer.data_collator(rows)
    device = next(model.parameters()).device  # the trainer placed the model (a GPU where there is one)
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100).to(device)
    inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items() if k != "completion_mask"}
    with torch.no_grad():
        trl_policy = model(**inputs, labels=labels, fused_lm_head=True).log_probs.sum(1)
        with reference(model):
            trl_ref = model(**inputs, labels=labels, fused_lm_head=True).log_probs.sum(1)
        with model.disable_adapter():
            base_chosen, base_rejected = pair_logps(model, trainer.data_collator, rows)
    chosen, rejected = pair_logps(model, trainer.data_collator, rows)
    torch.testing.assert_close(trl_policy, torch.cat([chosen, rejected]).to(device), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(trl_ref, torch.cat([base_chosen, base_rejected]).to(device), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(trl_policy, trl_ref)


# --- training ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory):
    """A tiny SFT run, then a DPO run continuing from its adapter; evaluated on the pairs it trained on."""
    from finetune.data.formats import CHARTQA_SYSTEM_PROMPT
    from finetune.training.pipeline import train

    tmp_path = tmp_path_factory.mktemp("dpo")
    sft = train(load_recipe(tiny_recipe(
        tmp_path / "sft", without=["training.logging_steps", "training.activation_checkpointing"],
        data={"max_samples": 8}, lora={"r": 8, "alpha": 16},
        training={"per_device_train_batch_size": 4, "learning_rate": 1e-3})))
    recipe = dpo_recipe(tmp_path, f"model.adapter={sft}", max_steps=12)
    recipe.data.system_prompt = CHARTQA_SYSTEM_PROMPT  # as the SFT adapter was trained
    recipe.data.eval_split = "train"  # the rows it trained on: the margin there must have grown
    return sft, train(recipe)


def test_dpo_run_from_an_sft_adapter_raises_the_margin_and_writes_the_run_folder(dpo_run):
    sft, out = dpo_run
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["method"] == "dpo" and summary["start_adapter"] == str(sft)
    curves = summary["dpo"]["curves"]
    assert len(curves) == 12 and {"rewards/margins", "rewards/accuracies", "logps/chosen"} <= set(curves[0])
    # Step 1: the policy is the reference (the SFT adapter as loaded), so the margin is exactly 0.
    assert curves[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    assert summary["dpo"]["final"]["rewards/margins"] > 0.1
    metrics = json.loads((out / "eval/metrics.json").read_text())
    assert metrics["reference"] == str(sft)
    assert metrics["logp_margin"]["after"] > metrics["logp_margin"]["before"] + 0.5
    assert metrics["preference_accuracy"]["after"] >= metrics["preference_accuracy"]["before"]
    assert not (out / "ref").exists() and (out / "adapter_model.safetensors").is_file()
    assert (out / "dpo_curves.png").is_file() and "preference accuracy" in (out / "report.md").read_text()
    # The run folder's adapter continues the SFT one: same LoRA layout, other weights.
    sft_cfg, dpo_cfg = (json.loads((p / "adapter_config.json").read_text()) for p in (sft, out))
    assert (sft_cfg["r"], sorted(sft_cfg["target_modules"])) == (dpo_cfg["r"], sorted(dpo_cfg["target_modules"]))
    from safetensors.torch import load_file

    before, after = (load_file(p / "adapter_model.safetensors") for p in (sft, out))
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)


def test_finetune_eval_on_a_dpo_run_folder_reproduces_its_generation_score(dpo_run):
    from finetune.evaluation.heldout import evaluate

    _, out = dpo_run
    metrics = json.loads((out / "eval/metrics.json").read_text())
    result = evaluate(out, limit=metrics["n"], out_dir=out / "eval-again", max_new_tokens=4, batch_size=4)
    assert (result["metric"], result["n"]) == ("relaxed_accuracy", metrics["n"])
    assert result["score"] == metrics["generation"]["after"]


def test_an_adapter_of_another_base_model_is_refused(dpo_run, tmp_path):
    from finetune.training.pipeline import prepare

    sft, _ = dpo_run
    with pytest.raises(RecipeError, match=f"model.adapter: {sft} was trained on zoo:qwen2_vl, not on zoo:llava"):
        prepare(dpo_recipe(tmp_path, f"model.adapter={sft}", "model.name_or_path=zoo:llava"))


def test_merge_and_push_a_dpo_run_folder(dpo_run, monkeypatch):
    import huggingface_hub.constants
    from hub_server import serve

    import finetune
    from finetune.export.merging import merge

    _, out = dpo_run
    merged = merge(out)  # parity-checked on the eval rows' prompts with their chosen reply
    parity = json.loads((merged / "parity.json").read_text())
    assert parity["passed"] and parity["checked"]
    with serve() as hub:
        monkeypatch.setenv("HF_TOKEN", "hf_test")
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        finetune.push(out, "alice/tiny-dpo")
        (commit,) = hub.commits
    assert commit["files"]["adapter_model.safetensors"] == (out / "adapter_model.safetensors").read_bytes()
    assert not any(name.startswith("ref/") for name in commit["files"])
    card = commit["files"]["README.md"].decode()
    metrics = json.loads((out / "eval/metrics.json").read_text())
    assert (f"| preference accuracy (chosen likelier than rejected) | {metrics['preference_accuracy']['before']:.3f}"
            in card)


def test_demo_pairs_are_the_chart_sample_with_a_wrong_answer_rejected():
    import subprocess
    import sys

    check = subprocess.run([sys.executable, "scripts/make_chartqa_preference.py", "--check"], cwd=ROOT,
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    for split in ("train", "test"):
        source = [json.loads(line) for line in (ROOT / f"data/chartqa-tiny/{split}.jsonl").read_text().splitlines()]
        pairs = [json.loads(line) for line in (ROOT / f"data/chartqa-tiny-dpo/{split}.jsonl").read_text().splitlines()]
        assert len(pairs) == len(source)
        for row, pair in zip(source, pairs):
            assert (pair["image"], pair["prompt"], pair["chosen"]) == (row["image"], row["query"], row["label"][0])
            assert pair["rejected"] != pair["chosen"]
            assert pair["rejected"].isdigit() == pair["chosen"].isdigit()  # a count for a count, a colour for a colour


def test_qlora_dpo_from_a_fresh_adapter_trains_only_lora_against_the_base(tmp_path):
    """QLoRA (NF4 decoder) with a fresh adapter: the reference is the base with the adapter disabled, so the first
    step's reward margin is exactly 0 (LoRA's B starts at zero); only LoRA tensors change."""
    import bitsandbytes as bnb

    from finetune.training.pipeline import prepare

    run = prepare(dpo_recipe(tmp_path, "quantization.load_in_4bit=true", max_steps=4))
    model = run.trainer.model
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    assert "ref" not in model.peft_config  # no copy of anything: the base is the reference
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    run.trainer.train()
    logs = [e for e in run.trainer.state.log_history if "rewards/margins" in e]
    assert len(logs) == 4 and logs[0]["rewards/margins"] == 0.0
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in logs)
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}
    assert changed and all("lora_" in n for n in changed)


@pytest.mark.parametrize("family", DPO_FAMILIES)
def test_dpo_trains_in_every_listed_family(family, tmp_path):
    from finetune.training.pipeline import prepare

    recipe = dpo_recipe(tmp_path, f"model.name_or_path=zoo:{family}", "data.max_samples=4", max_steps=2,
                        per_device_train_batch_size=2)
    run = prepare(recipe)
    run.trainer.train()
    logs = [e for e in run.trainer.state.log_history if "rewards/margins" in e]
    assert len(logs) == 2 and logs[0]["rewards/margins"] == 0.0 and logs[1]["rewards/margins"] != 0.0
    assert all(e["logps/chosen"] < 0 and e["logps/rejected"] < 0 for e in logs)


def test_a_resumed_dpo_run_from_an_sft_adapter_equals_the_uninterrupted_one(dpo_run, tmp_path, capsys):
    """Resuming restores the trained adapter; the reference stays the SFT adapter as it started (it is rebuilt from
    model.adapter, not from the checkpoint), so the resumed run ends with the same weights."""
    import shutil

    from safetensors.torch import load_file

    from finetune.training.pipeline import train

    sft, _ = dpo_run
    settings = (f"model.adapter={sft}", "evaluation.enabled=false")
    steps = dict(max_steps=4, save_strategy="steps", save_steps=2)
    whole = train(dpo_recipe(tmp_path / "whole", *settings, **steps))
    again = tmp_path / "again" / "dpo"
    again.mkdir(parents=True)
    shutil.copytree(whole / "checkpoint-2", again / "checkpoint-2")
    capsys.readouterr()
    resumed = train(dpo_recipe(tmp_path / "again", *settings, resume="auto", **steps))
    assert f"resuming from {again / 'checkpoint-2'} (step 2)" in capsys.readouterr().out
    a, b = (load_file(p / "adapter_model.safetensors") for p in (whole, resumed))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    margins = [json.loads((p / "run_summary.json").read_text())["dpo"]["curves"][-1]["rewards/margins"]
               for p in (whole, resumed)]
    assert margins[0] == pytest.approx(margins[1], abs=1e-5)
