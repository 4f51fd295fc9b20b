"""scripts/gpu_check.sh --dry-run: every step of the prepared GPU check, at tiny shapes on the CPU."""

import json
import os
import subprocess
import sys
import zipfile

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "tests"))

import bench_memory  # noqa: E402
import gpu_install  # noqa: E402
import gpu_report  # noqa: E402
import gpu_steps  # noqa: E402


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
    needs_cuda = [f"test_packed_rows_train_as_unpacked_on_the_gpu[{a}]" for a in ("flash_attention_2", "sdpa_varlen")]
    assert len(tests) == 9 and [tests.pop(t)["outcome"] for t in needs_cuda] == ["skipped"] * 2, tests
    assert {t["outcome"] for t in tests.values()} == {"passed"}, tests
    for family in ("qwen2_5_vl", "gemma3", "mllama"):
        figures = tests[f"test_qlora_nf4_quantizes_the_decoder_only[{family}]"]["figures"]
        assert figures["linear4bit"] > 0 and figures["vision_linear"] > 0 and figures["lm_head_dtype"] != "torch.uint8"
    losses = tests["test_bf16_lora_training_lowers_the_loss"]["figures"]["losses"]
    assert len(losses) == 20 and losses[-1] < losses[0] / 2
    parity = tests["test_bf16_merge_reproduces_the_adapter"]["figures"]
    assert 0 < parity["max_abs_diff"] < parity["tolerance"] and parity["kl_mean"] < 1e-3
    packed = tests["test_packed_rows_train_as_unpacked_on_the_gpu[sdpa]"]["figures"]
    assert packed["packed_attention_calls"]["per_sample"] > 0 == packed["packed_attention_calls"]["varlen"]

    bench = r["bench"]
    runs = {(x["mode"], x["pipeline"]): x for x in bench["runs"]}
    assert set(runs) == {(m, p) for m in ("qlora", "lora") for p in ("cookbook", "finetune")}
    for mode in ("qlora", "lora"):
        cookbook, ours = runs[mode, "cookbook"], runs[mode, "finetune"]
        # The same rows on both sides, so the same real tokens; packing leaves no padding at all.
        assert cookbook["samples"] == ours["samples"] == 24 and cookbook["tokens"] == ours["tokens"] > 0
        assert ours["padding"] == 0 < cookbook["padding"] and cookbook["steps"] == 6 and ours["steps"] < 24
        assert ours["attention_calls"]["varlen"] == 0 < ours["attention_calls"]["per_sample"]  # the CPU fallback
        assert not ours["vision_varlen"] and ours["mfu"] is None  # no kernel, no measured matmul rate on a CPU
        assert bench["ratios"][mode]["tokens_per_s"] > 0 and bench["ratios"][mode]["best"] == "finetune"
    levers = {mode: [e["lever"] for e in entries] for mode, entries in bench["sweep"].items()}
    assert levers == {  # the varlen levers and Liger need CUDA: measured on the GPU, left out here
        "qlora": ["finetune (best)", "fp32 upcast of the non-4-bit weights (finetune before)", "packs of 256 tokens",
                  "packs of 1024 tokens"],
        "lora": ["finetune (best)", "packing off (length-grouped batches of 4)", "frozen tower with autograd",
                 "gradient checkpointing off"]}
    assert all("error" not in e and e["steps"] == 2 for entries in bench["sweep"].values() for e in entries)
    assert bench["probes"]["varlen_kernel"] == {"status": "not available here", "ok": False}
    assert bench["probes"]["liger_lora"]["status"].startswith("liger-kernel not installed")
    assert 3 <= len(bench["profile"]["lora"]) <= 15 and all(o["ms"] >= 0 for o in bench["profile"]["lora"])
    assert 100 < bench["row_tokens"]["min"] <= bench["row_tokens"]["max"] < 200  # 112x112 charts at most

    memory = r["recipe"]
    assert memory["steps"] == 3 and memory["load_in_4bit"] and memory["gradient_checkpointing"]
    assert memory["max_length"] - 16 <= memory["sample_tokens"]["min"] <= memory["sample_tokens"]["max"] <= 1024

    report = (out / "gpu-results.md").read_text()
    assert "DRY RUN" in report and "| qlora | finetune |" in report and "## Peak memory of" in report
    assert "### Levers, lora" in report and "### Profile, finetune lora" in report


def test_the_benchmarks_cuda_branches_run_through_a_stand_in_kernel(tmp_path, monkeypatch):
    """What only a GPU runs (the varlen probes, the varlen levers on and off, the tower's varlen attention), through
    the CPU stand-in of the kernel (tests/test_fast_training.py), at the dry run's tiny shapes."""
    import functools

    import torch

    import bench_gpu
    from finetune.training import attention
    from test_fast_training import emulated

    seen = []
    monkeypatch.setattr(attention, "varlen_kernel", lambda: functools.partial(attention.call_varlen,
                                                                              emulated("2.14", seen)))
    monkeypatch.setattr(attention, "VARLEN_DTYPES", (torch.float32, torch.bfloat16))
    out = tmp_path / "bench.json"
    monkeypatch.setattr(sys, "argv", ["bench_gpu.py", "--preset", "tiny", "--models", "qwen2_5_vl_7b",
                                      "--modes", "lora", "--compare",
                                      "--samples", "24", "--max-pixels", str(112 * 112), "--pack-length", "512",
                                      "--sweep-steps", "2", "--json", str(out)])
    assert bench_gpu.main() == 0
    r = json.loads(out.read_text())["compare"]
    assert {k: p["ok"] for k, p in r["probes"].items()} == {
        "varlen_kernel": True, "varlen_decoder_lora_loss": True, "varlen_vision_lora_loss": True, "liger_lora": False}
    assert r["probes"]["varlen_decoder_lora_loss"]["sdpa"] == r["probes"]["varlen_decoder_lora_loss"]["varlen"]
    ours = next(x for x in r["runs"] if x["pipeline"] == "finetune")
    assert ours["attention_calls"] == {"varlen": 9 * 2 * 2, "per_sample": 0}  # 9 steps x 2 layers x recomputation
    assert ours["vision_varlen"] and len(seen) > 36
    sweep = {e["lever"]: e for e in r["sweep"]["lora"]}
    assert sweep["decoder varlen off (per-sample SDPA)"]["attention_calls"] == {"varlen": 0, "per_sample": 12}
    assert not sweep["vision varlen off (SDPA per window)"]["vision_varlen"]
    assert all("tokens_per_s" in e for e in sweep.values())


@pytest.mark.parametrize("header, claim", [
    # Since its GPU run: the measured peak, not the card size stated after it (nor the 6 of "22.6").
    ("# Qwen2.5-VL-7B with QLoRA: 22.6 GB peak GPU memory at batch 4 x 2048 tokens\n"
     "# (measured on an H200), so a 24 GB card fits.", 22.6),
    ("# SmolVLM 2.2B with QLoRA (NF4 decoder): ~10 GB GPU.", 10.0),  # before one: an estimate
    ("# SmolVLM-256M, plain LoRA in bf16.\n\n# Evaluated on an 80 GB card.", None),  # below the header: no claim
    ("# A tiny recipe.", None),
])
def test_a_recipes_memory_claim_is_the_first_figure_of_its_header(header, claim):
    text = header + "\nmodel:\n  name_or_path: Qwen/Qwen2.5-VL-7B-Instruct\n"
    assert bench_memory.recipe_claim_gb(text) == claim


def test_the_report_puts_the_measured_peak_beside_what_the_recipe_says():
    """The H200 run of the 7B QLoRA recipe (scripts/gpu-results.md) as gpu-results.md shows it."""
    memory = {"recipe": "recipes/qwen2_5-vl-7b-qlora.yaml", "batch": 4, "max_length": 2048,
              "sample_tokens": {"min": 2035, "max": 2035}, "load_in_4bit": True, "gradient_checkpointing": True,
              "optim": "adamw_torch_fused", "steps": 3, "train_s": 11.7, "losses": [0.6931, 0.6512, 0.60408],
              "weights_gib": 9.8, "peak_mem_gib": 18.6, "peak_reserved_gib": 20.2, "peak_device_gb": 22.6,
              "claim_gb": 24.0}
    results = {"check": {"dry_run": False, "started": "2026-12-05T10:00:00+00:00", "budget_s": 420.0}, "steps": {}}
    report = gpu_report.render_markdown(results | {"recipe": memory})
    assert "batch 4 x 2035 tokens (max_length 2048)" in report and "losses [0.693, 0.651, 0.604]" in report
    assert "| 9.8 | 18.6 | 20.2 | 22.6 | ~24 GB |" in report
    # A recipe step cut off before it measured anything leaves no half-filled section.
    assert "Peak memory" not in gpu_report.render_markdown(results | {"recipe": {}})


def test_wheels_unpack_like_pip_where_pip_is_missing(tmp_path):
    wheel = tmp_path / "demo-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("demo/__init__.py", "VALUE = 1\n")
        z.writestr("demo-1.0.dist-info/METADATA", "Name: demo\n")
        z.writestr("demo-1.0.data/purelib/demo_extra.py", "EXTRA = 2\n")
        z.writestr("demo-1.0.data/scripts/demo-cli", "#!/bin/sh\n")
    site = tmp_path / "site"
    site.mkdir()
    gpu_install.unpack(wheel, site)
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
    monkeypatch.setattr(gpu_install, "NEEDED", ("demo_gpu_wheel", "json"))
    check = gpu_steps.Check(tmp_path, tmp_path, dry_run=True, budget=60)
    env = dict(os.environ)
    info = gpu_install.install(check, sys.executable, wheels, tmp_path / "site", env)
    assert info["missing_before"] == ["demo_gpu_wheel"] and info["method"] == "pip --target"
    assert info["status"] == "passed" and info["missing_after"] == []
    out = subprocess.run([sys.executable, "-c", "import demo_gpu_wheel; print(demo_gpu_wheel.__file__)"],
                         env=env | {"PYTHONPATH": gpu_install.path_with(tmp_path / "site", env)},
                         capture_output=True, text=True, check=True)
    assert out.stdout.startswith(str(tmp_path / "site"))
