"""The recipe error, below every stage: a lower stage can find a recipe setting wrong only once it loads what the
setting names (models: a LoRA target that matches no module of the checkpoint, an image-processor key it does not
have), and says so with the recipe's dotted key. Every other error class lives in the stage that raises it.

`not_found` words the one failure every loading stage shares: a model, adapter or dataset that is neither a local
path nor loadable from the Hub (a typo, no network, offline mode, a gated or private repository)."""

import os
from pathlib import Path


class RecipeError(ValueError):
    """A recipe that cannot run; the message names the file and dotted key."""


class SourceNotFound(RecipeError):
    """A model, adapter or dataset that is neither a local path nor on the Hub as named (the CLI exits with 2)."""


def not_found(key: str, name: str, error: Exception) -> SourceNotFound:
    """One line for `key` = `name` that could not be loaded: where it was looked for locally, why the Hub did not
    answer, and what to do."""
    local = Path(name).expanduser()
    if local.exists():  # a local path after all: the library's own reason is the useful one
        return SourceNotFound(f"{key}: {name}: {error}")
    text = f"{type(error).__name__} {error}".lower()
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        why = ("HF_HUB_OFFLINE is set, so only the local Hugging Face cache is read and it does not hold it (download "
               "it once online, or unset HF_HUB_OFFLINE)")
    elif any(s in text for s in ("couldn't connect", "couldn't reach", "connection", "localentrynotfound",
                                 "name or service", "timed out")):
        why = ("the Hub could not be reached (no network?): connect, or download it once and set HF_HUB_OFFLINE=1, "
               "or check the id for a typo")
    elif "gated" in text:
        why = "it is a gated repository: accept its terms on its Hub page, then log in (huggingface-cli login or HF_TOKEN)"
    elif any(s in text for s in ("not found", "notfound", "404", "not a valid model identifier", "doesn't exist")):
        why = "the Hub has no such repository (a typo? a private one needs huggingface-cli login or HF_TOKEN)"
    else:
        why = f"it could not be loaded ({type(error).__name__}: {error})"
    return SourceNotFound(f"{key}: '{name}' is not a local path (looked for {local.resolve()}; relative paths resolve "
                          f"from the folder you run in, {Path.cwd()}), and as a Hub id: {why}")
