"""Optional training kernels: Liger's (`pip install finetune[liger]`), switched on by SFTConfig's own key
`training.use_liger_kernel: true`.

transformers' Trainer applies them to the model (`_apply_liger_kernel_to_instance`: RoPE, RMSNorm, SwiGLU for the
model type) and TRL keeps its fused LM head, so Liger's fused linear cross-entropy stays off: the LM head still
scores only the supervised positions (finetune.training.trainer.lm_head_on_supervised_positions), which is the part
of Liger's fused loss that matters at a 152k vocabulary. Liger's kernels are Triton: CUDA only, never needed on the
CPU. What it supports is Liger's own table (`MODEL_TYPE_TO_APPLY_LIGER_FN`); a run that asks for it where it cannot
apply is refused before anything loads, rather than silently trained without it.
"""

from __future__ import annotations

from ..models.families import FAMILIES, Family
from ..recipe import RecipeError


def liger_support():
    """Liger's model-type table, or None when liger-kernel is not installed (or cannot import: no Triton)."""
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError:
        return None
    return MODEL_TYPE_TO_APPLY_LIGER_FN


def refuse_missing_kernels(recipe, family: Family) -> None:
    """A clear error, naming the key, when `training.use_liger_kernel` cannot be honoured."""
    if not getattr(recipe.training, "use_liger_kernel", False):
        return
    table = liger_support()
    if table is None:
        raise RecipeError("training.use_liger_kernel: liger-kernel is not installed (pip install 'finetune[liger]'; "
                          "its kernels need Triton, which comes with CUDA builds of torch)")
    model_type = next(k for k, f in FAMILIES.items() if f is family)
    if model_type not in table:
        raise RecipeError(f"training.use_liger_kernel: Liger has no kernels for {family.name} (model type "
                          f"{model_type}); remove the key for this model")
    config = getattr(recipe.training, "liger_kernel_config", None) or {}
    if config.get("fused_linear_cross_entropy"):
        raise RecipeError("training.liger_kernel_config: fused_linear_cross_entropy replaces the model's forward, "
                          "and with it the LM head that scores only supervised positions; leave it out")
