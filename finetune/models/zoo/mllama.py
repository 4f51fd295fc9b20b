"""Llama 3.2 Vision (Mllama): cross-attention to tiled images."""

from __future__ import annotations

from .common import PARTS, HubFiles, text_config, tokenizer

# Llama 3.2 Vision, without the tool-calling and "Cutting Knowledge Date / Today Date" preamble of the hub template
# (a date in the prompt would make rendering depend on the day). Images stay where they are in the content.
MLLAMA_TEMPLATE = (
    "{{- '<|begin_of_text|>' -}}"
    "{%- for message in messages -%}" + PARTS +
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' -}}"
    "{%- for part in parts -%}"
    "{%- if part['type'] == 'image' -%}{{ '<|image|>' }}{%- elif part['type'] == 'text' -%}{{ part['text'] }}"
    "{%- endif -%}{%- endfor -%}{{- '<|eot_id|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif -%}"
)


def mllama(p, hub: HubFiles | None = None):
    import transformers as T

    if hub is None:
        tok = tokenizer(["<|begin_of_text|>", "<|end_of_text|>", "<|image|>", "<|eot_id|>", "<|start_header_id|>",
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
        text_config=text_config(p, proc.tokenizer, cross_attention_layers=list(range(1, p["layers"], 4)),
                          max_position_embeddings=131072),
        image_token_index=proc.tokenizer.convert_tokens_to_ids("<|image|>"))
    model = T.MllamaForConditionalGeneration(cfg)
    # Cross-attention layers are tanh-gated and the gates initialise to 0, which would cut the image off entirely
    # (and leave those layers without gradient); a trained checkpoint has open gates.
    for name, param in model.named_parameters():
        if name.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate")):
            param.data.fill_(1.0)
    return model, proc
