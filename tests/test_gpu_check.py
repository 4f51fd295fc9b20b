"""scripts/gpu_check.sh --dry-run: every step of the prepared GPU check, at tiny shapes on the CPU."""

import json
import os
import subprocess
import sys
import zipfile

from conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))

import gpu_check  # noqa: E402


def test_dry_run_passes_every_step_and_reports_its_figures(tmp_path):
    out = tmp_path / "out"
    env = os.environ | {"OUT": str(out), "FINETUNE_PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["gpu-check.log", "gpu-results.json", "gpu-results.md"]
    r = json.loads((out / "gpu-results.json").read_text())
    assert r["check"]["dry_run"] and r["install"]["status"].startswith("skipped")  # this interpreter has them all
    assert {name: s["status"] for name, s in r["steps"].items()} == dict.fromkeys(
        ["env", "tests", "bench", "recipe"], "passed")
    assert r["check"]["elapsed_s"] < r["check"]["budget_s"]
    assert r["env"]["cuda"] is False and r["env"]["bnb_nf4"].startswith("relative error")

    tests = r["tests"]
    flash = "test_packed_rows_train_as_unpacked_on_the_gpu[flash_attention_2]"
    assert len(tests) == 8 and tests.pop(flash)["outcome"] == "skipped", tests  # flash-attention needs CUDA
    assert {t["outcome"] for t in tests.values()} == {"passed"}, tests
    for family in ("qwen2_5_vl", "gemma3", "mllama"):
        figures = tests[f"test_qlora_nf4_quantizes_the_decoder_only[{family}]"]["figures"]
        assert figures["linear4bit"] > 0 and figures["vision_linear"] > 0 and figures["lm_head_dtype"] != "torch.uint8"
    losses = tests["test_bf16_lora_training_lowers_the_loss"]["figures"]["losses"]
    assert len(losses) == 20 and losses[-1] < losses[0] / 2
    parity = tests["test_bf16_merge_reproduces_the_adapter"]["figures"]
    assert 0 < parity["max_abs_diff"] < parity["tolerance"] and parity["kl_mean"] < 1e-3

    runs = {(x["mode"], x["pipeline"]): x for x in r["bench"]["runs"]}
    assert set(runs) == {(m, p) for m in ("qlora", "lora") for p in ("cookbook", "finetune")}
    for mode in ("qlora", "lora"):
        cookbook, ours = runs[mode, "cookbook"], runs[mode, "finetune"]
        # Same rows on both sides, so the same real tokens; length grouping removes most of the padding.
        assert cookbook["samples"] == ours["samples"] == 16 and cookbook["tokens"] == ours["tokens"] > 0
        assert ours["padding"] < cookbook["padding"] / 2, (ours["padding"], cookbook["padding"])
        assert r["bench"]["ratios"][mode]["tokens_per_s"] > 0

    memory = r["recipe"]
    assert memory["steps"] == 3 and memory["load_in_4bit"] and memory["gradient_checkpointing"]
    assert memory["max_length"] - 16 <= memory["sample_tokens"]["min"] <= memory["sample_tokens"]["max"] <= 1024
    assert memory["claim_gb"] == 22.6  # the recipe's comment: the figure the GPU run measured

    report = (out / "gpu-results.md").read_text()
    assert "DRY RUN" in report and "| qlora | finetune |" in report and "## Peak memory of" in report


def test_wheels_unpack_like_pip_where_pip_is_missing(tmp_path):
    wheel = tmp_path / "demo-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("demo/__init__.py", "VALUE = 1\n")
        z.writestr("demo-1.0.dist-info/METADATA", "Name: demo\n")
        z.writestr("demo-1.0.data/purelib/demo_extra.py", "EXTRA = 2\n")
        z.writestr("demo-1.0.data/scripts/demo-cli", "#!/bin/sh\n")
    site = tmp_path / "site"
    site.mkdir()
    gpu_check.unpack(wheel, site)
    assert sorted(str(p.relative_to(site)) for p in site.rglob("*") if p.is_file()) == [
        "demo-1.0.dist-info/METADATA", "demo/__init__.py", "demo_extra.py"]


def test_missing_packages_are_installed_from_the_carried_wheels(tmp_path, monkeypatch):
    """The GPU machine's path: a package the interpreter lacks comes from the wheel folder, onto PYTHONPATH."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    with zipfile.ZipFile(wheels / "demo_gpu_wheel-1.0-py3-none-any.whl", "w") as z:
        z.writestr("demo_gpu_wheel/__init__.py", "VALUE = 42\n")
        z.writestr("demo_gpu_wheel-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: demo-gpu-wheel\n"
                                                          "Version: 1.0\n")
        z.writestr("demo_gpu_wheel-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\n"
                                                       "Root-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr("demo_gpu_wheel-1.0.dist-info/RECORD", "demo_gpu_wheel/__init__.py,,\n"
                                                        "demo_gpu_wheel-1.0.dist-info/METADATA,,\n"
                                                        "demo_gpu_wheel-1.0.dist-info/WHEEL,,\n"
                                                        "demo_gpu_wheel-1.0.dist-info/RECORD,,\n")
    monkeypatch.setattr(gpu_check, "NEEDED", ("demo_gpu_wheel", "json"))
    check = gpu_check.Check(tmp_path, tmp_path, dry_run=True, budget=60)
    env = dict(os.environ)
    info = gpu_check.install(check, sys.executable, wheels, tmp_path / "site", env)
    assert info["missing_before"] == ["demo_gpu_wheel"] and info["method"] == "pip --target"
    assert info["status"] == "passed" and info["missing_after"] == []
    out = subprocess.run([sys.executable, "-c", "import demo_gpu_wheel; print(demo_gpu_wheel.__file__)"],
                         env=env | {"PYTHONPATH": gpu_check.path_with(tmp_path / "site", env)},
                         capture_output=True, text=True, check=True)
    assert out.stdout.startswith(str(tmp_path / "site"))
