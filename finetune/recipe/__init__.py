"""Recipe: the YAML file of a run, read into one typed dataclass per section and validated before anything heavy.

sections: model, data, lora, quantization, export, evaluation, guards, each field documented; training: the
`training:` section as TRL's own config class (SFTConfig, DPOConfig); types: value and choice checks with dotted
keys; load: YAML, `key=value` overrides, and the checks that span sections. It sits above data and models: it
validates names against their tables (formats, families, zoo presets), which take plain settings and never import
it.
"""

from ..errors import RecipeError
from .load import SECTIONS, Recipe, apply_override, build_recipe, load_recipe, parse_yaml
from .sections import (HUB_ID, METRIC_NAMES, DataConfig, EvaluationConfig, ExportConfig, GuardsConfig, LoraConfig,
                       ModelConfig, QuantizationConfig)
from .training import METHODS, training_config_class, trl_config, trl_config_class

__all__ = ["DataConfig", "EvaluationConfig", "ExportConfig", "GuardsConfig", "HUB_ID", "LoraConfig", "METHODS",
           "METRIC_NAMES", "ModelConfig", "QuantizationConfig", "Recipe", "RecipeError", "SECTIONS", "apply_override",
           "build_recipe", "load_recipe", "parse_yaml", "training_config_class", "trl_config", "trl_config_class"]
