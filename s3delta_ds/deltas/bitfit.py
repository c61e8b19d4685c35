"""BitFit-style *added* bias: Δy = b, zero-initialised (T5/LLaMA linears and norms have no bias
of their own, so this adds one). Sequential slot, as in the original S3Delta ``BitFitParallel``
(which despite its name sits in the sequential slot): it adds to the parallel-updated output.

Folds into the host's bias: an existing one (BERT/RoBERTa, LayerNorm), or one the family can add
(LLaMA's ``attention_bias`` / ``mlp_bias``; ``merge`` turns the flag on). T5 linears and RMSNorms
cannot hold a bias in the HF architecture, so BitFit there does not fold.

In a PEFT export, BitFit on a Linear rides in the LoRA adapter as PEFT's ``lora_bias`` (the bias of
``lora_B``; see ``LoRA.peft_site_state``). PEFT has no bias for norms or whole blocks."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from .base import Delta, Host, PeftAdapter, Slot


@dataclass(frozen=True, slots=True)
class BitFitConfig:
    pass


class BitFit(Delta):
    type_name = "bitfit"
    slot = Slot.SEQUENTIAL
    site_kinds = frozenset({"linear", "norm", "block"})
    Config = BitFitConfig
    mergeable = True
    needs_host_bias = True
    peft_adapter = PeftAdapter("lora", "", "LORA", carries_head=True)

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

    @classmethod
    def inert_at(cls, site, site_map) -> str | None:
        if site.component == "attn.k" and site_map.family.key_shift_invariant(site_map.config):
            return (
                "a bias on attention keys shifts all of a query's scores equally, and softmax cancels it "
                f"({site_map.family.name} applies no rotary embedding to keys)"
            )
        return None

    @classmethod
    def fold_refusal(cls, host: Host) -> str | None:
        module = host.module
        if isinstance(module, nn.Linear):
            if module.bias is not None or host.can_add_bias:
                return None
            return f"{host.where} has no bias to fold an added bias into"
        if isinstance(module, nn.LayerNorm) and module.bias is not None:
            return None
        return f"{type(module).__name__} has no bias to fold an added bias into"

    def fold_updates(self, module):
        return [(module.bias, self.bias.detach())]

    @classmethod
    def peft_refusal(cls, module):
        if isinstance(module, nn.Linear):
            return None
        return f"PEFT holds an added bias only on a Linear (LoRA's lora_bias), not on a {type(module).__name__}"
