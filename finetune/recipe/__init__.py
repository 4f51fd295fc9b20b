"""Recipe: the YAML file of a run, read into one typed dataclass per section and validated before anything heavy.

sections: model, data, lora, quantization, export, evaluation, guards, each field documented; methods: the method
table (one row per `training.method`); training: the `training:` section as the method's TRL config class; types: value and choice checks with dotted
keys; load: YAML, `key=value` overrides, and the checks that span sections. It sits above data and models: it
validates names against their tables (formats, families, zoo presets), which take plain settings and never import
it.
"""

from ..errors import RecipeError
from .load import SECTIONS, Recipe, apply_override, build_recipe, load_recipe, parse_yaml
from .sections import (HUB_ID, METRIC_NAMES, DataConfig, EvaluationConfig, ExportConfig, GuardsConfig, LoraConfig,
                       ModelConfig, QuantizationConfig)
from .methods import METHODS, Method, method_of
from .training import training_config_class, trl_config, trl_config_class

__all__ = ["DataConfig", "EvaluationConfig", "ExportConfig", "GuardsConfig", "HUB_ID", "LoraConfig", "METHODS",
           "METRIC_NAMES", "Method", "method_of", "ModelConfig", "QuantizationConfig", "Recipe", "RecipeError", "SECTIONS", "apply_override",
           "build_recipe", "load_recipe", "parse_yaml", "training_config_class", "trl_config", "trl_config_class"]
