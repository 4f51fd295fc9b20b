"""Bad input gets one finetune error naming the recipe key, not a library traceback: unknown hub ids, offline
mode, relative paths used from another folder, a missing adapter folder."""

import pytest

from conftest import ROOT
from finetune import cli
from finetune.errors import SourceNotFound, not_found
from finetune.training.adapter import continue_from


@pytest.fixture
def offline(monkeypatch):
    """Offline mode as a fresh process under HF_HUB_OFFLINE=1 has it (huggingface_hub reads the variable once, at
    import, possibly before the test session set it): no network retries."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("finetune:")]
    assert len(err) == 1
    return err[0]


def test_unknown_model_id_offline_is_one_line_naming_the_key(capsys, offline):
    code = cli.main(["check", str(ROOT / "recipes/tiny-chartqa.yaml"), "model.name_or_path=Qwen/Qwen2-VL-2B-Instructt"])
    assert code == 2
    line = one_error_line(capsys)
    assert line.startswith("finetune: error: model.name_or_path: 'Qwen/Qwen2-VL-2B-Instructt' is not a local path")
    assert "HF_HUB_OFFLINE is set" in line and "relative paths resolve from the folder you run in" in line


def test_unknown_dataset_id_is_one_line_naming_the_key(capsys, offline):
    code = cli.main(["check", str(ROOT / "recipes/tiny-chartqa.yaml"), "data.path=HuggingFaceM4/ChartQAA"])
    assert code == 2
    line = one_error_line(capsys)
    assert line.startswith("finetune: error: data.path: 'HuggingFaceM4/ChartQAA' is not a local path")


def test_a_shipped_recipe_run_from_another_folder_says_where_its_data_is(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["check", str(ROOT / "recipes/tiny-chartqa.yaml"), "--no-data"]) == 2
    line = one_error_line(capsys)
    assert f"data.path: data/chartqa-tiny is not in {tmp_path}" in line
    assert f"but {ROOT / 'data/chartqa-tiny'} exists: run from {ROOT}" in line


@pytest.mark.parametrize("error, why", [
    (OSError("We couldn't connect to 'https://huggingface.co' to load the files"), "the Hub could not be reached"),
    (ConnectionError("Couldn't reach 'x/y' on the Hub (LocalEntryNotFoundError)"), "the Hub could not be reached"),
    (OSError("x/y is not a local folder and is not a valid model identifier listed on 'https://huggingface.co/models'"),
     "the Hub has no such repository (a typo? a private one needs huggingface-cli login or HF_TOKEN)"),
    (FileNotFoundError("Dataset 'x/y' doesn't exist on the Hub or cannot be accessed."), "no such repository"),
    (OSError("You are trying to access a gated repo."), "gated repository: accept its terms"),
])
def test_why_a_hub_id_failed_is_told_apart(monkeypatch, error, why):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    message = str(not_found("model.name_or_path", "x/y", error))
    assert message.startswith("model.name_or_path: 'x/y' is not a local path") and why in message


def test_a_missing_adapter_folder_names_the_key(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SourceNotFound, match=rf"model.adapter: runs/sft is not a local folder \(looked for "
                                             rf"{tmp_path}/runs/sft"):
        continue_from(None, "runs/sft", "zoo:qwen2_vl")
