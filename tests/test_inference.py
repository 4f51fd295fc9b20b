"""Evaluation, before/after report, predict and chat, from a run folder (and a merged export)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import finetune
from conftest import ROOT
from finetune.evaluation.metrics import relaxed_accuracy

BIN = Path(sys.executable).parent
CHART = ROOT / "data/chartqa-tiny/images/test-0000.png"
QUESTION = "Which color is the tallest bar?"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("inference") / "run"
    return finetune.train(ROOT / "recipes/tiny-chartqa.yaml", [
        "model.name_or_path=zoo:qwen2_vl", f"data.path={ROOT / 'data/chartqa-tiny'}", "data.max_samples=48",
        "training.max_steps=12", "training.learning_rate=5e-3", f"training.output_dir={out}",
        "evaluation.limit=16", "evaluation.every_n_steps=6", "evaluation.during_limit=8", "evaluation.keep_best=true"])


def test_training_writes_before_after_report(run_dir):
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert metrics["metric"] == "relaxed_accuracy" and metrics["n"] == 16 and metrics["split"] == "test"
    for key in ("base", "tuned", "majority_answer", "majority_per_question"):
        assert 0.0 <= metrics[key] <= 1.0
    records = [json.loads(line) for line in (run_dir / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert len(records) == 16 and set(records[0]) == {"id", "turn", "prompt", "prediction", "references", "score"}
    assert all(r["score"] == relaxed_accuracy(r["prediction"], r["references"]) for r in records)
    assert sum(r["score"] for r in records) / 16 == pytest.approx(metrics["tuned"])
    report = (run_dir / "report.md").read_text()
    assert "| fine-tuned |" in report and "| majority answer (no image) |" in report and "loss_curve.png" in report
    # The in-training evaluation ran at steps 6 and 12, was logged with the loss, and kept the best adapter.
    summary = json.loads((run_dir / "run_summary.json").read_text())
    assert summary["steps"] == 12
    name, points = summary["eval_during_training"]
    assert name == "eval_relaxed_accuracy" and [step for step, _ in points] == [6, 12]
    best = json.loads((run_dir / "best" / "best.json").read_text())
    assert best["step"] in (6, 12) and (run_dir / "best" / "adapter_model.safetensors").is_file()


def test_evaluate_command_reproduces_the_run_score(run_dir, tmp_path):
    result = finetune.evaluate(run_dir, limit=16, out_dir=tmp_path)
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert result["score"] == pytest.approx(metrics["tuned"])  # same model, template and data: same answers
    assert result["kind"] == "adapter"


def cli(*args, stdin=None):
    result = subprocess.run([str(BIN / "finetune"), *args], cwd=ROOT, input=stdin, capture_output=True, text=True,
                            env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_predict_and_chat_agree(run_dir):
    direct = finetune.predict(run_dir, QUESTION, [str(CHART)])
    assert direct, "the trained model answers something"
    printed = cli("predict", str(run_dir), "--image", str(CHART), "--prompt", QUESTION).strip().splitlines()[-1]
    assert printed == direct
    transcript = cli("chat", str(run_dir), stdin=f"/image {CHART}\n{QUESTION}\nAnd the shortest?\n/exit\n")
    answers = [line.split("model> ", 1)[1] for line in transcript.splitlines() if "model> " in line]
    assert len(answers) == 2 and answers[0] == direct


def test_predict_over_a_jsonl_file(run_dir, tmp_path):
    rows = tmp_path / "q.jsonl"
    rows.write_text(json.dumps({"prompt": QUESTION, "images": [str(CHART)]}) + "\n")
    out = Path(cli("predict", str(run_dir), "--data", str(rows)).strip().splitlines()[-1])
    answers = [json.loads(line) for line in out.read_text().splitlines()]
    assert answers[0]["prediction"] == finetune.predict(run_dir, QUESTION, [str(CHART)])


def test_merged_export_answers_like_the_adapter(run_dir, tmp_path):
    """A merged folder (weights + processor + recipe.yaml) serves predict and chat with the same answers."""
    import shutil

    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from finetune.evaluation.inference import base_of

    merged = tmp_path / "merged"
    base = AutoModelForImageTextToText.from_pretrained(base_of(run_dir))
    PeftModel.from_pretrained(base, str(run_dir)).merge_and_unload().save_pretrained(merged)
    for name in ("processor_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                 "recipe.yaml"):
        shutil.copy(run_dir / name, merged / name)
    from_adapter = finetune.predict(run_dir, QUESTION, [str(CHART)])
    assert finetune.predict(merged, QUESTION, [str(CHART)]) == from_adapter
    transcript = cli("chat", str(merged), stdin=f"/image {CHART}\n{QUESTION}\n/exit\n")
    assert [line.split("model> ", 1)[1] for line in transcript.splitlines() if "model> " in line] == [from_adapter]
