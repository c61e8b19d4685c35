"""The trainable pipeline both recipes (and ``benchmarks/step.py``) assemble on a frozen backbone:
deltas attached with their exact init, cast to the backbone's dtype, the backbone frozen, the
objective wrapped, and the DeepSpeed engine that owns the trainable weights."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..backbones import SiteMap
from ..engine import zero
from ..method.objective import DeltaModel
from ..method.supernet import DeltaSpec, GateContext, attach, cast_deltas, freeze_backbone


@dataclass(frozen=True, slots=True)
class Pipeline:
    module: DeltaModel
    engine: Any
    """The DeepSpeed engine owning the trainable weights (``module``'s)."""
    trainable: int
    """Trainable elements (full sizes, not this rank's partitions)."""
    frozen_bytes_rank0: int
    """Bytes of frozen weights rank 0 holds (its ZeRO-3 partitions, or everything)."""


def frozen_bytes(model: torch.nn.Module) -> int:
    """Bytes of frozen weights this rank holds (its ZeRO-3 partitions, or everything)."""
    return sum(zero.local_numel(p) * p.element_size() for p in model.parameters() if not p.requires_grad)


def build_pipeline(
    model: torch.nn.Module,
    site_map: SiteMap,
    specs: Sequence[DeltaSpec] | None,
    *,
    objective: str,
    dtype: torch.dtype,
    ds_config: dict,
    lr: float,
    weight_decay: float,
    total_steps: int,
    seed: int,
    head: tuple[str, ...] = (),
    ctx: GateContext | None = None,
    masks: Mapping[str, torch.Tensor] | None = None,
) -> Pipeline:
    """Attach ``specs`` to ``model`` (None: train every weight, the full fine-tuning baseline) and
    build the engine. Collective: call on every rank.

    Args:
        specs: the deltas; ``ctx`` gates them (a search's supernet), None trains them ungated.
        dtype: the backbone's float dtype, given to the deltas (ZeRO-3 leaves late parameters as
            they are).
        head: module prefixes that train with the deltas (a classification head).
        masks: PaFi masks by site (globally ranked PaFi modules).
    """
    if specs is None:
        model.requires_grad_(True)
        trainable = sum(zero.full_numel(p) for p in model.parameters())
    else:
        torch.manual_seed(seed)  # identical delta init on every rank and in every ZeRO stage
        attach(model, site_map, specs, ctx, gather=zero.gathered, register_external=zero.register_external, masks=masks)
        cast_deltas(model, dtype)
        trainable = freeze_backbone(model, head)  # before deepspeed.initialize: it fixes the trainable set
    module = DeltaModel(model, objective, ctx)
    params = [p for p in module.parameters() if p.requires_grad]
    engine = zero.build_engine(
        module, params, lr=lr, weight_decay=weight_decay, total_steps=total_steps, ds_config=ds_config
    )
    rank0_bytes = zero.broadcast_object(frozen_bytes(module))
    return Pipeline(module, engine, trainable, rank0_bytes)
