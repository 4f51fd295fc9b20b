"""The three entry points (CLI, `python -m` / accelerate, Python API) run the same pipeline."""

import importlib
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import finetune
from conftest import ROOT
from finetune import cli
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


# The command table: each subcommand declared once (finetune/cli.py), its call derived from its arguments' names.

def named_parameters(function) -> dict:
    return {name: p for name, p in inspect.signature(function).parameters.items()
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


@pytest.mark.parametrize("command", cli.COMMANDS, ids=lambda c: c.name)
def test_each_subcommand_help_lists_every_declared_argument(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main([command.name, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    unwrapped = "".join(out.split())  # help is wrapped to the terminal, at spaces and hyphens
    assert out.startswith(f"usage: finetune {command.name} ")
    assert "".join(command.description.split()) in unwrapped and "".join(command.epilog.split()) in unwrapped
    for arg in command.args:
        shown = arg.name if arg.name.startswith("-") else arg.options.get("metavar", arg.name)
        assert shown in out, f"{command.name} --help does not list {shown}"
        assert "".join((arg.help or "").split()) in unwrapped
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert f"{command.name}" in capsys.readouterr().out.split("options:")[0]


@pytest.mark.parametrize("command", cli.COMMANDS, ids=lambda c: c.name)
def test_declared_arguments_are_parameters_of_the_function_called(command):
    function = command.load()
    takes = named_parameters(function)
    if command.adapter:  # the adapter's own parameters, after the function it is handed
        takes |= dict(list(named_parameters(command.adapter).items())[1:])
    dests = [a.dest for a in command.args]
    assert len(set(dests)) == len(dests), f"{command.name}: two arguments fill the same keyword"
    missing = [d for d in dests if d not in takes]
    assert not missing, f"{command.function} takes no keyword {missing} (renamed?)"
    required = [n for n, p in named_parameters(function).items() if p.default is p.empty]
    assert not set(required) - set(dests), f"{command.function} needs {required}, the command gives {dests}"


def record(monkeypatch, where: str, raises: Exception | None = None) -> list[dict]:
    """Replace the function `module:name` with one that checks each call against the real signature (a renamed or
    missing keyword fails as it would for real) and records the bound arguments."""
    module, _, name = where.partition(":")
    module = importlib.import_module(module)
    signature, calls = inspect.signature(getattr(module, name)), []

    def fake(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        calls.append(dict(bound.arguments))
        if raises:
            raise raises
        return f"<{name} result>"

    monkeypatch.setattr(module, name, fake)
    return calls


def test_options_map_to_keywords_and_overrides_may_follow_options(monkeypatch, capsys):
    check = record(monkeypatch, "finetune.training.preflight:check")
    assert cli.main(["check", "R", "a.b=1", "--show-labels", "2", "lora.r=8", "--no-data"]) == 0
    assert check[-1] == {"recipe": "R", "overrides": ["a.b=1", "lora.r=8"], "show_labels": 2, "data": False,
                         "accelerate_config": None}
    assert capsys.readouterr().out == "", "check's report is not printed again"

    merge = record(monkeypatch, "finetune.export.merging:merge")
    assert cli.main(["merge", "runs/x"]) == 0
    assert merge[-1]["onto"] == "original" and merge[-1]["parity"] is True and merge[-1]["samples"] == 4
    assert cli.main(["merge", "runs/x", "--onto-dequantized", "--no-parity", "--tolerance", "0.5"]) == 0
    assert merge[-1]["onto"] == "dequantized" and merge[-1]["parity"] is False and merge[-1]["tolerance"] == 0.5

    push = record(monkeypatch, "finetune.export.hub:push")
    assert cli.main(["push", "runs/x", "--repo", "alice/x", "--message", "v1"]) == 0
    assert (push[-1]["repo_id"], push[-1]["commit_message"], push[-1]["private"], push[-1]["merged"]) == \
        ("alice/x", "v1", None, None), "unset --private/--merged stay None: the recipe's export.hub_* decide"
    assert capsys.readouterr().out == "<push result>\n"

    evaluate = record(monkeypatch, "finetune.evaluation.heldout:evaluate")
    assert cli.main(["eval", "runs/x", "--out", "o", "--batch-size", "2"]) == 0
    assert evaluate[-1]["out_dir"] == "o" and evaluate[-1]["batch_size"] == 2


def test_predict_answers_a_prompt_or_a_file(monkeypatch, capsys):
    predict = record(monkeypatch, "finetune.evaluation.conversation:predict")
    predict_file = record(monkeypatch, "finetune.evaluation.conversation:predict_file")
    assert cli.main(["predict", "runs/x", "--prompt", "why?", "--image", "a.png", "--image", "b.png"]) == 0
    assert predict == [{"target": "runs/x", "prompt": "why?", "images": ["a.png", "b.png"], "max_new_tokens": 32}]
    assert cli.main(["predict", "runs/x", "--data", "q.jsonl", "--max-new-tokens", "5"]) == 0
    assert predict_file[0].items() >= {"target": "runs/x", "rows_path": "q.jsonl", "max_new_tokens": 5,
                                       "out_path": "q.jsonl.predictions.jsonl"}.items()
    assert capsys.readouterr().out == "<predict result>\n<predict_file result>\n"
    with pytest.raises(SystemExit) as exit_:
        cli.main(["predict", "runs/x"])
    assert exit_.value.code == 2 and "predict needs --prompt (with --image) or --data" in capsys.readouterr().err
    assert len(predict) == 1 and len(predict_file) == 1


def test_export_gguf_converts_or_sets_up(monkeypatch, capsys):
    export = record(monkeypatch, "finetune.export.gguf:export_gguf")
    setup = record(monkeypatch, "finetune.export.llama_cpp:install_converter")
    assert cli.main(["export-gguf", "runs/x", "--image-tokens", "4:8", "--no-parity"]) == 0
    assert export[-1]["outtypes"] == ["f16"] and export[-1]["image_tokens"] == (4, 8)
    assert export[-1]["parity"] is False and export[-1]["mmproj_outtype"] == "f16"
    assert cli.main(["export-gguf", "runs/x", "--outtype", "q8_0", "--outtype", "q4_k_m"]) == 0
    assert export[-1]["outtypes"] == ["q8_0", "q4_k_m"]
    assert cli.main(["export-gguf", "--setup", "--sdist", "llama.tar.gz"]) == 0
    assert setup[-1]["sdist"] == "llama.tar.gz" and len(export) == 2
    capsys.readouterr()
    for argv, message in ((["export-gguf"], "export-gguf needs a run or merged export folder (or --setup)"),
                          (["export-gguf", "runs/x", "--image-tokens", "8:4"], "expected MIN:MAX with 0 < MIN")):
        with pytest.raises(SystemExit) as exit_:
            cli.main(argv)
        assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert len(export) == 2


@pytest.mark.parametrize("argv, message", [
    (["check", "R", "--bogus"], "unrecognized arguments: --bogus"),
    (["chat", "runs/x", "stray=1"], "unrecognized arguments: stray=1"),  # chat takes no overrides
    (["merge", "runs/x", "--dtype", "int8"], "argument --dtype: invalid choice: 'int8'"),
    (["nope"], "invalid choice: 'nope'"),
])
def test_usage_errors_exit_2_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_errors_become_exit_codes(monkeypatch, capsys):
    from finetune.errors import SourceNotFound
    from finetune.training import TrainingInterrupted

    for error, code in ((RecipeError("r.yaml: lora.r: must be > 0"), 1), (SourceNotFound("no such model"), 2),
                        (TrainingInterrupted("stopped at step 3, resumable"), 130)):
        record(monkeypatch, "finetune.training.pipeline:train", raises=error)
        assert cli.main(["train", "r.yaml"]) == code
        assert str(error) in capsys.readouterr().err
    assert cli.main([]) == 2 and "COMMAND" in capsys.readouterr().out


def test_help_and_version_import_no_torch():
    code = ("import sys\nfrom finetune import cli\n"
            "for argv in ([], ['--help'], *([c.name, '--help'] for c in cli.COMMANDS), ['--version']):\n"
            "    try:\n        cli.main(argv)\n    except SystemExit:\n        pass\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'trl', 'peft')))")
    result = run(sys.executable, "-c", code)
    assert result.stdout.strip().splitlines()[-1] == "[]"
    assert finetune.__version__ in result.stdout.splitlines()
