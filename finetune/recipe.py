"""Recipes: YAML files loaded into one typed dataclass per section, validated before anything heavy is loaded.

Every error names the dotted key (`lora.r: must be > 0, got 0`) and suggests the closest valid key for typos.
The `training:` section takes the trainer config's keys verbatim: `trl.SFTConfig`'s for `training.method: sft`
(the default), `trl.DPOConfig`'s for `dpo`; `TrainingConfig` mirrors that class's fields.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import functools
import importlib.util
import re
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .families import FAMILIES


class RecipeError(ValueError):
    """A recipe that cannot run; the message names the file and dotted key."""


@dataclass
class ModelConfig:
    """The base model and how to load it."""

    #: Hub id (`Qwen/Qwen2.5-VL-3B-Instruct`), local folder, `zoo:<family>[:<preset>]` for a local tiny model, or
    #: `zoo:<folder of a checkpoint's hub files>` for a tiny model with that checkpoint's template and image settings.
    name_or_path: str
    #: Hub revision (branch, tag or commit). Required when `trust_remote_code` is on.
    revision: str | None = None
    #: Run modelling code shipped with the checkpoint. Off by default: it executes code from the hub.
    trust_remote_code: bool = False
    #: Weight dtype of the (unquantized) base model.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    #: Attention backend passed to `from_pretrained` (`sdpa`, `eager`, `flash_attention_2`); None = transformers' pick.
    attn_implementation: str | None = None
    #: A Jinja chat template file that replaces the model's own. Saved with the run (processor files), so
    #: evaluation, inference, merged exports and pushed repos render with it. None = the model's template, or for a
    #: checkpoint without one, finetune's documented template for its family (PaliGemma); otherwise an error.
    chat_template: str | None = None
    #: A run folder (or adapter folder) of this base model whose LoRA adapter training continues from, e.g. an SFT
    #: run as the start of a DPO recipe. Its adapter settings replace the `lora:` section.
    adapter: str | None = None

    def validate(self) -> None:
        if self.chat_template is not None and not self.chat_template.strip():
            raise RecipeError("model.chat_template: empty; give a template file path or null")
        if self.adapter is not None and not self.adapter.strip():
            raise RecipeError("model.adapter: empty; give a run folder holding adapter_config.json, or null")


@dataclass
class DataConfig:
    """Where the training data comes from and how rows become chat messages."""

    #: Dataset: local folder or file (.json/.jsonl/.parquet), or a hub dataset id.
    path: str
    #: Row schema, see `finetune.formats.FORMATS`: chartqa, vqa, caption, llava, cauldron, messages, video.
    format: str = "messages"
    #: The format's column names mapped to this dataset's, e.g. `{question: q, answers: gt}`.
    columns: dict[str, str] = field(default_factory=dict)
    #: Captioning with several captions per image: one training row per caption instead of the first only.
    expand_captions: bool = False
    #: Split to train on.
    train_split: str = "train"
    #: Held-out split for evaluation; None = no evaluation.
    eval_split: str | None = None
    #: Folder that relative image paths resolve against; None = the dataset's own folder.
    image_root: str | None = None
    #: System prompt; None = the adapter's default (ChartQA has one), "" = no system message.
    system_prompt: str | None = None
    #: Use only the first N rows of each split (quick experiments).
    max_samples: int | None = None
    #: Samples longer than `training.max_length` after image expansion: `drop` them (counted, ids reported) or
    #: `error` before training starts. They are never truncated, which would cut image tokens.
    on_too_long: Literal["drop", "error"] = "drop"
    #: Rows with an image or video that cannot be used (missing, empty, truncated, not an image, over
    #: `pixel_limit`, outside the image root) or that do not fit the format: `drop` them (counted per reason, row
    #: ids reported) or `error` before training starts.
    on_bad_image: Literal["drop", "error"] = "drop"
    #: Downscale images (keeping aspect) to at most this many pixels, in training, evaluation and inference alike
    #: (saved in the run's recipe.yaml). None = as they are; the processor applies its own limits after.
    max_pixels: int | None = None
    #: Refuse images with more pixels than this (decompression bombs).
    pixel_limit: int = 89_478_485
    #: Settings of the processor's image processor, e.g. Qwen's `{min_pixels: 3136, max_pixels: 401408}` or
    #: Idefics3's `{do_image_splitting: false}`; saved with the processor, so exports and inference use them too.
    image_processor: dict[str, Any] = field(default_factory=dict)
    #: Allow image paths that are absolute, leave the image root (`..`, symlinks) or are URLs (fetched).
    allow_external_paths: bool = False
    #: Frames per video, spread evenly over the clip (with `video_fps`: the most frames to take).
    video_frames: int | None = 8
    #: Sample videos at this many frames per second instead of a fixed count.
    video_fps: float | None = None
    #: How the pre-flight scan checks images: `header` reads each file's header only (missing, empty, not an
    #: image, over `pixel_limit`, outside the image root; lengths from the processor's formulas), `decode` decodes
    #: every image as training will (also catches truncated pixel data, at the cost of decoding everything).
    #: A file that fails only when decoded in training is dropped from its batch and counted, never fatal.
    verify_images: Literal["header", "decode"] = "header"
    #: Processes for the pre-flight scan; None = the CPU cores available to this process.
    num_proc: int | None = None
    #: Train from a stream (`datasets` streaming: hub id or local files) without listing it first; rows are
    #: checked as they arrive (same drop reasons, counted). Needs `training.max_steps`. Train split only.
    streaming: bool = False
    #: Streaming: rows of the stream's start that the pre-flight report scans, for your information.
    preview_rows: int = 1000
    #: Streaming: rows shuffled together and grouped into batches of similar length.
    shuffle_buffer: int = 2000

    def validate(self) -> None:
        from .formats import COLUMNS, FORMATS

        _check_choice("data.format", self.format, FORMATS)
        if self.max_samples is not None and self.max_samples <= 0:
            raise RecipeError(f"data.max_samples: must be > 0, got {self.max_samples}")
        for ours, theirs in self.columns.items():
            _check_choice("data.columns", ours, COLUMNS[self.format], what=f"column of format {self.format}")
            if not isinstance(theirs, str) or not theirs:
                raise RecipeError(f"data.columns.{ours}: expected a dataset column name, got {theirs!r}")
        if self.expand_captions and self.format != "caption":
            raise RecipeError(f"data.expand_captions: only for data.format caption, not {self.format}")
        for key in ("max_pixels", "pixel_limit", "video_frames", "video_fps", "num_proc", "preview_rows",
                    "shuffle_buffer"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise RecipeError(f"data.{key}: must be > 0, got {value}")
        if self.video_frames is None and self.video_fps is None:
            raise RecipeError("data.video_frames: set a frame count, or data.video_fps, to sample videos")


LORA_GROUPS = ("decoder", "projector", "vision")


@dataclass
class LoraConfig:
    """LoRA adapters, placed by meaning (`decoder`, `projector`, `vision`) and resolved per family."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    #: Which parts of the model get adapters: any of decoder, projector, vision.
    targets: list[str] = field(default_factory=lambda: ["decoder", "projector"])
    #: Expert override: exact peft `target_modules` (list of names or one regex). Replaces `targets` for modules.
    target_modules: list[str] | str | None = None

    def validate(self) -> None:
        if self.r <= 0:
            raise RecipeError(f"lora.r: must be > 0, got {self.r}")
        if self.alpha <= 0:
            raise RecipeError(f"lora.alpha: must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise RecipeError(f"lora.dropout: must be in [0, 1), got {self.dropout}")
        if not self.targets and not self.target_modules:
            raise RecipeError("lora.targets: empty; name at least one of decoder, projector, vision")
        for t in self.targets:
            _check_choice("lora.targets", t, LORA_GROUPS, what="target")
        if len(set(self.targets)) != len(self.targets):
            raise RecipeError(f"lora.targets: duplicate entries in {self.targets}")


@dataclass
class QuantizationConfig:
    """QLoRA: load the base model's decoder in 4-bit with bitsandbytes (vision tower, projector, lm_head stay full)."""

    load_in_4bit: bool = False
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    #: dtype the 4-bit matmuls compute in; auto = bfloat16 on a bf16-capable GPU, else float32.
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    #: dtype the packed 4-bit weights are stored in. FSDP can only shard them when it equals the model's dtype
    #: (e.g. bfloat16); uint8 is bitsandbytes' default.
    quant_storage: Literal["uint8", "bfloat16", "float16", "float32"] = "uint8"

    def validate(self) -> None:
        if self.load_in_4bit and importlib.util.find_spec("bitsandbytes") is None:
            raise RecipeError(
                "quantization.load_in_4bit: needs the bitsandbytes package (pip install bitsandbytes), "
                "which is not installed"
            )


@dataclass
class ExportConfig:
    """What to write besides the adapter once training ends."""

    #: Also write a merged checkpoint (parity-checked, see `finetune merge`) to `<output_dir>/merged`.
    merge: bool = False
    #: dtype of the merged weights.
    merge_dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    #: QLoRA runs: merge onto the `original` 16-bit base weights or the NF4-`dequantized` ones the adapter saw.
    merge_onto: Literal["original", "dequantized"] = "original"
    #: Push to the Hugging Face Hub when training ends (token from HF_TOKEN or `hf auth login`, never the recipe).
    push_to_hub: bool = False
    #: Hub repository, `namespace/name`; created if missing.
    hub_repo_id: str | None = None
    #: Create the repository as private (ignored when it already exists).
    hub_private: bool = False
    #: Branch to commit to (created if missing); None = main.
    hub_revision: str | None = None
    #: Push the merged export instead of the adapter (merges first if `merge` is off).
    hub_merged: bool = False

    def validate(self) -> None:
        if self.push_to_hub and not self.hub_repo_id:
            raise RecipeError("export.push_to_hub: needs export.hub_repo_id (namespace/name) to know where to push")
        if self.hub_repo_id is not None and not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", self.hub_repo_id):
            raise RecipeError(f"export.hub_repo_id: expected namespace/name (e.g. alice/qwen2-vl-chartqa), "
                              f"got {self.hub_repo_id!r}")
        if self.hub_revision is not None and not self.hub_revision.strip():
            raise RecipeError("export.hub_revision: empty branch name; use null for main")


@dataclass
class EvaluationConfig:
    """Generation-based evaluation on `data.eval_split`: before/after training, and optionally during it."""

    #: Evaluate the base model and the fine-tuned one at the end of training and write report.md.
    enabled: bool = True
    #: Held-out samples to generate for (None = the whole split).
    limit: int | None = 100
    #: relaxed_accuracy, exact_match, anls or vqa_accuracy; None = the data format's usual one.
    metric: str | None = None
    max_new_tokens: int = 16
    batch_size: int = 8
    #: Also evaluate every N optimizer steps during training (on `during_limit` samples) and log it; None = off.
    every_n_steps: int | None = None
    during_limit: int = 32
    #: Keep the adapter with the best in-training score in `<output_dir>/best` (needs every_n_steps).
    keep_best: bool = False
    #: A column of the eval split to break the held-out score down by in report.md; None = the first of
    #: question_type, type, category, source, human_or_machine with two or more values, else the question itself
    #: when the split asks only a few distinct ones.
    group_by: str | None = None

    def validate(self) -> None:
        from .metrics import METRICS

        if self.metric is not None:
            _check_choice("evaluation.metric", self.metric, METRICS, what="metric")
        for key in ("limit", "max_new_tokens", "batch_size", "every_n_steps", "during_limit"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise RecipeError(f"evaluation.{key}: must be > 0, got {value}")
        if self.keep_best and not self.every_n_steps:
            raise RecipeError("evaluation.keep_best: needs evaluation.every_n_steps to pick the best adapter")


@dataclass
class GuardsConfig:
    """Training-health guards, checked on every step."""

    #: A NaN/inf loss or gradient norm: `stop` the run (nothing after the last finite step is saved) or `skip` the
    #: batch (its gradients are zeroed; each skip is logged and listed in run_summary.json).
    on_nonfinite: Literal["stop", "skip"] = "stop"
    #: Warn when a gradient norm exceeds this many times the median of the last 20 steps; null = never.
    grad_norm_spike: float | None = 10.0
    #: Learning rates outside 1e-7..1e-2 are refused unless this is true (usually a typo such as 2e4 for 2e-4).
    allow_unusual_learning_rate: bool = False

    def validate(self) -> None:
        if self.grad_norm_spike is not None and self.grad_norm_spike <= 1:
            raise RecipeError(f"guards.grad_norm_spike: must be > 1 (a factor over the median), got {self.grad_norm_spike}")


#: Learning rates LoRA fine-tuning uses in practice; outside it needs guards.allow_unusual_learning_rate.
SANE_LEARNING_RATES = (1e-7, 1e-2)

#: Training methods and the TRL config class whose keys `training:` takes for each.
METHODS = {"sft": "SFTConfig", "dpo": "DPOConfig"}

#: Keys of the `training:` section that finetune adds to the TRL config's (never passed to it).
TRAINING_EXTENSIONS: list[tuple[str, Any, Any, str]] = [
    ("method", Literal["sft", "dpo"], "sft",
     "sft = supervised fine-tuning (trl.SFTConfig keys); dpo = preference tuning on data.format preference "
     "(trl.DPOConfig keys)"),
    ("resume", str | None, None,
     "null = start fresh; auto = continue from the newest complete checkpoint in output_dir (fresh if none); "
     "or a checkpoint folder, which must be complete"),
    ("resume_allow_incomplete", bool, False,
     "resume from an explicit checkpoint even if it lacks optimizer/scheduler/RNG state (warns loudly)"),
]

# finetune's defaults where they differ from SFTConfig's, each for a reason.
TRAINING_DEFAULTS: dict[str, Any] = {
    # Our collator needs the raw `messages`/`images` columns, not the model's forward signature.
    "remove_unused_columns": False,
    # Rows are tokenised by finetune's collator (assistant-only labels, images never truncated).
    "dataset_kwargs": {"skip_prepare_dataset": True},
    "report_to": "none",
    # TRL 1.16 defaults the deprecated `gradient_checkpointing` alias to True, which makes transformers 5 warn on
    # every run; the same default (checkpointing on) under its current name.
    "activation_checkpointing": True,
    "gradient_checkpointing": None,
}

#: SFTConfig keys transformers 5 renamed (the old names warn and go in v6): read under the new name. Recipes always
#: use the new names; on a transformers without them (5.17 has only `gradient_checkpointing`) finetune passes them
#: to TRL under the old ones (`trl_name`).
RENAMED_TRAINING_KEYS = {
    "gradient_checkpointing": "activation_checkpointing",
    "gradient_checkpointing_kwargs": "activation_checkpointing_kwargs",
}


def trl_name(config: type, name: str) -> str:
    """The name the installed TRL config has for recipe key `name` (old transformers: the pre-rename one)."""
    if name in {f.name for f in dataclasses.fields(config)}:
        return name
    old = {new: old for old, new in RENAMED_TRAINING_KEYS.items()}.get(name)
    return old if old is not None else name

# DPOConfig keys that would silently break multimodal training or finetune's label guarantees.
REFUSED_DPO_KEYS = {
    "padding_free": "padding-free batches are not supported for image datasets",
    "precompute_ref_log_probs": "not supported for image datasets (TRL); the reference is computed per batch",
    "sync_ref_model": "the reference is the base (adapter disabled), there is no reference model to sync",
    "remove_unused_columns": "the collator needs the raw message columns",
    "resume_from_checkpoint": "use training.resume (auto, or a checkpoint folder)",
}

# SFTConfig keys that would silently break multimodal training; refused with the reason.
REFUSED_TRAINING_KEYS = {
    "padding_free": "use training.packing: true (samples packed whole, attention isolated per sample)",
    "assistant_only_loss": "finetune always trains on assistant tokens only (see `finetune check --show-labels`)",
    "completion_only_loss": "finetune always trains on assistant tokens only (see `finetune check --show-labels`)",
    "dataset_text_field": "rows are chat messages; there is no text field",
    "remove_unused_columns": "the collator needs the raw message columns",
    "resume_from_checkpoint": "use training.resume (auto, or a checkpoint folder)",
}


def trl_config_class(method: str = "sft") -> type:
    import trl

    return getattr(trl, METHODS[method])


@functools.cache
def training_config_class(method: str = "sft") -> type:
    """A dataclass with exactly the method's TRL config fields (`trl.SFTConfig` or `trl.DPOConfig`: same names,
    types, defaults) plus finetune's extensions, and no side effects."""
    config = trl_config_class(method)
    hints = typing.get_type_hints(config)
    names = {f.name for f in dataclasses.fields(config)}
    renamed = {old: new for old, new in RENAMED_TRAINING_KEYS.items() if new not in names}  # old transformers
    defaults = {k: v for k, v in TRAINING_DEFAULTS.items() if k in names and k not in renamed}
    specs = []
    for f in dataclasses.fields(config):
        if not f.init:
            continue
        default = defaults.get(f.name, f.default)
        if f.name in defaults or f.default is not dataclasses.MISSING:
            spec = field(default_factory=lambda d=default: _copy(d))
        elif f.default_factory is not dataclasses.MISSING:
            spec = field(default_factory=f.default_factory)
        else:
            spec = field(default=None)
        specs.append((renamed.get(f.name, f.name), hints.get(f.name, Any), spec))
    # `method` keeps its default "sft" in both classes, so a dpo recipe always writes it out (recipe.yaml).
    specs += [(name, ann, field(default=default)) for name, ann, default, _ in TRAINING_EXTENSIONS if name not in names]
    return dataclasses.make_dataclass(f"TrainingConfig_{method}", specs)


def _copy(value: Any) -> Any:
    return dict(value) if isinstance(value, dict) else list(value) if isinstance(value, list) else value


@dataclass
class Recipe:
    model: ModelConfig
    data: DataConfig
    lora: LoraConfig
    quantization: QuantizationConfig
    #: `trl.SFTConfig` or `trl.DPOConfig` fields, per `training.method` (see `training_config_class`).
    training: Any
    export: ExportConfig
    evaluation: EvaluationConfig
    guards: GuardsConfig = field(default_factory=GuardsConfig)
    #: The file this recipe came from (None when built from a dict).
    source: Path | None = None

    def sft_config(self, **overrides: Any):
        """The TRL config for this recipe (`trl.SFTConfig`, or `trl.DPOConfig` for `training.method: dpo`): only
        keys that differ from its defaults are passed."""
        config = trl_config_class(self.training.method)
        defaults = {f.name: f for f in dataclasses.fields(config) if f.init}
        ours = {trl_name(config, f.name): f.name for f in dataclasses.fields(self.training)}
        kwargs = {}
        for name, f in defaults.items():
            value = getattr(self.training, ours.get(name, name))
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
            if value != default:
                kwargs[name] = value
        kwargs.update(overrides)
        try:
            return config(**kwargs)
        except ValueError as e:
            hint = ""
            if "bf16" in str(e) or "fp16" in str(e):
                hint = " (this machine has no bf16/fp16-capable GPU: set training.bf16=false to train on CPU)"
            raise RecipeError(f"training: {e}{hint}") from e

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
    if path is not None and "output_dir" not in (raw.get("training") or {}):
        recipe.training.output_dir = str(Path("runs") / path.stem)
    return recipe


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
    _check_choice("override", parts[0], SECTIONS, what="section")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise RecipeError(f"override '{item}': {part} is not a section")
    node[parts[-1]] = parse_yaml(f"v: {value}")["v"] if value.strip() else None


def build_recipe(raw: dict) -> Recipe:
    for name in raw:
        _check_choice("recipe", name, SECTIONS, what="section")
    for name in REQUIRED_SECTIONS:
        if name not in raw:
            raise RecipeError(f"{name}: section is required")
    sections = {}
    for name, cls in SECTIONS.items():
        body = raw.get(name) or {}
        if not isinstance(body, dict):
            raise RecipeError(f"{name}: expected a mapping of keys, got {type(body).__name__}")
        if name == "training":
            method = body.get("method", "sft")
            _check_choice("training.method", method, METHODS, what="method")
            refused = REFUSED_TRAINING_KEYS if method == "sft" else REFUSED_DPO_KEYS
            for key in body:
                if key in refused:
                    raise RecipeError(f"training.{key}: not supported: {refused[key]}")
            body = _renamed_training_keys(body)
            cls = training_config_class(method)
        sections[name] = _build_section(cls, body, name)
    recipe = Recipe(**sections)
    _validate_combinations(recipe)
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
        _check_choice(prefix, key, fields, what="key")
        values[key] = _coerce(value, hints.get(key, Any), f"{prefix}.{key}")
    missing = [n for n, f in fields.items() if n not in values and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise RecipeError(f"{prefix}.{missing[0]}: required")
    obj = cls(**values)
    if hasattr(obj, "validate"):
        obj.validate()
    return obj


def _validate_combinations(r: Recipe) -> None:
    dpo = r.training.method == "dpo"
    if dpo != (r.data.format == "preference"):
        raise RecipeError(
            "training.method: dpo trains on data.format preference (image(s), prompt, chosen, rejected)"
            if dpo else "data.format: preference rows train with training.method: dpo")
    if dpo and r.data.streaming:
        raise RecipeError("data.streaming: not supported with training.method dpo")
    if not dpo and r.training.packing:
        if r.data.streaming:
            raise RecipeError("training.packing: not supported with data.streaming (packs are planned from the "
                              "pre-flight scan's lengths of every row)")
        if r.training.packing_strategy != "bfd":
            raise RecipeError(f"training.packing_strategy: {r.training.packing_strategy!r} is not supported; finetune "
                              "packs whole samples (bfd): a sample split across rows would lose its images")
        if r.training.max_length is None:
            raise RecipeError("training.max_length: required with training.packing (the length of a packed row)")
    if dpo and r.evaluation.every_n_steps:
        raise RecipeError("evaluation.every_n_steps: not supported with training.method dpo (TRL logs reward "
                          "margins and accuracies every training.logging_steps)")
    if r.model.trust_remote_code and not r.model.revision:
        raise RecipeError(
            "model.trust_remote_code: runs code downloaded with the model; pin model.revision to a commit hash "
            "so that code cannot change under you"
        )
    low, high = SANE_LEARNING_RATES
    if not low <= r.training.learning_rate <= high and not r.guards.allow_unusual_learning_rate:
        raise RecipeError(
            f"training.learning_rate: {r.training.learning_rate:g} is outside {low:g}..{high:g}, the range LoRA "
            "fine-tuning uses (typo? 2e-4 is usual); set guards.allow_unusual_learning_rate: true if you mean it")
    if r.training.resume not in (None, "auto") and not r.training.resume.strip():
        raise RecipeError("training.resume: empty; use null, auto, or a checkpoint folder")
    if r.training.max_length is not None and r.training.max_length <= 0:
        raise RecipeError(f"training.max_length: must be > 0 or null, got {r.training.max_length}")
    if r.training.truncation_mode == "keep_end":
        raise RecipeError("training.truncation_mode: keep_end would cut image tokens out of the prompt")
    if r.quantization.load_in_4bit and r.model.name_or_path.startswith("zoo:"):
        pass  # the zoo models quantize like real ones; nothing to refuse
    if r.lora.target_modules is None and r.quantization.load_in_4bit and r.training.fp16 and r.quantization.compute_dtype == "bfloat16":
        raise RecipeError("quantization.compute_dtype: bfloat16 compute with training.fp16=true mixes precisions; "
                          "use compute_dtype float16 or training.bf16")
    if r.data.streaming and (r.training.max_steps is None or r.training.max_steps <= 0):
        raise RecipeError("data.streaming: a stream has no known length; set training.max_steps")
    if r.evaluation.every_n_steps and not r.data.eval_split:
        raise RecipeError("evaluation.every_n_steps: evaluation needs data.eval_split")
    if r.data.eval_split is None and r.training.eval_strategy not in ("no", None):
        raise RecipeError("training.eval_strategy: evaluation needs data.eval_split")
    if r.model.name_or_path.startswith("zoo:"):
        from .zoo import parse_name

        family, folder, _ = parse_name(r.model.name_or_path)
        if folder is None:
            _check_choice("model.name_or_path", family, FAMILIES, what="zoo family")
        elif not (folder / "config.json").is_file():
            raise RecipeError(f"model.name_or_path: {folder}: not a folder of hub checkpoint files (no config.json)")


# --- type checking -----------------------------------------------------------------------------------------------


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check `value` against a type annotation, converting only where YAML is ambiguous (`1e-4` is a string)."""
    ok, converted = _try(value, annotation)
    if ok:
        return converted
    raise RecipeError(f"{key}: expected {_describe(annotation)}, got {type(value).__name__} {value!r}")


def _try(value: Any, ann: Any) -> tuple[bool, Any]:
    if ann is Any or ann is object:
        return True, value
    origin = typing.get_origin(ann)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(ann):
            ok, v = _try(value, arg)
            if ok:
                return True, v
        return False, None
    if ann is type(None):
        return value is None, None
    if origin is Literal:
        return value in typing.get_args(ann), value
    if isinstance(ann, type) and issubclass(ann, enum.Enum):
        values = {m.value for m in ann}
        return (value in values, value) if isinstance(value, str) else (isinstance(value, ann), value)
    if ann is bool:
        return isinstance(value, bool), value
    if ann is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if ann is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, value  # an int stays an int: `warmup_steps: 10` means steps, `0.1` a ratio
        if isinstance(value, str):
            try:
                return True, float(value)
            except ValueError:
                return False, None
        return False, None
    if ann is str:
        return isinstance(value, str), value
    if origin in (list, tuple, typing.Sequence) or ann in (list, tuple):
        if not isinstance(value, list):
            return False, None
        args = typing.get_args(ann)
        if not args:
            return True, value
        out = []
        for item in value:
            ok, v = _try(item, args[0])
            if not ok:
                return False, None
            out.append(v)
        return True, out
    if origin is dict or ann is dict:
        return isinstance(value, dict), value
    return True, value  # an annotation we do not model: SFTConfig validates it when built


def _describe(ann: Any) -> str:
    origin = typing.get_origin(ann)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(ann))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(ann))
    if ann is type(None):
        return "null"
    if isinstance(ann, type) and issubclass(ann, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in ann)
    return getattr(ann, "__name__", str(ann))


def _check_choice(key: str, value: str, choices: typing.Iterable[str], what: str = "value") -> None:
    choices = list(choices)
    if value in choices:
        return
    close = difflib.get_close_matches(str(value), choices, n=1, cutoff=0.6)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    if what == "key":
        raise RecipeError(f"{key}.{value}: unknown key{hint}")
    if what == "section":
        raise RecipeError(f"{value}: unknown section{hint}; sections are {', '.join(choices)}")
    raise RecipeError(f"{key}: unknown {what} '{value}'{hint}; choose from {', '.join(choices)}")


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
