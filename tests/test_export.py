"""`finetune merge`: merged exports reload from their folder alone and reproduce base + adapter, LoRA and QLoRA."""

import json
import re
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
import yaml
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

import conftest
from conftest import ROOT
from finetune import cli
from finetune.export.card import render_card
from finetune.batching.collate import ChatCollator
from finetune.export.merging import ExportError, ParityError, merge, parity_rows, serving_warnings
from finetune.batching.template import template_traits
from finetune.models.families import FAMILIES
from finetune.models.loading import load_family, load_model
from finetune.training.pipeline import train
from finetune.recipe import load_recipe

MERGE_FAMILIES = ["llava", "qwen2_5_vl", "idefics3", "gemma3", "qwen3_5", "qwen3_5_moe", "qwen3_vl_moe", "gemma4",
                  "gemma3n"]
CHART = ROOT / "data/chartqa-tiny/images/test-0000.png"


def tiny_recipe(family, out, qlora=False, *extra):
    # LoRA B starts at zero: the tiny recipe's high learning rate (1e-2) makes the adapter change the logits visibly
    # in its 2 steps.
    return load_recipe(conftest.tiny_recipe(
        out, model={"name_or_path": f"zoo:{family}:tiny"}, data={"system_prompt": "", "eval_split": "test"},
        quantization={"load_in_4bit": qlora}), list(extra))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Trained runs, made on first use and shared by every test of this module."""
    cache = {}

    def get(family, qlora=False):
        if (family, qlora) not in cache:
            out = tmp_path_factory.mktemp("runs") / f"{family}-{'qlora' if qlora else 'lora'}"
            cache[family, qlora] = train(tiny_recipe(family, out, qlora))
        return cache[family, qlora]

    return get


@pytest.fixture(scope="module")
def exports(runs, tmp_path_factory):
    """Merged exports (parity-checked by `merge` itself), made on first use."""
    cache = {}

    def get(family, qlora=False, onto="original", dtype="float32"):
        key = (family, qlora, onto, dtype)
        if key not in cache:
            cache[key] = merge(runs(family, qlora), tmp_path_factory.mktemp("exports") / "merged", dtype=dtype,
                               onto=onto)
        return cache[key]

    return get


@torch.no_grad()
def logits(model, processor, family, rows):
    batch = ChatCollator(processor, family)(rows)
    batch.pop("labels")
    return model.eval()(**batch).logits


def adapter_model(run_dir, base):
    from peft import PeftModel

    return PeftModel.from_pretrained(base, str(run_dir)).eval()


@pytest.mark.parametrize("qlora", [False, True], ids=["lora", "qlora"])
@pytest.mark.parametrize("family", MERGE_FAMILIES)
def test_merged_export_reloads_alone_and_matches_base_plus_adapter(family, qlora, runs, exports):
    run_dir, out = runs(family, qlora), exports(family, qlora)
    for name in ("model.safetensors", "config.json", "generation_config.json", "processor_config.json",
                 "tokenizer.json", "chat_template.jinja", "README.md", "parity.json", "recipe.yaml"):
        assert (out / name).is_file(), name
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"

    # The export on its own: plain transformers classes, nothing from the run folder.
    merged = AutoModelForImageTextToText.from_pretrained(out)
    processor = AutoProcessor.from_pretrained(out)
    assert not any("lora_" in k for k in merged.state_dict())
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in merged.modules())

    recipe = load_recipe(run_dir / "recipe.yaml")
    base_path, family_entry = load_family(recipe.model)
    rows = parity_rows(recipe, 4)
    base = AutoModelForImageTextToText.from_pretrained(base_path, dtype=torch.float32)  # 16/32-bit, never NF4
    base_logits = logits(base, processor, family_entry, rows)
    reference = logits(adapter_model(run_dir, base), processor, family_entry, rows)
    merged_logits = logits(merged, processor, family_entry, rows)
    assert (reference - merged_logits).abs().max() < 1e-4
    assert (base_logits - merged_logits).abs().max() > 1e-2, "the adapter changes the model: the merge is not a no-op"

    parity = json.loads((out / "parity.json").read_text())
    assert parity["passed"] and parity["tolerance"] == 1e-4 and parity["max_abs_diff"] < 1e-4
    comparison = parity["comparison"]
    # 4 samples x (answer token + end of turn, after the template's reply lead: Qwen3.5's closed think block)
    lead = len(processor.tokenizer.encode(template_traits(processor, family_entry).reply_lead, add_special_tokens=False))
    assert comparison["supervised_positions"]["positions"] == 4 * (2 + lead)
    assert comparison["supervised_positions"]["kl_mean"] < 1e-9
    assert comparison["generation"]["agree"] == comparison["generation"]["total"] == 4
    assert parity["merge"] == {"dtype": "float32", "onto": "original", "qlora": qlora, "family": family_entry.name,
                               "base_model": f"zoo:{family}:tiny", "run": run_dir.name}
    # Merging a QLoRA adapter onto the original 16-bit weights is not what was trained: the NF4 gap is reported.
    if qlora:
        assert parity["nf4_gap"]["comparison"]["text_positions"]["max_abs_diff"] > 1e-2
    else:
        assert "nf4_gap" not in parity


@pytest.mark.parametrize("family", MERGE_FAMILIES)
def test_qlora_merge_onto_dequantized_weights_reproduces_the_trained_model(family, runs, exports):
    run_dir, out = runs(family, qlora=True), exports(family, qlora=True, onto="dequantized")
    recipe = load_recipe(run_dir / "recipe.yaml")
    base_path, family_entry = load_family(recipe.model)
    rows = parity_rows(recipe, 4)
    processor = AutoProcessor.from_pretrained(out)
    nf4 = load_model(base_path, recipe.model, recipe.quantization, family_entry)
    trained = logits(adapter_model(run_dir, nf4), processor, family_entry, rows)
    merged = logits(AutoModelForImageTextToText.from_pretrained(out), processor, family_entry, rows)
    assert (trained - merged).abs().max() < 1e-4  # what the adapter was trained against, now in plain weights

    parity = json.loads((out / "parity.json").read_text())
    assert parity["passed"] and parity["merge"]["onto"] == "dequantized"
    gap = parity["nf4_gap"]["comparison"]
    assert gap["text_positions"]["max_abs_diff"] < 1e-4 and gap["generation"]["agree"] == 4
    assert "merged onto the NF4-dequantized weights" in (out / "README.md").read_text()
    assert "merged onto the original 16-bit base weights" in (exports(family, qlora=True) / "README.md").read_text()


def test_bfloat16_export_is_checked_with_its_own_tolerance(runs, exports):
    out = exports("llava", dtype="bfloat16")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    parity = json.loads((out / "parity.json").read_text())
    assert parity["passed"] and parity["tolerance"] == 1.0
    # bf16 rounding, measured against the float32 base + adapter: visible, small, greedy answers unchanged.
    assert 1e-4 < parity["max_abs_diff"] < 0.1
    assert parity["comparison"]["generation"]["agree"] == 4


def test_parity_failure_fails_loudly(runs, tmp_path, capsys):
    out = tmp_path / "export"
    code = cli.main(["merge", str(runs("llava")), "--out", str(out), "--dtype", "bfloat16", "--tolerance", "1e-9"])
    assert code == 1
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("finetune: error:") and "above the tolerance 1e-09 for bfloat16" in last
    parity = json.loads((out / "parity.json").read_text())
    assert parity["passed"] is False and parity["max_abs_diff"] > 1e-9
    with pytest.raises(ParityError):
        merge(runs("llava"), out, dtype="bfloat16", tolerance=1e-9, overwrite=True)


def test_merge_refuses_what_it_cannot_do(runs, tmp_path):
    with pytest.raises(ExportError, match="not a QLoRA run"):
        merge(runs("llava"), tmp_path / "a", onto="dequantized")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "keep.txt").write_text("x")
    with pytest.raises(ExportError, match="already holds files"):
        merge(runs("llava"), tmp_path / "b")
    with pytest.raises(ExportError, match="not a training run folder"):
        merge(tmp_path / "b")


@pytest.mark.parametrize("family", ["llava", "gemma3", "qwen3_vl_moe"])
def test_exports_are_written_in_the_published_tensor_layout(family, runs, exports):
    # transformers 5 saves CLIP/SigLIP towers without `vision_model.` and Qwen3-VL-MoE's fused experts as
    # (experts, out, in); the published checkpoints, which vLLM and llama.cpp's converter read, have
    # `vision_tower.vision_model.` and (experts, in, out). The parity check reloaded these very files.
    out = exports(family)
    assert json.loads((out / "parity.json").read_text())["layout"] == "published"
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    if family == "qwen3_vl_moe":
        text = AutoConfig.from_pretrained(out).text_config
        # down_proj: (experts, hidden, inter) in memory. (gate_up_proj is square in the tiny zoo, which
        # transformers cannot tell apart from its transpose, so it stays as saved.)
        experts = {k: v for k, v in shapes.items() if k.endswith("layers.0.mlp.experts.down_proj")}
        assert list(experts.values()) == [(text.num_experts, text.moe_intermediate_size, text.hidden_size)]
    else:
        tower = [k for k in shapes if k.startswith("vision_tower.")]
        assert tower and all(k.startswith("vision_tower.vision_model.") for k in tower)


def test_adapters_outside_the_language_model_are_flagged(runs, exports, tmp_path, capsys):
    family = FAMILIES["gemma3"]
    warnings = serving_warnings(runs("gemma3"), family)  # decoder + the projector's raw parameter
    assert len(warnings) == 1 and "projector" in warnings[0] and "vLLM" in warnings[0]
    card = render_card(runs("gemma3"), kind="adapter")
    assert "## Serving" in card and "finetune serve --adapter" in card


def _front_matter(card: str) -> dict:
    return yaml.safe_load(re.match(r"^---\n(.*?)\n---\n", card, re.S)[1])


def _quick_start(card: str, repo: str, replacement: str) -> str:
    code = re.search(r"```python\n(.*?)```", card, re.S)[1]
    assert f"repo_id = {repo!r}" in code
    return code.replace(repr(repo), repr(replacement)).replace('"image.png"', repr(str(CHART)))


def test_cards_are_vlm_aware_and_their_quick_starts_run(runs, exports, capsys):
    out = exports("qwen2_5_vl")
    card = (out / "README.md").read_text()
    meta = _front_matter(card)
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "image-text-to-text"
    assert meta["tags"] == ["finetune", "lora", "qwen2_5_vl", "vision-language", "merged"]
    assert "base_model" not in meta, "a zoo model is not on the Hub"
    assert "/tmp" not in card and str(out) not in card and "| text (" in card
    assert "serves as a plain model" in card  # the projector adapter is inside the merged weights
    assert "vllm serve <your-namespace>/<repo-name> --dtype float32 --max-model-len 1024" in card
    capsys.readouterr()
    exec(_quick_start(card, "<your-namespace>/<repo-name>", str(out)), {})  # image + text, from the export alone
    assert capsys.readouterr().out.strip() != ""

    run_dir = runs("gemma3", qlora=True)
    card = render_card(run_dir, kind="adapter", repo_id="alice/gemma3-tiny")
    meta = _front_matter(card)
    assert meta["library_name"] == "peft" and meta["tags"][:3] == ["finetune", "qlora", "gemma3"]
    assert "PeftModel.from_pretrained" in card and "zoo.ensure('gemma3', 'tiny')" in card
    exec(_quick_start(card, "alice/gemma3-tiny", str(run_dir)), {})


def test_finetune_predict_answers_the_same_from_export_and_adapter(runs, exports):
    import finetune

    question = "Which color is the tallest bar?"
    from_adapter = finetune.predict(runs("idefics3"), question, [str(CHART)], max_new_tokens=8)
    assert finetune.predict(exports("idefics3"), question, [str(CHART)], max_new_tokens=8) == from_adapter


def test_training_writes_the_merged_export_when_the_recipe_asks(tmp_path):
    out = train(tiny_recipe("qwen2_5_vl", tmp_path / "run", False, "export.merge=true",
                            "export.merge_dtype=float32"))
    parity = json.loads((out / "merged" / "parity.json").read_text())
    assert parity["passed"] and parity["max_abs_diff"] < 1e-4 and parity["merge"]["dtype"] == "float32"


def test_merge_keeps_the_base_dtype_unless_asked(runs, tmp_path):
    from types import SimpleNamespace

    from finetune.models.loading import stored_dtype

    # The zoo base is stored in float32: the default export is float32, never silently rounded to 16 bits.
    out = merge(runs("llava"), tmp_path / "default")
    report = json.loads((out / "parity.json").read_text())
    assert report["merge"]["dtype"] == "float32" and report["passed"] and report["max_abs_diff"] < 1e-4
    for weights in out.glob("*.safetensors"):
        with safe_open(str(weights), "pt") as f:
            assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}
    # A checkpoint stored in bfloat16 (as the hub's 7B models are) merges to bfloat16 by default.
    base = load_recipe(runs("llava") / "recipe.yaml").model
    folder = tmp_path / "bf16-base"
    folder.mkdir()
    config = json.loads((Path(load_family(base)[0]) / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16"}))
    assert stored_dtype(SimpleNamespace(name_or_path=str(folder), revision=None, trust_remote_code=False)) == "bfloat16"
    assert stored_dtype(base) == "float32"
