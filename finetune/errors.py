"""The recipe error, below every stage: a lower stage can find a recipe setting wrong only once it loads what the
setting names (models: a LoRA target that matches no module of the checkpoint, an image-processor key it does not
have), and says so with the recipe's dotted key. Every other error class lives in the stage that raises it."""


class RecipeError(ValueError):
    """A recipe that cannot run; the message names the file and dotted key."""
