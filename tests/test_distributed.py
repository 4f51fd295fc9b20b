"""A real 2-process CPU (gloo) training job through torchrun."""

import json
import os
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

from conftest import ROOT

BIN = Path(sys.executable).parent


def test_two_process_cpu_training(tmp_path):
    reports, out = tmp_path / "reports", tmp_path / "runs" / "ddp"
    reports.mkdir()
    # Rows of their own (a file no other test reads), so that no earlier test's scan is in the cache.
    sample = ROOT / "data/chartqa-tiny"
    (tmp_path / "train.jsonl").write_text("".join((sample / "train.jsonl").read_text().splitlines(True)[:32]))
    result = subprocess.run(
        [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", str(ROOT / "tests/ddp_worker.py"),
         str(reports), str(ROOT / "recipes/tiny-chartqa.yaml"), "model.name_or_path=zoo:qwen2_vl",
         f"data.path={tmp_path / 'train.jsonl'}", f"data.image_root={sample}", "data.eval_split=null",
         "training.max_steps=4", "training.per_device_train_batch_size=4", "training.logging_steps=1",
         f"training.output_dir={out}", "training.disable_tqdm=true"],
        cwd=ROOT, capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"}, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.loads((reports / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2] and ranks[0]["backend"] == "gloo"
    # 4 steps x 4 samples per rank: each rank saw 16 rows, and no row was seen by both.
    assert [len(r["rows"]) for r in ranks] == [16, 16]
    assert not set(ranks[0]["rows"]) & set(ranks[1]["rows"])
    # DDP averaged the gradients: both ranks end with the same adapter, which is the one saved.
    assert ranks[0]["adapter_sha256"] == ranks[1]["adapter_sha256"] and ranks[0]["n_lora_tensors"] > 0
    saved = load_file(out / "adapter_model.safetensors")
    assert len(saved) == ranks[0]["n_lora_tensors"]
    # One output folder, written once: the summary counts the steps of one run, the logs come from rank 0 only.
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["ddp"]
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["steps"] == 4 and len(summary["loss_curve"]) == 4
    assert summary["distributed"] == {"strategy": "DDP", "world_size": 2}
    assert result.stdout.count("[finetune] done in") == 1
    # The data was scanned once, by rank 0; rank 1 waited and loaded the cached scan.
    assert result.stdout.count("[finetune] rank 0: pre-flight scan of 32 rows (header check") == 1
    assert result.stdout.count("[finetune] rank 1: pre-flight scan of 32 rows loaded from cache") == 1
    assert result.stdout.count("pre-flight scan of") == 2
    assert ranks[0]["scan"] == ranks[1]["scan"], "every rank has the same kept rows and lengths"
    assert result.stdout.count("[finetune] train data:") == 1 and result.stdout.count("[finetune] trainable parameters") == 1
    # Throughput counts the batches of both ranks.
    seen = [r["seen"] for r in ranks]
    assert summary["throughput"]["samples"] == 32 == seen[0][0] + seen[1][0]
    assert summary["throughput"]["tokens"] == seen[0][1] + seen[1][1]
    assert summary["throughput"]["padding_fraction"] == round(1 - (seen[0][1] + seen[1][1]) / (seen[0][2] + seen[1][2]), 4)
