"""Atomic checkpoints, exact resume after SIGKILL, health guards, and nothing lost on a failed save."""

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file
from transformers.trainer_pt_utils import safe_globals

import finetune
from conftest import ROOT, tiny_recipe
from finetune.training.checkpoints import MARKER, STAGING, CheckpointError, is_complete, resume_point
from finetune.training.guards import HealthMonitor, TrainingHealthError
from finetune.training.pipeline import prepare
from finetune.recipe import RecipeError, load_recipe


def recipe(out: Path, **training) -> dict:
    return tiny_recipe(
        out, data={"max_samples": 12, "system_prompt": ""},
        # Dropout on, so an exact resume also needs the RNG state restored.
        lora={"dropout": 0.1},
        training={"max_steps": 5, "save_strategy": "steps", "save_steps": 1, "disable_tqdm": True, **training})


def losses(out: Path) -> list[float]:
    return [p["loss"] for p in json.loads((out / "run_summary.json").read_text())["loss_curve"]]


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("kill_at, accumulation, extra", [
    (1, 1, {}),
    (3, 1, {}),
    (1, 2, {"train_sampling_strategy": "group_by_length"}),
    (3, 2, {"train_sampling_strategy": "group_by_length"}),
    (3, 1, {"qlora": True}),
    (3, 1, {"packing": True, "max_length": 160}),  # 12 rows of ~53 tokens: 4 packs of 3, 2 steps per epoch
    (3, 1, {"family": "qwen3_5_moe", "experts": True}),  # DeltaNet layers, expert LoRA, the aux loss
    (3, 1, {"family": "gemma4"}),
])
def test_resume_after_sigkill_mid_save_equals_an_uninterrupted_run(tmp_path, kill_at, accumulation, extra, capsys):
    extra = dict(extra)
    qlora, family, experts = extra.pop("qlora", False), extra.pop("family", None), extra.pop("experts", False)

    def make(out, **more):
        r = recipe(out, gradient_accumulation_steps=accumulation, **extra, **more)
        if qlora:
            r["quantization"] = {"load_in_4bit": True}
        if family:
            r["model"]["name_or_path"] = f"zoo:{family}"
        if experts:  # peft adapts the fused 3-D expert weights only without dropout
            r["lora"].update(experts=True, dropout=0.0)
        return r

    # 5 steps x 2 x accumulation samples crosses the 12-row epoch boundary, so the epoch's new order is tested too.
    reference = finetune.train(make(tmp_path / "reference"))

    out = tmp_path / "interrupted"
    spec = tmp_path / "recipe.json"
    spec.write_text(json.dumps(make(out)))
    threads = str(torch.get_num_threads())  # the same kernels' reduction order as this process
    # Killed while writing checkpoint-(k+1): its adapter and optimizer are on disk, its RNG state and marker not.
    killed = subprocess.run([sys.executable, str(ROOT / "tests/resume_worker.py"), str(spec), str(kill_at + 1)],
                            cwd=ROOT, capture_output=True, text=True,
                            env=os.environ | {"OMP_NUM_THREADS": threads, "PYTHONPATH": str(ROOT)})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [f"checkpoint-{s}" for s in range(1, kill_at + 1)]
    assert (out / STAGING / f"checkpoint-{kill_at + 1}" / "adapter_model.safetensors").is_file(), "killed mid-write"
    assert not (out / "adapter_model.safetensors").exists()

    capsys.readouterr()
    resumed = finetune.train(make(out, resume="auto"))
    assert "pre-flight scan of 12 rows loaded from cache" in capsys.readouterr().out, "a resume does not rescan"
    assert not (out / STAGING).exists(), "the partial checkpoint was removed"
    assert losses(resumed) == losses(reference) and len(losses(reference)) == 5
    after, expected = load_file(resumed / "adapter_model.safetensors"), load_file(reference / "adapter_model.safetensors")
    assert after.keys() == expected.keys()
    assert all(torch.equal(after[k], expected[k]) for k in expected), "adapter tensors differ after resume"


def test_auto_resume_ignores_a_checkpoint_without_its_marker(tmp_path):
    out = tmp_path / "run"
    finetune.train(recipe(out, max_steps=2))
    torn = out / "checkpoint-7"  # e.g. a copy cut off by a full disk: files there, marker missing
    torn.mkdir()
    (torn / "adapter_model.safetensors").write_bytes(b"\0" * 10)
    assert is_complete(out / "checkpoint-2") and not is_complete(torn)
    assert resume_point("auto", out, False) == out / "checkpoint-2"

    # A listed file that changed size since the marker was written also makes a checkpoint incomplete.
    (out / "checkpoint-2" / "scheduler.pt").write_bytes(b"")
    assert resume_point("auto", out, False) == out / "checkpoint-1"

    # Resuming skips the torn folder but does not delete it: only finetune's own `.partial` is cleared.
    finetune.train(recipe(out, max_steps=3, resume="auto"))
    assert (torn / "adapter_model.safetensors").read_bytes() == b"\0" * 10
    assert is_complete(out / "checkpoint-2") and is_complete(out / "checkpoint-3")


def test_explicit_incomplete_checkpoint_is_refused_unless_allowed(tmp_path, capsys):
    out = tmp_path / "run"
    finetune.train(recipe(out, max_steps=1))
    checkpoint = out / "checkpoint-1"
    (checkpoint / "optimizer.pt").unlink()
    with pytest.raises(CheckpointError, match=r"training.resume: .*checkpoint-1 is incomplete: missing optimizer.pt"):
        resume_point(str(checkpoint), out, allow_incomplete=False)
    assert resume_point(str(checkpoint), out, allow_incomplete=True) == checkpoint
    assert "WARNING" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="is not a checkpoint folder"):
        resume_point(str(out / "checkpoint-9"), out, False)
    with pytest.raises(RecipeError, match="resume_from_checkpoint: not supported: use training.resume"):
        load_recipe(recipe(out, resume_from_checkpoint=str(checkpoint)))


def test_failed_save_keeps_the_previous_checkpoint_byte_identical(tmp_path, monkeypatch):
    out = tmp_path / "run"
    save_rng_state = transformers.Trainer._save_rng_state
    before = {}

    def disk_full_at_step_3(self, output_dir):
        if self.state.global_step == 3:
            before.update(digest(out / "checkpoint-2"))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), output_dir)
        return save_rng_state(self, output_dir)

    monkeypatch.setattr(transformers.Trainer, "_save_rng_state", disk_full_at_step_3)
    with pytest.raises(CheckpointError) as e:
        finetune.train(recipe(out))
    assert "saving checkpoint-3 failed (No space left on device)" in str(e.value)
    assert f"the previous checkpoint {out / 'checkpoint-2'} is intact" in str(e.value)
    assert "free some disk space" in str(e.value)
    assert before and digest(out / "checkpoint-2") == before
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-1", "checkpoint-2", "train_log.jsonl"], \
        "no partial files left"


def poison_loss_at(monkeypatch, step: int):
    """The model's loss becomes NaN on optimizer step `step` (as after an overflow or a corrupt sample)."""
    compute_loss = finetune.training.sft.SFTTrainer.compute_loss

    def nan_loss(self, model, inputs, *args, **kwargs):
        result = compute_loss(self, model, inputs, *args, **kwargs)
        if model.training and self.state.global_step + 1 == step:
            return result * float("nan")
        return result

    monkeypatch.setattr(finetune.training.sft.SFTTrainer, "compute_loss", nan_loss)


def test_nan_loss_stops_within_the_step_and_writes_nothing_after_it(tmp_path, monkeypatch):
    out = tmp_path / "run"
    poison_loss_at(monkeypatch, 3)
    with pytest.raises(TrainingHealthError, match="loss is nan at step 3: training stopped before applying it"):
        finetune.train(recipe(out))
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-1", "checkpoint-2", "train_log.jsonl"]
    weights = load_file(out / "checkpoint-2" / "adapter_model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_nan_loss_can_be_skipped_and_is_reported(tmp_path, monkeypatch):
    out = tmp_path / "run"
    poison_loss_at(monkeypatch, 3)
    r = recipe(out, save_strategy="no", max_steps=4)
    r["guards"] = {"on_nonfinite": "skip"}
    finetune.train(r)
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["steps"] == 4
    assert summary["health"]["skipped_batches"] == [{"step": 3, "what": "loss", "value": "nan"}]
    assert all(torch.isfinite(t).all() for t in load_file(out / "adapter_model.safetensors").values())


def test_non_finite_weights_are_never_checkpointed(tmp_path):
    out = tmp_path / "run"

    class Poison(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step == 2:
                next(p for p in model.parameters() if p.requires_grad).data.fill_(float("inf"))

    run = prepare(load_recipe(recipe(out)))
    run.trainer.add_callback(Poison())
    with pytest.raises(TrainingHealthError, match="is not finite after step 2; refusing to write checkpoint-2"):
        run.trainer.train()
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-1", "train_log.jsonl"]


def test_existing_output_folder_is_refused_with_a_resume_hint(tmp_path):
    out = tmp_path / "run"
    finetune.train(recipe(out, max_steps=1))
    with pytest.raises(RecipeError, match=r"already holds files .*checkpoint-1: training.resume=auto continues"):
        finetune.train(recipe(out, max_steps=2))
    assert is_complete(out / "checkpoint-1") and (out / "adapter_model.safetensors").is_file()


def test_ctrl_c_saves_a_resumable_checkpoint(tmp_path):
    out = tmp_path / "run"
    spec = tmp_path / "recipe.yaml"
    spec.write_text(json.dumps(recipe(out, max_steps=10_000, save_strategy="no")))  # JSON is YAML
    proc = subprocess.Popen([sys.executable, "-m", "finetune", "train", str(spec)], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=os.environ | {"OMP_NUM_THREADS": "1"})
    for line in proc.stdout:  # training has started once the trainer exists
        if "trainable parameters" in line:
            break
    time.sleep(3)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    saved = sorted(out.glob("checkpoint-*"))
    assert len(saved) == 1 and is_complete(saved[0]), stderr[-2000:]
    assert "Continue with: finetune train" in stderr and "training.resume=auto" in stderr
    step = int(saved[0].name.split("-")[1])
    resumed = finetune.train(recipe(out, max_steps=step + 1, save_strategy="no", resume="auto"))
    assert json.loads((resumed / "run_summary.json").read_text())["steps"] == step + 1


def test_outputs_hold_no_pickled_weights_and_every_pickle_loads_weights_only(tmp_path):
    out = tmp_path / "run"
    finetune.train(recipe(out, max_steps=2))
    files = [p for p in out.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in (".bin", ".ckpt", ".pkl", ".pickle")], "weights are safetensors"
    assert {p.name for p in out.rglob("*.safetensors")} == {"adapter_model.safetensors"}
    for p in files:
        if p.suffix in (".pt", ".pth"):  # optimizer, scheduler and RNG state: tensors, numbers, numpy RNG state only
            with safe_globals():  # the numpy types transformers allows when it resumes
                torch.load(p, weights_only=True)
    assert all((c / MARKER).is_file() for c in out.glob("checkpoint-*"))


def test_unusual_learning_rates_need_confirmation(tmp_path):
    with pytest.raises(RecipeError, match=r"training.learning_rate: 20000 is outside 1e-07..0.01"):
        load_recipe(recipe(tmp_path, learning_rate=2e4))
    r = recipe(tmp_path, learning_rate=0.05)
    r["guards"] = {"allow_unusual_learning_rate": True}
    assert load_recipe(r).training.learning_rate == 0.05


def test_non_finite_gradient_stops_before_the_optimizer_step(tmp_path):
    out = tmp_path / "run"

    class InfGradient(transformers.TrainerCallback):  # the loss stays finite; one gradient overflows
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            if state.global_step == 1:
                param = next(p for p in model.parameters() if p.requires_grad)
                param.register_hook(lambda grad: grad * float("inf"))

    run = prepare(load_recipe(recipe(out)))
    run.trainer.add_callback(InfGradient())
    with pytest.raises(TrainingHealthError, match=r"gradient norm is (inf|nan) at step 2"):
        run.trainer.train()
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-1", "train_log.jsonl"]


def test_gradient_norm_spikes_are_reported(capsys):
    monitor = HealthMonitor("stop", spike_factor=10.0)
    for step, norm in enumerate([1.0, 1.2, 0.9, 1.1, 1.0, 1.0, 30.0, 1.0], start=1):
        assert monitor.check_grad_norm(norm, step)
    assert monitor.spikes == [{"step": 7, "grad_norm": 30.0, "median_before": 1.0}]
    assert "gradient-norm spike at step 7" in capsys.readouterr().err
