"""What a user reads while a run goes: no library warnings finetune cannot act on, and numbers as numbers."""

from __future__ import annotations

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


def rounded(value):
    """A logged value as a short number: 4 significant digits, whole numbers as ints (never a string)."""
    if isinstance(value, bool) or not isinstance(value, float):
        return value
    short = float(f"{value:.4g}")
    return int(short) if short.is_integer() else short

