"""LoRA (Hu et al. 2021), parallel on an ``nn.Linear``: Δy = (alpha/r) · x Aᵀ Bᵀ.

Init as in the original S3Delta/loralib: A kaiming-uniform(a=√5), B = 0, so the delta starts at 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import Delta, PeftAdapter, Slot


@dataclass(frozen=True, slots=True)
class LoRAConfig:
    r: int = 8
    """Rank of the update."""
    alpha: float = 16.0
    """Scale numerator: the update is multiplied by alpha / r."""
    dropout: float = 0.0
    """Dropout on the LoRA input (training only)."""

    def __post_init__(self):
        if self.r < 1:
            raise ValueError(f"r must be >= 1, got {self.r}")
        if self.alpha <= 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


class LoRA(Delta):
    type_name = "lora"
    slot = Slot.PARALLEL
    site_kinds = frozenset({"linear"})
    Config = LoRAConfig
    mergeable = True
    peft_adapter = PeftAdapter("lora", "", "LORA", carries_head=True)

    def __init__(self, dims, cfg: LoRAConfig):
        super().__init__(dims, cfg)
        self.lora_A = nn.Parameter(torch.empty(cfg.r, dims.in_dim))
        self.lora_B = nn.Parameter(torch.empty(dims.out_dim, cfg.r))
        self.scaling = cfg.alpha / cfg.r
        self.drop = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.reset_parameters()

    @classmethod
    def num_params(cls, dims, cfg):
        return cfg.r * (dims.in_dim + dims.out_dim)

    def reset_parameters(self):
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def forward(self, x):
        return F.linear(F.linear(self.drop(x), self.lora_A), self.lora_B) * self.scaling

    def merged_weight_delta(self) -> torch.Tensor:
        """ΔW (out, in) such that the merged Linear computes x (W + ΔW)ᵀ."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def fold_updates(self, module):
        return [(module.weight, self.merged_weight_delta())]

    def peft_state(self, module):
        return {
            "lora_A.weight": self.lora_A.detach().cpu().clone(),
            "lora_B.weight": self.lora_B.detach().cpu().clone(),
        }

    @classmethod
    def peft_site_state(cls, module, deltas, types):
        """PEFT's LoRA layer on one Linear: lora_A, lora_B and, when the adapter holds BitFit
        anywhere (``lora_bias=True`` puts a bias on every lora_B), lora_B.bias. PEFT scales the
        whole lora_B output, bias included, by α/r, so the bias is stored divided by it. A site with
        BitFit and no LoRA gets a zero rank-1 LoRA with α = 1 that only carries the bias."""
        lora, bitfit = deltas.get("lora"), deltas.get("bitfit")
        if lora is not None:
            state, scaling = lora.peft_state(module), lora.scaling
        else:
            state = {
                "lora_A.weight": torch.zeros(1, module.in_features),
                "lora_B.weight": torch.zeros(module.out_features, 1),
            }
            scaling = 1.0
        if "bitfit" in types:
            bias = bitfit.bias.detach().float().cpu() if bitfit is not None else torch.zeros(module.out_features)
            state["lora_B.bias"] = bias / scaling
        return state

    @classmethod
    def peft_config(cls, members, head):
        """One adapter for every LoRA (per-module ranks and alphas in ``rank_pattern`` /
        ``alpha_pattern``), and BitFit on Linears as ``lora_bias`` (bias-only sites: rank 1, α 1)."""
        ranks: dict[str, int] = {}
        alphas: dict[str, float] = {}
        for path, d in members:
            if d.type_name == "lora":
                ranks[path], alphas[path] = d.cfg.r, d.cfg.alpha
        for path, d in members:
            if d.type_name != "lora" and path not in ranks:
                ranks[path], alphas[path] = 1, 1.0
        first = next((d for _, d in members if d.type_name == "lora"), None)
        r0, a0 = (first.cfg.r, first.cfg.alpha) if first is not None else (1, 1.0)
        return {
            "target_modules": sorted(ranks),
            "r": r0,
            "lora_alpha": a0,
            "lora_dropout": 0.0,
            "bias": "none",
            "lora_bias": any(d.type_name == "bitfit" for _, d in members),
            "rank_pattern": {k: v for k, v in ranks.items() if v != r0},
            "alpha_pattern": {k: v for k, v in alphas.items() if v != a0},
            "modules_to_save": head or None,
            "fan_in_fan_out": False,
        }
