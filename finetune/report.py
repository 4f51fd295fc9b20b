"""What a run leaves behind besides the adapter: the resolved recipe, a JSON summary and a loss-curve PNG."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from PIL import Image, ImageDraw


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


def plot_loss(points: list[tuple[int, float]], path: Path, title: str = "training loss",
              metric: tuple[str, list[tuple[int, float]]] | None = None) -> None:
    """A plain line chart drawn with PIL (no plotting dependency for one figure); an eval metric on a 0-1 axis."""
    width, height, pad = 640, 400, 50
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((pad, 15), title, fill="black")
    draw.line([(pad, pad), (pad, height - pad), (width - pad, height - pad)], fill="black")
    if points:
        steps = [s for s, _ in points]
        losses = [v for _, v in points]
        lo, hi = min(losses), max(losses)
        hi = hi if hi > lo else lo + 1.0
        s0, s1 = min(steps), max(steps) if max(steps) > min(steps) else min(steps) + 1

        def xy(step, loss):
            return (pad + (step - s0) / (s1 - s0) * (width - 2 * pad),
                    height - pad - (loss - lo) / (hi - lo) * (height - 2 * pad))

        draw.line([xy(s, v) for s, v in points], fill=(31, 119, 180), width=2)
        draw.text((5, pad - 5), f"{hi:.3f}", fill="black")
        draw.text((5, height - pad - 5), f"{lo:.3f}", fill="black")
        draw.text((pad, height - pad + 8), f"step {s0}", fill="black")
        draw.text((width - pad - 60, height - pad + 8), f"step {s1}", fill="black")
        if metric and metric[1]:
            name, values = metric

            def mxy(step, value):
                return xy(step, lo)[0], height - pad - value * (height - 2 * pad)

            draw.line([mxy(s, v) for s, v in values], fill=(214, 39, 40), width=2)
            for s, v in values:
                x, y = mxy(s, v)
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(214, 39, 40))
            draw.text((width - pad + 5, pad - 5), "1.0", fill=(214, 39, 40))
            draw.text((width - pad + 5, height - pad - 5), "0.0", fill=(214, 39, 40))
            draw.text((width - 260, 15), f"red: {name} (right axis)", fill=(214, 39, 40))
    image.save(path)


def metric_table(result: dict) -> str:
    """The before/after table, as markdown."""
    metric = result["metric"]
    rows = [("base model", result["base"]), ("fine-tuned", result["tuned"]),
            ("majority answer (no image)", result["majority_answer"]),
            ("majority answer per question (no image)", result["majority_per_question"])]
    lines = [f"| {result['split']} split, {result['n']} samples | {metric} |", "|---|---|"]
    lines += [f"| {name} | {value:.3f} |" for name, value in rows]
    return "\n".join(lines)


def write_report(out: Path, run, result: dict, records: list[dict], n_examples: int = 8) -> str:
    """report.md: recipe, data, loss curve, before/after metrics and example predictions."""
    table = metric_table(result)
    summary = json.loads((out / "run_summary.json").read_text())
    examples = "\n".join(
        f"| {r['id']} | {r['prompt']} | {r['prediction']} | {' / '.join(r['references'])} | {r['score']:.2f} |"
        for r in records[:n_examples])
    text = f"""# Fine-tuning report: {run.recipe.model.name_or_path}

Family: {run.family.name}. Steps: {summary['steps']}. Loss {summary['first_loss']} -> {summary['final_loss']}.
Wall time: {summary['wall_time_s']} s.

## Held-out results

{table}

## Loss curve

![loss curve](loss_curve.png)

## Data

```json
{json.dumps(summary['train_data'], indent=2)}
```

## Example predictions (fine-tuned)

| row | question | prediction | reference | score |
|---|---|---|---|---|
{examples}

## Recipe

```yaml
{(out / 'recipe.yaml').read_text()}```
"""
    (out / "report.md").write_text(text, encoding="utf-8")
    return table
