"""What a user reads while a run goes: no library warnings finetune cannot act on, and numbers in short figures."""

from __future__ import annotations

import math
import warnings

#: Warnings a library raises about its own internals, whatever the recipe says: (category, message regex).
LIBRARY_INTERNALS = [
    # peft 0.21 (PeftModel.__init__) and TRL 1.16 (generation helpers) read `model.is_gradient_checkpointing`,
    # which transformers 5.24 deprecated in favour of `is_activation_checkpointing`; nothing a recipe can change.
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated"),
]


def quiet_library_warnings() -> None:
    """Filter exactly the warnings in LIBRARY_INTERNALS (finetune's entry points call this); others still show."""
    for category, message in LIBRARY_INTERNALS:
        warnings.filterwarnings("ignore", message=message, category=category)


def figure(value) -> str:
    """A logged number for the console: 4 significant digits, whole numbers of 1,000 and more with separators."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int) or (math.isfinite(value) and value.is_integer() and abs(value) >= 1000):
        return f"{int(value):,}"
    return f"{value:.4g}"
