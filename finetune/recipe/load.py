"""Recipes: YAML files loaded into one typed dataclass per section, validated before anything heavy is loaded.

Every error names the dotted key (`lora.r: must be > 0, got 0`) and suggests the closest valid key for typos.
The sections are declared in finetune.recipe.sections; the `training:` section takes the trainer config's keys
verbatim (finetune.recipe.training). Checks that span sections are here (`validate_combinations`).
"""

from __future__ import annotations

import dataclasses
import enum
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..data.formats import COLUMNS
from ..errors import RecipeError, SourceNotFound
from ..models.families import FAMILIES
from ..models.zoo import parse_name
from .distributed import validate_distributed
from .methods import DEFAULT_METHOD, METHODS, format_owner, method_of
from .sections import (DataConfig, EvaluationConfig, ExportConfig, GuardsConfig, LoraConfig, ModelConfig,
                       QuantizationConfig, RewardsConfig)
from .training import RENAMED_TRAINING_KEYS, SANE_LEARNING_RATES, check_ranges, training_config_class, trl_config
from .types import check_choice, coerce


@dataclass
class Recipe:
    model: ModelConfig
    data: DataConfig
    lora: LoraConfig
    quantization: QuantizationConfig
    #: The fields of `training.method`'s TRL config (finetune.recipe.methods; see `training_config_class`).
    training: Any
    export: ExportConfig
    evaluation: EvaluationConfig
    guards: GuardsConfig = field(default_factory=GuardsConfig)
    #: GRPO's rewards (training.method: grpo).
    rewards: RewardsConfig = field(default_factory=RewardsConfig)
    #: The file this recipe came from (None when built from a dict).
    source: Path | None = None

    def trl_config(self, **overrides: Any):
        """The TRL config for this recipe: `training.method`'s config class (`trl.SFTConfig`, `trl.DPOConfig`, ...)."""
        return trl_config(self.training, **overrides)

    def to_dict(self) -> dict[str, Any]:
        """Only the values that differ from defaults for `training`; every field for the other sections."""
        out = {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS if name != "training"}
        default_training = training_config_class(self.training.method)()
        out["training"] = {
            f.name: getattr(self.training, f.name)
            for f in dataclasses.fields(self.training)
            if getattr(self.training, f.name) != getattr(default_training, f.name)
        }
        return _plain(out)


SECTIONS = {
    "model": ModelConfig,
    "data": DataConfig,
    "lora": LoraConfig,
    "quantization": QuantizationConfig,
    "training": None,  # resolved lazily: importing trl is slow and `finetune --help` should not pay for it
    "export": ExportConfig,
    "evaluation": EvaluationConfig,
    "guards": GuardsConfig,
    "rewards": RewardsConfig,
}
REQUIRED_SECTIONS = ("model", "data")


def load_recipe(source: str | Path | dict, overrides: typing.Sequence[str] = ()) -> Recipe:
    """Read a recipe (a YAML path or an already-parsed dict), apply `key=value` overrides, validate everything."""
    path = None
    if isinstance(source, dict):
        raw = _deepcopy(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise RecipeError(f"{path}: recipe file not found")
        raw = parse_yaml(path.read_text(encoding="utf-8"), str(path))
    where = f"{path}: " if path else ""
    try:
        for item in overrides:
            apply_override(raw, item)
        recipe = build_recipe(raw)
    except RecipeError as e:
        raise RecipeError(f"{where}{e}") from None
    recipe.source = path
    if path is not None and not (path.parent / "adapter_config.json").is_file():  # a user's recipe, not a run's copy
        refuse_paths_relative_to_elsewhere(recipe, path)
    if path is not None and "output_dir" not in (raw.get("training") or {}):
        recipe.training.output_dir = str(Path("runs") / path.stem)
    return recipe


def refuse_paths_relative_to_elsewhere(recipe: Recipe, path: Path) -> None:
    """A relative data path resolves from the folder `finetune` runs in. Run from elsewhere, it would be sent to
    the Hub as a dataset id and fail there; when it exists relative to the recipe's folders, say so instead."""
    for key in ("path", "image_root"):
        value = getattr(recipe.data, key)
        if not value or Path(value).is_absolute() or Path(value).exists():
            continue
        for folder in list(path.resolve().parents)[:3]:
            if (folder / value).exists():
                raise SourceNotFound(
                    f"{path}: data.{key}: {value} is not in {Path.cwd()} (relative paths resolve from the folder "
                    f"you run in), but {folder / value} exists: run from {folder}, or give data.{key} as that "
                    "absolute path")


def parse_yaml(text: str, name: str = "<recipe>") -> dict:
    """YAML through the safe loader only: tags such as `!!python/object` are refused, never executed."""
    try:
        raw = yaml.safe_load(text)
    except yaml.constructor.ConstructorError as e:
        mark = f" (line {e.problem_mark.line + 1})" if e.problem_mark else ""
        raise RecipeError(f"{name}{mark}: {e.problem}; recipes are read with a safe YAML loader") from None
    except yaml.YAMLError as e:
        raise RecipeError(f"{name}: not valid YAML: {e}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError(f"{name}: a recipe is a mapping of sections (model, data, ...), got {type(raw).__name__}")
    return raw


def apply_override(raw: dict, item: str) -> None:
    """Apply one `section.key=value` override (value parsed as YAML, so `1e-4`, `true`, `[a, b]` work)."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise RecipeError(f"override '{item}': expected section.key=value, e.g. training.learning_rate=1e-4")
    parts = key.strip().split(".")
    if len(parts) < 2:
        raise RecipeError(f"override '{item}': expected section.key=value, e.g. training.learning_rate=1e-4")
    check_choice("override", parts[0], SECTIONS, what="section")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise RecipeError(f"override '{item}': {part} is not a section")
    node[parts[-1]] = parse_yaml(f"v: {value}")["v"] if value.strip() else None


def build_recipe(raw: dict) -> Recipe:
    for name in raw:
        check_choice("recipe", name, SECTIONS, what="section")
    for name in REQUIRED_SECTIONS:
        if name not in raw:
            raise RecipeError(f"{name}: section is required")
    sections = {}
    for name, cls in SECTIONS.items():
        body = raw.get(name) or {}
        if not isinstance(body, dict):
            raise RecipeError(f"{name}: expected a mapping of keys, got {type(body).__name__}")
        if name == "training":
            method = body.get("method", DEFAULT_METHOD)
            check_choice("training.method", method, METHODS, what="method")
            refused = METHODS[method].refused_keys
            for key in body:
                if key in refused:
                    raise RecipeError(f"training.{key}: not supported: {refused[key]}")
            body = _renamed_training_keys(body)
            cls = training_config_class(method)
        sections[name] = _build_section(cls, body, name)
    recipe = Recipe(**sections)
    validate_combinations(recipe)
    return recipe


def _renamed_training_keys(body: dict) -> dict:
    """`training:` with transformers' deprecated key names read as their current ones (one warning each)."""
    body = dict(body)
    for old, new in RENAMED_TRAINING_KEYS.items():
        if old not in body:
            continue
        if new in body:
            raise RecipeError(f"training.{old}: the deprecated name of training.{new}; set only {new}")
        warnings.warn(f"training.{old} is deprecated (transformers 5; removed in v6): read as training.{new}, "
                      "the name to use in recipes", FutureWarning, stacklevel=2)
        body[new] = body.pop(old)
    return body


def _build_section(cls: type, body: dict, prefix: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls) if cls.__module__ != "types" else {f.name: f.type for f in fields.values()}
    values = {}
    for key, value in body.items():
        check_choice(prefix, key, fields, what="key")
        values[key] = coerce(value, hints.get(key, Any), f"{prefix}.{key}")
    missing = [n for n, f in fields.items() if n not in values and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise RecipeError(f"{prefix}.{missing[0]}: required")
    obj = cls(**values)
    if hasattr(obj, "validate"):
        obj.validate()
    return obj


def validate_combinations(r: Recipe) -> None:
    validate_method(r)
    if r.model.trust_remote_code and not r.model.revision:
        raise RecipeError(
            "model.trust_remote_code: runs code downloaded with the model; pin model.revision to a commit hash "
            "so that code cannot change under you"
        )
    check_ranges(r.training)
    low, high = SANE_LEARNING_RATES
    if not low <= r.training.learning_rate <= high and not r.guards.allow_unusual_learning_rate:
        raise RecipeError(
            f"training.learning_rate: {r.training.learning_rate:g} is outside {low:g}..{high:g}, the range LoRA "
            "fine-tuning uses (typo? 2e-4 is usual); set guards.allow_unusual_learning_rate: true if you mean it")
    if r.training.resume not in (None, "auto") and not r.training.resume.strip():
        raise RecipeError("training.resume: empty; use null, auto, or a checkpoint folder")
    if getattr(r.training, "truncation_mode", None) == "keep_end":
        raise RecipeError("training.truncation_mode: keep_end would cut image tokens out of the prompt")
    q = r.quantization
    if r.lora.target_modules is None and q.load_in_4bit and r.training.fp16 and q.compute_dtype == "bfloat16":
        raise RecipeError("quantization.compute_dtype: bfloat16 compute with training.fp16=true mixes precisions; "
                          "use compute_dtype float16 or training.bf16")
    if r.data.streaming and (r.training.max_steps is None or r.training.max_steps <= 0):
        raise RecipeError("data.streaming: a stream has no known length; set training.max_steps")
    if r.evaluation.every_n_steps and not r.data.eval_split:
        raise RecipeError("evaluation.every_n_steps: evaluation needs data.eval_split")
    if r.data.eval_split is None and r.training.eval_strategy not in ("no", None):
        raise RecipeError("training.eval_strategy: evaluation needs data.eval_split")
    validate_distributed(r)
    if r.model.name_or_path.startswith("zoo:"):
        family, folder, _ = parse_name(r.model.name_or_path)
        if folder is None:
            check_choice("model.name_or_path", family, FAMILIES, what="zoo family")
        elif not (folder / "config.json").is_file():
            raise RecipeError(f"model.name_or_path: {folder}: not a folder of hub checkpoint files (no config.json)")


def validate_method(r: Recipe) -> None:
    """What `training.method` (its row in finetune.recipe.methods) requires of the other sections."""
    name, method = r.training.method, method_of(r.training)
    owner = format_owner(r.data.format)
    if method.data_format and r.data.format != method.data_format:
        raise RecipeError(f"training.method: {name} trains on data.format {method.data_format} (columns "
                          f"{', '.join(COLUMNS[method.data_format])})")
    if owner and owner != name:
        raise RecipeError(f"data.format: {r.data.format} rows train with training.method: {owner}")
    if r.data.streaming and method.no_streaming:
        raise RecipeError(f"data.streaming: {method.no_streaming}")
    if r.evaluation.every_n_steps and method.no_eval_during_training:
        raise RecipeError(f"evaluation.every_n_steps: {method.no_eval_during_training}")
    if method.packing and r.training.packing:
        if r.data.streaming:
            raise RecipeError("training.packing: not supported with data.streaming (packs are planned from the "
                              "pre-flight scan's lengths of every row)")
        if r.training.packing_strategy != "bfd":
            raise RecipeError(f"training.packing_strategy: {r.training.packing_strategy!r} is not supported; finetune "
                              "packs whole samples (bfd): a sample split across rows would lose its images")
        if r.training.max_length is None:
            raise RecipeError("training.max_length: required with training.packing (the length of a packed row)")
    if not method.rewards:
        if r.rewards.functions:
            raise RecipeError(f"rewards.functions: used only with training.method: "
                              f"{' or '.join(n for n, m in METHODS.items() if m.rewards)} (it would be ignored)")
        return
    if not r.rewards.functions:
        raise RecipeError(f"rewards.functions: training.method {name} needs at least one reward (e.g. "
                          "[relaxed_accuracy])")
    weights = r.training.reward_weights
    if weights is not None and len(weights) != len(r.rewards.functions):
        raise RecipeError(f"training.reward_weights: {len(weights)} weights for {len(r.rewards.functions)} rewards "
                          f"({', '.join(r.rewards.functions)})")


def _deepcopy(raw: dict) -> dict:
    return yaml.safe_load(yaml.safe_dump(raw))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    return value
