import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


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
