"""The training run, top to bottom: recipe -> processor and model -> data -> trainer -> train -> save."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Sequence

from .collate import ChatCollator
from .data import chat_dataset
from .modeling import load_family, load_model, load_processor, plan_lora, trainable_by_group
from .recipe import Recipe, RecipeError, load_recipe
from .report import loss_points, plot_loss, write_recipe, write_summary
from .scan import scan


def train(recipe: Recipe | str | Path | dict, overrides: Sequence[str] = (), overwrite: bool = False) -> Path:
    """Fine-tune as the recipe says; returns the output folder holding the adapter, processor and summary."""
    started = time.time()
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, overrides)
    out = Path(recipe.training.output_dir)
    _claim_output_dir(out, overwrite)

    # Processor first: it is cheap, and the data scan needs it before any weights are read.
    model_path, family = load_family(recipe.model)
    processor = load_processor(model_path, recipe.model)
    collator = ChatCollator(processor, family)

    train_data = chat_dataset(recipe.data, recipe.data.train_split)
    train_scan = scan(train_data, collator, recipe.training.max_length, recipe.data.on_too_long)
    print(f"[finetune] train data: {train_scan.describe()}")
    train_data = train_data.select(train_scan.kept)
    eval_data = eval_scan = None
    if recipe.data.eval_split:
        eval_data = chat_dataset(recipe.data, recipe.data.eval_split)
        eval_scan = scan(eval_data, collator, recipe.training.max_length, recipe.data.on_too_long)
        print(f"[finetune] eval data: {eval_scan.describe()}")
        eval_data = eval_data.select(eval_scan.kept)

    model = load_model(model_path, recipe.model, recipe.quantization, family)
    lora = plan_lora(model, family, recipe.lora)

    from trl import SFTTrainer

    trainer = SFTTrainer(
        model=model,
        args=recipe.sft_config(),
        train_dataset=train_data,
        eval_dataset=eval_data,
        data_collator=collator,
        processing_class=processor,
        peft_config=lora.peft_config(recipe.lora),
    )
    trainable = trainable_by_group(trainer.model, family)
    print("[finetune] trainable parameters: " + ", ".join(f"{g} {n:,}" for g, n in trainable.items() if n))

    result = trainer.train()

    if trainer.is_world_process_zero():
        trainer.save_model(str(out))
        (out / "training_args.bin").unlink(missing_ok=True)  # a pickle; recipe.yaml records the same, as text
        processor.save_pretrained(str(out))
        write_recipe(recipe, out)
        points = loss_points(trainer.state.log_history)
        plot_loss(points, out / "loss_curve.png", title=f"training loss - {recipe.model.name_or_path}")
        write_summary({
            "base_model": recipe.model.name_or_path,
            "family": family.name,
            "steps": trainer.state.global_step,
            "epochs": trainer.state.epoch,
            "first_loss": points[0][1] if points else None,
            "final_loss": points[-1][1] if points else None,
            "train_loss": result.training_loss,
            "loss_curve": [{"step": s, "loss": v} for s, v in points],
            "trainable_parameters": trainable,
            "lora_modules": {group: len(names) for group, names in lora.modules.items()},
            "lora_parameters": lora.parameters,
            "train_data": train_scan.summary(),
            "eval_data": eval_scan.summary() if eval_scan else None,
            "wall_time_s": round(time.time() - started, 1),
            "train_runtime_s": result.metrics.get("train_runtime"),
            "samples_per_second": result.metrics.get("train_samples_per_second"),
        }, out)
        print(f"[finetune] done in {time.time() - started:.0f}s; loss {points[0][1] if points else float('nan'):.4f}"
              f" -> {points[-1][1] if points else float('nan'):.4f}; outputs in {out}")
    return out


def _claim_output_dir(out: Path, overwrite: bool) -> None:
    """Never write into a previous run silently."""
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise RecipeError(
                f"training.output_dir: {out} already holds files from an earlier run; choose another folder "
                "(training.output_dir=...) or pass --overwrite to replace it"
            )
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
