"""Generation-based evaluation: greedy answers on a held-out split, scored per task, written as JSONL + JSON; and
what the score is broken down by and compared with (answering without the image)."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from ..data.rows import ROW_ID, chat_dataset, source_rows
from ..recipe import Recipe, RecipeError, load_recipe
from .inference import Target, generate, load_target
from .metrics import DEFAULT_METRIC, METRICS, normalize


@dataclass
class Example:
    """One assistant turn to answer: the conversation before it (earlier replies as the data gives them), the
    images and videos that conversation shows, and the reply as reference."""

    row_id: int
    prompt: list[dict]
    images: list
    references: list[str]
    videos: list = field(default_factory=list)
    turn: int = 0  # which assistant turn of its row (0 = the first)


def examples(dataset, limit: int | None = None) -> list[Example]:
    """Every assistant turn of the first `limit` rows, as an Example; unusable rows (the pre-flight report names
    them) are skipped."""
    out = []
    for i in range(len(dataset) if limit is None else min(limit, len(dataset))):
        sample = dataset[i]
        if sample.get("chosen") and not sample["problem"]:  # a preference row: its chosen reply is the answer
            out.append(Example(sample["row_id"], sample["messages"], sample["images"], [sample["chosen"]]))
        elif not sample["problem"]:
            out += row_examples(sample)
    return out


def write_eval(eval_dir: Path, records: list[dict], result: dict) -> None:
    """`predictions.jsonl` (one record per scored answer) and `metrics.json` in `eval_dir` (a run's `eval/`)."""
    eval_dir.mkdir(parents=True, exist_ok=True)
    with open(eval_dir / "predictions.jsonl", "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    (eval_dir / "metrics.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


def row_examples(sample: dict) -> list[Example]:
    """One Example per assistant turn of a chat row, each with the images and videos its prompt places."""
    messages = sample["messages"]
    out = []
    for end, message in enumerate(messages):
        if message["role"] != "assistant" or not end:
            continue
        prompt = messages[:end]
        shown = [p["type"] for m in prompt for p in m["content"]]
        reply = "".join(p["text"] for p in message["content"] if p["type"] == "text")
        out.append(Example(sample["row_id"], prompt, list(sample["images"])[:shown.count("image")], [reply],
                           list(sample["videos"] or [])[:shown.count("video")], turn=len(out)))
    return out


#: Columns that commonly say what kind of question a row asks, or where it came from (ChartQA: human_or_machine).
GROUP_COLUMNS = ("question_type", "type", "category", "source", "human_or_machine")
#: Without such a column, templated eval sets (a few distinct questions) are broken down by the question itself.
MAX_QUESTION_GROUPS = 12


def grouping(recipe: Recipe, split: str, records: list[dict]) -> tuple[str | None, list[str]]:
    """What to break the held-out score down by, and each record's group; (None, []) when nothing splits it."""
    rows = source_rows(recipe.data, split)
    wanted = recipe.evaluation.group_by
    if wanted and wanted not in rows.column_names:
        raise RecipeError(f"evaluation.group_by: the {split} split has no column '{wanted}' (columns: "
                          f"{', '.join(c for c in rows.column_names if c != ROW_ID)})")
    for column in [wanted] if wanted else [c for c in GROUP_COLUMNS if c in rows.column_names]:
        label = dict(zip(rows[ROW_ID], rows[column]))
        groups = [str(label[r["id"]]) for r in records]
        if len(set(groups)) > 1:
            return column, groups
    keys = [normalize(r["prompt"]) for r in records]
    if not wanted and 1 < len(set(keys)) <= min(MAX_QUESTION_GROUPS, len(records) // 2):
        shown: dict[str, str] = {}  # each question as the data first words it
        for key, record in zip(keys, records):
            shown.setdefault(key, record["prompt"])
        return "question", [shown[key] for key in keys]
    return None, []


def breakdown(base: list[dict], tuned: list[dict], by: str | None, groups: list[str]) -> dict | None:
    """Mean base and fine-tuned score per group, the fine-tuned model's weakest group first."""
    if by is None:
        return None
    members: dict[str, list[int]] = {}
    for i, group in enumerate(groups):
        members.setdefault(group, []).append(i)

    def mean(records, idx):
        return sum(records[i]["score"] for i in idx) / len(idx)

    rows = [{"group": g, "n": len(idx), "base": mean(base, idx), "tuned": mean(tuned, idx)}
            for g, idx in members.items()]
    return {"by": by, "groups": sorted(rows, key=lambda r: (r["tuned"], -r["n"], r["group"]))}


def metric_for(recipe: Recipe, metric: str | None) -> str:
    name = metric or recipe.evaluation.metric or DEFAULT_METRIC.get(recipe.data.format, "exact_match")
    if name not in METRICS:
        raise RecipeError(f"evaluation.metric: unknown metric '{name}'; choose from {', '.join(METRICS)}")
    return name


def score(target: Target, items: list[Example], metric: str, batch_size: int = 8, max_new_tokens: int = 16,
          desc: str = "eval") -> tuple[float, list[dict]]:
    """Mean score and one record per example (id, prompt, prediction, references, score)."""
    fn = METRICS[metric]
    records = []
    for start in tqdm(range(0, len(items), batch_size), desc=desc, unit="batch", leave=False):
        chunk = items[start:start + batch_size]
        answers = generate(target, [e.prompt for e in chunk], [e.images for e in chunk], max_new_tokens,
                           videos=[e.videos for e in chunk])
        for example, answer in zip(chunk, answers):
            question = " ".join(p["text"] for p in example.prompt[-1]["content"] if p["type"] == "text")
            records.append({"id": example.row_id, "turn": example.turn, "prompt": question, "prediction": answer,
                            "references": example.references, "score": fn(answer, example.references)})
    mean = sum(r["score"] for r in records) / len(records) if records else 0.0
    return mean, records


def majority_baselines(train_items: list[Example], eval_items: list[Example], metric: str) -> dict[str, float]:
    """What answering without the image scores: the most common training answer, overall and per question."""
    fn = METRICS[metric]
    answers = Counter(normalize(e.references[0]) for e in train_items)
    overall = answers.most_common(1)[0][0] if answers else ""
    per_question: dict[str, Counter] = {}
    for e in train_items:
        per_question.setdefault(_question(e), Counter())[normalize(e.references[0])] += 1

    def mean(guess) -> float:
        return sum(fn(guess(e), e.references) for e in eval_items) / max(1, len(eval_items))

    return {
        "majority_answer": mean(lambda e: overall),
        "majority_per_question": mean(lambda e: per_question[_question(e)].most_common(1)[0][0]
                                      if _question(e) in per_question else overall),
    }


def _question(e: Example) -> str:
    return normalize(" ".join(p["text"] for p in e.prompt[-1]["content"] if p["type"] == "text"))


def evaluate(target: str | Path | Target, split: str | None = None, limit: int | None = None,
             metric: str | None = None, out_dir: str | Path | None = None, recipe: Recipe | str | None = None,
             batch_size: int = 8, max_new_tokens: int = 16) -> dict:
    """Evaluate a run folder, merged export or base model; writes predictions.jsonl and metrics.json."""
    if isinstance(recipe, (str, Path)):
        recipe = load_recipe(recipe)
    if not isinstance(target, Target):
        target = load_target(target, recipe)
    recipe = recipe or target.recipe
    if recipe is None:
        raise RecipeError(f"{target.name}: no recipe.yaml beside it; pass --recipe to say which data to evaluate on")
    split = split or recipe.data.eval_split
    if not split:
        raise RecipeError("data.eval_split: not set; pass --split")
    name = metric_for(recipe, metric)
    items = examples(chat_dataset(recipe.data, split, videos_as_images=not target.family.video_input), limit)
    value, records = score(target, items, name, batch_size, max_new_tokens, desc=f"eval {split}")
    result = {"target": target.name, "kind": target.kind, "split": split, "metric": name, "score": value,
              "n": len(records)}
    out = Path(out_dir) if out_dir else (Path(target.name) / "eval" if Path(target.name).is_dir() else Path("eval"))
    write_eval(out, records, result)
    print(f"[finetune] {name} on {split} ({len(records)} samples): {value:.3f}; predictions in {out}")
    return result
