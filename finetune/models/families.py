"""The model-family table: everything that differs between VLM architectures lives here and nowhere else.

Module paths are regexes matched from the start of a module's full name up to a module boundary (the same rule
`transformers` uses for `llm_int8_skip_modules`), so `model\\.visual\\.merger` matches `model.visual.merger.mlp.0` and
never `model.visual.blocks.0.mlp.fc1`. Names were read off the real model classes in transformers 5.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


#: The parts of a model LoRA can adapt (`lora.targets`); each is a module-path regex of every Family.
LORA_GROUPS = ("decoder", "projector", "vision")


@dataclass(frozen=True)
class Family:
    """One VLM architecture, keyed in FAMILIES by its `config.model_type`."""

    name: str
    #: Module-path regex of the language decoder (LoRA group `decoder`).
    decoder: str
    #: Module-path regex of the multimodal projector (LoRA group `projector`).
    projector: str
    #: Module-path regex of the vision tower (LoRA group `vision`); projector modules inside it are excluded.
    vision: str
    #: Regex over token strings: every token an image expands to (placeholders, row/col/tile markers, boundaries).
    image_tokens: str
    #: The token that closes an assistant reply in the chat template; it carries loss with the reply.
    end_of_turn: str
    #: Projector weights that are raw `nn.Parameter`s, not Linear modules (trained with peft `target_parameters`).
    projector_parameters: tuple[str, ...] = ()
    #: Prefix-LM (PaliGemma): `token_type_ids` = 1 marks causal (answer) tokens, 0 the bidirectional prefix.
    prefix_lm: bool = False
    #: The processor inserts `<bos>` after the last image token and appends the prompt's closing "\n" (PaliGemma).
    processor_adds_bos_and_newline: bool = False
    #: What an image placeholder becomes, as a function of the image's size (how the pre-flight scan measures rows
    #: without decoding images): `count` = the image token repeated as often as the processor's
    #: `_get_num_multimodal_tokens` says; `tiles` = the processor's row/column tile text for the
    #: `get_number_of_image_patches` split; `soft_tokens` = that count, wrapped as the processor's
    #: `replace_image_token` wraps it (Gemma 4's boundary tokens); `fixed` = the same text for every image.
    image_expansion: str = "count"
    #: The processor takes `videos=` and the template renders `{"type": "video"}`; otherwise videos become frames.
    video_input: bool = False
    #: finetune's chat template for checkpoints that ship none (PaliGemma); saved with every run and export.
    default_chat_template: str | None = None
    #: Variables every rendering passes to the chat template, so training and inference render the same text (a
    #: template that reads today's date otherwise changes its prompt from day to day).
    template_kwargs: tuple[tuple[str, str], ...] = ()
    #: The image processor mishandles rows without images (transformers' MllamaImageProcessor fails when the first
    #: row has none and drops them from `aspect_ratio_ids`): such batches are encoded with their image rows first,
    #: padded as a missing image is padded, and put back in order (all its outputs are batch-first).
    image_rows_first: bool = False
    #: Image tokens attend to their own image bidirectionally (Gemma 3's `token_type_ids` blocks).
    bidirectional_images: bool = False
    #: The position of a sequence's first token (PaliGemma counts from 1).
    first_position: int = 0
    #: Image inputs that come one row per sample, padded with all-zero images (Idefics3): regrouped per pack.
    packed_row_inputs: tuple[str, ...] = ()
    #: Why `training.packing` cannot be exact for this family ("" = it can; finetune.batching.packing).
    no_packing: str = ""
    #: Training methods (finetune.recipe.methods) TRL's trainers cannot run for this family: ((method, why), ...).
    no_methods: tuple[tuple[str, str], ...] = ()
    #: The vision tower's attention passes `cu_seq_lens_q` to a flash-named implementation (Qwen-VL), so it can run
    #: every window or image of a batch in one varlen kernel call per layer (finetune.training.attention).
    vision_varlen: bool = False
    #: Why llama.cpp (the pinned converter and its mtmd runtime) cannot run this family ("" = it can;
    #: finetune.export.gguf).
    no_gguf: str = ""
    #: The trained resolution llama.cpp must be told: "pixels" = image-token limits from the processor's pixel
    #: bounds (one token per (patch x merge)^2 pixels), as llama.cpp otherwise allows up to 4,096 tokens an image;
    #: "" = the family has a fixed token count per image.
    gguf_image_tokens: str = ""
    #: What the converter reads that a transformers 5 save lacks: the text model's architecture (absent from
    #: `text_config`).
    gguf_text_architecture: str = ""
    #: Where transformers 5 saves tensors otherwise than the published checkpoints, which vLLM and llama.cpp's
    #: converter read (transformers reads both): name prefixes (saved, published), and 3-D tensors (name suffixes)
    #: saved with their last two axes swapped (Qwen3-VL-MoE's fused experts). Merged exports are written in the
    #: published layout (finetune.export.merging).
    hub_renames: tuple[tuple[str, str], ...] = ()
    hub_transposed: tuple[str, ...] = ()
    #: Mixture-of-experts: module-path regex of the routers (top-k gates, Qwen3.5's shared-expert gate). They are
    #: never adapted and never quantized (a 4-bit router changes which experts a token reaches).
    router: str = ""
    #: Module-path regex of the expert blocks: fused experts (3-D parameters `expert_parameters`, adapted through
    #: peft `target_parameters`) and shared experts (Linear modules). Adapted only with `lora.experts: true`.
    experts: str = ""
    expert_parameters: tuple[str, ...] = ()
    #: The decoder Linear modules LoRA adapts, by their last name ("" = all): Gemma 3n / Gemma 4 keep AltUp,
    #: LAuReL and the per-layer-input projections frozen (small gating maps, several of which see no gradient
    #: through their clamps and sparse activations), as peers adapt only attention and MLP projections there.
    decoder_linears: str = ""
    #: Module-path regex of decoder modules bitsandbytes must not quantize (Gemma 3n's AltUp clamps its coefficient
    #: weights in place every training step, which a 4-bit weight cannot take; its LAuReL and per-layer maps with it).
    full_precision: str = ""
    #: Packages the model classes import beyond finetune's own (Gemma 3n: timm), each with the extra that installs it.
    requires: tuple[tuple[str, str], ...] = ()
    #: Module-path regex of an audio encoder and its projector (Gemma 3n, Gemma 4): never adapted, never quantized;
    #: rows with audio are refused (finetune trains image-text data).
    audio: str = ""
    notes: str = ""

    def method_refusal(self, method: str) -> str:
        """Why `training.method` `method` cannot train this family ("" = it can)."""
        return dict(self.no_methods).get(method, "")

    def quantization_skip(self) -> list[str]:
        """Modules bitsandbytes must keep in full precision: vision tower, projector and the LM head."""
        return [self.vision, self.projector, "lm_head"] + [p for p in (self.router, self.audio, self.full_precision)
                                                            if p]


# PaliGemma checkpoints ship no chat template: they are prompted "<image>...<bos>{prefix}\n" and answer
# "{suffix}<eos>". finetune's template keeps that layout: every image first (the processor puts <bos> after the last
# <image>), then each turn's text; a prompt turn is followed by "\n" and a reply by "<eos>". There is no "\n" after
# the final prompt turn and nothing for add_generation_prompt: the processor appends the "\n" that separates prompt
# from answer. Content may be a string or a list of {"type": "image"} / {"type": "text"} parts.
PALIGEMMA_TEMPLATE = (
    "{%- for message in messages if message['content'] is not string -%}"
    "{%- for part in message['content'] if part['type'] == 'image' -%}{{ '<image>' }}{%- endfor -%}"
    "{%- endfor -%}"
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{%- set parts = [{'type': 'text', 'text': message['content']}] -%}"
    "{%- else -%}{%- set parts = message['content'] -%}{%- endif -%}"
    "{%- for part in parts if part['type'] == 'text' -%}{{ part['text'] }}{%- endfor -%}"
    "{%- if message['role'] == 'assistant' -%}{{ '<eos>' }}"
    "{%- elif message['role'] in ('system', 'user') -%}{%- if not loop.last -%}{{ '\n' }}{%- endif -%}"
    "{%- else -%}{{ raise_exception('Unsupported role: ' + message['role']) }}{%- endif -%}"
    "{%- endfor -%}"
)

_LLAVA_IMAGE = r"<image>"
_QWEN_IMAGE = r"<\|(?:image_pad|video_pad|vision_start|vision_end)\|>"
_IDEFICS_IMAGE = r"<image>|<fake_token_around_image>|<global-img>|<row_\d+_col_\d+>"
_GEMMA3_IMAGE = r"<start_of_image>|<end_of_image>|<image_soft_token>"
# Qwen3.5 decoders: 3 of every 4 layers are gated DeltaNet (linear attention with a causal conv and a recurrent state).
_DELTANET_PACKING = (
    "its gated DeltaNet layers carry a causal-conv and recurrent state from token to token, and transformers' torch "
    "path (torch_chunk_gated_delta_rule, causal_conv1d_fn) ignores the pack's cu_seqlens: a packed sequence would "
    "start from the state of the one before it")
_DELTANET_GGUF = (
    "llama.cpp does not apply the NFC normalisation Qwen3.5's tokenizer starts with, so text with decomposed "
    "accents ('e' + U+0301) reads as other tokens than in training (the export's tokenizer check fails on it; the "
    "pinned converter itself converts a transformers save with --no-mtp)")
_FUSED = ("gate_up_proj", "down_proj")
#: transformers 5 saves a CLIP/SigLIP tower without the `vision_model.` level the published checkpoints have.
_VISION_MODEL = (("vision_tower.", "vision_tower.vision_model."),)
_ATTENTION_AND_MLP = r"q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj"
_GEMMA_AUDIO = r"model\.(?:audio_tower|embed_audio)"

FAMILIES: dict[str, Family] = {
    "llava": Family(
        name="LLaVA 1.5",
        decoder=r"model\.language_model", projector=r"model\.multi_modal_projector", vision=r"model\.vision_tower",
        image_tokens=_LLAVA_IMAGE, end_of_turn="</s>", hub_renames=_VISION_MODEL,
        no_gguf="the pinned llama.cpp converter writes no mmproj for its CLIP vision tower (only llama.cpp's legacy "
                "llava scripts do)",
    ),
    "llava_next": Family(
        name="LLaVA-NeXT (1.6)",
        decoder=r"model\.language_model", projector=r"model\.multi_modal_projector", vision=r"model\.vision_tower",
        image_tokens=_LLAVA_IMAGE, end_of_turn="</s>", hub_renames=_VISION_MODEL,
        no_gguf="the pinned llama.cpp converter does not know LlavaNextForConditionalGeneration",
        notes="`model.image_newline` is a raw parameter of the projector side; it stays frozen.",
    ),
    "idefics3": Family(
        name="Idefics3",
        decoder=r"model\.text_model", projector=r"model\.connector", vision=r"model\.vision_model",
        image_tokens=_IDEFICS_IMAGE, end_of_turn="<end_of_utterance>", image_expansion="tiles",
        packed_row_inputs=("pixel_values", "pixel_attention_mask"),
        no_gguf="llama.cpp's mtmd wraps each image in <global-img> looked up as one token, and Idefics3's tokenizer "
                "has it only as plain text (the image prompt would hold invalid tokens)",
        notes="Image splitting expands one image into row/column tiles plus a global image.",
    ),
    "smolvlm": Family(
        name="SmolVLM",
        decoder=r"model\.text_model", projector=r"model\.connector", vision=r"model\.vision_model",
        image_tokens=_IDEFICS_IMAGE, end_of_turn="<end_of_utterance>", image_expansion="tiles",
        packed_row_inputs=("pixel_values", "pixel_attention_mask"), gguf_text_architecture="LlamaForCausalLM",
        notes="Idefics3 architecture; processor needs the `num2words` package.",
    ),
    "qwen2_vl": Family(
        name="Qwen2-VL",
        decoder=r"model\.language_model", projector=r"model\.visual\.merger", vision=r"model\.visual",
        image_tokens=_QWEN_IMAGE, end_of_turn="<|im_end|>", video_input=True, gguf_image_tokens="pixels",
        vision_varlen=True,
        notes="Dynamic resolution: image token count follows image size (min/max pixels).",
    ),
    "qwen2_5_vl": Family(
        name="Qwen2.5-VL",
        decoder=r"model\.language_model", projector=r"model\.visual\.merger", vision=r"model\.visual",
        image_tokens=_QWEN_IMAGE, end_of_turn="<|im_end|>", video_input=True, gguf_image_tokens="pixels",
        vision_varlen=True,
    ),
    "qwen3_vl": Family(
        name="Qwen3-VL",
        decoder=r"model\.language_model", projector=r"model\.visual\.(?:merger|deepstack_merger_list)",
        vision=r"model\.visual",
        image_tokens=_QWEN_IMAGE, end_of_turn="<|im_end|>", video_input=True, gguf_image_tokens="pixels",
        vision_varlen=True,
        notes="DeepStack mergers feed intermediate vision features into early decoder layers; they are projectors.",
    ),
    "qwen3_vl_moe": Family(
        name="Qwen3-VL-MoE",
        decoder=r"model\.language_model", projector=r"model\.visual\.(?:merger|deepstack_merger_list)",
        vision=r"model\.visual",
        image_tokens=_QWEN_IMAGE, end_of_turn="<|im_end|>", video_input=True, gguf_image_tokens="pixels",
        vision_varlen=True, router=r"model\.language_model\.layers\.\d+\.mlp\.gate",
        experts=r"model\.language_model\.layers\.\d+\.mlp\.experts", expert_parameters=_FUSED,
        hub_transposed=("mlp.experts.gate_up_proj", "mlp.experts.down_proj"),
        notes="Qwen3-VL with fused experts (no shared expert); the top-k router stays frozen and unquantized.",
    ),
    "qwen3_5": Family(
        name="Qwen3.5",
        decoder=r"model\.language_model", projector=r"model\.visual\.merger", vision=r"model\.visual",
        image_tokens=_QWEN_IMAGE, end_of_turn="<|im_end|>", video_input=True, gguf_image_tokens="pixels",
        vision_varlen=True, no_packing=_DELTANET_PACKING, no_gguf=_DELTANET_GGUF,
        notes="Natively multimodal; decoder layers mix gated DeltaNet (3 of 4) and full attention. The 4B and larger "
              "templates open every reply with <think>: set model.chat_template_kwargs.enable_thinking.",
    ),
    "qwen3_5_moe": Family(
        name="Qwen3.5-MoE",
        decoder=r"model\.language_model", projector=r"model\.visual\.merger", vision=r"model\.visual",
        image_tokens=_QWEN_IMAGE, end_of_turn="<|im_end|>", video_input=True, gguf_image_tokens="pixels",
        vision_varlen=True, no_packing=_DELTANET_PACKING, no_gguf=_DELTANET_GGUF,
        router=r"model\.language_model\.layers\.\d+\.mlp\.(?:gate|shared_expert_gate)",
        experts=r"model\.language_model\.layers\.\d+\.mlp\.(?:experts|shared_expert)", expert_parameters=_FUSED,
        notes="Fused experts plus a shared expert per layer; the shared expert's sigmoid gate is a router.",
    ),
    "paligemma": Family(
        name="PaliGemma / PaliGemma 2",
        decoder=r"model\.language_model", projector=r"model\.multi_modal_projector", vision=r"model\.vision_tower",
        image_tokens=r"<image>", end_of_turn="<eos>", prefix_lm=True, processor_adds_bos_and_newline=True,
        image_expansion="fixed", first_position=1, default_chat_template=PALIGEMMA_TEMPLATE, hub_renames=_VISION_MODEL,
        no_gguf="the pinned llama.cpp converter does not know PaliGemmaForConditionalGeneration",
        notes="Not a chat model: the prefix (image + prompt) attends bidirectionally, answers causally. The hub "
              "checkpoints have no chat template; finetune's (PALIGEMMA_TEMPLATE) is used and saved with the run.",
    ),
    "gemma3": Family(
        name="Gemma 3",
        decoder=r"model\.language_model", projector=r"model\.multi_modal_projector", vision=r"model\.vision_tower",
        image_tokens=_GEMMA3_IMAGE, end_of_turn="<end_of_turn>",
        projector_parameters=("model.multi_modal_projector.mm_input_projection_weight",), image_expansion="fixed",
        bidirectional_images=True, hub_renames=_VISION_MODEL,
        notes="`processor.image_token_id` is <start_of_image>, not the soft token; the projector is a raw parameter.",
    ),
    "gemma3n": Family(
        name="Gemma 3n",
        decoder=r"model\.language_model", projector=r"model\.embed_vision", vision=r"model\.vision_tower",
        image_tokens=_GEMMA3_IMAGE, end_of_turn="<end_of_turn>", image_expansion="fixed",
        audio=_GEMMA_AUDIO, decoder_linears=_ATTENTION_AND_MLP,
        full_precision=r"model\.language_model\.(?:altup_projections|altup_unembed_projections|"
                       r"per_layer_model_projection|layers\.\d+\.(?:altup|laurel|per_layer_input_gate|"
                       r"per_layer_projection))",
        requires=(("timm", "gemma3n"),),
        no_gguf="the pinned converter's Gemma 3n mmproj cannot map the audio tower's tensors of a transformers 5 "
                "save ('model.audio_tower.subsample_conv_projection.conv_0.norm.weight')",
        no_packing="not shown exact: with padding after a row's last sample, the padding tokens (each a sequence of "
                   "its own) give NaN LoRA gradients through Gemma 3n's decoder although every logit is finite "
                   "(tests/test_packing.py, two-row case); unpacked batches train exactly",
        notes="MobileNetV5 vision tower built through timm (installed by setup). Per-layer embeddings, AltUp and "
              "LAuReL in the decoder; the audio tower stays frozen and rows with audio are refused.",
    ),
    "gemma4": Family(
        name="Gemma 4",
        decoder=r"model\.language_model", projector=r"model\.embed_vision", vision=r"model\.vision_tower",
        image_tokens=r"<\|image>|<image\|>|<\|image\|>", end_of_turn="<turn|>", image_expansion="soft_tokens",
        audio=_GEMMA_AUDIO, decoder_linears=_ATTENTION_AND_MLP,
        no_gguf="not answer-checked: the pinned converter reads Gemma 4's vocabulary as a SentencePiece-style "
                "tokenizer.json (LlamaHfVocab, llama.cpp's 'gemma4' tokenizer), which finetune's tokenizer and "
                "answer checks have not been run against; finetune exports only what they passed",
        notes="Variable image token budget (max_soft_tokens); native system turn; thinking is off unless the "
              "system turn starts with <|think|>. The audio tower stays frozen and rows with audio are refused.",
    ),
    "mllama": Family(
        name="Llama 3.2 Vision (Mllama)",
        decoder=r"model\.language_model", projector=r"model\.multi_modal_projector", vision=r"model\.vision_model",
        image_tokens=r"<\|image\|>", end_of_turn="<|eot_id|>", image_rows_first=True, image_expansion="fixed",
        # The hub template writes "Today Date: <today>" into a system preamble; pinned to the template's own
        # fallback date so a run renders the same prompt in training, evaluation and inference on any day.
        template_kwargs=(("date_string", "26 Jul 2024"),),
        no_gguf="llama.cpp has no cross-attention vision models (its converter does not know "
                "MllamaForConditionalGeneration)",
        no_methods=(("grpo", "TRL's GRPOTrainer does not pass aspect_ratio_ids, aspect_ratio_mask or "
                             "cross_attention_mask to the model when it scores completions (the forward pass fails)"),),
        no_packing="text attends to images through cross-attention masks of a whole row, and transformers masks "
                   "text that attends to no image only in the MLP: a packed sample without images would attend to "
                   "the other samples' images",
        notes="Cross-attention model: <|image|> stays one token; the projector is itself a Linear. In a batch with "
              "images, transformers' cross-attention still adds attention over the batch's vision tokens to text "
              "that attends to no image (only the MLP is masked; Meta's reference masks both).",
    ),
}


class UnsupportedModelError(ValueError):
    pass


def family_for(model_type: str, why=None) -> Family:
    """The table entry for a `config.model_type`, or an error saying why not (`why()`: the reason, computed only
    on that path) and listing what is supported."""
    try:
        return FAMILIES[model_type]
    except KeyError:
        supported = ", ".join(f"{k} ({f.name})" for k, f in FAMILIES.items())
        reason = f": {why()}" if why is not None else ""
        raise UnsupportedModelError(
            f"model type '{model_type}' is not in finetune's model-family table{reason}. Supported: {supported}. "
            "Add an entry to finetune/models/families.py (module paths of decoder, projector and vision tower, image "
            "tokens, end-of-turn token) to support it."
        ) from None


def image_token_id(config) -> int | None:
    """The token an image's embeddings take the place of in the text (`<image>`, `<|image_pad|>`, Gemma 3's soft
    token): model configs name it `image_token_id` or, in older classes, `image_token_index`."""
    found = getattr(config, "image_token_id", None)
    return found if found is not None else getattr(config, "image_token_index", None)


def matches(pattern: str, module_name: str) -> bool:
    """True when `pattern` matches `module_name` from its start up to a module boundary."""
    return re.match(rf"(?:{pattern})(?:\.|$)", module_name) is not None


def renamed(name: str, renames) -> str:
    """A tensor name under the published prefix of `renames` ((saved, published), ...; `Family.hub_renames`);
    a name already published, or under no listed prefix, as it is."""
    for old, new in renames:
        if name.startswith(old) and not name.startswith(new):
            return new + name[len(old):]
    return name
