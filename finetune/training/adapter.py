"""The adapter a run trains when `model.adapter` names a run folder: that run's adapter, loaded trainable, after
checking it was trained on this recipe's base model (its own LoRA settings replace the `lora:` section)."""

from __future__ import annotations

from pathlib import Path

from ..errors import SourceNotFound
from ..recipe import RecipeError, load_recipe


def continue_from(model, adapter: str | Path, base: str):
    """The model (`base`: the recipe's model.name_or_path) with the adapter of a run folder loaded, trainable."""
    from peft import PeftModel

    folder = Path(adapter)
    if not folder.exists():
        raise SourceNotFound(f"model.adapter: {adapter} is not a local folder (looked for {folder.resolve()}; relative "
                          f"paths resolve from the folder you run in, {Path.cwd()}); give the folder of a finished "
                          "run (its training.output_dir)")
    if not (folder / "adapter_config.json").is_file():
        raise RecipeError(f"model.adapter: {folder}: no adapter_config.json (give the folder of a finished run)")
    if (folder / "recipe.yaml").is_file():  # a finetune run: its adapter belongs to the base it names
        trained_on = load_recipe(folder / "recipe.yaml").model.name_or_path
        if trained_on != base:
            raise RecipeError(f"model.adapter: {folder} was trained on {trained_on}, not on "
                              f"{base} (model.name_or_path)")
    return PeftModel.from_pretrained(model, str(folder), is_trainable=True)
