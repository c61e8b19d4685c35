"""Make structures: from gate probabilities (a search), at random (the baseline), or from the
standard manual recipes (LoRA r=8 on q,v; BitFit; LNFit; LowRankAdapter; Adapter), so that
every kind goes through one retrain path."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import torch.nn as nn

from ..backbones import Family, SiteMap, family_for
from ..backbones.loading import BackboneInfo, build_model, config_hash, hub_id, load_config
from ..errors import BudgetError, SearchSpaceError
from ..method.gates import discretise, random_structure
from ..method.space import Rule, SearchSpace, backbone_params, enumerate_rules, enumerate_space
from . import Budget, CandidateRecord, ModuleChoice, Structure

_MATMUL = ("attn.proj", "mlp.in", "mlp.out")

#: The original repo's manual baselines, in roles/components so they fit every family.
MANUAL_PRESETS: dict[str, tuple[Rule, ...]] = {
    "lora": (Rule((), "lora", {"r": 8, "alpha": 16.0}, components=("attn.q", "attn.v")),),
    "bitfit": (Rule(_MATMUL + ("norm",), "bitfit"),),
    "lnfit": (Rule(("norm",), "lnfit"),),
    "lra": (Rule(("attn.block", "mlp.block"), "lra", {"reduction": 32, "rank": 1}),),
    "adapter": (Rule(("attn.block", "mlp.block"), "adapter", {"bottleneck": 24}),),
    "lora-all-r1": (Rule(_MATMUL, "lora", {"r": 1, "alpha": 16.0}),),
    # Liao et al. 2023: the smallest 0.5% of every projection matrix (per-matrix ranking; the global
    # ranking needs the weights: `s3delta pafi-mask`), and HiWi on the FFN weights.
    "pafi": (Rule(_MATMUL, "pafi", {"density": 0.005}),),
    "hiwi": (Rule(("mlp.in", "mlp.out"), "hiwi", {"target": "weight", "bottleneck": 8}),),
    # Liu et al. 2022: (IA)³ scales on attention keys and values and on the FFN inner activations.
    "ia3": (
        Rule((), "ia3", {"position": "output"}, components=("attn.k", "attn.v")),
        Rule(("mlp.out",), "ia3", {"position": "input"}),
    ),
}


@dataclass(frozen=True)
class Backbone:
    """A backbone as the planners see it: config, family, a model instance (meta device unless
    given), its site map and the info a structure records."""

    config: Any
    family: Family
    model: nn.Module
    site_map: SiteMap
    info: BackboneInfo

    @classmethod
    def from_model(cls, model: nn.Module, name_or_path: str | None = None) -> Backbone:
        config = model.config
        family = family_for(config)
        site_map = SiteMap(model, family, config)
        info = BackboneInfo(
            family=family.name,
            name_or_path=name_or_path or str(getattr(config, "_name_or_path", "") or "unknown"),
            model_type=config.model_type,
            config_hash=config_hash(config),
            num_params=backbone_params(model, family),
            depths=dict(site_map.depths),
            hidden_size=family.hidden_size(config),
        )
        return cls(config, family, model, site_map, info)

    @classmethod
    def plan(cls, model_or_config: str, gguf_file: str | None = None) -> Backbone:
        """From a model name/path or a bare config (or a GGUF file's metadata), on the meta device:
        no weights, no memory."""
        config = load_config(model_or_config, gguf_file)
        return cls.from_model(build_model(config, device="meta"), hub_id(str(model_or_config)))

    def space(self, name: str) -> SearchSpace:
        return enumerate_space(self.model, name, family=self.family, site_map=self.site_map)


def budget_range(params: Sequence[int], num_params: int) -> tuple[float, float] | None:
    """The relative budgets a search or a random draw over candidates of ``params`` can meet (at
    least the cheapest candidate, below all of them together), as a closed range of 3-significant-
    digit numbers inside it, or None when there is none (a single candidate). An error names it,
    and either end copied from it must be accepted: 0.000353 printed for 0.0003535 was not. Exact
    (fractions), so 1e-4 for one parameter in 10,000 is not printed as 0.000101."""
    total = Fraction(sum(params), num_params)
    lo, hi = _sig3(Fraction(min(params), num_params), up=True), _sig3(total, up=False)
    if hi == total:  # all of them is not a search: the 3-digit number just under it
        hi = _sig3(total * (1 - Fraction(1, 10**6)), up=False)
    return (float(lo), float(hi)) if lo <= hi else None


def _unit(x: Fraction) -> Fraction:
    """One unit of ``x``'s third significant digit."""
    k = math.floor(math.log10(x))
    k += (Fraction(10) ** (k + 1) <= x) - (Fraction(10) ** k > x)  # log10 of a float may be off by one
    return Fraction(10) ** (k - 2)


def _sig3(x: Fraction, *, up: bool) -> Fraction:
    unit = _unit(x)
    return (math.ceil(x / unit) if up else math.floor(x / unit)) * unit


def absolute_budget(relative: float, num_params: int) -> float:
    """relative × backbone parameters, checked to be a fraction in (0, 1). Exact, for the decimal the
    user wrote: 3e-4 × 10,000 is 2.9999999999999996 in floats, and a candidate of 3 parameters must
    fit the budget that names it (so must either end of a ``budget_range``)."""
    if isinstance(relative, bool) or not isinstance(relative, (int, float)) or not math.isfinite(relative):
        raise BudgetError(f"budget must be a number, got {relative!r}")
    if not 0 < relative < 1:
        raise BudgetError(
            f"budget {relative!r} must be a fraction of the backbone's parameters in (0, 1), e.g. 1e-4 for 0.01%"
        )
    return float(Fraction(repr(float(relative))) * num_params)


def from_indices(
    space: SearchSpace,
    info: BackboneInfo,
    chosen: Sequence[int],
    *,
    kind: str,
    relative: float | None,
    absolute: float | None,
    p: Sequence[float] | None = None,
    alpha: Sequence[float] | None = None,
    search: Mapping[str, Any] | None = None,
    provenance: Mapping[str, Any] | None = None,
) -> Structure:
    """A structure choosing ``chosen`` (candidate indices) of ``space``; with ``p`` (and ``alpha``)
    every candidate's gate is recorded too."""
    cands = space.candidates
    modules = tuple(
        ModuleChoice(cands[i].site, cands[i].type, cands[i].kwargs, cands[i].params) for i in sorted(chosen)
    )
    records: tuple[CandidateRecord, ...] = ()
    if p is not None:
        records = tuple(
            CandidateRecord(
                c.site, c.type, c.kwargs, c.params, None if alpha is None else float(alpha[c.index]), float(p[c.index])
            )
            for c in cands
        )
    used = sum(m.params for m in modules)
    return Structure(
        kind=kind,
        backbone=info,
        budget=Budget(relative, absolute, used),
        modules=modules,
        space=space.name,
        candidates=records,
        search=dict(search or {}),
        provenance=dict(provenance or {}),
    )


def searched(
    space: SearchSpace,
    info: BackboneInfo,
    p: Sequence[float],
    alpha: Sequence[float] | None,
    relative: float,
    search: Mapping[str, Any] | None = None,
) -> Structure:
    """Discretise gate probabilities at the budget (greedy knapsack by p)."""
    absolute = absolute_budget(relative, info.num_params)
    chosen = discretise(list(p), space.params, absolute, logits=alpha)
    return from_indices(
        space, info, chosen, kind="searched", relative=relative, absolute=absolute, p=p, alpha=alpha, search=search
    )


def random_baseline(space: SearchSpace, info: BackboneInfo, relative: float, seed: int) -> Structure:
    """Random candidates of ``space`` until nothing more fits the budget."""
    absolute = absolute_budget(relative, info.num_params)
    chosen = random_structure(space.params, absolute, seed)
    return from_indices(
        space,
        info,
        chosen,
        kind="random",
        relative=relative,
        absolute=absolute,
        search={"method": "random", "seed": seed},
    )


def preset_modules(backbone: Backbone, preset: str, overrides: dict | None = None) -> tuple[ModuleChoice, ...]:
    """The modules of a manual preset on ``backbone``, its rules' settings updated by ``overrides``
    (a scaled preset's knob, e.g. ``{"r": 2}``).

    Raises:
        SearchSpaceError: an unknown preset, or one with no sites on this backbone."""
    try:
        rules = MANUAL_PRESETS[preset]
    except KeyError:
        raise SearchSpaceError(f"unknown manual preset {preset!r}; presets: {', '.join(MANUAL_PRESETS)}") from None
    if overrides:
        rules = tuple(Rule(r.roles, r.delta, {**r.kwargs, **overrides}, components=r.components) for r in rules)
    cands = enumerate_rules(backbone.site_map, rules)
    if not cands:
        raise SearchSpaceError(f"manual preset {preset!r} has no sites on this {backbone.family.name} backbone")
    return tuple(ModuleChoice(c.site, c.type, c.kwargs, c.params) for c in cands)


def manual(backbone: Backbone, preset: str) -> Structure:
    """One of the standard manual structures (``MANUAL_PRESETS``), at its own parameter count."""
    modules = preset_modules(backbone, preset)
    used = sum(m.params for m in modules)
    return Structure(
        kind="manual",
        backbone=backbone.info,
        budget=Budget(used / backbone.info.num_params, None, used),
        modules=modules,
        space=None,
        search={"method": "manual", "preset": preset},
    )


#: Presets whose size has a knob: (kwarg, values from largest to smallest structure).
SCALABLE: dict[str, tuple[str, tuple[int, ...]]] = {
    "lora": ("r", tuple(range(64, 0, -1))),
    "adapter": ("bottleneck", tuple(range(256, 0, -1))),
    "lra": ("reduction", tuple(range(1, 1025))),
    "hiwi": ("bottleneck", tuple(range(256, 0, -1))),
    "pafi": ("density", tuple(10 ** (-k / 20) for k in range(20, 141))),  # 0.1 down to 1e-7, 20 steps a decade
}


def scaled_manual(backbone: Backbone, preset: str, relative: float) -> Structure | None:
    """A manual preset resized to the largest version that fits the budget (LoRA rank, adapter
    bottleneck, LRA reduction); None when even the smallest version does not fit."""
    if preset not in SCALABLE:
        raise SearchSpaceError(f"preset {preset!r} has no size knob; scalable presets: {', '.join(SCALABLE)}")
    absolute = absolute_budget(relative, backbone.info.num_params)
    key, values = SCALABLE[preset]

    def sized(value) -> tuple[ModuleChoice, ...] | None:
        try:
            return preset_modules(backbone, preset, {key: value})
        except SearchSpaceError:  # e.g. a reduction that leaves no bottleneck
            return None

    # The first value (largest structure) that fits, by bisection: a structure's size never grows
    # along ``values``, and the values that build nothing (an LRA reduction wider than the width)
    # are a tail, so "builds nothing or fits" is false and then true along it. A linear scan
    # enumerated the whole space up to ~1,000 times (LRA's reductions) for each preset and budget.
    lo, hi = 0, len(values)
    while lo < hi:
        mid = (lo + hi) // 2
        modules = sized(values[mid])
        if modules is None or sum(m.params for m in modules) <= absolute:
            hi = mid
        else:
            lo = mid + 1
    modules = sized(values[lo]) if lo < len(values) else None
    if modules is None:
        return None
    return Structure(
        kind="manual",
        backbone=backbone.info,
        budget=Budget(relative, absolute, sum(m.params for m in modules)),
        modules=modules,
        space=None,
        search={"method": "manual", "preset": preset, "scaled": {key: values[lo]}},
    )
