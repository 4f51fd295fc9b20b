"""The recipe's sections, one typed dataclass each (the `training:` section is TRL's own config: recipe.training).

Every field is documented where it is declared; `validate()` checks what a type cannot say and names the dotted key.
Choices that belong to other stages are read from their tables: formats and their columns (finetune.data.formats),
LoRA groups (finetune.models.families). The metric names are declared here, and finetune.evaluation.metrics
implements exactly these (a test holds them equal).
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from ..data.formats import COLUMNS, FORMATS
from ..errors import RecipeError
from ..models.families import LORA_GROUPS
from .types import check_choice

#: Answer metrics `evaluation.metric` may name (implemented by finetune.evaluation.metrics.METRICS).
METRIC_NAMES = ("relaxed_accuracy", "exact_match", "anls", "vqa_accuracy")
#: A Hub repository id: `namespace/name`.
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


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
    #: Variables the chat template reads, fixed for the run (Qwen3.5: `{enable_thinking: false}` renders every
    #: reply after an empty think block, as the template's non-thinking mode generates). Written into the run's saved
    #: template, so predict, serve, merged and GGUF exports render the same prompt.
    chat_template_kwargs: dict[str, bool | int | float | str] = field(default_factory=dict)
    #: A run folder (or adapter folder) of this base model whose LoRA adapter training continues from, e.g. an SFT
    #: run as the start of a DPO recipe. Its adapter settings replace the `lora:` section.
    adapter: str | None = None

    def validate(self) -> None:
        if self.chat_template is not None and not self.chat_template.strip():
            raise RecipeError("model.chat_template: empty; give a template file path or null")
        for key in self.chat_template_kwargs:
            if not str(key).isidentifier():
                raise RecipeError(f"model.chat_template_kwargs: {key!r} is not a template variable name")
        if self.adapter is not None and not self.adapter.strip():
            raise RecipeError("model.adapter: empty; give a run folder holding adapter_config.json, or null")


@dataclass
class DataConfig:
    """Where the training data comes from and how rows become chat messages."""

    #: Dataset: local folder or file (.json/.jsonl/.parquet), or a hub dataset id.
    path: str
    #: Row schema, see `finetune.data.formats.FORMATS`: chartqa, vqa, caption, llava, cauldron, messages, video.
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
        check_choice("data.format", self.format, FORMATS)
        if self.max_samples is not None and self.max_samples <= 0:
            raise RecipeError(f"data.max_samples: must be > 0, got {self.max_samples}")
        for ours, theirs in self.columns.items():
            check_choice("data.columns", ours, COLUMNS[self.format], what=f"column of format {self.format}")
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
    #: Mixture-of-experts models: also adapt the experts, the fused 3-D expert weights (peft `target_parameters`)
    #: and the shared expert. The router is never adapted. Off: experts stay frozen (LoRA on attention only).
    experts: bool = False

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
            check_choice("lora.targets", t, LORA_GROUPS, what="target")
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


#: What llama.cpp writes a GGUF language model as: converted directly, or quantized from that (finetune.export).
GGUF_OUTTYPES = ("f32", "f16", "bf16", "q8_0", "q4_k_m", "q5_k_m", "q6_k", "q4_0")


@dataclass
class ExportConfig:
    """What to write besides the adapter once training ends."""

    #: Also write a merged checkpoint (parity-checked, see `finetune merge`) to `<output_dir>/merged`.
    merge: bool = False
    #: dtype of the merged weights; auto = the dtype the base checkpoint is stored in (its config.json).
    merge_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
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
    #: GGUF files for llama.cpp to write (and check) into `<output_dir>/gguf` once training ends, e.g.
    #: [f16, q4_k_m]: see `finetune export-gguf` (needs `pip install 'finetune[gguf]'`). Empty = none.
    gguf: list[str] = field(default_factory=list)

    def validate(self) -> None:
        if self.push_to_hub and not self.hub_repo_id:
            raise RecipeError("export.push_to_hub: needs export.hub_repo_id (namespace/name) to know where to push")
        if self.hub_repo_id is not None and not HUB_ID.match(self.hub_repo_id):
            raise RecipeError(f"export.hub_repo_id: expected namespace/name (e.g. alice/qwen2-vl-chartqa), "
                              f"got {self.hub_repo_id!r}")
        if self.hub_revision is not None and not self.hub_revision.strip():
            raise RecipeError("export.hub_revision: empty branch name; use null for main")
        for outtype in self.gguf:
            check_choice("export.gguf", outtype, GGUF_OUTTYPES, what="outtype")


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
        if self.metric is not None:
            check_choice("evaluation.metric", self.metric, METRIC_NAMES, what="metric")
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


#: Rewards finetune provides besides the task metrics (METRIC_NAMES); see finetune.evaluation.rewards.
REWARD_NAMES = ("format", "length")


@dataclass
class RewardsConfig:
    """GRPO's verifiable rewards (`training.method: grpo`), weighted by `training.reward_weights` (GRPOConfig's key;
    equal weights when unset)."""

    #: Each a task metric scored on the completion's answer (relaxed_accuracy, exact_match, anls, vqa_accuracy),
    #: `format` (1 for the reasoning-then-answer layout), `length` (a penalty past length_target characters), or your
    #: own as module:function with TRL's signature (prompts, completions, answers, **columns) -> list of floats.
    functions: list[str] = field(default_factory=list)
    #: Completions reason first, then answer: <think>...</think><answer>...</answer> (tags below); metrics score the
    #: text inside the answer tags. Off: the whole completion is the answer.
    reasoning: bool = False
    think_tags: list[str] = field(default_factory=lambda: ["<think>", "</think>"])
    answer_tags: list[str] = field(default_factory=lambda: ["<answer>", "</answer>"])
    #: `length`: no penalty up to this many characters, -1 at twice as many.
    length_target: int = 200

    def validate(self) -> None:
        for i, name in enumerate(self.functions):
            if ":" not in name:
                check_choice(f"rewards.functions[{i}]", name, [*METRIC_NAMES, *REWARD_NAMES], what="reward")
        for key in ("think_tags", "answer_tags"):
            tags = getattr(self, key)
            if len(tags) != 2 or not all(isinstance(t, str) and t for t in tags):
                raise RecipeError(f"rewards.{key}: two non-empty tags, opening and closing; got {tags!r}")
        if self.length_target < 1:
            raise RecipeError(f"rewards.length_target: must be at least 1, got {self.length_target}")
