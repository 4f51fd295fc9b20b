"""Models: the model-family table and everything loaded from a checkpoint.

families: one entry per architecture (module paths of decoder, projector and vision tower, image tokens, end of
turn, quirks); loading: processor, chat template and base model, 4-bit for QLoRA; lora: where the adapters go;
zoo: tiny local checkpoints of every family, faithful to their hub interfaces, for tests and the demo.
"""

from . import zoo
from .families import FAMILIES, LORA_GROUPS, Family, UnsupportedModelError, family_for, matches
from .loading import DTYPES, load_family, load_model, load_processor, resolve_model_path
from .lora import LoraPlan, group_of, plan_lora, trainable_by_group

__all__ = ["DTYPES", "FAMILIES", "LORA_GROUPS", "Family", "LoraPlan", "UnsupportedModelError", "family_for",
           "group_of", "load_family", "load_model", "load_processor", "matches", "plan_lora", "resolve_model_path",
           "trainable_by_group", "zoo"]
