"""LLaVA 1.5 and LLaVA-NeXT: CLIP vision tower, Llama / Mistral decoder."""

from __future__ import annotations

from .common import BAD_ROLE, PARTS, TEXT_PARTS, HubFiles, text_config, tokenizer, trl_template, vision_config

# LLaVA-1.5 (Vicuna v1 conversation format, as LLaVA was trained): "{system} USER: <image>\n{text} ASSISTANT:
# {reply}</s>USER: ...". The hub's llava-hf template drops the </s>; we keep it so replies have an end-of-turn.
LLAVA_TEMPLATE = (
    "{%- for message in messages -%}" + PARTS +
    "{%- if message['role'] == 'system' -%}" + TEXT_PARTS + "{{ ' ' }}"
    "{%- elif message['role'] == 'user' -%}{{ 'USER: ' }}"
    "{%- for part in parts if part['type'] == 'image' -%}{{ '<image>\n' }}{%- endfor -%}" + TEXT_PARTS + "{{ ' ' }}"
    "{%- elif message['role'] == 'assistant' -%}{{ 'ASSISTANT: ' }}" + TEXT_PARTS + "{{ '</s>' }}"
    "{%- else -%}" + BAD_ROLE + "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
)


def llava(p, hub: HubFiles | None = None):
    import transformers as T

    if hub is None:
        tok = tokenizer(["<unk>", "<s>", "</s>", "<image>", "<pad>"], bos="<s>", eos="</s>", pad="<pad>",
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
        vision_config=T.CLIPVisionConfig(**vision_config(p, image_size=geo["image_size"], patch_size=geo["patch_size"],
                                                   projection_dim=p["hidden"])),
        text_config=T.LlamaConfig(**text_config(p, proc.tokenizer)),
        image_token_index=proc.tokenizer.convert_tokens_to_ids("<image>"), image_seq_length=geo["image_seq_length"],
        vision_feature_layer=geo["vision_feature_layer"],
        vision_feature_select_strategy=geo["vision_feature_select_strategy"])
    return T.LlavaForConditionalGeneration(cfg), proc


def _llava_geometry(real) -> dict:
    return dict(image_size=real.vision_config.image_size, patch_size=real.vision_config.patch_size,
                image_seq_length=real.image_seq_length, vision_feature_layer=real.vision_feature_layer,
                vision_feature_select_strategy=real.vision_feature_select_strategy)


def llava_next(p, hub: HubFiles | None = None):
    import transformers as T

    if hub is None:
        # llava-v1.6-mistral: Mistral decoder, [INST] template. The real tokenizer pads with <unk>; a separate <pad>
        # keeps padding distinguishable here.
        tok = tokenizer(["<unk>", "<s>", "</s>", "<image>", "<pad>"], bos="<s>", eos="</s>", pad="<pad>",
                         unk="<unk>", extra={"image_token": "<image>"}, add_bos=True,
                         template=trl_template("llava_next"))
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
        vision_config=T.CLIPVisionConfig(**vision_config(p, image_size=geo["image_size"], patch_size=geo["patch_size"],
                                                   projection_dim=p["hidden"])),
        text_config=T.MistralConfig(**text_config(p, proc.tokenizer, sliding_window=None)),
        image_token_index=proc.tokenizer.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=geo["image_grid_pinpoints"], image_seq_length=geo["image_seq_length"],
        vision_feature_layer=geo["vision_feature_layer"],
        vision_feature_select_strategy=geo["vision_feature_select_strategy"])
    return T.LlavaNextForConditionalGeneration(cfg), proc
