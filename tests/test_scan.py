"""Pre-flight scan: over-long samples are dropped or refused with row ids, never truncated; empty ones dropped."""

import json

import pytest

from conftest import image, tiny_recipe
from finetune.training.pipeline import prepare
from finetune.recipe import load_recipe
from finetune.batching.scan import DataRefused


def chat_rows(tmp_path, n_long=2, n_empty=1, n_ok=5):
    """A `messages` dataset: short rows, rows with many images (long after expansion), rows with no reply."""
    (tmp_path / "img").mkdir()
    image(0, (64, 64)).save(tmp_path / "img" / "a.png")
    rows = []
    for i in range(n_ok):
        rows.append({"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "color?"}]},
                                  {"role": "assistant", "content": [{"type": "text", "text": "red"}]}],
                     "images": ["img/a.png"]})
    for i in range(n_long):
        rows.append({"messages": [{"role": "user", "content": [{"type": "image"}] * 6 + [{"type": "text", "text": "?"}]},
                                  {"role": "assistant", "content": [{"type": "text", "text": "six"}]}],
                     "images": ["img/a.png"] * 6})
    for i in range(n_empty):
        rows.append({"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}],
                     "images": ["img/a.png"]})
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def recipe(tmp_path, data_path, *overrides):
    # finetune's own defaults for the keys and sections left out, as these runs always had them
    return load_recipe(tiny_recipe(
        tmp_path / "run", without=["data.max_samples", "lora", "evaluation", "training.learning_rate",
                                   "training.logging_steps", "training.save_strategy", "training.seed",
                                   "training.dataloader_num_workers"],
        data={"path": str(data_path), "format": "messages"}, training={"max_steps": 1, "max_length": 60}),
        list(overrides))


def test_too_long_and_unsupervised_rows_are_dropped_and_reported(tmp_path):
    run = prepare(recipe(tmp_path, chat_rows(tmp_path)))
    summary = run.train_scan.summary()
    assert summary["rows"] == 8 and summary["kept"] == 5
    assert summary["dropped"] == {
        "longer than training.max_length=60": {"count": 2, "row_ids": [5, 6]},
        "no supervised tokens": {"count": 1, "row_ids": [7]},
    }
    assert len(run.trainer.train_dataset) == 5
    assert max(run.train_scan.lengths) <= 60
    run.trainer.train()  # the kept rows train without an image-token mismatch


def test_too_long_rows_can_be_refused_before_training(tmp_path):
    with pytest.raises(DataRefused, match=r"2 samples are longer than training.max_length=60.*row ids \[5, 6\]"):
        prepare(recipe(tmp_path, chat_rows(tmp_path), "data.on_too_long=error"))


def test_nothing_trainable_is_refused(tmp_path):
    with pytest.raises(DataRefused, match="no trainable samples left"):
        prepare(recipe(tmp_path, chat_rows(tmp_path, n_ok=0), "training.max_length=10"))


def test_a_second_start_loads_the_scan_from_cache_and_decisions_are_not_cached(tmp_path, capsys):
    data = chat_rows(tmp_path)
    first = scanned_report(tmp_path, data)
    assert "pre-flight scan of 8 rows (header check" in capsys.readouterr().out
    again = scanned_report(tmp_path, data)
    assert "pre-flight scan of 8 rows loaded from cache" in capsys.readouterr().out
    assert (again.kept, again.lengths, again.dropped) == (first.kept, first.lengths, first.dropped)

    # max_length decides what is dropped but does not change a measurement: no rescan, other decisions.
    longer = scanned_report(tmp_path, data, "training.max_length=200")
    assert "loaded from cache" in capsys.readouterr().out
    assert longer.kept == [0, 1, 2, 3, 4, 5, 6] and longer.dropped == {"no supervised tokens": [7]}

    # An image setting changes the measurement: scanned again.
    scanned_report(tmp_path, data, "data.max_pixels=1024")
    assert "pre-flight scan of 8 rows (header check" in capsys.readouterr().out


def test_a_processor_the_header_path_does_not_follow_is_rescanned_decoded(tmp_path, capsys, monkeypatch):
    from finetune.batching.lengths import Measurer

    data = chat_rows(tmp_path)
    honest = scanned_report(tmp_path, data, "data.verify_images=decode")
    capsys.readouterr()
    measure = Measurer.measure
    monkeypatch.setattr(Measurer, "measure", lambda self, sample: (lambda n, s: (n + 1, s))(*measure(self, sample)))
    report = scanned_report(tmp_path, data, "data.max_samples=7")  # another fingerprint
    assert "rescanning with decoded images" in capsys.readouterr().out
    assert report.lengths == honest.lengths[:5] and report.kept == [0, 1, 2, 3, 4]


def scanned_report(tmp_path, data_path, *overrides):
    from finetune.training.pipeline import load_processing, scanned

    r = recipe(tmp_path, data_path, *overrides)
    _, family, _, collator = load_processing(r)
    return scanned(r, r.data.train_split, family, collator)[1]
