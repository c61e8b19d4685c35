"""BitFit-style *added* bias: Δy = b, zero-initialised (T5/LLaMA linears and norms have no bias
of their own, so this adds one). Sequential slot, as in the original S3Delta ``BitFitParallel``
(which despite its name sits in the sequential slot): it adds to the parallel-updated output."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from .base import Delta, Slot


@dataclass(frozen=True, slots=True)
class BitFitConfig:
    pass


class BitFit(Delta):
    type_name = "bitfit"
    slot = Slot.SEQUENTIAL
    site_kinds = frozenset({"linear", "norm", "block"})
    Config = BitFitConfig
    mergeable = True

    def __init__(self, dims, cfg: BitFitConfig):
        super().__init__(dims, cfg)
        self.bias = nn.Parameter(torch.empty(dims.out_dim))
        self.reset_parameters()

    @classmethod
    def num_params(cls, dims, cfg):
        return dims.out_dim

    def reset_parameters(self):
        nn.init.zeros_(self.bias)

    def forward(self, y):
        return self.bias
