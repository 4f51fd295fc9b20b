"""The frozen vision side without autograd: where LoRA leaves the vision tower out (`lora.targets` without `vision`,
the default, in LoRA and QLoRA), nothing upstream of the adapters needs a gradient, yet with gradient checkpointing
on, transformers' `enable_input_require_grads` makes the tower's patch embeddings require grad, so autograd records
the whole tower and checkpointing runs it a second time in the backward pass (the tower of Qwen2.5-VL-7B is 0.67B
parameters over every image patch). Here each frozen part runs with grad mode off: the same outputs (the forward is
the same code), no graph, no recomputation.

A part is frozen when no parameter under it is trainable, and a call of it runs without autograd when, besides, no
input's graph leads back to a trainable parameter: then no trainable weight can receive a gradient through it. The
second condition is checked per call, because module order is not execution order: with LoRA on Qwen's merger
(inside `model.visual`), the tower's blocks and the merger's first norm run without autograd, while the merger's
GELU, downstream of its first adapter, keeps it. The patch embeddings that `enable_input_require_grads` makes
require grad are a leaf that is no parameter: a graph from them (the tower's reshapes before its blocks) leads to
nothing trainable.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.utils.parametrize

from .families import Family, matches


@dataclass
class FrozenParts:
    """The modules that run without autograd; `undo()` removes the hooks that make them."""

    names: list[str] = field(default_factory=list)
    _handles: list = field(default_factory=list, repr=False)

    def undo(self) -> None:
        for handle in self._handles:
            handle.remove()
        self.names, self._handles = [], []


def frozen_parts(model, family: Family) -> list[tuple[str, torch.nn.Module]]:
    """The largest modules of the vision tower and projector with no trainable parameter under them that run
    (containers are looked into, not called), outermost first."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    chosen: list[tuple[str, torch.nn.Module]] = []
    for name, module in base.named_modules():
        if not name or not (matches(family.vision, name) or matches(family.projector, name)):
            continue
        if any(name.startswith(outer + ".") for outer, _ in chosen):
            continue
        if isinstance(module, (torch.nn.ModuleList, torch.nn.ModuleDict)):
            continue
        # A LoRA layer's frozen base: peft may compute its weight from the adapters while it runs (a parametrization,
        # for adapters on raw parameters such as Gemma 3's projector), which no input would show.
        if name.endswith(".base_layer") or torch.nn.utils.parametrize.is_parametrized(module):
            continue
        if any(p.requires_grad for p in module.parameters()):
            continue
        chosen.append((name, module))
    return chosen


def carries_graph(values) -> bool:
    """Whether a gradient could reach a trainable parameter through any of these inputs (tensors, or tensors in
    lists and tuples)."""
    for v in values:
        if isinstance(v, (list, tuple)):
            if carries_graph(v):
                return True
        elif isinstance(v, torch.Tensor) and reaches_trainable(v):
            return True
    return False


def reaches_trainable(tensor: torch.Tensor) -> bool:
    """Whether the tensor's graph leads back to a trainable parameter. On the vision side graphs are short: the
    patch embeddings made to require grad (a leaf that is no parameter), or a few layers back to an adapter. A
    custom autograd function (reentrant checkpointing) hides what it used inside, so it counts as reaching one."""
    if not tensor.requires_grad:
        return False
    if tensor.grad_fn is None:
        return isinstance(tensor, torch.nn.Parameter)
    stack, seen = [tensor.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if isinstance(node, torch.autograd.function.BackwardCFunction):
            return True
        variable = getattr(node, "variable", None)  # AccumulateGrad: a leaf
        if variable is not None:
            if isinstance(variable, torch.nn.Parameter) and variable.requires_grad:
                return True
            continue
        stack.extend(next_node for next_node, _ in node.next_functions)
    return False


def run_frozen_without_autograd(model, family: Family) -> FrozenParts:
    """Hooks on every `frozen_parts` module: grad mode off for calls whose inputs carry no graph, back on after.
    Call after the adapters are in place (which parameters train decides what is frozen). Hooks, not a wrapped
    `forward`: transformers' hub-kernel layers (RMSNorm) replace their instance forward on every train()/eval()."""
    parts = FrozenParts()
    for name, module in frozen_parts(model, family):
        modes: list[bool] = []  # grad mode to restore, per call in flight (a module may be re-entered)

        def enter(module, args, kwargs, modes=modes):
            modes.append(torch.is_grad_enabled())
            if not (carries_graph(args) or carries_graph(kwargs.values())):
                torch.set_grad_enabled(False)

        def leave(module, args, output, modes=modes):
            torch.set_grad_enabled(modes.pop())

        parts._handles += [module.register_forward_pre_hook(enter, with_kwargs=True),
                           module.register_forward_hook(leave, always_call=True)]
        parts.names.append(name)
    return parts
