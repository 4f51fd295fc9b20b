"""The three entry points (CLI, `python -m` / accelerate, Python API) run the same pipeline."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import finetune
from conftest import ROOT
from finetune.recipe import RecipeError

BIN = Path(sys.executable).parent
QUICK = ["training.max_steps=3", "training.logging_steps=1", "data.max_samples=8", "data.eval_split=null",
         "model.name_or_path=zoo:qwen2_vl"]


def run(*args, check=True):
    result = subprocess.run([*args], cwd=ROOT, capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"})
    if check and result.returncode != 0:
        raise AssertionError(result.stdout[-3000:] + result.stderr[-3000:])
    return result


def resolved_batch():
    return finetune.load_recipe(ROOT / "recipes/tiny-chartqa.yaml").training.per_device_train_batch_size


def test_help_lists_commands_and_examples():
    out = run(str(BIN / "finetune"), "--help").stdout
    for word in ("train", "check", "examples:", "training.max_steps=20"):
        assert word in out
    train_help = run(str(BIN / "finetune"), "train", "--help").stdout
    assert "KEY=VALUE" in train_help and "--overwrite" in train_help
    assert "--show-labels" in run(str(BIN / "finetune"), "check", "--help").stdout


def test_cli_train_writes_a_complete_run_folder(tmp_path):
    out = tmp_path / "run"
    result = run(str(BIN / "finetune"), "train", "recipes/tiny-chartqa.yaml", *QUICK, f"training.output_dir={out}")
    assert "trainable parameters: decoder" in result.stdout and "projector" in result.stdout
    for name in ("adapter_model.safetensors", "adapter_config.json", "processor_config.json", "tokenizer.json",
                 "chat_template.jinja", "recipe.yaml", "run_summary.json", "loss_curve.png"):
        assert (out / name).is_file(), name
    assert not list(out.glob("*.bin")) and not list(out.glob("*.pt")), "no pickle files"
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["steps"] == 3 and len(summary["loss_curve"]) == 3
    assert summary["trainable_parameters"]["decoder"] > 0 and summary["trainable_parameters"]["projector"] > 0
    assert summary["trainable_parameters"]["vision"] == 0
    assert summary["train_data"]["rows"] == 8 and summary["train_data"]["kept"] == 8
    speed = summary["throughput"]
    assert speed["samples"] == 3 * resolved_batch() and speed["tokens_per_second"] > 0
    assert 0 <= speed["padding_fraction"] < 1
    resolved = finetune.load_recipe(out / "recipe.yaml")
    assert resolved.training.max_steps == 3 and resolved.model.name_or_path == "zoo:qwen2_vl"

    again = run(str(BIN / "finetune"), "train", "recipes/tiny-chartqa.yaml", *QUICK, f"training.output_dir={out}",
                check=False)
    assert again.returncode == 1 and "already holds files from an earlier run" in again.stderr
    assert (out / "adapter_model.safetensors").is_file(), "the earlier run is untouched"


def test_python_api_and_module_entry_point_give_the_same_adapter(tmp_path):
    import torch
    from safetensors.torch import load_file

    api_out = finetune.train("recipes/tiny-chartqa.yaml", [*QUICK, f"training.output_dir={tmp_path / 'api'}"])
    assert api_out == tmp_path / "api"
    run(str(BIN / "accelerate"), "launch", "--cpu", "--num_processes", "1", "-m", "finetune", "train",
        "recipes/tiny-chartqa.yaml", *QUICK, f"training.output_dir={tmp_path / 'accel'}")
    a = load_file(api_out / "adapter_model.safetensors")
    b = load_file(tmp_path / "accel" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a), "same recipe, same seed: same adapter"


def test_check_shows_which_tokens_carry_loss():
    result = run(str(BIN / "finetune"), "check", "recipes/tiny-chartqa.yaml", "--show-labels", "1",
                 "model.name_or_path=zoo:qwen2_vl")
    assert "1000 rows, 1000 trainable" in result.stdout
    marked = result.stdout.split("carry loss ---", 1)[1]
    assert "<|image_pad|>x" in marked  # image tokens collapsed, outside the marks
    trained = marked.split("[[", 1)[1].split("]]", 1)[0]
    assert trained.endswith("<|im_end|>") and trained[:-len("<|im_end|>")] in {
        "red", "green", "blue", "orange", "purple", "yellow", "2", "3", "4", "5"}


def test_cli_reports_recipe_errors_without_a_traceback(tmp_path):
    result = run(str(BIN / "finetune"), "train", "recipes/tiny-chartqa.yaml", "lora.r=0", check=False)
    assert result.returncode == 1
    assert "finetune: error: recipes/tiny-chartqa.yaml: lora.r: must be > 0, got 0" in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_model_type_lists_supported_families(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=32, hidden_size=8, num_hidden_layers=1, num_attention_heads=1).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"model type 'llama' is not in finetune's model-family table.*qwen2_5_vl"):
        finetune.check({"model": {"name_or_path": str(tmp_path)}, "data": {"path": "x"}})
    with pytest.raises(RecipeError):
        finetune.check({"model": {"name_or_path": str(tmp_path)}, "data": {"path": "x", "format": "nope"}})
