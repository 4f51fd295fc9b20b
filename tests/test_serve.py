"""`finetune serve`: exports vLLM answers exactly like `finetune predict`, with or without a system message.

The tests that start vLLM need its environment (`bash scripts/setup.sh vllm`, which CI runs); they are skipped
without it. The rest (templates, generation settings, serving warnings, bad input) run everywhere.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from urllib.request import urlopen

import pytest
import yaml
from safetensors.torch import save_file
import torch
from transformers import AutoProcessor, GenerationConfig

import conftest
from conftest import ROOT
from finetune import cli, zoo
from finetune.data.formats import CHARTQA_SYSTEM_PROMPT
from finetune.export.card import render_card, serving_warnings
from finetune.export.merging import merge
from finetune.export.serve import ServeError, free_port, plan
from finetune.export.serve_check import serve_check
from finetune.models.families import FAMILIES
from finetune.models.loading import with_default_system
from finetune.recipe import load_recipe
from finetune.training.pipeline import train

VLLM = ROOT / ".venv-vllm" / "bin" / "python"
needs_vllm = pytest.mark.skipif(not VLLM.is_file() and not os.environ.get("FINETUNE_VLLM_PYTHON"),
                                reason="vLLM's environment is not built (bash scripts/setup.sh vllm)")
PROMPT = 'Answer with one word.\nUse "quotes" as given; café, 図表.'


def conversation(system=None):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which bar is tallest?"}]}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": [{"type": "text", "text": system}]})
    return messages


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_default_system_prompt_renders_what_predict_sends(family):
    processor = AutoProcessor.from_pretrained(zoo.ensure(family, "tiny"))
    template = processor.chat_template
    served = with_default_system(template, PROMPT)
    assert with_default_system(served, PROMPT) == served  # applied twice: unchanged
    assert with_default_system(template, None) == template

    def rendered(t, messages):
        return processor.apply_chat_template(messages, chat_template=t, add_generation_prompt=True, tokenize=False)

    # No system message: the export renders the training prompt, token for token what predict renders.
    assert rendered(served, conversation()) == rendered(template, conversation(PROMPT))
    assert rendered(served, conversation()) != rendered(template, conversation())
    # A client's own system message wins, rendered as the template always did.
    assert rendered(served, conversation("Be terse.")) == rendered(template, conversation("Be terse."))


@pytest.fixture(scope="module")
def chart_run(tmp_path_factory):
    """A short run on the ChartQA sample with its default system prompt; decoder + projector LoRA."""
    out = tmp_path_factory.mktemp("serve") / "tiny-chartqa"
    recipe = conftest.tiny_recipe(out, data={"eval_split": "test", "max_samples": 256},
                                  training={"max_steps": 150, "per_device_train_batch_size": 8, "learning_rate": 1e-3})
    recipe["model"]["name_or_path"] = "zoo:qwen2_vl:small"
    return train(load_recipe(recipe))


@pytest.fixture(scope="module")
def chart_export(chart_run):
    return merge(chart_run)


def test_the_merged_export_defaults_to_the_training_system_prompt_and_stops_where_predict_stops(chart_run,
                                                                                            chart_export):
    run, export = AutoProcessor.from_pretrained(chart_run), AutoProcessor.from_pretrained(chart_export)
    assert export.chat_template.startswith("{%- if not messages or messages[0]['role'] != 'system' -%}")
    without = export.apply_chat_template(conversation(), add_generation_prompt=True, tokenize=False)
    trained = run.apply_chat_template(conversation(CHARTQA_SYSTEM_PROMPT), add_generation_prompt=True,
                                      tokenize=False)
    assert CHARTQA_SYSTEM_PROMPT in without and without == trained  # what vLLM renders for a client without one
    assert export.tokenizer(without).input_ids == run.tokenizer(trained).input_ids
    assert export.tokenizer.chat_template == export.chat_template
    vocab = export.tokenizer.get_vocab()
    eos = GenerationConfig.from_pretrained(chart_export).eos_token_id
    assert vocab["<|im_end|>"] in eos and export.tokenizer.eos_token_id in eos
    assert json.loads((chart_export / "parity.json").read_text())["merge"]["dtype"] == "float32"


def test_serving_warnings_read_the_adapter_tensors(chart_run, tmp_path):
    # peft shortens target_modules to suffixes (`mlp.0`); only the tensor names say the projector was trained.
    assert "mlp.0" in json.loads((chart_run / "adapter_config.json").read_text())["target_modules"]
    warnings = serving_warnings(chart_run, FAMILIES["qwen2_vl"])
    assert len(warnings) == 1 and "projector" in warnings[0] and "--enable-tower-connector-lora" in warnings[0]
    card = render_card(chart_run, kind="adapter")
    assert "## Serving" in card and "--enable-tower-connector-lora" in card
    decoder_only = tmp_path / "decoder-only"
    decoder_only.mkdir()
    save_file({"base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 2)},
              decoder_only / "adapter_model.safetensors")
    assert serving_warnings(decoder_only, FAMILIES["qwen2_vl"]) == []


def test_bad_input_is_one_line(chart_run, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert cli.main(["serve", str(tmp_path / "empty")]) == 1
    assert "not a training run folder (no adapter_config.json)" in capsys.readouterr().err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert cli.main(["serve", str(chart_run), "--port", str(port)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--port {port}: already in use" in err
    os.environ["FINETUNE_VLLM_PYTHON"] = str(tmp_path / "no-python")
    try:
        assert cli.main(["serve", str(chart_run)]) == 1
    finally:
        del os.environ["FINETUNE_VLLM_PYTHON"]
    assert "FINETUNE_VLLM_PYTHON" in capsys.readouterr().err


@needs_vllm
def test_a_family_vllm_lacks_is_refused_by_name(tmp_path):
    run = tmp_path / "mllama-run"
    run.mkdir()
    (run / "recipe.yaml").write_text(yaml.safe_dump(conftest.tiny_recipe(
        run, model={"name_or_path": "zoo:mllama:tiny"})))
    (run / "adapter_config.json").write_text(json.dumps({"r": 4}))
    with pytest.raises(ServeError, match=r"vLLM \S+ has no implementation of MllamaForConditionalGeneration"):
        plan(run)


@needs_vllm
def test_an_export_from_before_the_serving_settings_is_merged_again(chart_run, chart_export, capsys):
    parity_file = chart_export / "parity.json"
    old = json.loads(parity_file.read_text())
    del old["layout"]
    parity_file.write_text(json.dumps(old))
    (chart_export / "chat_template.jinja").write_text((chart_run / "chat_template.jinja").read_text())
    plan(chart_run)
    assert "re-merging" in capsys.readouterr().out
    assert json.loads(parity_file.read_text())["layout"] == "published"
    assert (chart_export / "chat_template.jinja").read_text().startswith("{%- if not messages")


@needs_vllm
@pytest.mark.parametrize("adapter", [False, True], ids=["merged", "adapter"])
def test_served_answers_equal_predict_with_and_without_a_system_message(chart_run, chart_export, adapter):
    line = serve_check(chart_run, 20, adapter=adapter)
    report = json.loads((chart_run / "serve_check.json").read_text())
    assert report["served"] == ("base + adapter" if adapter else "merged export")
    assert report["without_system_message"] == {"agree": 20, "total": 20, "differ": []}
    assert report["with_system_message"] == {"agree": 20, "total": 20, "differ": []}
    assert "20/20 without system message, 20/20 with system message" in line
    assert len(set(report["answers"])) >= 3  # the run answers the charts, not one string for every row
    command = report["command"]
    assert command[command.index("--dtype") + 1] == "float32"  # not vLLM's default bf16 downcast
    max_length = load_recipe(chart_run / "recipe.yaml").training.max_length
    assert command[command.index("--max-model-len") + 1] == str(max_length)
    if adapter:  # the projector LoRA is kept: without it vLLM answered 9/20 (../shared/reference/vllm-cpu.md)
        assert "--enable-tower-connector-lora" in command


@needs_vllm
def test_serve_prints_the_url_and_stops_on_sigterm(chart_run, chart_export):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "finetune", "serve", str(chart_run), "--port", str(port)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        lines.append(line)
        if "Ctrl-C stops it" in line or process.poll() is not None:
            break
    output = "".join(lines)
    assert f"serving {chart_run.name} at http://127.0.0.1:{port}/v1" in output, output[-2000:]
    assert f"curl http://127.0.0.1:{port}/v1/chat/completions" in output
    with urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=30) as response:
        assert [m["id"] for m in json.loads(response.read())["data"]] == [chart_run.name]
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=60)  # drains vLLM's log while it shuts down
    assert process.returncode == 0
    assert free_port("127.0.0.1", port) == port  # the server is gone: nothing listens there any more
