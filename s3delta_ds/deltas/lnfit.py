"""LNFit: a zero-initialised additive scale on a layer norm / RMSNorm, parallel slot.

Δy = Δg ⊙ normalise(x), so the norm's effective scale is g + z·Δg. The normalisation repeats the
backbone's (RMS for T5/LLaMA with their eps and fp32 accumulation; mean/var for BERT) from the
module input, so the frozen norm weight is never touched (it may be ZeRO-3-partitioned).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import Delta, PeftAdapter, Slot


@dataclass(frozen=True, slots=True)
class LNFitConfig:
    pass


def normalise(x: torch.Tensor, kind: str, eps: float) -> torch.Tensor:
    """The affine-free part of the backbone's norm, in ``x``'s dtype."""
    if kind == "layer":
        return F.layer_norm(x, (x.shape[-1],), eps=eps)
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


class LNFit(Delta):
    type_name = "lnfit"
    slot = Slot.PARALLEL
    site_kinds = frozenset({"norm"})
    Config = LNFitConfig
    mergeable = True
    # PEFT cannot hold LN tuning and LoRA in one model: its own folder, merged before the LoRA one
    peft_adapter = PeftAdapter("ln_tuning", "ln_tuning", "LN_TUNING", carries_head=True)

    def __init__(self, dims, cfg: LNFitConfig):
        super().__init__(dims, cfg)
        self.scale = nn.Parameter(torch.empty(dims.out_dim))
        self.reset_parameters()

    @classmethod
    def num_params(cls, dims, cfg):
        return dims.out_dim

    def reset_parameters(self):
        nn.init.zeros_(self.scale)

    def forward(self, x):
        return self.scale * normalise(x, self.dims.norm, self.dims.eps)

    def fold_updates(self, module):
        return [(module.weight, self.scale.detach())]  # the norm's scale: g += Δg

    def peft_state(self, module):
        """PEFT's LN tuning trains a copy of the whole norm: its weight is g + Δg, its bias the norm's."""
        state = {"ln_tuning_layers.weight": (module.weight + self.scale).detach().cpu()}
        if getattr(module, "bias", None) is not None:
            state["ln_tuning_layers.bias"] = module.bias.detach().cpu().clone()
        return state

    @classmethod
    def peft_config(cls, members, head):
        return {"target_modules": sorted(path for path, _ in members), "modules_to_save": head or None}
