"""`data.streaming: true`: train from a stream never listed up front, rows checked as they arrive, exact resume."""

import itertools
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import finetune
from conftest import ROOT, image, tiny_recipe
from finetune.recipe import RecipeError, load_recipe

SAMPLE = ROOT / "data/chartqa-tiny"


def stream_file(tmp_path, rows: int = 40):
    """ChartQA sample rows, with a missing image at 5 and a 6-image (too long) row at 11, in `messages` form."""
    (tmp_path / "img").mkdir(exist_ok=True)
    image(0, (64, 64)).save(tmp_path / "img" / "a.png")
    lines = []
    for i, line in enumerate((SAMPLE / "train.jsonl").read_text().splitlines()[:rows]):
        row = json.loads(line)
        images = [str(SAMPLE / row["image"])]
        if i == 5:
            images = [str(tmp_path / "img" / "missing.png")]
        if i == 11:
            images = [str(tmp_path / "img" / "a.png")] * 6
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": row["query"]}]
        lines.append(json.dumps({"messages": [{"role": "user", "content": content},
                                              {"role": "assistant",
                                               "content": [{"type": "text", "text": row["label"][0]}]}],
                                 "images": images}))
    path = tmp_path / "stream.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def stream_recipe(data, out, **training):
    return tiny_recipe(
        out, without=["data.max_samples"],
        data={"path": str(data), "format": "messages", "streaming": True, "allow_external_paths": True,
              "preview_rows": 12, "shuffle_buffer": 16},
        lora={"dropout": 0.1},
        training={"max_steps": 6, "save_strategy": "steps", "save_steps": 1, "max_length": 60, "disable_tqdm": True,
                  **training})


def test_streaming_needs_max_steps(tmp_path):
    r = stream_recipe(tmp_path / "x.jsonl", tmp_path / "run")
    del r["training"]["max_steps"]
    with pytest.raises(RecipeError, match="data.streaming: a stream has no known length; set training.max_steps"):
        load_recipe(r)


def test_a_stream_trains_and_reports_dropped_rows_by_reason(tmp_path, capsys):
    # 40 rows, 2 dropped, batch 2 x 20 steps: one pass over the 38 good rows, then the stream repeats.
    out = finetune.train(stream_recipe(stream_file(tmp_path), tmp_path / "run", max_steps=20, save_strategy="no"))
    printed = capsys.readouterr().out
    assert "train data: first 12 rows of the stream (the rest is checked as it is read): 12 rows, 10 trainable" \
        in printed
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["steps"] == 20 and summary["throughput"]["samples"] == 40
    dropped = summary["train_data"]["dropped_in_training"]["rows"]
    # Each bad row is met twice: the run reads the stream a second time after 19 steps.
    assert {k: (v["count"], v["row_ids"]) for k, v in dropped.items()} == {
        "missing file": (2, [5]), "longer than training.max_length=60": (2, [11])}
    assert "left out during training (missing file): 2 rows, ids [5]" in printed


def test_stream_batches_split_ranks_workers_and_resume_points(tmp_path, monkeypatch):
    from finetune.training.pipeline import load_processing
    from finetune.batching.lengths import Measurer
    from finetune.batching.streaming import streamed

    recipe = load_recipe(stream_recipe(stream_file(tmp_path), tmp_path / "run"))
    _, family, processor, collator = load_processing(recipe)

    def batches(rank=0, world=1, start=0, workers=0, take=25):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", str(world))
        stream, _, _ = streamed(recipe, family, collator, Measurer(processor, family), start)
        if workers:  # what each dataloader worker yields, interleaved as the DataLoader does
            from unittest import mock

            per_worker, firsts = [], []
            for w in range(workers):
                with mock.patch("torch.utils.data.get_worker_info", return_value=mock.Mock(id=w, num_workers=workers)):
                    per_worker.append(iter(stream))
                    firsts.append(next(per_worker[-1]))  # the generator asks who it is when it starts
            items = [firsts[i] if i < workers else next(per_worker[i % workers]) for i in range(take)]
        else:
            it = iter(stream)
            items = [next(it) for _ in range(take)]
        return [[position for position, _ in item["rows"]] for item in items]

    single = batches()
    first_pass = sorted(p for batch in single[:19] for p in batch)
    assert first_pass == [i for i in range(40) if i not in (5, 11)], "every good row once per pass"
    assert all(len(b) == 2 for b in single)
    assert single[19:] != single[:6], "the second pass is shuffled anew"
    # Two ranks: disjoint halves of the stream.
    rank0, rank1 = batches(0, 2, take=9), batches(1, 2, take=9)
    assert {p % 2 for b in rank0 for p in b} == {0} and {p % 2 for b in rank1 for p in b} == {1}
    # Dataloader workers take turns: the same batches in the same order.
    assert batches(workers=3, take=12) == single[:12]
    # A resume at batch 7 continues with batch 7, without the earlier ones.
    assert batches(start=7, take=10) == single[7:17]
    # Real dataloader worker processes: the same batches, in the same order (none lost to datasets' file sharding).
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    stream, _, _ = streamed(recipe, family, collator, Measurer(processor, family))
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2, collate_fn=lambda item: item)
    served = [[position for position, _ in item["rows"]] for item in itertools.islice(loader, 12)]
    assert served == single[:12]


def test_a_killed_streaming_run_resumes_exactly(tmp_path):
    data = stream_file(tmp_path, rows=24)
    reference = finetune.train(stream_recipe(data, tmp_path / "reference"))
    out = tmp_path / "interrupted"
    spec = tmp_path / "recipe.json"
    spec.write_text(json.dumps(stream_recipe(data, out)))
    killed = subprocess.run([sys.executable, str(ROOT / "tests/resume_worker.py"), str(spec), "4"], cwd=ROOT,
                            capture_output=True, text=True,
                            env=os.environ | {"OMP_NUM_THREADS": str(torch.get_num_threads()),
                                              "PYTHONPATH": str(ROOT)})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resumed = finetune.train(stream_recipe(data, out, resume="auto"))
    curve = lambda run: [p["loss"] for p in json.loads((run / "run_summary.json").read_text())["loss_curve"]]  # noqa: E731
    assert curve(resumed) == curve(reference) and len(curve(reference)) == 6
    after, expected = load_file(resumed / "adapter_model.safetensors"), load_file(reference / "adapter_model.safetensors")
    assert all(torch.equal(after[k], expected[k]) for k in expected), "adapter tensors differ after resume"
