"""Recipes: every shipped recipe loads; bad input fails early with the dotted key named."""

from pathlib import Path

import pytest

from finetune.recipe import RecipeError, load_recipe, parse_yaml
from finetune.recipe.distributed import check_launch, from_accelerate_config

RECIPES = sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml"))
MINIMAL = {"model": {"name_or_path": "zoo:llava"}, "data": {"path": "data/chartqa-tiny", "format": "chartqa"}}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_loads_and_states_its_command(path):
    recipe = load_recipe(path)
    assert recipe.lora.r > 0 and recipe.lora.targets
    first = path.read_text().splitlines()[0]
    assert first.startswith("# Run: ") and path.name in first, "a recipe opens with the command that runs it"
    assert recipe.training.output_dir  # defaulted to runs/<name> when not given
    # The SFTConfig built at train time receives exactly the recipe's values.
    assert recipe.training.learning_rate == parse_yaml(path.read_text())["training"]["learning_rate"] * 1.0


def test_recipes_exist_for_every_required_family():
    text = " ".join(p.read_text() for p in RECIPES)
    for hub_id in ["SmolVLM-256M", "SmolVLM-Instruct", "Qwen2.5-VL-3B", "Qwen2.5-VL-7B", "Qwen3-VL",
                   "llava-v1.6-mistral-7b", "paligemma2", "gemma-3-4b", "Llama-3.2-11B-Vision", "zoo:",
                   "Qwen/Qwen3.5-9B", "Qwen/Qwen3.5-35B-A3B", "Qwen/Qwen3-VL-30B-A3B-Instruct", "google/gemma-4-E2B-it",
                   "google/gemma-3n-E4B-it"]:
        assert hub_id in text


def test_misspelled_key_names_the_dotted_key_and_suggests(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model:\n  name_or_path: zoo:llava\ndata:\n  path: x\ntraining:\n  learning_rat: 1.0e-4\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    assert "training.learning_rat: unknown key (did you mean 'learning_rate'?)" in str(e.value)
    assert str(path) in str(e.value)


def test_misspelled_lora_target_suggests_the_right_one():
    with pytest.raises(RecipeError, match=r"lora.targets: unknown target 'projectr' \(did you mean 'projector'\?\)"):
        load_recipe(MINIMAL | {"lora": {"targets": ["decoder", "projectr"]}})


def test_misspelled_section():
    with pytest.raises(RecipeError, match=r"lroa: unknown section \(did you mean 'lora'\?\)"):
        load_recipe(MINIMAL | {"lroa": {"r": 8}})


def test_python_object_tag_is_refused_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.yaml"
    path.write_text(f"model: !!python/object/apply:os.system ['touch {marker}']\ndata: {{path: x}}\n")
    with pytest.raises(RecipeError, match="safe YAML loader"):
        load_recipe(path)
    assert not marker.exists()


@pytest.mark.parametrize("section,body,message", [
    ("lora", {"r": 0}, "lora.r: must be > 0, got 0"),
    ("lora", {"r": "8"}, "lora.r: expected int, got str '8'"),
    ("lora", {"dropout": 1.5}, "lora.dropout: must be in [0, 1)"),
    ("training", {"per_device_train_batch_size": "eight"}, "training.per_device_train_batch_size: expected int"),
    ("training", {"padding_free": True}, "training.padding_free: not supported: use training.packing"),
    ("training", {"max_length": 0}, "training.max_length: must be at least 1, got 0"),
    ("training", {"per_device_train_batch_size": -1}, "training.per_device_train_batch_size: must be at least 1"),
    ("training", {"per_device_eval_batch_size": 0}, "training.per_device_eval_batch_size: must be at least 1"),
    ("training", {"gradient_accumulation_steps": 0}, "training.gradient_accumulation_steps: must be at least 1"),
    ("training", {"num_train_epochs": 0}, "training.num_train_epochs: must be > 0, got 0"),
    ("training", {"max_steps": 0}, r"training.max_steps: must be > 0, or -1 to train for num_train_epochs; got 0"),
    ("training", {"max_steps": -5}, "training.max_steps: must be > 0, or -1 to train for num_train_epochs; got -5"),
    ("training", {"learning_rate": -1e-4}, "training.learning_rate: must not be negative, got -0.0001"),
    ("data", {"path": "x", "format": "chartqq"}, "data.format: unknown value 'chartqq' (did you mean 'chartqa'?)"),
    ("data", {"path": "x", "on_too_long": "truncate"}, "data.on_too_long: expected one of 'drop', 'error'"),
    ("model", {"name_or_path": "x", "trust_remote_code": True}, "model.trust_remote_code: runs code"),
    ("model", {"name_or_path": "zoo:lava"}, "model.name_or_path: unknown zoo family 'lava' (did you mean 'llava'?)"),
    ("quantization", {"load_in_4bit": "yes"}, "quantization.load_in_4bit: expected bool"),
])
def test_invalid_values_fail_with_the_dotted_key(section, body, message):
    raw = MINIMAL | {section: body} if section not in MINIMAL else MINIMAL | {section: MINIMAL[section] | body}
    with pytest.raises(RecipeError) as e:
        load_recipe(raw)
    assert message in str(e.value)


def test_missing_required_section_and_key():
    with pytest.raises(RecipeError, match="data: section is required"):
        load_recipe({"model": {"name_or_path": "zoo:llava"}})
    with pytest.raises(RecipeError, match="model.name_or_path: required"):
        load_recipe({"model": {}, "data": {"path": "x"}})


def test_overrides_are_typed_like_the_file():
    recipe = load_recipe(MINIMAL, ["training.learning_rate=1e-4", "lora.targets=[decoder, vision]", "lora.r=8",
                                   "training.bf16=false", "model.revision=abc123"])
    assert recipe.training.learning_rate == 1e-4 and isinstance(recipe.training.learning_rate, float)
    assert recipe.lora.targets == ["decoder", "vision"]
    assert recipe.lora.r == 8 and recipe.training.bf16 is False and recipe.model.revision == "abc123"
    with pytest.raises(RecipeError, match="training.learning_rat: unknown key"):
        load_recipe(MINIMAL, ["training.learning_rat=1e-4"])
    with pytest.raises(RecipeError, match="expected section.key=value"):
        load_recipe(MINIMAL, ["learning_rate"])


def test_yaml_scientific_notation_without_dot_becomes_float():
    # YAML 1.1 reads `1e-4` as a string; a float field takes it as the number it obviously is.
    recipe = load_recipe(parse_yaml("model: {name_or_path: zoo:llava}\ndata: {path: x}\ntraining: {learning_rate: 1e-4}"))
    assert recipe.training.learning_rate == 1e-4


def test_sft_config_receives_recipe_values_and_finetune_defaults():
    recipe = load_recipe(MINIMAL, ["training.max_steps=7", "training.bf16=false", "training.output_dir=/tmp/x"])
    args = recipe.trl_config()
    assert args.max_steps == 7 and args.output_dir == "/tmp/x"
    assert args.remove_unused_columns is False and args.dataset_kwargs == {"skip_prepare_dataset": True}


def test_resolved_recipe_round_trips():
    recipe = load_recipe(MINIMAL, ["training.max_steps=7", "lora.r=4"])
    again = load_recipe(recipe.to_dict())
    assert again.to_dict() == recipe.to_dict()
    assert recipe.to_dict()["training"]["max_steps"] == 7


ACCELERATE = sorted((Path(__file__).parents[1] / "recipes" / "accelerate").glob("*.yaml"))


@pytest.mark.parametrize("path", ACCELERATE, ids=lambda p: p.name)
def test_accelerate_configs_parse_and_state_their_command(path):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(path))
    first = path.read_text().splitlines()[0]
    assert f"accelerate launch --config_file recipes/accelerate/{path.name}" in first and "-m finetune train" in first
    recipe, *overrides = first.split("-m finetune train ", 1)[1].split()[:1] + [
        o for o in first.split("-m finetune train ", 1)[1].split()[1:] if "=" in o]
    loaded = load_recipe(Path(__file__).parents[1] / recipe, overrides)  # the recipe and overrides it names are valid
    check_launch(loaded, from_accelerate_config(path))  # and agree with the config (precision, strategy, 4-bit)
    assert config.num_processes >= 1


def test_accelerate_configs_cover_the_setups():
    names = {p.name for p in ACCELERATE}
    assert {"single-gpu.yaml", "fsdp2-cpu.yaml", "multi-gpu-ddp.yaml", "fsdp2-qlora.yaml", "deepspeed-zero2.yaml",
            "deepspeed-zero3.yaml", "two-node.yaml"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipes_build_their_sft_config_without_deprecation_warnings(path):
    import warnings

    recipe = load_recipe(path, ["training.bf16=false"])  # bf16 needs a GPU to build the config; not the point
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = recipe.trl_config()
    deprecations = [str(w.message) for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))]
    assert deprecations == []
    expected = parse_yaml(path.read_text())["training"].get("activation_checkpointing", True)
    # transformers 5.24 has both names (one an alias); 5.17 only gradient_checkpointing.
    assert getattr(config, "activation_checkpointing", expected) is expected
    assert config.gradient_checkpointing is expected


def test_deprecated_training_key_names_are_read_under_their_current_names():
    with pytest.warns(FutureWarning, match="training.gradient_checkpointing is deprecated .* training.activation_"):
        recipe = load_recipe({**MINIMAL, "training": {"gradient_checkpointing": False}})
    assert recipe.training.activation_checkpointing is False
    assert recipe.to_dict()["training"] == {"activation_checkpointing": False}
    assert load_recipe(MINIMAL).training.activation_checkpointing is True  # TRL's default: checkpointing on
    with pytest.raises(RecipeError, match="training.gradient_checkpointing: the deprecated name of "
                                          "training.activation_checkpointing; set only activation_checkpointing"):
        load_recipe({**MINIMAL, "training": {"gradient_checkpointing": True, "activation_checkpointing": True}})
