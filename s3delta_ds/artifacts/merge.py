"""Fold trained deltas into the backbone's own weights, for zero added inference latency.

Each delta type folds itself (``Delta.fold_refusal`` / ``fold_updates``, PEFT's layer ``merge``):

| delta | folded into |
|---|---|
| LoRA | W += (alpha/r) B A |
| PaFi | W.flat[positions] += values (or the norm scale) |
| HiWi | W += f(W), or b += f(b) |
| LNFit | the norm's scale: g += Δg |
| BitFit | the module's bias: existing (BERT/RoBERTa) or added (LLaMA's `attention_bias` / `mlp_bias`) |
| IA3 | output: W ← (1+Δ) ⊙ W rows (and b); input: W ← W diag(1+Δ) |
| LRA, Adapter | not mergeable (a non-linear function of the output) |

T5 linears and RMSNorms cannot hold a bias in the HF architecture, so BitFit there is not mergeable.
This module holds what is not per type: which family can add a bias (LLaMA), the order of folds
on one site (``deltas.base.FOLD_ORDER``), and removing the folded deltas.

A sequential delta (BitFit, IA3 on outputs) that shares a site with a kept (unmerged) delta is kept
too: folding it into the module would change that delta's input. Under ZeRO-3 every module is
gathered on its own (``gather``), never the whole model.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..backbones import SiteMap
from ..deltas import Slot, fold_all, host_of
from ..method.supernet import slots


@dataclass
class MergeReport:
    merged: list[tuple[str, str]] = field(default_factory=list)
    kept: list[tuple[str, str, str]] = field(default_factory=list)  # (site, type, why)
    update_sq: float = 0.0
    """Σ‖ΔW‖² over the folded tensors (with ``merge(saved_in=...)``)."""
    rounding_sq: float = 0.0
    """Σ‖round(W + ΔW) − (W + ΔW)‖² in the saved dtype over the same tensors."""

    @property
    def update_lost(self) -> float | None:
        """‖rounding error‖ / ‖ΔW‖ of the folded tensors once saved: how much of the trained update
        the saved dtype does not hold (bf16 keeps ~8 bits of W, and a small ΔW sits below them)."""
        return (self.rounding_sq / self.update_sq) ** 0.5 if self.update_sq > 0 else None

    @property
    def complete(self) -> bool:
        return not self.kept


def plan_merge(model: nn.Module, site_map: SiteMap) -> MergeReport:
    """Which attached deltas can be folded (nothing is changed)."""
    report = MergeReport()
    for site, slot in slots(model).items():
        host = host_of(model, site_map, site)
        never = [k for k, d in slot.deltas.items() if not d.mergeable]
        for key, delta in slot.deltas.items():
            why = delta.fold_refusal(host)
            if why is None and delta.slot is Slot.SEQUENTIAL and never:
                why = f"shares the site with the kept {', '.join(never)} (its input would change)"
            if why:
                report.kept.append((site, key, why))
            else:
                report.merged.append((site, key))
    return report


def _enable_llama_bias(model: nn.Module, site_map: SiteMap, group: str) -> None:
    """Turn on LLaMA's attention_bias / mlp_bias: zero biases on every projection of that group,
    so the saved model loads as a plain LlamaForCausalLM with the flag set."""
    flag = site_map.family.bias_flag(f"{group}.proj", site_map.config)
    setattr(site_map.config, flag, True)  # and a zero bias wherever one is missing, whatever the flag said
    for s in site_map.sites.values():
        if s.component.startswith(group + ".") and s.dims.kind == "linear":
            lin = model.get_submodule(s.path)
            if lin.bias is None:
                lin.bias = nn.Parameter(
                    torch.zeros(lin.out_features, dtype=lin.weight.dtype, device=lin.weight.device), requires_grad=False
                )


def kept_in_fp32(model: nn.Module, dtype: torch.dtype | None) -> set[str]:
    """Module names transformers keeps (and saves) in fp32 in a model of ``dtype``, as it does:
    ``_keep_in_fp32_modules`` under fp16 (T5's ``wo``: its activations overflow fp16), and
    ``_keep_in_fp32_modules_strict`` under fp16 and bf16."""
    keep: set[str] = set()
    if dtype == torch.float16:
        keep |= set(getattr(model, "_keep_in_fp32_modules", None) or ())
    if dtype in (torch.float16, torch.bfloat16):
        keep |= set(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    return keep


@torch.no_grad()
def merge(model: nn.Module, site_map: SiteMap, *, gather=None, saved_in: torch.dtype | None = None) -> MergeReport:
    """Fold every mergeable delta into the backbone and remove it; returns what was kept. With
    ``saved_in`` (a dtype narrower than the merge's), also what rounding to it takes from the
    update (``MergeReport.update_lost``), one host at a time."""
    gather = gather or (lambda params, modifier_rank=None: contextlib.nullcontext())
    report = plan_merge(model, site_map)
    merged = set(report.merged)
    keep_fp32 = kept_in_fp32(model, saved_in)  # saved in fp32 (save_hf): no rounding
    for site, slot in list(slots(model).items()):
        s = site_map.site(site)
        module = model.get_submodule(s.path)
        todo = [k for k in list(slot.deltas) if (site, k) in merged]
        if not todo:
            continue
        needs_bias = any(slot.deltas[k].needs_host_bias for k in todo)
        if needs_bias and isinstance(module, nn.Linear) and module.bias is None:
            _enable_llama_bias(model, site_map, s.component.split(".")[0])
        params = [*module.parameters(recurse=False), *slot.parameters()]
        with gather(params, modifier_rank=0):
            own = dict(module.named_parameters(recurse=False))
            rounds = saved_in is not None and not (keep_fp32 & set(s.path.split(".")))
            before = {n: p.detach().float().clone() for n, p in own.items()} if rounds else {}
            fold_all(module, [slot.deltas[key] for key in todo])
            for name, old in before.items():
                new = module.get_parameter(name).detach().float()
                if torch.equal(new, old):  # left alone by the fold (a Linear's bias under LoRA)
                    continue
                report.update_sq += float((new - old).square().sum())
                report.rounding_sq += float((new.to(saved_in).float() - new).square().sum())
        for key in todo:
            slot.remove(key)
        if len(slot.deltas) == 0:
            slot.unhook(module)
    return report
