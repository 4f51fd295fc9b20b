"""What a run leaves behind besides the adapter: the resolved recipe, a JSON summary and report.md (the figure is
drawn by finetune.evaluation.plots)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml


def write_recipe(recipe, out: Path) -> None:
    header = "# The resolved recipe this run trained with (defaults filled in, overrides applied).\n"
    (out / "recipe.yaml").write_text(header + yaml.safe_dump(recipe.to_dict(), sort_keys=False), encoding="utf-8")


def write_summary(summary: dict, out: Path) -> None:
    (out / "run_summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")


def loss_points(log_history: list[dict]) -> list[tuple[int, float]]:
    return [(entry["step"], entry["loss"]) for entry in log_history if "loss" in entry and "step" in entry]


def metric_points(log_history: list[dict]) -> tuple[str, list[tuple[int, float]]] | None:
    """The in-training generation eval (`eval_<metric>` entries), if any."""
    for entry in log_history:
        for key in entry:
            if key.startswith("eval_") and key not in ("eval_loss", "eval_runtime") and "per_second" not in key:
                return key, [(e["step"], e[key]) for e in log_history if key in e]
    return None


def metric_table(result: dict) -> str:
    """The before/after table, as markdown."""
    metric = result["metric"]
    start = result.get("start")
    rows = [("base model", result["base"]),
            *([(f"starting adapter ({start['adapter']})", start["score"])] if start else []),
            ("fine-tuned", result["tuned"]),
            ("majority answer (no image)", result["majority_answer"]),
            ("majority answer per question (no image)", result["majority_per_question"])]
    lines = [f"| {result['split']} split, {result['n']} samples | {metric} |", "|---|---|"]
    lines += [f"| {name} | {value:.3f} |" for name, value in rows]
    return "\n".join(lines)


def headline(summary: dict) -> str:
    """Steps, loss and speed in rounded figures (run_summary.json keeps them in full)."""
    first, final = summary.get("first_loss"), summary.get("final_loss")
    loss = f"Loss {first:.4f} -> {final:.4f}." if first is not None and final is not None else "No loss logged."
    speed = summary.get("throughput")
    speed = (f" {speed['tokens_per_second']:,.0f} tokens/s, {speed['samples_per_second']:.2f} samples/s, "
             f"{speed['padding_fraction']:.1%} padding." if speed else "")
    return f"Steps: {summary['steps']}. {loss} Wall time: {summary['wall_time_s']:.0f} s.{speed}"


def breakdown_table(breakdown: dict | None, metric: str) -> str:
    """The fine-tuned score per group (question type, source, ...), worst first; empty without groups."""
    if not breakdown:
        return ""
    lines = [f"| {breakdown['by']} | samples | base | fine-tuned |", "|---|---|---|---|"]
    lines += [f"| {g['group']} | {g['n']} | {g['base']:.3f} | {g['tuned']:.3f} |" for g in breakdown["groups"]]
    return f"\n### By {breakdown['by']} ({metric})\n\n" + "\n".join(lines) + "\n"


def predictions_table(records: list[dict]) -> str:
    rows = [f"| {_row(r)} | {_cell(r['prompt'])} | "
            f"{_cell(r['prediction'])} | {_cell(' / '.join(r['references']))} | {r['score']:.2f} |" for r in records]
    return "| row | question | prediction | reference | score |\n|---|---|---|---|---|\n" + "\n".join(rows)


def worst(records: list[dict], n: int = 5) -> list[dict]:
    """The n lowest-scored predictions (the first of equal scores in data order)."""
    return sorted(records, key=lambda r: r["score"])[:n]


def _row(record: dict) -> str:
    """The row id, and which of its assistant turns after the first (`7, turn 2`)."""
    return f"{record['id']}, turn {record['turn'] + 1}" if record.get("turn") else str(record["id"])


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def write_report(out: Path, run, result: dict, records: list[dict], n_examples: int = 8) -> str:
    """report.md: recipe, data, figure, before/after metrics (per group where the data has groups), example
    predictions and the worst-scored ones."""
    table = metric_table(result)
    summary = json.loads((out / "run_summary.json").read_text())
    text = f"""# Fine-tuning report: {run.recipe.model.name_or_path}

Family: {run.family.name}. {headline(summary)}

## Held-out results

{table}
{breakdown_table(result.get("breakdown"), result["metric"])}
## Training curves

![loss, held-out metric and learning rate by step](loss_curve.png)

## Data

```json
{json.dumps(summary['train_data'], indent=2)}
```

## Example predictions (fine-tuned)

{predictions_table(records[:n_examples])}

## Worst-scored predictions (fine-tuned)

{predictions_table(worst(records))}

## Recipe

```yaml
{(out / 'recipe.yaml').read_text()}```
"""
    (out / "report.md").write_text(text, encoding="utf-8")
    return table
