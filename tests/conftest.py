import copy
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]

# A few seconds of CPU per run: the zoo's tiny Qwen2-VL on 4 rows of the bundled ChartQA sample, a small adapter, no
# evaluation, and nothing left to chance (seed, no dropout, no worker processes, no bf16 or checkpointing).
_TINY_RECIPE = {
    "model": {"name_or_path": "zoo:qwen2_vl", "dtype": "float32"},
    "data": {"path": str(ROOT / "data/chartqa-tiny"), "format": "chartqa", "max_samples": 4},
    "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
    "evaluation": {"enabled": False},
    "training": {"max_steps": 2, "per_device_train_batch_size": 2, "learning_rate": 1e-2, "logging_steps": 1,
                 "save_strategy": "no", "bf16": False, "activation_checkpointing": False, "seed": 0,
                 "dataloader_num_workers": 0},
}


def tiny_recipe(out=None, *, without=(), **sections) -> dict:
    """The tiny training recipe as a fresh dict (for `load_recipe`, `finetune.train`, or a recipe file).

    `out` is training.output_dir. `without` names keys ("lora.dropout") or whole sections ("evaluation") to leave
    out, so finetune's own defaults apply to them; it is applied first, then each keyword section's keys are merged
    over the tiny recipe's (a section it lacks is added): `tiny_recipe(out, training={"max_steps": 3})`."""
    recipe = copy.deepcopy(_TINY_RECIPE)
    for key in without:
        section, _, name = key.partition(".")
        # A KeyError names a key the tiny recipe never had (a typo would otherwise leave it in).
        del (recipe[section] if name else recipe)[name or section]
    for section, values in sections.items():
        recipe[section] = {**recipe.get(section, {}), **copy.deepcopy(values)}
    if out is not None:
        recipe["training"]["output_dir"] = str(out)
    return recipe


@pytest.fixture(scope="session", autouse=True)
def zoo_cache(tmp_path_factory):
    """Tests build the zoo in their own cache (subprocesses inherit it through the environment)."""
    cache = os.environ.get("FINETUNE_TEST_CACHE") or str(tmp_path_factory.mktemp("finetune-cache"))
    os.environ["FINETUNE_CACHE"] = cache
    os.environ["HF_HUB_OFFLINE"] = "1"
    return Path(cache)


def image(seed: int = 0, size: tuple[int, int] = (64, 64)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def two_turn(system: bool = True) -> list[dict]:
    """A two-turn conversation with one image in the first user turn."""
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is the tallest bar?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "The tallest bar is red."}]},
        {"role": "user", "content": [{"type": "text", "text": "How many bars are there?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "There are 4 bars."}]},
    ]
    if system:
        messages.insert(0, {"role": "system", "content": [{"type": "text", "text": "Answer briefly."}]})
    return messages


REPLIES = ["The tallest bar is red.", "There are 4 bars."]
