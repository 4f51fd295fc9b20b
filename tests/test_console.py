"""What a user sees: the tiny recipe's console (no deprecation warnings, numbers as numbers), its figure and
report.md, and finetune's own metrics in a tracker (tensorboard) next to the loss."""

import json
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT
from finetune.evaluation.plots import Line, Panel, panels_figure, smoothed, training_figure

STEPS = 10


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """`finetune train recipes/tiny-chartqa.yaml` for 10 steps, a tracker on, with every warning shown."""
    out = tmp_path_factory.mktemp("console") / "run"
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "default"}  # DeprecationWarnings too
    result = subprocess.run(
        [sys.executable, "-m", "finetune", "train", "recipes/tiny-chartqa.yaml", f"training.output_dir={out}",
         f"training.max_steps={STEPS}", "training.logging_steps=5", "training.report_to=tensorboard",
         "evaluation.every_n_steps=5", "evaluation.during_limit=8", "evaluation.limit=16"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, result.stdout + result.stderr


def logged_steps(out) -> list[dict]:
    """The training logs (with a loss) of train_log.jsonl, the run folder's log."""
    lines = (out / "train_log.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if "loss" in e]


def test_the_tiny_recipe_prints_one_formatted_line_per_log_and_no_raw_dicts(tiny_run):
    out, console = tiny_run
    warned = [line for line in console.splitlines() if re.search(r"(Future|Deprecation|User)Warning", line)]
    assert warned == []
    assert "{'" not in console, "no raw log dict on the console"
    summary = json.loads((out / "run_summary.json").read_text())
    lines = re.findall(r"step (\d+)/10 · loss ([\d.]+) · lr ([\d.e+-]+) · ([\d,]+) tokens/s(.*)", console)
    assert [int(step) for step, *_ in lines] == [5, 10]
    logs = logged_steps(out)
    for (step, loss, lr, tokens, rest), log, point in zip(lines, logs, summary["loss_curve"]):
        assert float(loss) == float(f"{point['loss']:.4g}")  # 4 significant digits
        assert float(lr) == pytest.approx(log["learning_rate"], rel=5e-3)
        assert int(tokens.replace(",", "")) == round(log["tokens_per_second"]) > 0
        # The held-out metric evaluated at this step (before its loss line) is on the line.
        during = dict(summary["eval_during_training"][1])
        assert f"eval_relaxed_accuracy {during[int(step)]:.4g}" in rest
    # The full dicts are in the run folder's log and run_summary.json, every figure a number.
    assert [e["step"] for e in logs] == [5, 10] and all(0 <= e["padding_fraction"] < 0.1 for e in logs)
    assert all(isinstance(v, (int, float)) for e in logs for v in e.values())
    assert [e for e in summary["log_history"] if "loss" in e] == [{k: v for k, v in e.items()} for e in logs]
    final = re.search(r"\[finetune\] done in \d+s; loss (\d+\.\d{4}) -> (\d+\.\d{4}); (\d+) tokens/s", console)
    assert final and float(final[2]) == round(summary["final_loss"], 4)


def test_report_is_in_rounded_figures_with_groups_and_the_worst_predictions(tiny_run):
    out, _ = tiny_run
    report = (out / "report.md").read_text()
    summary = json.loads((out / "run_summary.json").read_text())
    body = report[:report.index("## Recipe")]
    assert f"Loss {summary['first_loss']:.4f} -> {summary['final_loss']:.4f}." in body
    assert not re.search(r"\d\.\d{5,}", body), "no unrounded figure"
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    records = [json.loads(line) for line in (out / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert metrics["n"] == len(records) == 16

    # The bundled data has no question-type column, and asks three templated questions: broken down by question.
    groups = metrics["breakdown"]["groups"]
    assert metrics["breakdown"]["by"] == "question" and sum(g["n"] for g in groups) == 16
    for g in groups:
        scores = [r["score"] for r in records if r["prompt"] == g["group"]]
        assert g["n"] == len(scores) and g["tuned"] == pytest.approx(sum(scores) / len(scores))
        assert f"| {g['group']} | {g['n']} | {g['base']:.3f} | {g['tuned']:.3f} |" in body
    assert [g["tuned"] for g in groups] == sorted(g["tuned"] for g in groups)  # weakest first

    worst = body[body.index("## Worst-scored predictions"):].splitlines()[4:9]
    lowest = sorted(r["score"] for r in records)[:5]
    assert [float(line.rsplit("|", 2)[1]) for line in worst] == pytest.approx(lowest, abs=0.005)


def test_tensorboard_has_finetunes_throughput_and_eval_metric_next_to_the_loss(tiny_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, console = tiny_run
    (logdir,) = (out / "runs").iterdir()
    events = EventAccumulator(str(logdir))
    events.Reload()
    scalars = {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}
    summary = json.loads((out / "run_summary.json").read_text())
    assert scalars["train/loss"] == pytest.approx({p["step"]: p["loss"] for p in summary["loss_curve"]}, rel=1e-6)
    logged = logged_steps(out)
    assert list(scalars["train/tokens_per_second"]) == [5, 10]
    assert list(scalars["train/tokens_per_second"].values()) == pytest.approx(
        [log["tokens_per_second"] for log in logged], rel=1e-3)
    assert set(scalars["train/padding_fraction"]) == {5, 10}
    during = summary["eval_during_training"]
    assert during[0] == "eval_relaxed_accuracy"
    assert scalars["eval/relaxed_accuracy"] == pytest.approx(dict(during[1]))
    assert list(scalars["eval/relaxed_accuracy"]) == [5, 10]
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert scalars["eval/relaxed_accuracy_tuned"] == pytest.approx({STEPS: metrics["tuned"]})
    assert scalars["eval/relaxed_accuracy_base"] == pytest.approx({STEPS: metrics["base"]})


def test_the_run_figure_is_a_png_with_labelled_axes(tiny_run):
    from PIL import Image

    out, _ = tiny_run
    with Image.open(out / "loss_curve.png") as png:
        assert png.format == "PNG" and png.width >= 800 and png.height >= 700
    loss = [{"step": 5 * i, "loss": 8.0 / i, "learning_rate": 1e-3 * (1 - i / 40)} for i in range(1, 41)]
    metric = ("eval_relaxed_accuracy", [(100, 0.25), (200, 0.5)])
    fig = training_figure(loss + [{"step": s, "eval_relaxed_accuracy": v} for s, v in metric[1]], None, "t",
                          metric)
    top, bottom, right = fig.axes
    assert (top.get_ylabel(), bottom.get_ylabel(), bottom.get_xlabel()) == ("training loss", "learning rate", "step")
    assert right.get_ylabel() == "held-out relaxed_accuracy" and right.get_ylim() == (-0.02, 1.02)
    raw, average = top.get_lines()
    assert list(raw.get_ydata()) == [8.0 / i for i in range(1, 41)]
    assert list(average.get_ydata()) == pytest.approx(smoothed([8.0 / i for i in range(1, 41)], 4))
    assert [t.get_text() for t in top.get_legend().get_texts()] == [
        "loss (each log)", "loss (moving average, 4 logs)", "relaxed_accuracy"]
    assert list(right.get_lines()[0].get_ydata()) == [0.25, 0.5]
    assert list(bottom.get_lines()[0].get_ydata()) == [e["learning_rate"] for e in loss]


def test_panels_take_any_series_and_short_series_are_drawn_unsmoothed():
    fig = panels_figure(None, [Panel("reward", [Line("chosen", [(1, 0.5), (2, 0.7)], smooth=True),
                                                 Line("rejected", [(1, 0.4), (2, 0.1)])],
                                     right=[Line("margin", [(1, 0.1), (2, 0.6)])], right_label="margin")],
                        x_label="optimizer step")
    ax, twin = fig.axes
    assert (ax.get_ylabel(), ax.get_xlabel(), twin.get_ylabel()) == ("reward", "optimizer step", "margin")
    assert [line.get_label() for line in ax.get_lines()] == ["chosen", "rejected"]
    assert smoothed([2.0, 2.0, 2.0], 3) == pytest.approx([2.0, 2.0, 2.0])  # debiased: no pull towards 0


def test_breakdown_uses_a_source_column_when_the_data_has_one(tmp_path):
    from finetune.evaluation.heldout import breakdown, grouping
    from finetune.recipe import RecipeError, load_recipe

    rows = [{"image": "a.png", "query": f"q{i}", "label": ["x"], "source": src, "human_or_machine": 0}
            for i, src in enumerate(["docvqa", "chartqa", "docvqa", "chartqa", "docvqa"])]
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = load_recipe({"model": {"name_or_path": "zoo:qwen2_vl"},
                          "data": {"path": str(tmp_path), "format": "chartqa", "eval_split": "test"}})
    # Records of rows 0-3 only (a limit), scored 1, 0, 1, 1 fine-tuned and 0 everywhere for the base model.
    tuned = [{"id": i, "prompt": f"q{i}", "score": s} for i, s in enumerate([1.0, 0.0, 1.0, 1.0])]
    base = [{**r, "score": 0.0} for r in tuned]
    by, groups = grouping(recipe, "test", tuned)
    assert (by, groups) == ("source", ["docvqa", "chartqa", "docvqa", "chartqa"])  # human_or_machine: one value
    assert breakdown(base, tuned, by, groups) == {"by": "source", "groups": [
        {"group": "chartqa", "n": 2, "base": 0.0, "tuned": 0.5}, {"group": "docvqa", "n": 2, "base": 0.0, "tuned": 1.0}]}
    recipe.evaluation.group_by = "kind"
    with pytest.raises(RecipeError, match="evaluation.group_by: the test split has no column 'kind'"):
        grouping(recipe, "test", tuned)
    recipe.evaluation.group_by = None
    distinct = [{"id": i, "prompt": f"q{i}", "score": 1.0} for i in range(4)]
    (tmp_path / "test.jsonl").write_text("".join(json.dumps({**r, "source": "one"}) + "\n" for r in rows))
    assert grouping(recipe, "test", distinct) == (None, [])  # one source, and every question distinct


def test_progress_lines_show_the_methods_figures_and_each_held_out_figure_once():
    from types import SimpleNamespace

    from finetune.recipe import METHODS
    from finetune.training.progress import ProgressLines

    args = SimpleNamespace(logging_strategy="steps", logging_steps=5)
    state = SimpleNamespace(is_world_process_zero=True, global_step=3, max_steps=10)
    lines = ProgressLines(METHODS["dpo"].progress)
    # An eval at a step without a loss log gets its own line; at a logging step it waits for the loss line.
    assert lines.line(args, state, {"eval_relaxed_accuracy": 0.25, "eval_runtime": 1.5}) == \
        "step 3/10 · eval_relaxed_accuracy 0.25"
    state.global_step = 5
    assert lines.line(args, state, {"eval_relaxed_accuracy": 0.5}) is None
    logs = {"loss": 0.693147, "learning_rate": 5e-6, "tokens_per_second": 12345.6, "rewards/accuracies": 0.75,
            "rewards/margins": 0.0123456, "grad_norm": 3.2}
    assert lines.line(args, state, logs) == ("step 5/10 · loss 0.6931 · lr 5.00e-06 · 12,346 tokens/s · "
                                             "rewards/accuracies 0.75 · rewards/margins 0.01235 · "
                                             "eval_relaxed_accuracy 0.5")
    assert lines.line(args, state, {"train_runtime": 9.0, "train_loss": 0.7}) is None  # finetune prints its own
    state.is_world_process_zero = False
    assert lines.line(args, state, logs) is None
