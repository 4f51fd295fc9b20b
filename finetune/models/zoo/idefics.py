"""Idefics3 and SmolVLM: SigLIP tiles, pixel shuffle, row/column tile tokens."""

from __future__ import annotations

from .common import HubFiles, text_config, tokenizer, trl_template, vision_config, with_merge

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
    cfg = config_cls(vision_config=vision_config(p, image_size=image_size, patch_size=patch_size),
                     text_config=text_config(p, proc.tokenizer, model_type="llama"),
                     scale_factor=scale, image_token_id=proc.tokenizer.convert_tokens_to_ids("<image>"))
    return model_cls(cfg), proc


def idefics3(p, hub: HubFiles | None = None):
    import transformers as T

    # As published (HuggingFaceM4/Idefics3-8B-Llama3): eos <|end_of_text|>, and only <fake_token_around_image>,
    # <image> and <end_of_utterance> added as special tokens; <global-img> and <row_i_col_j> are plain text, several
    # tokens each (SmolVLM, below, made them single tokens).
    tok = None if hub else tokenizer(
        ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<fake_token_around_image>",
         "<image>", "<end_of_utterance>"],
        bos="<|begin_of_text|>", eos="<|end_of_text|>", pad="<|reserved_special_token_0|>", add_bos=True,
        template=trl_template("idefics3"))
    return _idefics3_like(p, tok, T.Idefics3Processor, T.Idefics3ImageProcessor, T.Idefics3Config,
                          T.Idefics3ForConditionalGeneration, hub)


def smolvlm(p, hub: HubFiles | None = None):
    import transformers as T

    # "\n\n" one token, as in SmolLM's vocabulary: llama.cpp's mtmd opens each image with it, looked up by text.
    tok = None if hub else with_merge(tokenizer(
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<end_of_utterance>", "<fake_token_around_image>",
         "<image>", "<global-img>"] + _ROW_COL,
        bos="<|im_start|>", eos="<end_of_utterance>", pad="<|im_end|>", unk="<|endoftext|>",
        extra={"image_token": "<image>", "fake_image_token": "<fake_token_around_image>",
               "global_image_token": "<global-img>", "end_of_utterance_token": "<end_of_utterance>"},
        template=trl_template("smolvlm")), "\n\n")
    return _idefics3_like(p, tok, T.SmolVLMProcessor, T.SmolVLMImageProcessor, T.SmolVLMConfig,
                          T.SmolVLMForConditionalGeneration, hub,
                          **({} if hub else {"video_processor": T.SmolVLMVideoProcessor()}))
