"""FSDP / ZeRO-3 with text-only rows beside image rows hangs; finetune must refuse it before training."""

import json
from types import SimpleNamespace

import pytest

from finetune.recipe import RecipeError
from finetune.training.sharding import refuse_text_only_rows_when_sharded, requested_strategy, sharded_strategy


def args(fsdp="", deepspeed=None):
    return SimpleNamespace(fsdp=fsdp, deepspeed=deepspeed)


def test_sharded_strategy_is_read_from_the_recipe_and_from_accelerate_launch(tmp_path):
    assert sharded_strategy(args(), {}) is None
    assert sharded_strategy(args(fsdp="full_shard"), {}) == "FSDP"
    assert sharded_strategy(args(), {"ACCELERATE_USE_FSDP": "true"}) == "FSDP"
    assert sharded_strategy(args(), {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}) \
        == "DeepSpeed ZeRO-3"
    assert sharded_strategy(args(), {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}) is None
    assert requested_strategy(args(), {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}) \
        == "DeepSpeed ZeRO-2"
    assert requested_strategy(args(fsdp=True), {}) == "FSDP" and requested_strategy(args(), {}) is None
    assert sharded_strategy(args(deepspeed={"zero_optimization": {"stage": 3}}), {}) == "DeepSpeed ZeRO-3"
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    assert sharded_strategy(args(deepspeed=str(config)), {}) is None
    assert sharded_strategy(args(), {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2",
                                     "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(config)}) is None


def test_mixed_text_only_and_image_rows_are_refused_only_when_sharded():
    mixed = {0: 1, 1: 0, 2: 2, 3: 0}
    with pytest.raises(RecipeError, match=r"data: 2 of 4 training rows have no image \(row ids \[1, 3\]\).*FSDP"):
        refuse_text_only_rows_when_sharded("FSDP", mixed)
    refuse_text_only_rows_when_sharded(None, mixed)  # DDP: every rank holds the whole vision tower
    refuse_text_only_rows_when_sharded("DeepSpeed ZeRO-3", {0: 1, 1: 3})  # every batch has an image
    refuse_text_only_rows_when_sharded("DeepSpeed ZeRO-3", {0: 0, 1: 0})  # no rank ever runs the vision tower


def test_training_refuses_a_mixed_dataset_under_fsdp_before_loading_weights(tmp_path, monkeypatch):
    from conftest import image
    from finetune.models import loading as modeling
    from finetune.training import pipeline
    from finetune.recipe import load_recipe

    img = tmp_path / "a.png"
    image(0).save(img)
    user = lambda with_image: [{"type": "image"}] * with_image + [{"type": "text", "text": "What is shown?"}]
    rows = [{"messages": [{"role": "user", "content": user(n)},
                          {"role": "assistant", "content": [{"type": "text", "text": "A chart."}]}],
             "images": ["a.png"] * n} for n in (1, 0, 1, 0, 0)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = load_recipe({"model": {"name_or_path": "zoo:qwen2_vl"}, "data": {"path": str(tmp_path)},
                          "training": {"output_dir": str(tmp_path / "run"), "use_cpu": True}})
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setattr(modeling, "load_model", lambda *a: pytest.fail("weights loaded before the refusal"))
    monkeypatch.setattr(pipeline, "load_model", lambda *a: pytest.fail("weights loaded before the refusal"))
    with pytest.raises(RecipeError, match=r"3 of 5 training rows have no image \(row ids \[1, 3, 4\]\)"):
        pipeline.prepare(recipe)
