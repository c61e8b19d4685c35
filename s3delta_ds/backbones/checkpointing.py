"""Activation checkpointing of a backbone's transformer blocks (``model.gradient_checkpointing``).

Each block's forward runs without keeping its intermediate activations; the backward runs the
block again to get them. Memory for activations drops from all of every block's to one block's plus
each block's input, for about one more forward per step. The transformers model does the
checkpointing (every family here has per-layer checkpointing); this module only decides how.
"""

from __future__ import annotations

import torch.nn as nn

from ..errors import BackboneError


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Checkpoint every block of the transformers ``model`` with non-reentrant ``torch.utils.checkpoint``.

    Non-reentrant, because

    * the gate phase takes its gradient with ``torch.autograd.grad`` w.r.t. the gate sample z,
      which reentrant checkpointing does not support (it works with ``.backward()`` only);
    * the frozen backbone's block inputs do not require grad, and reentrant checkpointing would
      then give the delta weights inside a block no gradient at all;
    * it stashes the RNG state, so the recomputation draws the forward's dropout masks.

    The deltas' hooks sit on modules *inside* the blocks (projections, norms, sublayers), so they
    run again in the recomputation and read the same gate values: ``GateContext.z`` is replaced
    only between a forward and the next, never between a forward and its backward. Under ZeRO-3
    the recomputation gathers the partitioned weights again through DeepSpeed's module hooks.
    Evaluation (``model.eval()`` or ``torch.no_grad()``) does not checkpoint.

    Raises:
        BackboneError: the model class has no activation checkpointing.
    """
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise BackboneError(
            f"{type(model).__name__} does not support activation checkpointing: set model.gradient_checkpointing=false"
        )
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # the newer name; the old one warns
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    # transformers also makes the embedding output require grad, which only reentrant
    # checkpointing needs: without it the backward stops where it does without checkpointing.
    model.disable_input_require_grads()


def checkpointed_blocks(model: nn.Module) -> int:
    """How many blocks of ``model`` checkpoint their forward in training (0: checkpointing is off)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return sum(1 for m in model.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing)
