"""`finetune push` end to end: the real huggingface_hub client against a local stand-in for the Hub API."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import finetune
import conftest
from conftest import ROOT
from finetune.export.card import render_card
from finetune.export.hub import HubError, transient, with_retries
from finetune.training.pipeline import train
from finetune.recipe import RecipeError, load_recipe
from hub_server import serve

BIN = Path(sys.executable).parent
CANARY = "hf_canary_5f1d2c3b4a69788796a5b4c3d2e1f0a9"
ADAPTER_FILES = {"README.md", "adapter_config.json", "adapter_model.safetensors", "chat_template.jinja",
                 "loss_curve.png", "processor_config.json", "recipe.yaml", "run_summary.json", "tokenizer.json",
                 "tokenizer_config.json"}


def tiny_recipe(out, *extra):
    return load_recipe(conftest.tiny_recipe(
        out, without=["evaluation.enabled"], model={"name_or_path": "zoo:qwen2_vl:tiny"},
        data={"system_prompt": "", "eval_split": "test"},
        evaluation={"limit": 4, "max_new_tokens": 4, "batch_size": 4}), list(extra))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A trained run with an eval split, so it has eval/metrics.json for the card."""
    return train(tiny_recipe(tmp_path_factory.mktemp("push") / "run"))


@pytest.fixture
def hub():
    with serve() as server:
        yield server


@pytest.fixture
def online(monkeypatch, hub):
    """In-process pushes: the canary token, the local endpoint, and huggingface_hub's offline switch off."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_TOKEN", CANARY)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    return hub


def front_matter(card: bytes | str) -> dict:
    text = card.decode() if isinstance(card, bytes) else card
    return yaml.safe_load(re.match(r"^---\n(.*?)\n---\n", text, re.S)[1])


def files_under(*folders: Path):
    for folder in folders:
        for path in folder.rglob("*"):
            if path.is_file():
                yield path


def assert_no_canary(hub, *folders: Path, text: str = ""):
    assert CANARY not in text
    assert CANARY not in hub.stored_text()
    for path in files_under(*folders):
        assert CANARY.encode() not in path.read_bytes(), path
    # ... and yet it was used: every request carried it, in the Authorization header only.
    assert hub.requests and all(r.authorization == f"Bearer {CANARY}" for r in hub.requests)


def test_cli_push_is_one_private_commit_on_the_branch_retried_past_a_503(run_dir, hub, tmp_path):
    hub.fail_commits = 1
    hf_home = tmp_path / "hf_home"
    env = os.environ | {"HF_ENDPOINT": hub.url, "HF_TOKEN": CANARY, "HF_HUB_OFFLINE": "0", "HF_HOME": str(hf_home),
                        "HF_HUB_DISABLE_TELEMETRY": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([str(BIN / "finetune"), "push", str(run_dir), "--repo", "alice/tiny-vlm", "--private",
                             "--revision", "experiment"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]

    assert hub.repos == {"alice/tiny-vlm": {"private": True, "branches": ["main", "experiment"]}}
    assert hub.failed_commits == 1 and "retry 1/4" in result.stdout  # the 503 was retried...
    assert len(hub.commits) == 1  # ... into exactly one commit, on the branch
    commit = hub.commits[0]
    assert commit["revision"] == "experiment" and commit["summary"] == "Upload LoRA adapter (finetune)"
    assert set(commit["files"]) == ADAPTER_FILES
    assert result.stdout.strip().splitlines()[-1] == f"{hub.url}/alice/tiny-vlm/commit/{commit['oid']}"
    for name in ("adapter_model.safetensors", "tokenizer.json", "chat_template.jinja"):
        assert commit["files"][name] == (run_dir / name).read_bytes(), name

    meta = front_matter(commit["files"]["README.md"])
    assert meta == {"library_name": "peft", "pipeline_tag": "image-text-to-text",
                    "tags": ["finetune", "lora", "qwen2_vl", "vision-language"]}  # zoo base: no hub id to name
    card = commit["files"]["README.md"].decode()
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert f"| fine-tuned | {metrics['tuned']:.3f} |" in card and "| LoRA rank / alpha / dropout | 4 / 8 / 0.0 |" in card
    assert "AutoModelForImageTextToText" in card and "PeftModel" in card and '"type": "image"' in card
    assert "repo_id = 'alice/tiny-vlm'" in card
    # No filesystem path of this machine goes up: the adapter config names no local base model folder either.
    assert str(run_dir) not in card and str(Path.home()) not in card
    assert json.loads(commit["files"]["adapter_config.json"])["base_model_name_or_path"] is None
    assert "projector" in result.stdout and "vLLM" in result.stdout  # serving note for projector adapters

    assert_no_canary(hub, run_dir, hf_home, text=result.stdout + result.stderr)


def test_push_merged_merges_checks_and_uploads_the_export(run_dir, online, capfd):
    url = finetune.push(run_dir, "alice/tiny-vlm-merged", merged=True)
    export = run_dir / "merged"
    parity = json.loads((export / "parity.json").read_text())
    assert parity["passed"] and parity["merge"]["dtype"] == "float32"  # export.merge_dtype auto: as the base is stored

    (commit,) = online.commits
    assert url == f"{online.url}/alice/tiny-vlm-merged/commit/{commit['oid']}" and commit["revision"] == "main"
    assert online.repos["alice/tiny-vlm-merged"]["private"] is False
    assert {"model.safetensors", "config.json", "generation_config.json", "processor_config.json",
            "tokenizer.json", "chat_template.jinja", "parity.json", "recipe.yaml", "README.md"} <= set(commit["files"])
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in commit["files"])
    meta = front_matter(commit["files"]["README.md"])
    assert meta["library_name"] == "transformers" and "merged" in meta["tags"]
    card = commit["files"]["README.md"].decode()
    assert "Parity check (passed)" in card and "PeftModel" not in card
    out = capfd.readouterr()
    assert "[finetune] parity on 4 samples" in out.out
    assert_no_canary(online, run_dir, text=out.out + out.err)


def test_training_pushes_when_the_recipe_says_so(online, tmp_path, capfd):
    out = train(tiny_recipe(tmp_path / "run", "evaluation.enabled=false", "export.push_to_hub=true",
                            "export.hub_repo_id=alice/pushed-by-training", "export.hub_revision=v1",
                            "export.hub_private=true"))
    (commit,) = online.commits
    assert commit["repo"] == "alice/pushed-by-training" and commit["revision"] == "v1"
    assert online.repos["alice/pushed-by-training"]["private"] is True
    assert set(commit["files"]) == ADAPTER_FILES
    captured = capfd.readouterr()
    assert_no_canary(online, out, text=captured.out + captured.err)


def test_push_refuses_without_token_or_repo(run_dir, monkeypatch, tmp_path):
    import huggingface_hub.constants

    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "token"))  # no login either
    with pytest.raises(HubError, match="no Hugging Face token"):
        finetune.push(run_dir, "alice/x")
    with pytest.raises(HubError, match="--repo: where to push"):
        finetune.push(run_dir)
    with pytest.raises(HubError, match="expected namespace/name"):
        finetune.push(run_dir, "/tmp/not-a-repo")
    with pytest.raises(RecipeError, match="export.push_to_hub: needs export.hub_repo_id"):
        tiny_recipe(tmp_path, "export.push_to_hub=true")


def test_retries_are_bounded_and_only_for_transient_failures(monkeypatch):
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    def http_error(status):
        return HfHubHTTPError(f"{status}", response=httpx2.Response(status, request=httpx2.Request("POST", "http://x")))

    assert transient(http_error(503)) and transient(http_error(429)) and transient(httpx2.ConnectError("down"))
    assert not transient(http_error(403)) and not transient(OfflineModeIsEnabled("offline"))
    monkeypatch.setattr("time.sleep", lambda s: None)
    calls = []

    def always_503():
        calls.append(1)
        raise http_error(503)

    with pytest.raises(HfHubHTTPError):
        with_retries(always_503, "commit", attempts=3)
    assert len(calls) == 3


def test_card_names_hub_models_and_datasets_and_never_local_paths(run_dir, tmp_path):
    folder = tmp_path / "copy"
    folder.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors", "run_summary.json"):
        (folder / name).write_bytes((run_dir / name).read_bytes())
    recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    recipe["model"]["name_or_path"] = "Qwen/Qwen2-VL-2B-Instruct"
    recipe["data"]["path"] = "HuggingFaceM4/ChartQA"
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    meta = front_matter(render_card(folder, "adapter", "alice/qwen2-vl-chartqa"))
    assert meta["base_model"] == "Qwen/Qwen2-VL-2B-Instruct" and meta["base_model_relation"] == "adapter"
    assert meta["datasets"] == ["HuggingFaceM4/ChartQA"] and "qwen2_vl" in meta["tags"]

    recipe["model"]["name_or_path"] = str(tmp_path)  # a local checkpoint folder
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    card = render_card(folder, "adapter", "alice/qwen2-vl-chartqa")
    assert "base_model" not in front_matter(card) and str(tmp_path) not in card


def test_pushed_recipe_and_summary_name_no_local_path_while_the_run_folder_keeps_them(run_dir, online):
    """Regression: recipe.yaml went up with the user's absolute data, image and output paths in it."""
    finetune.push(run_dir, repo_id="alice/redacted", attempts=1)
    files = online.commits[-1]["files"]
    local = load_recipe(run_dir / "recipe.yaml")  # the run folder keeps the full recipe
    assert local.data.path == str(ROOT / "data/chartqa-tiny") and local.training.output_dir == str(run_dir)
    pushed_text = files["recipe.yaml"].decode()
    for text in (pushed_text, files["run_summary.json"].decode()):
        assert str(ROOT) not in text and str(run_dir) not in text and str(Path.home()) not in text
    pushed = yaml.safe_load(pushed_text)
    assert pushed["data"]["path"] == "<local path>/chartqa-tiny"
    assert pushed["training"]["output_dir"] == f"<local path>/{run_dir.name}"
    assert pushed["lora"] == yaml.safe_load((run_dir / "recipe.yaml").read_text())["lora"]  # the rest is intact
    assert pushed_text.startswith("# The resolved recipe") and "<local path>/NAME" in pushed_text
