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
