"""Every image-text-to-text model type transformers knows gets an answer: supported (a family row), or refused
with a reason read off its own layout, never a traceback (finetune/models/refusals.py)."""

import pytest
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES as TYPES

import finetune
from finetune.models.families import FAMILIES, UnsupportedModelError, family_for
from finetune.models.refusals import refusal_for_config


def default_config(model_type):
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type)


@pytest.mark.parametrize("model_type", sorted(TYPES))
def test_every_type_is_supported_or_refused_with_its_reason(model_type):
    if model_type in FAMILIES:
        assert family_for(model_type) is FAMILIES[model_type]
        return
    try:
        config = default_config(model_type)
    except Exception as e:  # noqa: BLE001 - a type whose default config does not build: its checkpoint's would
        pytest.skip(f"no default config: {type(e).__name__}")
    reason = refusal_for_config(config)
    assert reason and "Traceback" not in reason
    with pytest.raises(UnsupportedModelError, match=f"model type '{model_type}' is not in finetune's model-family "
                                                    r"table: .{20,}\. Supported: "):
        family_for(model_type, why=lambda: reason)


@pytest.mark.parametrize("model_type, reason", [
    ("mistral3", r"has the layout finetune adapts \(vision model.vision_tower; projector model.multi_modal_projector; "
                 r"decoder model.language_model\) but no row"),
    ("glm4v", r"has the layout finetune adapts \(vision model.visual; projector model.visual.merger; decoder "
              r"model.language_model\)"),
    ("florence2", "is an encoder-decoder model"),
    ("fuyu", "has no vision tower under `model.`"),  # image patches go straight into the decoder
    ("idefics", r"has no separate language model under `model.` \(its parts: .*model.gated_cross_attn_layers"),
    ("llama4", r"keeps its parts at the top level \(vision_model, multi_modal_projector, language_model\)"),
    ("evolla", "is not an image-text-to-text model"),
])
def test_the_reason_names_what_the_layout_lacks(model_type, reason):
    import re

    assert re.search(reason, refusal_for_config(default_config(model_type)))


def test_a_checkpoint_of_an_unsupported_type_is_refused_with_its_reason(tmp_path):
    default_config("mistral3").save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match=r"'mistral3' is not in finetune's model-family table: "
                                                    r"Mistral3ForConditionalGeneration has the layout"):
        finetune.check({"model": {"name_or_path": str(tmp_path)}, "data": {"path": "x"}})
