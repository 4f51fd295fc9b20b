"""`finetune export-gguf`: GGUF files llama.cpp runs as the merged model answers, per family, with the checks that
refuse a wrong tokenizer or a wrong image resolution. Needs the `gguf` extra (`bash scripts/setup.sh gguf`)."""

import io
import re
import json
import sys
import tarfile

import pytest
import yaml

from conftest import ROOT, tiny_recipe
from finetune import cli
from finetune.export import ExportError, ParityError
from finetune.export.gguf import check_tokenizer, export_gguf, image_token_limits
from finetune.export.gguf_strings import tokenizer_strings
from finetune.export.llama_cpp import Runtime, convert, install_converter
from finetune.evaluation.conversation import recipe_system_prompt
from finetune.export.merging import parity_rows
from finetune.models.loading import with_default_system
from finetune.models.families import FAMILIES
from finetune.recipe import load_recipe
from finetune.training.pipeline import train

llama_cpp = pytest.importorskip("llama_cpp", reason="the gguf extra is not installed (bash scripts/setup.sh gguf)")

GGUF_FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "gemma3", "smolvlm"]


def recipe(family, out, *extra):
    return load_recipe(tiny_recipe(
        out, model={"name_or_path": f"zoo:{family}:small"}, data={"max_samples": 24, "eval_split": "test"},
        lora={"r": 8, "alpha": 16}, training={"max_steps": 6, "per_device_train_batch_size": 4, "learning_rate": 5e-3}),
        list(extra))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Trained runs, made on first use; qwen2_vl's recipe asks for its GGUF files itself (export.gguf)."""
    cache = {}

    def get(family):
        if family not in cache:
            extra = ["export.gguf=[f16, q4_k_m]"] if family == "qwen2_vl" else []
            cache[family] = train(recipe(family, tmp_path_factory.mktemp("gguf") / family, *extra))
        return cache[family]

    return get


@pytest.fixture(scope="module")
def exports(runs):
    cache = {}

    def get(family):
        if family not in cache:
            run = runs(family)
            cache[family] = run / "gguf" if family == "qwen2_vl" else export_gguf(run, ["f16", "q4_k_m"], samples=8)
        return cache[family]

    return get


def served_template(run_dir) -> str:
    """The run's template with its system prompt as the default, as the merged export (and so the GGUF) holds it."""
    recipe = load_recipe(run_dir / "recipe.yaml")
    return with_default_system((run_dir / "chat_template.jinja").read_text(), recipe_system_prompt(recipe))


@pytest.mark.parametrize("family", GGUF_FAMILIES)
def test_llama_cpp_answers_as_the_merged_model_at_the_trained_resolution(family, runs, exports):
    out = exports(family)
    report = json.loads((out / "gguf.json").read_text())
    assert report["checked"] and report["passed"]
    assert {p.name for p in out.iterdir()} == {"model-f16.gguf", "model-q4_k_m.gguf", "mmproj-f16.gguf",
                                               "gguf.json", "chat_template.jinja", "README.md"}
    assert (out / "chat_template.jinja").read_text() == served_template(runs(family))
    assert report["tokenizer"]["passed"] and report["tokenizer"]["strings"] >= 2000
    f16, q4 = report["answers"]["f16"], report["answers"]["q4_k_m"]
    for result in (f16, q4):  # every image took as many tokens in llama.cpp as in training
        assert result["image_tokens_equal"]
        assert all(r["image_tokens"][0] == r["image_tokens"][1] > 0 for r in result["rows"])
    assert f16["agreement"] >= 0.9 and q4["agreement"] >= 0.7
    # f16 against float32: the first answer token's log-probability moves by rounding only (Qwen: 0.003-0.03).
    # Gemma 3 moves by 0.3-0.65 with every answer still agreeing (0.44 trained with peft 0.21.2, 0.63 with 0.22.0),
    # from the image side (a text-only prompt agrees to 0.001; neither the "\n\n" transformers puts around an image
    # nor the resize changes it): reported in gguf.json.
    assert f16["first_logprob_diff_max"] < (0.8 if family == "gemma3" else 0.05)
    readme = (out / "README.md").read_text()
    assert "llama-mtmd-cli -m model-q4_k_m.gguf --mmproj mmproj-f16.gguf" in readme
    limits = report["image_tokens"]
    if FAMILIES[family].gguf_image_tokens:
        assert f"--image-min-tokens {limits['min']} --image-max-tokens {limits['max']}" in readme
        rows = [r["image_tokens"][0] for r in f16["rows"]]
        assert limits["min"] <= min(rows) and max(rows) <= limits["max"]
    else:
        assert limits is None and "--image-max-tokens" not in readme


def test_image_token_limits_are_the_processors_pixel_bounds(runs):
    from transformers import AutoProcessor

    run = runs("qwen2_vl")
    processor = AutoProcessor.from_pretrained(run)
    size = processor.image_processor.size
    assert image_token_limits(FAMILIES["qwen2_vl"], processor, load_recipe(run / "recipe.yaml")) == (
        size["shortest_edge"] // 28 ** 2, size["longest_edge"] // 28 ** 2)
    capped = load_recipe(run / "recipe.yaml", ["data.max_pixels=6272"])  # finetune downscales first: 8 tokens
    assert image_token_limits(FAMILIES["qwen2_vl"], processor, capped)[1] == 8


def test_a_wrong_resolution_is_caught(runs, tmp_path):
    with pytest.raises(ParityError, match="another resolution"):
        export_gguf(runs("qwen2_5_vl"), ["f16"], out=tmp_path / "g", samples=4, image_tokens=(64, 256))
    report = json.loads((tmp_path / "g" / "gguf.json").read_text())
    assert not report["passed"] and not report["answers"]["f16"]["image_tokens_equal"]
    assert "| model-f16.gguf |" in (tmp_path / "g" / "README.md").read_text()  # the files and report stay


def test_the_tokenizer_check_refuses_a_mismatched_tokenizer(runs, exports, tmp_path):
    from transformers import AutoProcessor

    run = runs("qwen2_vl")
    merged, processor = run / "merged", AutoProcessor.from_pretrained(run / "merged")
    rec = load_recipe(run / "recipe.yaml")
    rows = parity_rows(rec, 2)
    strings = tokenizer_strings(processor, FAMILIES["qwen2_vl"], rec, rows)
    assert {"<|im_start|>", "a<|im_end|>b", "1999", "日本語のテキストです"} <= set(strings)
    assert any("Which color" in s for s in strings)  # the run's own data
    # The zoo tokenizer mapped to Qwen2's pre-tokenizer (digits one by one): llama.cpp splits numbers differently.
    wrong = convert(merged, tmp_path / "wrong.gguf", "f16", pre_tokenizer="qwen2")
    result = check_tokenizer(wrong, processor, FAMILIES["qwen2_vl"], rec, rows)
    assert not result["passed"] and "tokenises" in result["verdict"]
    right = check_tokenizer(exports("qwen2_vl") / "model-f16.gguf", processor, FAMILIES["qwen2_vl"], rec, rows)
    assert right["passed"]


def test_a_real_checkpoints_unknown_tokenizer_is_refused_not_guessed(runs, tmp_path):
    merged = runs("qwen2_vl") / "merged"
    with pytest.raises(ExportError, match="pre-tokenizer"):
        convert(merged, tmp_path / "m.gguf", "f16")  # no mapping given: as for any non-zoo model


@pytest.mark.parametrize("family", ["llava", "llava_next", "paligemma", "mllama", "idefics3", "qwen3_5", "qwen3_5_moe",
                                    "gemma4", "gemma3n"])
def test_families_llama_cpp_cannot_run_are_refused_at_once(family, tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump({
        "model": {"name_or_path": f"zoo:{family}:tiny"}, "data": {"path": str(ROOT / "data/chartqa-tiny")}}))
    with pytest.raises(ExportError, match=re.escape(f"{FAMILIES[family].name}: no GGUF export: ")):
        export_gguf(tmp_path)
    assert not (tmp_path / "merged").exists() and not (tmp_path / "gguf").exists()


def test_cli_converts_an_existing_run_and_says_what_is_missing(runs, tmp_path, monkeypatch, capsys):
    run = runs("qwen2_vl")
    out = tmp_path / "cli"
    assert cli.main(["export-gguf", str(run), "--outtype", "q8_0", "--out", str(out), "--samples", "4"]) == 0
    assert json.loads((out / "gguf.json").read_text())["answers"]["q8_0"]["passed"]
    assert cli.main(["export-gguf", str(run), "--out", str(out)]) == 1  # never over an export silently
    assert "already holds files" in capsys.readouterr().err
    assert cli.main(["export-gguf", str(run), "--outtype", "q3", "--out", str(tmp_path / "x")]) == 1
    assert "outtype: unknown 'q3'" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as without the extra
    assert cli.main(["export-gguf", str(run), "--out", str(tmp_path / "y")]) == 1
    err = capsys.readouterr().err
    assert "pip install 'finetune[gguf]'" in err and len(err.strip().splitlines()) == 1


def test_recipe_refuses_an_unknown_gguf_outtype(tmp_path):
    with pytest.raises(Exception, match=r"export.gguf: unknown outtype 'q4_km' \(did you mean 'q4_k_m'\?\)"):
        recipe("qwen2_vl", tmp_path, "export.gguf=[q4_km]")


def test_the_gguf_carries_the_template_special_tokens_and_end_of_turn(runs, exports):
    from transformers import AutoProcessor

    tokenizer = AutoProcessor.from_pretrained(runs("qwen2_vl")).tokenizer
    runtime = Runtime(exports("qwen2_vl") / "model-f16.gguf")
    try:
        assert runtime.chat_template == served_template(runs("qwen2_vl"))
        end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        assert runtime.tokenize("<|im_start|>user\nhi<|im_end|>") == tokenizer.encode(
            "<|im_start|>user\nhi<|im_end|>", add_special_tokens=False)
        assert llama_cpp.llama_vocab_is_eog(runtime.llm._model.vocab, end)  # llama.cpp stops where training did
    finally:
        runtime.close()


def test_setup_copies_the_converter_out_of_the_pinned_source_archive(tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_LLAMA_CPP_CONVERTER", str(tmp_path / "converter"))
    archive = tmp_path / "llama_cpp_python-0.3.36.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name, text in {"convert_hf_to_gguf.py": "print('convert')\n", "conversion/__init__.py": "",
                           "gguf-py/gguf/__init__.py": "", "src/llama.cpp": "// not needed"}.items():
            data = text.encode()
            info = tarfile.TarInfo(f"llama_cpp_python-0.3.36/vendor/llama.cpp/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    folder = install_converter(archive)
    assert folder == tmp_path / "converter"
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) == [
        "conversion/__init__.py", "convert_hf_to_gguf.py", "gguf-py/gguf/__init__.py"]
    other = tmp_path / "llama_cpp_python-0.3.30.tar.gz"
    other.write_bytes(archive.read_bytes())
    with pytest.raises(ExportError, match="expected llama_cpp_python-0.3.36"):
        install_converter(other)


def test_push_gguf_uploads_the_checked_files_with_a_card_on_running_them(runs, exports, monkeypatch, tmp_path):
    import huggingface_hub.constants

    from finetune.export.hub import HubError, push
    from hub_server import serve
    from test_push import front_matter

    run = runs("qwen2_vl")
    exports("qwen2_vl")
    with serve() as hub:
        monkeypatch.setenv("HF_TOKEN", "hf_test")
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        push(run, "alice/tiny-vlm-gguf", gguf=True)
        (commit,) = hub.commits
        assert set(commit["files"]) == {"model-f16.gguf", "model-q4_k_m.gguf", "mmproj-f16.gguf", "gguf.json",
                                        "chat_template.jinja", "README.md"}
        assert commit["files"]["model-f16.gguf"] == (run / "gguf" / "model-f16.gguf").read_bytes()
        card = commit["files"]["README.md"].decode()
        assert "gguf" in front_matter(card)["tags"] and "llama-mtmd-cli -m model-q4_k_m.gguf" in card
        assert str(tmp_path.parent) not in card and str(run) not in card  # no local path leaves the machine
        assert commit["summary"] == "Upload GGUF files (finetune)"
        failed = tmp_path / "failed"
        failed.mkdir()
        (failed / "recipe.yaml").write_text((run / "recipe.yaml").read_text())
        (failed / "gguf").mkdir()
        (failed / "gguf" / "gguf.json").write_text(json.dumps({"checked": True, "passed": False}))
        with pytest.raises(HubError, match="its GGUF checks failed"):
            push(failed, "alice/broken", gguf=True)
        assert len(hub.commits) == 1
