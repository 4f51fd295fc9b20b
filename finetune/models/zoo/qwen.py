"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL: dynamic resolution, multimodal rope."""

from __future__ import annotations

from .common import HubFiles, head_dim, mrope_sections, text_config, token_ids, tokenizer, trl_template

_QWEN_EXTRA = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
               "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"}


def _qwen(p, template: str, patch: int, proc_cls, video_cls, config_cls, model_cls, text: dict, vision: dict,
          hub: HubFiles | None = None):
    """Qwen-VL families: dynamic resolution, bounded to 2x2..4x4 merged patches (4-16 image tokens)."""
    import transformers as T

    if hub is None:
        tok = tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                          "<|image_pad|>", "<|video_pad|>"], eos="<|im_end|>", pad="<|endoftext|>", extra=_QWEN_EXTRA,
                         template=trl_template(template))
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
        text_config=text_config(p, tok, **text),
        vision_config=dict(depth=p["v_layers"], num_heads=p["v_heads"], patch_size=patch, spatial_merge_size=merge,
                           temporal_patch_size=temporal, **vision),
        **dict(zip(["image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"],
                   token_ids(tok, "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"))))
    return model_cls(cfg), proc


def qwen2_vl(p, hub: HubFiles | None = None):
    import transformers as T

    rope = {"rope_type": "default", "mrope_section": mrope_sections(p), "rope_theta": 10000.0}
    # Qwen2-VL ships the same template as Qwen2.5-VL (byte-identical, says TRL)
    return _qwen(p, "qwen2_5_vl", 14, T.Qwen2VLProcessor, T.Qwen2VLVideoProcessor, T.Qwen2VLConfig,
                 T.Qwen2VLForConditionalGeneration, text=dict(rope_parameters=rope),
                 vision=dict(embed_dim=p["v_hidden"], hidden_size=p["hidden"], in_chans=3,
                             mlp_ratio=p["v_intermediate"] // p["v_hidden"]), hub=hub)


def qwen2_5_vl(p, hub: HubFiles | None = None):
    import transformers as T

    rope = {"rope_type": "default", "mrope_section": mrope_sections(p), "rope_theta": 10000.0}
    depth = p["v_layers"]
    # window of 56 px = 2x2 merged patches (a replica keeps its checkpoint's); every other block attends globally
    window = hub.model_config().vision_config.window_size if hub else 56
    return _qwen(p, "qwen2_5_vl", 14, T.Qwen2_5_VLProcessor, T.Qwen2VLVideoProcessor, T.Qwen2_5_VLConfig,
                 T.Qwen2_5_VLForConditionalGeneration, text=dict(rope_parameters=rope),
                 vision=dict(hidden_size=p["v_hidden"], out_hidden_size=p["hidden"], in_channels=3,
                             intermediate_size=p["v_intermediate"], window_size=window,
                             fullatt_block_indexes=list(range(1, depth, 2))), hub=hub)


def qwen3_vl(p, hub: HubFiles | None = None):
    import transformers as T

    rope = {"rope_type": "default", "mrope_section": mrope_sections(p), "mrope_interleaved": True,
            "rope_theta": 10000.0}
    # 16 learned positions = a 4x4 grid, interpolated to other sizes (a replica keeps its checkpoint's 48x48);
    # DeepStack taps every other block
    positions = hub.model_config().vision_config.num_position_embeddings if hub else 16
    return _qwen(p, "qwen3_vl", 16, T.Qwen3VLProcessor, T.Qwen3VLVideoProcessor, T.Qwen3VLConfig,
                 T.Qwen3VLForConditionalGeneration, text=dict(rope_parameters=rope, head_dim=head_dim(p)),
                 vision=dict(hidden_size=p["v_hidden"], out_hidden_size=p["hidden"], in_channels=3,
                             intermediate_size=p["v_intermediate"], num_position_embeddings=positions,
                             deepstack_visual_indexes=list(range(0, p["v_layers"] - 1, 2))), hub=hub)


def _qwen3_vl_vision(p, hub: HubFiles | None, **extra) -> dict:
    # 16 learned positions = a 4x4 grid, interpolated to other sizes (a replica keeps its checkpoint's 48x48)
    positions = hub.model_config().vision_config.num_position_embeddings if hub else 16
    return dict(hidden_size=p["v_hidden"], out_hidden_size=p["hidden"], in_channels=3,
                intermediate_size=p["v_intermediate"], num_position_embeddings=positions, **extra)


def _moe(p) -> dict:
    """Four experts, two per token: enough for routing to matter, small enough for a CPU."""
    return dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=p["intermediate"] // 4)


def qwen3_vl_moe(p, hub: HubFiles | None = None):
    import transformers as T

    rope = {"rope_type": "default", "mrope_section": mrope_sections(p), "mrope_interleaved": True,
            "rope_theta": 10000.0}
    return _qwen(p, "qwen3_vl", 16, T.Qwen3VLProcessor, T.Qwen3VLVideoProcessor, T.Qwen3VLMoeConfig,
                 T.Qwen3VLMoeForConditionalGeneration,
                 # norm_topk_prob: the published config's routing key, which transformers 5 no longer defines
                 # and vLLM reads
                 text=dict(rope_parameters=rope, head_dim=head_dim(p), decoder_sparse_step=1, norm_topk_prob=True,
                           **_moe(p)),
                 vision=_qwen3_vl_vision(p, hub, deepstack_visual_indexes=list(range(0, p["v_layers"] - 1, 2))),
                 hub=hub)


def _qwen3_5_text(p) -> dict:
    """Qwen3.5's decoder: every fourth layer (and the last) full attention, the others gated DeltaNet; rotary on a
    quarter of each head (the real partial_rotary_factor), M-RoPE sections split over it like the real 11/11/10."""
    layers, dim = p["layers"], max(32, head_dim(p))
    freqs = dim // 4 // 2
    hw = round(freqs * 11 / 32)
    rope = {"rope_type": "default", "mrope_section": [freqs - 2 * hw, hw, hw], "mrope_interleaved": True,
            "rope_theta": 10000.0, "partial_rotary_factor": 0.25}
    types = ["full_attention" if i % 4 == 3 or i == layers - 1 else "linear_attention" for i in range(layers)]
    return dict(rope_parameters=rope, head_dim=dim, layer_types=types, linear_num_key_heads=2,
                linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16, linear_conv_kernel_dim=4)


def qwen3_5(p, hub: HubFiles | None = None):
    import transformers as T

    # The 4B and larger checkpoints' template (think): every reply opens with a <think> block
    return _qwen(p, "qwen3_5_think", 16, T.Qwen3VLProcessor, T.Qwen3VLVideoProcessor, T.Qwen3_5Config,
                 T.Qwen3_5ForConditionalGeneration, text=_qwen3_5_text(p), vision=_qwen3_vl_vision(p, hub), hub=hub)


def qwen3_5_moe(p, hub: HubFiles | None = None):
    import transformers as T

    text = _qwen3_5_text(p) | _moe(p) | dict(shared_expert_intermediate_size=p["intermediate"] // 4)
    return _qwen(p, "qwen3_5_think", 16, T.Qwen3VLProcessor, T.Qwen3VLVideoProcessor, T.Qwen3_5MoeConfig,
                 T.Qwen3_5MoeForConditionalGeneration, text=text, vision=_qwen3_vl_vision(p, hub), hub=hub)
