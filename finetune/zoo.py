"""Tiny-model zoo: randomly initialised vision-language checkpoints built locally, without the Hugging Face Hub.

Each family is built with its real model and processor classes, its real special and image tokens and its real chat
template, so that everything downstream (collator, label masking, LoRA placement, 4-bit loading, merging) runs the
same code paths as on a hub checkpoint, in seconds, on a CPU. Only the sizes are tiny, and the weights are random.

    from finetune import zoo
    path = zoo.ensure("qwen2_vl", "small")     # a folder for AutoProcessor / AutoModelForImageTextToText
    model, processor = zoo.build("llava")      # in memory, not saved
    path = zoo.ensure_like("tests/fixtures/hub/Qwen__Qwen2.5-VL-3B-Instruct")  # a real checkpoint's interface

Tokenizers are byte-level BPE trained here on a small fixed corpus (generic words plus the vocabulary of the
bundled chart-QA demo), deterministic run to run. Images are small (32-64 px) so image token runs stay short.

`ensure_like` / `build_like` (recipes: `zoo:<folder>`) build a replica of a real checkpoint from a folder of its
small hub files instead: its own chat template, special tokens and image settings (so an image expands to as many
tokens as on the real model), with tiny weights and vocabulary. The repository keeps those files for every model
the recipes name under tests/fixtures/hub/.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import itertools
import json
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

from .data import CHARTQA_SYSTEM_PROMPT
from .families import FAMILIES as FAMILY_TABLE
from .families import PALIGEMMA_TEMPLATE as FAMILY_PALIGEMMA_TEMPLATE

#: Bump when a change in the build changes what gets saved; the cache key also hashes this file and the versions
#: of the libraries whose classes and templates end up in the checkpoint.
ZOO_VERSION = "1"

#: Every family of the model-family table has a zoo builder (BUILDERS below).
FAMILIES: tuple[str, ...] = tuple(FAMILY_TABLE)

#: Size presets. Text: decoder width/depth; v_*: vision tower. A preset never changes image size, patch size or
#: token layout, so the same conversation expands to the same tokens at every size.
PRESETS: dict[str, dict[str, int]] = {
    # A few hundred K parameters: for tests.
    "tiny": dict(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2,
                 v_hidden=32, v_intermediate=64, v_layers=2, v_heads=2),
    # ~2-3M: big enough to visibly learn the chart-QA demo on a CPU.
    "small": dict(hidden=192, intermediate=512, layers=4, heads=6, kv_heads=2,
                  v_hidden=64, v_intermediate=256, v_layers=3, v_heads=4),
    # Tens of M: for throughput benchmarks.
    "bench": dict(hidden=512, intermediate=1408, layers=8, heads=8, kv_heads=4,
                  v_hidden=128, v_intermediate=512, v_layers=4, v_heads=4),
}

VOCAB_SIZE = 1536  # BPE target before special tokens are counted; the corpus saturates a bit below it


# --- tokenizer -----------------------------------------------------------------------------------------------------

_COLORS = "red green blue orange purple yellow gray grey black pink brown white".split()
_CHART_WORDS = ("bar bars chart charts plot graph line label labels value values axis title legend color colour "
                "colors tallest shortest highest lowest largest smallest leftmost rightmost middle biggest").split()
_WORDS = ("the a an is are was of to in on at with for and or not this that these there here it its image picture "
          "photo shape square circle cat dog describe what which where how many much who when why do does show "
          "shows shown please tell me about answer question yes no left right top bottom up down small large big "
          "tall short high low more less most least than first second third last one two three four five six seven "
          "eight nine ten hundred percent number total sum difference average between each per year you can see "
          "I my your we they he she has have had be been will would could should brief briefly short concise").split()
_MARKERS = ["User:", "Assistant:", "System:", "USER:", "ASSISTANT:", "[INST]", "[/INST]", "<<SYS>>", "<</SYS>>",
            "system\n", "user\n", "assistant\n", "model\n", "Answer:", "Answer", "Yes", "No", "Picture 1:"]


def _corpus(seed: int = 0):
    """Training text for the BPE: fixed, so the tokenizer (and so the model) is identical run to run."""
    rnd = random.Random(seed)
    words = _WORDS + _COLORS + _CHART_WORDS + [str(n) for n in range(101)]
    for _ in range(4000):
        sentence = " ".join(rnd.choice(words) for _ in range(rnd.randint(3, 14)))
        yield (sentence[0].upper() + sentence[1:] if rnd.random() < 0.5 else sentence) + rnd.choice(".?!,:\n")
    # The demo's questions and answers in the templates' role formats, so that they tokenize compactly.
    formats = ["Answer briefly. USER: {q} ASSISTANT: {a}", "[INST] {q} [/INST] {a}", "User: {q}\nAssistant: {a}",
               "System: Answer briefly.\nuser\n{q}\nmodel\n{a}\n"]
    for _ in range(2):
        for c, fmt in itertools.product(_COLORS, formats):
            for a in (c.capitalize(), c, str(rnd.randint(0, 100)), rnd.choice(["Yes", "No"])):
                q = rnd.choice([f"What is the value of the {c} bar?", "How many bars are in the chart?",
                                f"Which color is the {rnd.choice(_CHART_WORDS[-8:])} bar?", f"Is the {c} bar tallest?"])
                yield fmt.format(q=q, a=a)
    for _ in range(20):
        yield CHARTQA_SYSTEM_PROMPT
    yield from _MARKERS
    yield " ".join(str(n) for n in range(101)) + " 0.5 1.25 (e.g., x) - ; ' \" / %"


def _tokenizer(specials: list[str], *, bos: str | None = None, eos: str, pad: str, unk: str | None = None,
               extra: dict[str, str] | None = None, add_bos: bool = False, template: str):
    """Byte-level BPE with the family's special tokens at the lowest ids (in the order given), like real vocabularies
    that start with their control tokens. `add_bos`: the real tokenizer prepends bos when encoding (Llama, Gemma)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE + len(specials), special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer=trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad, unk_token=unk,
                                   extra_special_tokens=extra or {}, chat_template=template)


# --- chat templates ------------------------------------------------------------------------------------------------


def _trl_template(name: str) -> str:
    """The real template as TRL ships it; read byte-for-byte so TRL recognises it (it compares templates exactly to
    swap in its `{% generation %}`-marked training variant)."""
    return (importlib.resources.files("trl") / "chat_templates" / f"{name}.jinja").read_text(encoding="utf-8")


# Our own templates take `content` as a string or a list of {"type": "image"} / {"type": "text"} parts.
_PARTS = ("{%- if message['content'] is string -%}{%- set parts = [{'type': 'text', 'text': message['content']}] -%}"
          "{%- else -%}{%- set parts = message['content'] -%}{%- endif -%}")
_TEXT = "{%- for part in parts if part['type'] == 'text' -%}{{ part['text'] }}{%- endfor -%}"
_BAD_ROLE = "{{ raise_exception('Unsupported role: ' + message['role']) }}"

# LLaVA-1.5 (Vicuna v1 conversation format, as LLaVA was trained): "{system} USER: <image>\n{text} ASSISTANT:
# {reply}</s>USER: ...". The hub's llava-hf template drops the </s>; we keep it so replies have an end-of-turn.
LLAVA_TEMPLATE = (
    "{%- for message in messages -%}" + _PARTS +
    "{%- if message['role'] == 'system' -%}" + _TEXT + "{{ ' ' }}"
    "{%- elif message['role'] == 'user' -%}{{ 'USER: ' }}"
    "{%- for part in parts if part['type'] == 'image' -%}{{ '<image>\n' }}{%- endfor -%}" + _TEXT + "{{ ' ' }}"
    "{%- elif message['role'] == 'assistant' -%}{{ 'ASSISTANT: ' }}" + _TEXT + "{{ '</s>' }}"
    "{%- else -%}" + _BAD_ROLE + "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
)

# Llama 3.2 Vision, without the tool-calling and "Cutting Knowledge Date / Today Date" preamble of the hub template
# (a date in the prompt would make rendering depend on the day). Images stay where they are in the content.
MLLAMA_TEMPLATE = (
    "{{- '<|begin_of_text|>' -}}"
    "{%- for message in messages -%}" + _PARTS +
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' -}}"
    "{%- for part in parts -%}"
    "{%- if part['type'] == 'image' -%}{{ '<|image|>' }}{%- elif part['type'] == 'text' -%}{{ part['text'] }}"
    "{%- endif -%}{%- endfor -%}{{- '<|eot_id|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif -%}"
)

# PaliGemma's hub checkpoints have no chat template; the zoo uses finetune's documented one.
PALIGEMMA_TEMPLATE = FAMILY_PALIGEMMA_TEMPLATE


# --- shared config pieces ------------------------------------------------------------------------------------------


def _ids(tok, *tokens: str) -> list[int]:
    return [tok.convert_tokens_to_ids(t) for t in tokens]


def _text(p: dict, tok, **overrides) -> dict:
    """Decoder config shared by every family (Llama-like names); vocab from the final tokenizer."""
    cfg = dict(vocab_size=len(tok), hidden_size=p["hidden"], intermediate_size=p["intermediate"],
               num_hidden_layers=p["layers"], num_attention_heads=p["heads"], num_key_value_heads=p["kv_heads"],
               max_position_embeddings=4096, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
               pad_token_id=tok.pad_token_id)
    return cfg | overrides


def _vision(p: dict, **overrides) -> dict:
    """ViT config (CLIP / SigLIP / Idefics3 field names)."""
    return dict(hidden_size=p["v_hidden"], intermediate_size=p["v_intermediate"], num_hidden_layers=p["v_layers"],
                num_attention_heads=p["v_heads"]) | overrides


def _head_dim(p: dict) -> int:
    return p["hidden"] // p["heads"]


def _mrope(p: dict) -> list[int]:
    """Qwen M-RoPE (temporal, height, width) sections over head_dim/2 frequencies, split like the real 16/24/24."""
    h = _head_dim(p)
    return [h // 8, 3 * h // 16, 3 * h // 16]


# --- families ------------------------------------------------------------------------------------------------------
# Each returns (model, processor). The processor is built before the config: some processors add tokens.


class HubFiles:
    """The small files of a hub checkpoint (no weights, no vocabulary): its interface, read from a local folder.

    `config.json` (model type, vision geometry), `tokenizer_config.json` (special tokens, whether <bos> is added),
    `preprocessor_config.json` / `processor_config.json` / `video_preprocessor_config.json` (image settings) and
    `chat_template.jinja` (or `chat_template.json`), as `hf download <repo> --include "*.json" "*.jinja"` fetches
    them. Trimmed copies are fine: what a file leaves out takes transformers' defaults.
    """

    PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json")

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not (self.folder / "config.json").is_file():
            raise ValueError(f"{self.folder}: not a folder of hub checkpoint files (no config.json)")
        self.config = self._json("config.json")
        self.tokenizer_config = self._json("tokenizer_config.json") or {}
        self.chat_template = self._template()
        self.family = self.config.get("model_type")
        if self.family not in BUILDERS:
            raise ValueError(f"{self.folder}: model type {self.family!r} has no zoo builder; valid: "
                             f"{', '.join(BUILDERS)}")

    def _json(self, name: str) -> dict | None:
        path = self.folder / name
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None

    def _template(self) -> str | None:
        if (self.folder / "chat_template.jinja").is_file():
            return (self.folder / "chat_template.jinja").read_text(encoding="utf-8")
        return (self._json("chat_template.json") or {}).get("chat_template")

    def digest(self) -> str:
        """A hash of every file the replica is built from, for its cache key."""
        h = hashlib.sha256()
        for path in sorted(self.folder.iterdir()):
            if path.is_file() and path.suffix in (".json", ".jinja"):
                h.update(path.name.encode() + b"\0" + path.read_bytes())
        return h.hexdigest()[:10]

    def model_config(self):
        """The checkpoint's config as transformers reads it (defaults filled in, legacy key names mapped)."""
        from transformers import AutoConfig

        return AutoConfig.for_model(**self.config)

    def tokenizer(self):
        """A tiny BPE vocabulary with the checkpoint's special tokens, <bos> behaviour and chat template."""
        tc = self.tokenizer_config

        def token(key):
            value = tc.get(key)
            return value.get("content") if isinstance(value, dict) else value

        named = {k: token(k) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        # Named extra tokens (Gemma 3's boi_token, image_token, ...) become the tokenizer's attributes, as on the hub.
        extra = dict(tc.get("extra_special_tokens") or {})
        extra.update({k: token(k) for k in tc if k.endswith("_token") and k not in named and isinstance(token(k), str)})
        specials = [t for t in named.values() if t]
        specials += [e["content"] for _, e in sorted((tc.get("added_tokens_decoder") or {}).items(),
                                                       key=lambda kv: int(kv[0]))]
        specials += list(tc.get("additional_special_tokens") or []) + list(extra.values())
        if not named["eos_token"] or not named["pad_token"]:
            raise ValueError(f"{self.folder}: tokenizer_config.json needs an eos_token and a pad_token")
        return _tokenizer(list(dict.fromkeys(specials)), bos=named["bos_token"], eos=named["eos_token"],
                          pad=named["pad_token"], unk=named["unk_token"], extra=extra,
                          add_bos=bool(tc.get("add_bos_token")), template=self.chat_template)

    def processor(self):
        """The checkpoint's processor class and image settings, loaded the way `from_pretrained` loads the real
        one, around the tiny tokenizer."""
        from transformers import AutoProcessor

        with tempfile.TemporaryDirectory() as tmp:
            self.tokenizer().save_pretrained(tmp)
            for name in ("config.json", *self.PROCESSOR_FILES):
                if (self.folder / name).is_file():
                    shutil.copy(self.folder / name, Path(tmp) / name)
            if self.chat_template is not None:
                (Path(tmp) / "chat_template.jinja").write_text(self.chat_template, encoding="utf-8")
            processor = AutoProcessor.from_pretrained(tmp)
        processor.chat_template = self.chat_template
        return processor


def _llava(p, hub: HubFiles | None = None):
    import transformers as T

    if hub is None:
        tok = _tokenizer(["<unk>", "<s>", "</s>", "<image>", "<pad>"], bos="<s>", eos="</s>", pad="<pad>",
                         unk="<unk>", extra={"image_token": "<image>"}, add_bos=True, template=LLAVA_TEMPLATE)
        ip = T.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
        # 32 px / patch 8 = 16 patches + CLS; the "default" strategy drops CLS: 16 <image> tokens per image.
        proc = T.LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=8,
                                vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                chat_template=tok.chat_template)
        geo = dict(image_size=32, patch_size=8, image_seq_length=16, vision_feature_layer=-2,
                   vision_feature_select_strategy="default")
    else:
        proc, geo = hub.processor(), _llava_geometry(hub.model_config())
    cfg = T.LlavaConfig(
        vision_config=T.CLIPVisionConfig(**_vision(p, image_size=geo["image_size"], patch_size=geo["patch_size"],
                                                   projection_dim=p["hidden"])),
        text_config=T.LlamaConfig(**_text(p, proc.tokenizer)),
        image_token_index=proc.tokenizer.convert_tokens_to_ids("<image>"), image_seq_length=geo["image_seq_length"],
        vision_feature_layer=geo["vision_feature_layer"],
        vision_feature_select_strategy=geo["vision_feature_select_strategy"])
    return T.LlavaForConditionalGeneration(cfg), proc


def _llava_geometry(real) -> dict:
    return dict(image_size=real.vision_config.image_size, patch_size=real.vision_config.patch_size,
                image_seq_length=real.image_seq_length, vision_feature_layer=real.vision_feature_layer,
                vision_feature_select_strategy=real.vision_feature_select_strategy)


def _llava_next(p, hub: HubFiles | None = None):
    import transformers as T

    if hub is None:
        # llava-v1.6-mistral: Mistral decoder, [INST] template. The real tokenizer pads with <unk>; a separate <pad>
        # keeps padding distinguishable here.
        tok = _tokenizer(["<unk>", "<s>", "</s>", "<image>", "<pad>"], bos="<s>", eos="</s>", pad="<pad>",
                         unk="<unk>", extra={"image_token": "<image>"}, add_bos=True,
                         template=_trl_template("llava_next"))
        # Real pinpoints are 336 x (1x2, 2x1, 2x2, 3x1, 1x3); scaled to 32 px tiles. A 64 px image -> 2x2 tiles.
        grid = [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]
        ip = T.LlavaNextImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                       image_grid_pinpoints=grid)
        proc = T.LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=8,
                                    vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                    chat_template=tok.chat_template)
        geo = dict(image_size=32, patch_size=8, image_seq_length=16, vision_feature_layer=-2,
                   vision_feature_select_strategy="default", image_grid_pinpoints=grid)
    else:
        real = hub.model_config()
        proc, geo = hub.processor(), _llava_geometry(real) | dict(image_grid_pinpoints=real.image_grid_pinpoints)
    cfg = T.LlavaNextConfig(
        vision_config=T.CLIPVisionConfig(**_vision(p, image_size=geo["image_size"], patch_size=geo["patch_size"],
                                                   projection_dim=p["hidden"])),
        text_config=T.MistralConfig(**_text(p, proc.tokenizer, sliding_window=None)),
        image_token_index=proc.tokenizer.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=geo["image_grid_pinpoints"], image_seq_length=geo["image_seq_length"],
        vision_feature_layer=geo["vision_feature_layer"],
        vision_feature_select_strategy=geo["vision_feature_select_strategy"])
    return T.LlavaNextForConditionalGeneration(cfg), proc


_ROW_COL = [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]


def _idefics3_like(p, tok, proc_cls, image_proc_cls, config_cls, model_cls, hub=None, **proc_kwargs):
    """Idefics3 and SmolVLM: SigLIP tiles of 32 px / patch 8 -> 16 patches, pixel-shuffled (scale 2) to 4 tokens per
    tile; images up to 64 px split into at most 2x2 tiles plus a global image."""
    if hub is None:
        ip = image_proc_cls(size={"longest_edge": 64}, max_image_size={"longest_edge": 32}, do_image_splitting=True)
        proc = proc_cls(image_processor=ip, tokenizer=tok, image_seq_len=4, chat_template=tok.chat_template,
                        **proc_kwargs)
        image_size, patch_size, scale = 32, 8, 2
    else:
        real = hub.model_config()
        proc = hub.processor()
        image_size, patch_size = real.vision_config.image_size, real.vision_config.patch_size
        scale = real.scale_factor
    cfg = config_cls(vision_config=_vision(p, image_size=image_size, patch_size=patch_size),
                     text_config=_text(p, proc.tokenizer, model_type="llama"),
                     scale_factor=scale, image_token_id=proc.tokenizer.convert_tokens_to_ids("<image>"))
    return model_cls(cfg), proc


def _idefics3(p, hub: HubFiles | None = None):
    import transformers as T

    tok = None if hub else _tokenizer(
        ["<|begin_of_text|>", "<|end_of_text|>", "<end_of_utterance>", "<fake_token_around_image>", "<image>",
         "<global-img>"] + _ROW_COL,
        bos="<|begin_of_text|>", eos="<end_of_utterance>", pad="<|end_of_text|>", add_bos=True,
        template=_trl_template("idefics3"))
    return _idefics3_like(p, tok, T.Idefics3Processor, T.Idefics3ImageProcessor, T.Idefics3Config,
                          T.Idefics3ForConditionalGeneration, hub)


def _smolvlm(p, hub: HubFiles | None = None):
    import transformers as T

    tok = None if hub else _tokenizer(
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<end_of_utterance>", "<fake_token_around_image>",
         "<image>", "<global-img>"] + _ROW_COL,
        bos="<|im_start|>", eos="<end_of_utterance>", pad="<|im_end|>", unk="<|endoftext|>",
        extra={"image_token": "<image>", "fake_image_token": "<fake_token_around_image>",
               "global_image_token": "<global-img>", "end_of_utterance_token": "<end_of_utterance>"},
        template=_trl_template("smolvlm"))
    return _idefics3_like(p, tok, T.SmolVLMProcessor, T.SmolVLMImageProcessor, T.SmolVLMConfig,
                          T.SmolVLMForConditionalGeneration, hub,
                          **({} if hub else {"video_processor": T.SmolVLMVideoProcessor()}))


_QWEN_EXTRA = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
               "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"}


def _qwen(p, template: str, patch: int, proc_cls, video_cls, config_cls, model_cls, text: dict, vision: dict,
          hub: HubFiles | None = None):
    """Qwen-VL families: dynamic resolution, bounded to 2x2..4x4 merged patches (4-16 image tokens)."""
    import transformers as T

    if hub is None:
        tok = _tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                          "<|image_pad|>", "<|video_pad|>"], eos="<|im_end|>", pad="<|endoftext|>", extra=_QWEN_EXTRA,
                         template=_trl_template(template))
        side = 2 * patch * 2  # merge 2 x patch size: the smallest image side the processor produces
        ip = T.Qwen2VLImageProcessor(size={"shortest_edge": side * side, "longest_edge": (2 * side) ** 2},
                                     patch_size=patch, merge_size=2, temporal_patch_size=2)
        proc = proc_cls(image_processor=ip, tokenizer=tok, video_processor=video_cls(),
                        chat_template=tok.chat_template)
        merge, temporal = 2, 2
    else:
        proc, real = hub.processor(), hub.model_config().vision_config
        patch, merge, temporal = real.patch_size, real.spatial_merge_size, real.temporal_patch_size
    tok = proc.tokenizer
    cfg = config_cls(
        text_config=_text(p, tok, **text),
        vision_config=dict(depth=p["v_layers"], num_heads=p["v_heads"], patch_size=patch, spatial_merge_size=merge,
                           temporal_patch_size=temporal, **vision),
        **dict(zip(["image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"],
                   _ids(tok, "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"))))
    return model_cls(cfg), proc


def _qwen2_vl(p, hub: HubFiles | None = None):
    import transformers as T

    rope = {"rope_type": "default", "mrope_section": _mrope(p), "rope_theta": 10000.0}
    # Qwen2-VL ships the same template as Qwen2.5-VL (byte-identical, says TRL)
    return _qwen(p, "qwen2_5_vl", 14, T.Qwen2VLProcessor, T.Qwen2VLVideoProcessor, T.Qwen2VLConfig,
                 T.Qwen2VLForConditionalGeneration, text=dict(rope_parameters=rope),
                 vision=dict(embed_dim=p["v_hidden"], hidden_size=p["hidden"], in_chans=3,
                             mlp_ratio=p["v_intermediate"] // p["v_hidden"]), hub=hub)


def _qwen2_5_vl(p, hub: HubFiles | None = None):
    import transformers as T

    rope = {"rope_type": "default", "mrope_section": _mrope(p), "rope_theta": 10000.0}
    depth = p["v_layers"]
    # window of 56 px = 2x2 merged patches (a replica keeps its checkpoint's); every other block attends globally
    window = hub.model_config().vision_config.window_size if hub else 56
    return _qwen(p, "qwen2_5_vl", 14, T.Qwen2_5_VLProcessor, T.Qwen2VLVideoProcessor, T.Qwen2_5_VLConfig,
                 T.Qwen2_5_VLForConditionalGeneration, text=dict(rope_parameters=rope),
                 vision=dict(hidden_size=p["v_hidden"], out_hidden_size=p["hidden"], in_channels=3,
                             intermediate_size=p["v_intermediate"], window_size=window,
                             fullatt_block_indexes=list(range(1, depth, 2))), hub=hub)


def _qwen3_vl(p, hub: HubFiles | None = None):
    import transformers as T

    rope = {"rope_type": "default", "mrope_section": _mrope(p), "mrope_interleaved": True, "rope_theta": 10000.0}
    # 16 learned positions = a 4x4 grid, interpolated to other sizes (a replica keeps its checkpoint's 48x48);
    # DeepStack taps every other block
    positions = hub.model_config().vision_config.num_position_embeddings if hub else 16
    return _qwen(p, "qwen3_vl", 16, T.Qwen3VLProcessor, T.Qwen3VLVideoProcessor, T.Qwen3VLConfig,
                 T.Qwen3VLForConditionalGeneration, text=dict(rope_parameters=rope, head_dim=_head_dim(p)),
                 vision=dict(hidden_size=p["v_hidden"], out_hidden_size=p["hidden"], in_channels=3,
                             intermediate_size=p["v_intermediate"], num_position_embeddings=positions,
                             deepstack_visual_indexes=list(range(0, p["v_layers"] - 1, 2))), hub=hub)


def _paligemma(p, hub: HubFiles | None = None):
    import transformers as T

    if hub is None:
        tok = _tokenizer(["<pad>", "<eos>", "<bos>", "<unk>", "<image>"], bos="<bos>", eos="<eos>", pad="<pad>",
                         unk="<unk>", extra={"image_token": "<image>"}, template=PALIGEMMA_TEMPLATE)
        ip = T.SiglipImageProcessor(size={"height": 32, "width": 32})
        ip.image_seq_length = 16  # 32 px / patch 8; the processor reads it from the image processor
        proc = T.PaliGemmaProcessor(image_processor=ip, tokenizer=tok, chat_template=tok.chat_template)  # adds <loc>
        image_size, patch_size, text_type = 32, 8, "gemma"
    else:
        real = hub.model_config()
        proc = hub.processor()
        image_size, patch_size = real.vision_config.image_size, real.vision_config.patch_size
        text_type = real.text_config.model_type  # PaliGemma 2: gemma2
    cfg = T.PaliGemmaConfig(
        vision_config=dict(model_type="siglip_vision_model", vision_use_head=False, image_size=image_size,
                           patch_size=patch_size, **_vision(p)),
        text_config=_text(p, proc.tokenizer, model_type=text_type, head_dim=_head_dim(p),
                          **({"query_pre_attn_scalar": _head_dim(p)} if text_type != "gemma" else {})),
        image_token_index=proc.tokenizer.convert_tokens_to_ids("<image>"), projection_dim=p["hidden"],
        hidden_size=p["hidden"])
    return T.PaliGemmaForConditionalGeneration(cfg), proc


def _gemma3(p, hub: HubFiles | None = None):
    import transformers as T

    if hub is None:
        tok = _tokenizer(["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
                          "<end_of_image>", "<image_soft_token>"], bos="<bos>", eos="<eos>", pad="<pad>",
                         unk="<unk>", extra={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                                             "image_token": "<image_soft_token>"},
                         add_bos=True, template=_trl_template("gemma3"))
        ip = T.Gemma3ImageProcessor(size={"height": 32, "width": 32}, do_pan_and_scan=False)
        proc = T.Gemma3Processor(image_processor=ip, tokenizer=tok, image_seq_length=4,
                                 chat_template=tok.chat_template)
        # 32 px / patch 4 = 8x8 patches, average-pooled to 2x2 = 4 soft tokens per image
        image_size, patch_size, tokens = 32, 4, 4
    else:
        real = hub.model_config()
        proc = hub.processor()
        image_size, patch_size = real.vision_config.image_size, real.vision_config.patch_size
        tokens = real.mm_tokens_per_image
    boi, eoi, soft = _ids(proc.tokenizer, "<start_of_image>", "<end_of_image>", "<image_soft_token>")
    cfg = T.Gemma3Config(
        text_config=_text(p, proc.tokenizer, head_dim=_head_dim(p), query_pre_attn_scalar=_head_dim(p)),
        vision_config=_vision(p, image_size=image_size, patch_size=patch_size, vision_use_head=False),
        mm_tokens_per_image=tokens, boi_token_index=boi, eoi_token_index=eoi, image_token_index=soft)
    return T.Gemma3ForConditionalGeneration(cfg), proc


def _mllama(p, hub: HubFiles | None = None):
    import transformers as T

    if hub is None:
        tok = _tokenizer(["<|begin_of_text|>", "<|end_of_text|>", "<|image|>", "<|eot_id|>", "<|start_header_id|>",
                          "<|end_header_id|>", "<|finetune_right_pad_id|>", "<|python_tag|>"],
                         bos="<|begin_of_text|>", eos="<|eot_id|>", pad="<|finetune_right_pad_id|>",
                         extra={"image_token": "<|image|>"}, add_bos=True, template=MLLAMA_TEMPLATE)
        ip = T.MllamaImageProcessor(size={"height": 32, "width": 32}, max_image_tiles=2)
        proc = T.MllamaProcessor(image_processor=ip, tokenizer=tok, chat_template=tok.chat_template)
        geo = dict(image_size=32, patch_size=8, max_num_tiles=2, supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]])
    else:
        real = hub.model_config().vision_config
        proc = hub.processor()
        geo = {k: getattr(real, k) for k in ("image_size", "patch_size", "max_num_tiles", "supported_aspect_ratios")}
    intermediate = [0]  # vision layers whose outputs are concatenated with the last one
    cfg = T.MllamaConfig(
        vision_config=dict(hidden_size=p["v_hidden"], intermediate_size=p["v_intermediate"],
                           num_hidden_layers=p["v_layers"], num_global_layers=1, attention_heads=p["v_heads"],
                           intermediate_layers_indices=intermediate,
                           vision_output_dim=p["v_hidden"] * (len(intermediate) + 1), **geo),
        # cross-attention layers are counted in num_hidden_layers, as in the real model
        text_config=_text(p, proc.tokenizer, cross_attention_layers=list(range(1, p["layers"], 4)),
                          max_position_embeddings=131072),
        image_token_index=proc.tokenizer.convert_tokens_to_ids("<|image|>"))
    model = T.MllamaForConditionalGeneration(cfg)
    # Cross-attention layers are tanh-gated and the gates initialise to 0, which would cut the image off entirely
    # (and leave those layers without gradient); a trained checkpoint has open gates.
    for name, param in model.named_parameters():
        if name.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate")):
            param.data.fill_(1.0)
    return model, proc


BUILDERS = {
    "llava": _llava, "llava_next": _llava_next, "idefics3": _idefics3, "smolvlm": _smolvlm, "qwen2_vl": _qwen2_vl,
    "qwen2_5_vl": _qwen2_5_vl, "qwen3_vl": _qwen3_vl, "paligemma": _paligemma, "gemma3": _gemma3, "mllama": _mllama,
}


# --- public API ----------------------------------------------------------------------------------------------------


def _check(family: str, preset: str) -> None:
    if family not in BUILDERS:
        raise ValueError(f"unknown zoo family {family!r}; valid: {', '.join(FAMILIES)}")
    if preset not in PRESETS:
        raise ValueError(f"unknown zoo preset {preset!r}; valid: {', '.join(PRESETS)}")


def build(family: str, preset: str = "tiny"):
    """A randomly initialised (seeded: identical every run) model and its processor, in memory."""
    _check(family, preset)
    return _finish(family, *_seeded(lambda: BUILDERS[family](PRESETS[preset])), stop_at_end_of_turn=True)


def build_like(hub_dir: str | Path, preset: str = "tiny"):
    """A tiny random model with the interface of a real checkpoint: its model and processor classes, special
    tokens, chat template, image settings and vision geometry (patch and image size, merge/pixel-shuffle factors,
    tiling), read from a folder of its small files (`HubFiles`). Only the sizes and the vocabulary are tiny, so an
    image expands to exactly as many tokens as on the real model. Generation stops at the tokenizer's EOS only,
    like a checkpoint whose generation config names no end-of-turn."""
    hub = HubFiles(hub_dir)
    _check(hub.family, preset)
    return _finish(hub.family, *_seeded(lambda: BUILDERS[hub.family](PRESETS[preset], hub)),
                   stop_at_end_of_turn=False)


def _seeded(make):
    import torch

    torch.manual_seed(0)
    return make()


def _finish(family: str, model, proc, stop_at_end_of_turn: bool):
    import torch

    # Behind the final RMSNorm, an lm_head initialised at std 0.02 caps every logit near 0.02 * hidden: the output
    # stays near-uniform whatever LoRA learns. Unit-variance logits leave LoRA the room a trained head has.
    head = model.get_output_embeddings()
    if head.weight is not model.get_input_embeddings().weight:
        with torch.no_grad():
            head.weight.normal_(0.0, head.weight.shape[1] ** -0.5)
    tok = proc.tokenizer
    eos = [tok.eos_token_id]
    if stop_at_end_of_turn:
        eos += [i for i in _ids(tok, FAMILY_TABLE[family].end_of_turn) if i != tok.eos_token_id]
    gen = model.generation_config
    gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = tok.bos_token_id, eos, tok.pad_token_id
    return model, proc


def version_tag() -> str:
    """ZOO_VERSION plus a hash of this file and the library versions that shape the saved checkpoint."""
    import tokenizers
    import transformers
    import trl

    h = hashlib.sha256(Path(__file__).read_bytes())
    h.update(f"{transformers.__version__} {trl.__version__} {tokenizers.__version__}".encode())
    return f"v{ZOO_VERSION}-{h.hexdigest()[:8]}"


def cache_root() -> Path:
    env = os.environ.get("FINETUNE_CACHE")
    return (Path(env) if env else Path.home() / ".cache" / "finetune") / "zoo"


def ensure(family: str, preset: str = "tiny", cache_dir: str | Path | None = None) -> Path:
    """The folder of a saved zoo checkpoint (model + processor, safetensors), built on first use and then cached."""
    _check(family, preset)
    return _ensure(f"{family}-{preset}-{version_tag()}", lambda: build(family, preset),
                   dict(family=family, preset=preset), cache_dir)


def ensure_like(hub_dir: str | Path, preset: str = "tiny", cache_dir: str | Path | None = None) -> Path:
    """`ensure` for `build_like`: a cached tiny checkpoint with a real checkpoint's interface."""
    hub = HubFiles(hub_dir)
    _check(hub.family, preset)
    return _ensure(f"like-{hub.folder.name}-{preset}-{version_tag()}-{hub.digest()}",
                   lambda: build_like(hub.folder, preset),
                   dict(family=hub.family, preset=preset, like=str(hub.folder.resolve())), cache_dir)


def _ensure(name: str, make, meta: dict, cache_dir) -> Path:
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    final = root / name
    if (final / "zoo.json").is_file():  # written before the folder is renamed into place: the folder is complete
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))  # same filesystem: the rename is atomic
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
    try:
        start = time.perf_counter()
        model, proc = make()
        model.save_pretrained(tmp)
        proc.save_pretrained(tmp)
        meta = dict(meta, version=version_tag(), params=sum(p.numel() for p in model.parameters()),
                    model_class=type(model).__name__, processor_class=type(proc).__name__,
                    build_seconds=round(time.perf_counter() - start, 3))
        (tmp / "zoo.json").write_text(json.dumps(meta, indent=2) + "\n")
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "zoo.json").is_file():
                raise
            # another process finished the same build first; its copy is identical and complete
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def parse_name(name: str) -> tuple[str | None, Path | None, str]:
    """`zoo:<family>[:<preset>]` -> (family, None, preset); `zoo:<folder of hub files>[:<preset>]` -> (None,
    folder, preset). A folder is told apart by its path separator; family names have none."""
    body = name.removeprefix("zoo:")
    head, _, tail = body.rpartition(":")
    target, preset = (head, tail) if head and tail in PRESETS else (body, "tiny")
    if "/" in target or os.sep in target:
        return None, Path(target).expanduser(), preset
    return target, None, preset


def resolve(name: str) -> Path:
    """The checkpoint folder a `zoo:` name stands for, built and cached on first use."""
    family, folder, preset = parse_name(name)
    return ensure_like(folder, preset) if folder is not None else ensure(family, preset)


def info(path: str | Path) -> dict:
    """The zoo.json of a checkpoint folder made by `ensure`."""
    return json.loads((Path(path) / "zoo.json").read_text())
