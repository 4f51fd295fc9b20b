"""Every shipped distributed config runs for real: FSDP2, DeepSpeed ZeRO-2 and ZeRO-3 in 2 CPU processes (gloo),
through `accelerate launch` with the configs as shipped (only num_processes and mixed_precision overridden); FSDP
through torchrun with the recipe's `training.fsdp` keys too. Each run must shard the way it asked, lose nothing
against one process at the same global batch, write an ordinary PEFT adapter that reproduces the trained model, and
resume from a mid-run checkpoint with the same losses."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import finetune
from conftest import ROOT
from finetune.evaluation.inference import load_target
from finetune.training.checkpoints import resume_point

pytest.importorskip("deepspeed")  # the dev install brings it (finetune[deepspeed]); CI runs these

BIN = Path(sys.executable).parent
SAMPLE = ROOT / "data/chartqa-tiny"
# 2 processes x 4 rows = the one-process run's 8 rows per step.
COMMON = ["data.image_root=" + str(SAMPLE), "data.eval_split=null", "training.max_steps=4", "training.logging_steps=1",
          "training.disable_tqdm=true", "training.save_strategy=steps", "training.save_steps=2"]
# Losses of the sharded runs against the one-process run: float32 all-reduces sum in another order (seen: <= 1e-6).
LOSS_TOLERANCE = 1e-5
MODES = {
    "FSDP2": ["--config_file", "recipes/accelerate/fsdp2-cpu.yaml"],
    "DeepSpeed ZeRO-2": ["--config_file", "recipes/accelerate/deepspeed-zero2.yaml"],
    "DeepSpeed ZeRO-3": ["--config_file", "recipes/accelerate/deepspeed-zero3.yaml"],
}


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    """32 rows of the sample in a file no other test reads (no earlier scan in the cache)."""
    path = tmp_path_factory.mktemp("sharded-data") / "train.jsonl"
    path.write_text("".join((SAMPLE / "train.jsonl").read_text().splitlines(True)[:32]))
    return path


@pytest.fixture(scope="module")
def one_process(rows, tmp_path_factory):
    """The same 4 steps in one process, 8 rows per step: the per-step losses every mode must reproduce."""
    out = tmp_path_factory.mktemp("one-process") / "run"
    finetune.train(ROOT / "recipes/tiny-chartqa.yaml", [f"data.path={rows}", *COMMON,
                                                        "training.per_device_train_batch_size=8",
                                                        f"training.output_dir={out}"])
    return losses(out)


def losses(out: Path) -> list[float]:
    return [p["loss"] for p in json.loads((out / "run_summary.json").read_text())["loss_curve"]]


def launch(launcher: list[str], script: list[str], args: list[str]) -> subprocess.CompletedProcess:
    result = subprocess.run([*launcher, *script, *args], cwd=ROOT, capture_output=True, text=True, timeout=900,
                            env=os.environ | {"OMP_NUM_THREADS": "1"})  # 2 processes x 1 thread on 2 cores
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def accelerate(mode: str) -> list[str]:
    # A port of its own per launch: the default 29500 may still be held by the previous launch's rendezvous.
    return [str(BIN / "accelerate"), "launch", *MODES[mode], "--num_processes", "2", "--mixed_precision", "no",
            "--main_process_port", str(free_port())]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("mode", list(MODES))
def test_shipped_config_shards_trains_like_one_process_writes_the_adapter_and_resumes(mode, rows, one_process,
                                                                                      tmp_path):
    out, reports = tmp_path / "run", tmp_path / "reports"
    reports.mkdir()
    recipe = ["recipes/tiny-chartqa.yaml", f"data.path={rows}", *COMMON, "training.per_device_train_batch_size=4"]
    result = launch(accelerate(mode), ["tests/sharded_worker.py", str(reports)],
                    [*recipe, f"training.output_dir={out}"])

    # What really ran, read from the prepared model: printed once at the start and recorded in the summary.
    assert result.stdout.count(f"[finetune] distributed: {mode}, world size 2") == 1
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["distributed"] == {"strategy": mode, "world_size": 2}
    held = [json.loads((reports / f"rank{r}.json").read_text()) for r in (0, 1)]
    if mode == "FSDP2":  # every LoRA weight a DTensor; each rank holds half of its rows
        assert all(h["dtensor"] for h in held) and held[0]["full"] == [16, 256]
        assert [h["local"] for h in held] == [[8, 256], [8, 256]]
    else:
        assert [h["wrapper"] for h in held] == ["DeepSpeedEngine"] * 2
        assert [h["zero_stage"] for h in held] == [int(mode[-1])] * 2
        if mode == "DeepSpeed ZeRO-3":  # a flat partition of half the weight's elements on each rank
            assert [h["local"] for h in held] == [[16 * 256 // 2]] * 2 and held[0]["full"] == [16, 256]

    # Nothing lost against one process at the same global batch.
    assert losses(out) == pytest.approx(one_process, abs=LOSS_TOLERANCE)

    # The adapter is an ordinary PEFT adapter: on a fresh base it gives the trained model's logits.
    saved = torch.load(reports / "logits.pt")
    fresh = load_target(out).model.eval()
    with torch.no_grad():
        logits = fresh(**saved["inputs"]).logits
        with fresh.disable_adapter():
            untrained = fresh(**saved["inputs"]).logits
    assert (logits - saved["logits"]).abs().max().item() < 1e-5
    assert (untrained - saved["logits"]).abs().max().item() > 0.1  # the adapter matters (seen: 4.0)

    # Every mode's checkpoint is recognised, by explicit path and by `auto`; resuming gives the same losses.
    checkpoint = out / "checkpoint-2"
    assert resume_point(str(checkpoint), out, allow_incomplete=False) == checkpoint
    resumed = tmp_path / "resumed"
    shutil.copytree(checkpoint, resumed / "checkpoint-2")
    result = launch(accelerate(mode), ["-m", "finetune", "train"],
                    [*recipe, f"training.output_dir={resumed}", "training.resume=auto"])
    assert f"resuming from {resumed / 'checkpoint-2'} (step 2)" in result.stdout
    assert losses(resumed)[-2:] == pytest.approx(losses(out)[-2:], abs=1e-6)

    # `finetune merge` works on the run folder (parity checked against base + adapter).
    merged = finetune.merge(out, dtype="float32")
    parity = json.loads((merged / "parity.json").read_text())
    assert parity["passed"] and parity["max_abs_diff"] < 1e-4


def test_torchrun_with_the_recipes_fsdp_keys_shards_with_fsdp2(rows, one_process, tmp_path):
    out = tmp_path / "run"
    result = launch([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2"], ["-m", "finetune", "train"],
                    ["recipes/tiny-chartqa.yaml", f"data.path={rows}", *COMMON,
                     "training.per_device_train_batch_size=4", f"training.output_dir={out}", "training.fsdp=true",
                     "training.fsdp_config={version: 2, state_dict_type: SHARDED_STATE_DICT}"])
    assert result.stdout.count("[finetune] distributed: FSDP2, world size 2") == 1
    assert losses(out) == pytest.approx(one_process, abs=LOSS_TOLERANCE)
    assert (out / "adapter_model.safetensors").is_file() and (out / "checkpoint-2" / "pytorch_model_fsdp_0").is_dir()
