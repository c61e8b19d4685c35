"""Fold trained deltas into the backbone's own weights, for zero added inference latency.

| delta | folded into |
|---|---|
| LoRA | W += (alpha/r) B A |
| PaFi | W.flat[positions] += values (or the norm scale) |
| HiWi | W += f(W), or b += f(b) |
| LNFit | the norm's scale: g += Δg |
| BitFit | the module's bias: existing (BERT/RoBERTa) or added (LLaMA's `attention_bias` / `mlp_bias`) |
| LRA, Adapter | not mergeable (a non-linear function of the output) |

T5 linears and RMSNorms cannot hold a bias in the HF architecture, so BitFit there is not mergeable.

A BitFit that shares a site with a kept (unmerged) sequential delta is kept too: folding it into
the bias would change that delta's input. Under ZeRO-3 every module is gathered on its own
(``gather``), never the whole model.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .backbones import Family, SiteMap
from .supernet import SLOT_ATTR, slots

_LLAMA_BIAS_FLAGS = {"attn": "attention_bias", "mlp": "mlp_bias"}


@dataclass
class MergeReport:
    merged: list[tuple[str, str]] = field(default_factory=list)
    kept: list[tuple[str, str, str]] = field(default_factory=list)  # (site, type, why)

    @property
    def complete(self) -> bool:
        return not self.kept


def _bias_home(module: nn.Module, family: Family, component: str, config) -> str | None:
    """Why a BitFit cannot be folded here (None: it can)."""
    if isinstance(module, nn.Linear):
        if module.bias is not None:
            return None
        group = component.split(".")[0]
        if family.name == "llama" and group in _LLAMA_BIAS_FLAGS and hasattr(config, _LLAMA_BIAS_FLAGS[group]):
            return None
        return f"{family.name} {component} has no bias to fold an added bias into"
    if isinstance(module, nn.LayerNorm) and module.bias is not None:
        return None
    return f"{type(module).__name__} has no bias to fold an added bias into"


def plan_merge(model: nn.Module, site_map: SiteMap) -> MergeReport:
    """Which attached deltas can be folded (nothing is changed)."""
    report = MergeReport()
    for site, slot in slots(model).items():
        s = site_map.site(site)
        module = model.get_submodule(s.path)
        kept_sequential = [k for k, d in slot.deltas.items() if not d.mergeable]
        for key, delta in slot.deltas.items():
            if not delta.mergeable:
                report.kept.append((site, key, "a non-linear function of the output: cannot be folded"))
                continue
            if key == "bitfit":
                why = _bias_home(module, site_map.family, s.component, site_map.config)
                if why is None and kept_sequential:
                    why = f"shares the site with the kept {', '.join(kept_sequential)} (its input would change)"
                if why:
                    report.kept.append((site, key, why))
                    continue
            report.merged.append((site, key))
    return report


def _enable_llama_bias(model: nn.Module, site_map: SiteMap, group: str) -> None:
    """Turn on LLaMA's attention_bias / mlp_bias: zero biases on every projection of that group,
    so the saved model loads as a plain LlamaForCausalLM with the flag set."""
    flag = _LLAMA_BIAS_FLAGS[group]
    if getattr(site_map.config, flag, False):
        return
    setattr(site_map.config, flag, True)
    for s in site_map.sites.values():
        if s.component.startswith(group + ".") and s.dims.kind == "linear":
            lin = model.get_submodule(s.path)
            if lin.bias is None:
                lin.bias = nn.Parameter(
                    torch.zeros(lin.out_features, dtype=lin.weight.dtype, device=lin.weight.device), requires_grad=False
                )


@torch.no_grad()
def merge(model: nn.Module, site_map: SiteMap, *, gather=None) -> MergeReport:
    """Fold every mergeable delta into the backbone and remove it; returns what was kept."""
    gather = gather or (lambda params, modifier_rank=None: contextlib.nullcontext())
    report = plan_merge(model, site_map)
    merged = set(report.merged)
    for site, slot in list(slots(model).items()):
        s = site_map.site(site)
        module = model.get_submodule(s.path)
        todo = [k for k in list(slot.deltas) if (site, k) in merged]
        if not todo:
            continue
        if "bitfit" in todo and isinstance(module, nn.Linear) and module.bias is None:
            _enable_llama_bias(model, site_map, s.component.split(".")[0])
        params = [*module.parameters(recurse=False), *slot.parameters()]
        with gather(params, modifier_rank=0):
            # every update from the original weights first (HiWi reads W), then apply them all
            updates = [_update(module, slot.deltas[key], key) for key in todo]
            for target, delta in updates:
                target.add_(delta.to(target.dtype))
        for key in todo:
            del slot.deltas[key]
            for order in (slot._parallel, slot._sequential):
                if key in order:
                    order.remove(key)
        if len(slot.deltas) == 0:
            slot._handle.remove()
            delattr(module, SLOT_ATTR)
    return report


def _update(module: nn.Module, delta, key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(tensor of the backbone to change, what to add to it)."""
    w = module.weight
    if key == "lora":
        return w, delta.merged_weight_delta()
    if key == "pafi":
        return w, delta.dense()
    if key == "hiwi":
        target = w if delta.cfg.target == "weight" else module.bias
        return target, delta.delta(target.detach().float())
    if key == "lnfit":
        return w, delta.scale.detach()
    if key == "bitfit":
        return module.bias, delta.bias.detach()
    raise ValueError(f"cannot fold {key}")  # pragma: no cover - plan_merge only lets mergeable types through
