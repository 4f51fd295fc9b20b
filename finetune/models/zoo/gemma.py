"""PaliGemma (prefix-LM, finetune's documented chat template) and Gemma 3 (bidirectional image blocks)."""

from __future__ import annotations

from ..families import PALIGEMMA_TEMPLATE
from .common import HubFiles, head_dim, text_config, token_ids, tokenizer, trl_template, vision_config

def paligemma(p, hub: HubFiles | None = None):
    import transformers as T

    if hub is None:
        tok = tokenizer(["<pad>", "<eos>", "<bos>", "<unk>", "<image>"], bos="<bos>", eos="<eos>", pad="<pad>",
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
                           patch_size=patch_size, **vision_config(p)),
        text_config=text_config(p, proc.tokenizer, model_type=text_type, head_dim=head_dim(p),
                          **({"query_pre_attn_scalar": head_dim(p)} if text_type != "gemma" else {})),
        image_token_index=proc.tokenizer.convert_tokens_to_ids("<image>"), projection_dim=p["hidden"],
        hidden_size=p["hidden"])
    return T.PaliGemmaForConditionalGeneration(cfg), proc


def gemma3(p, hub: HubFiles | None = None):
    import transformers as T

    if hub is None:
        tok = tokenizer(["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
                          "<end_of_image>", "<image_soft_token>"], bos="<bos>", eos="<eos>", pad="<pad>",
                         unk="<unk>", extra={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                                             "image_token": "<image_soft_token>"},
                         add_bos=True, template=trl_template("gemma3"))
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
    boi, eoi, soft = token_ids(proc.tokenizer, "<start_of_image>", "<end_of_image>", "<image_soft_token>")
    cfg = T.Gemma3Config(
        text_config=text_config(p, proc.tokenizer, head_dim=head_dim(p), query_pre_attn_scalar=head_dim(p)),
        vision_config=vision_config(p, image_size=image_size, patch_size=patch_size, vision_use_head=False),
        mm_tokens_per_image=tokens, boi_token_index=boi, eoi_token_index=eoi, image_token_index=soft)
    return T.Gemma3ForConditionalGeneration(cfg), proc


def _published_template(name: str) -> str:
    import importlib.resources

    return (importlib.resources.files(__package__) / "templates" / f"{name}.jinja").read_text(encoding="utf-8")


_GEMMA_NAMED = {"<pad>": "pad", "<eos>": "eos", "<bos>": "bos", "<unk>": "unk"}


def gemma3n(p, hub: HubFiles | None = None):
    """Gemma 3n: a MobileNetV5 vision tower (timm), its multi-scale fusion pooled to a fixed grid of soft tokens
    (the real 16x16 = 256; the plain zoo 2x2 = 4 on 64 px images), per-layer embeddings, AltUp and LAuReL."""
    import transformers as T

    if hub is None:
        specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
                    "<end_of_image>", "<image_soft_token>", "<start_of_audio>", "<end_of_audio>", "<audio_soft_token>"]
        tok = tokenizer(specials, bos="<bos>", eos="<eos>", pad="<pad>", unk="<unk>", add_bos=True,
                         extra={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                                "image_token": "<image_soft_token>", "boa_token": "<start_of_audio>",
                                "eoa_token": "<end_of_audio>", "audio_token": "<audio_soft_token>"},
                         template=_published_template("gemma3n"))
        ip = T.SiglipImageProcessor(size={"height": 64, "width": 64}, do_normalize=False)
        proc = T.Gemma3nProcessor(feature_extractor=T.Gemma3nAudioFeatureExtractor(), image_processor=ip,
                                  tokenizer=tok, image_seq_length=4, audio_seq_length=4,
                                  chat_template=tok.chat_template)
        grid = 2
    else:
        proc = hub.processor()
        grid = round(proc.image_seq_length ** 0.5)
    tok = proc.tokenizer
    ids = dict(zip(["boi_token_id", "eoi_token_id", "image_token_id", "boa_token_id", "eoa_token_id",
                    "audio_token_id"],
                   token_ids(tok, "<start_of_image>", "<end_of_image>", "<image_soft_token>", "<start_of_audio>",
                             "<end_of_audio>", "<audio_soft_token>")))
    layers = p["layers"]
    text = text_config(p, tok, head_dim=head_dim(p), query_pre_attn_scalar=head_dim(p),
                       layer_types=["sliding_attention"] * (layers - 1) + ["full_attention"],
                       num_kv_shared_layers=0, hidden_size_per_layer_input=16, vocab_size_per_layer_input=len(tok),
                       laurel_rank=8, altup_num_inputs=4, activation_sparsity_pattern=[0.95] + [0.0] * (layers - 1))
    offset = max(len(tok) - 128, 0)  # each tower's 128 embedding rows end the vocabulary
    # Channels scaled down 50x (the real tower is 294M parameters, this one 2.3M); the fused output keeps its 2048.
    vision = dict(model_args={"channel_multiplier": 0.02, "msfa_output_resolution": grid}, hidden_size=2048,
                  vocab_offset=offset)
    audio = dict(hidden_size=32, conf_num_attention_heads=2, conf_num_hidden_layers=1,
                 sscp_conv_channel_size=[8, 4], vocab_offset=offset)
    cfg = T.Gemma3nConfig(text_config=text, vision_config=vision, audio_config=audio,
                          vision_soft_tokens_per_image=grid * grid, audio_soft_tokens_per_image=4, **ids)
    return T.Gemma3nForConditionalGeneration(cfg), proc


def gemma4(p, hub: HubFiles | None = None):
    """Gemma 4: a ViT whose patches are average-pooled 3x3 into soft tokens, as many as the image's aspect ratio
    fits in `max_soft_tokens` (70 at the least; the plain zoo uses patch 4, so a 70-token image is ~100 px)."""
    import transformers as T

    if hub is None:
        specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<|turn>", "<turn|>", "<|image>", "<image|>",
                    "<|image|>", "<|video|>", "<|audio>", "<audio|>", "<|audio|>", "<|channel>", "<channel|>",
                    "<|think|>", "<|tool_call>", "<tool_call|>", "<|tool>", "<tool|>", "<|tool_response>",
                    "<tool_response|>", '<|"|>']
        tok = tokenizer(specials, bos="<bos>", eos="<eos>", pad="<pad>", unk="<unk>", add_bos=True,
                         extra={"boi_token": "<|image>", "eoi_token": "<image|>", "image_token": "<|image|>",
                                "video_token": "<|video|>", "audio_token": "<|audio|>", "boa_token": "<|audio>",
                                "eoa_token": "<audio|>"},
                         template=trl_template("gemma4_v4"))
        ip = T.Gemma4ImageProcessor(max_soft_tokens=70, image_seq_length=70, patch_size=4, pooling_kernel_size=3)
        proc = T.Gemma4Processor(feature_extractor=T.Gemma4AudioFeatureExtractor(), image_processor=ip,
                                 video_processor=T.Gemma4VideoProcessor(patch_size=4), tokenizer=tok,
                                 image_seq_length=70,
                                 chat_template=tok.chat_template)
        patch, pooling, length = 4, 3, 70
    else:
        proc = hub.processor()
        real = hub.model_config().vision_config
        patch, pooling = real.patch_size, real.pooling_kernel_size
        length = getattr(real, "default_output_length", 280)
    tok = proc.tokenizer
    ids = dict(zip(["boi_token_id", "eoi_token_id", "image_token_id", "video_token_id"],
                   token_ids(tok, "<|image>", "<image|>", "<|image|>", "<|video|>")))
    layers = p["layers"]
    text = text_config(p, tok, head_dim=head_dim(p), layer_types=["sliding_attention"] * (layers - 1) +
                       ["full_attention"], hidden_size_per_layer_input=16, vocab_size_per_layer_input=len(tok),
                       final_logit_softcapping=30.0)
    vision = T.Gemma4VisionConfig(hidden_size=p["v_hidden"], intermediate_size=p["v_intermediate"],
                                  num_hidden_layers=p["v_layers"], num_attention_heads=p["v_heads"],
                                  num_key_value_heads=p["v_heads"], head_dim=p["v_hidden"] // p["v_heads"],
                                  patch_size=patch, pooling_kernel_size=pooling, use_clipped_linears=True,
                                  # the published key transformers 5.25 no longer defines and vLLM reads
                                  default_output_length=length)
    cfg = T.Gemma4Config(text_config=text, vision_config=vision, audio_config=None, **ids)
    return T.Gemma4ForConditionalGeneration(cfg), proc
