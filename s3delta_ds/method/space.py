"""Search spaces: which delta types may go where, written in *roles* so one space fits every
family, and their enumeration on a concrete backbone into candidates with exact parameter counts.

``mixed`` is S3PET-M and ``lora`` is S3PET-L of the original code: on T5-base / T5-large shapes
they give 460 / 916 and 144 / 288 candidates. Enumeration then leaves out the candidates that
provably cannot change the output (``Delta.inert_at``: BitFit on attention keys, wherever attention
is invariant to a key shift), so ``mixed`` has 436 / 868 on those shapes: the original's searches
spent ~10% of their budget on such biases.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch.nn as nn

from ..backbones import Family, SiteMap, family_for
from ..backbones.loading import count_params
from ..deltas import config_kwargs, delta_class, host_of, resolve
from ..errors import SearchSpaceError

_MATMULS = ("attn.proj", "mlp.in", "mlp.out")


@dataclass(frozen=True, slots=True)
class Rule:
    """Put delta ``delta(**kwargs)`` on every site whose component plays one of ``roles`` or is
    one of ``components`` (e.g. ``("attn.q", "attn.v")`` for classic LoRA)."""

    roles: tuple[str, ...]
    delta: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    components: tuple[str, ...] = ()
    foldable_only: bool = False
    """Keep only the sites where the delta folds into the frozen module (``Delta.fold_refusal``):
    BitFit where the module has, or its family can add, a bias that ``from_pretrained`` reloads."""

    def sites(self, site_map: SiteMap, model: nn.Module | None = None):
        wanted = {c for r in self.roles for c in site_map.components_for(r)} | set(self.components)
        sites = [s for s in site_map.sites.values() if s.component in wanted]
        if not self.foldable_only:
            return sites
        if model is None:
            raise SearchSpaceError(f"rule {self.delta} keeps foldable sites only: enumerate it on a model")
        cls = delta_class(self.delta)
        return [s for s in sites if cls.fold_refusal(host_of(model, site_map, s.name)) is None]


# S3PET-M: LoRA r=1 on self-attention q,k,v,o and the FFN in/out projections; BitFit on those
# outputs and on every layer norm; LNFit on every layer norm; LowRankAdapter on whole
# self-attention and FFN outputs. Cross-attention projections, embeddings, lm_head: never.
_MIXED = (
    Rule(_MATMULS, "lora", {"r": 1, "alpha": 16.0}),
    Rule(_MATMULS + ("norm",), "bitfit"),
    Rule(("norm",), "lnfit"),
    Rule(("attn.block", "mlp.block"), "lra", {"reduction": 32, "rank": 1}),
)

SPACES: dict[str, tuple[Rule, ...]] = {
    "mixed": _MIXED,
    # S3PET-L: LoRA r=1 only.
    "lora": (Rule(_MATMULS, "lora", {"r": 1, "alpha": 16.0}),),
    # mixed plus Houlsby adapters (bottleneck 24) on whole sublayers.
    "mixed+adapter": _MIXED + (Rule(("attn.block", "mlp.block"), "adapter", {"bottleneck": 24}),),
    # mixed plus the zero-latency types of Liao et al. 2023: PaFi (sparse smallest-|w| entries of
    # every projection, per-matrix ranking so counts come from shapes) and HiWi on FFN weights.
    "mixed+pafi+hiwi": _MIXED
    + (
        Rule(_MATMULS, "pafi", {"density": 1 / 512}),
        Rule(("mlp.in", "mlp.out"), "hiwi", {"target": "weight", "bottleneck": 1}),
    ),
    # mixed plus (IA)³ as in its paper: scales on self-attention keys and values (their outputs) and
    # on the FFN inner activations (the input of the down projection, role mlp.out).
    "mixed+ia3": _MIXED
    + (
        Rule((), "ia3", {"position": "output"}, components=("attn.k", "attn.v")),
        Rule(("mlp.out",), "ia3", {"position": "input"}),
    ),
    # Deployable: only types that fold into the backbone (zero added latency; `export --merge` gives a
    # plain HF model): LoRA, LNFit, IA3, PaFi, HiWi, and BitFit where a reloadable bias can hold it
    # (BERT everywhere, LLaMA projections through attention_bias/mlp_bias; never T5 or RMSNorm).
    "mergeable": (
        Rule(_MATMULS, "lora", {"r": 1, "alpha": 16.0}),
        Rule(_MATMULS + ("norm",), "bitfit", foldable_only=True),
        Rule(("norm",), "lnfit"),
        Rule((), "ia3", {"position": "output"}, components=("attn.k", "attn.v")),
        Rule(("mlp.out",), "ia3", {"position": "input"}),
        Rule(_MATMULS, "pafi", {"density": 1 / 512}),
        Rule(("mlp.in", "mlp.out"), "hiwi", {"target": "weight", "bottleneck": 1}),
    ),
    # Cheap vector-only deltas: BitFit and LNFit.
    "bias": (Rule(_MATMULS + ("norm",), "bitfit"), Rule(("norm",), "lnfit")),
}


@dataclass(frozen=True, slots=True)
class Candidate:
    """One (site, delta type, kwargs) choice the search can switch on, with its cost."""

    index: int
    site: str
    type: str
    kwargs: Mapping[str, Any]
    params: int

    @property
    def key(self) -> tuple[str, str]:
        return (self.site, self.type)


@dataclass(frozen=True)
class SearchSpace:
    """The enumerated candidates of one space on one backbone."""

    name: str
    family: Family
    site_map: SiteMap
    backbone_params: int
    candidates: tuple[Candidate, ...]
    inert: tuple[tuple[str, str, str], ...] = ()
    """(site, delta type, why) of every rule match left out because it cannot change the output."""

    def __len__(self) -> int:
        return len(self.candidates)

    @property
    def params(self) -> list[int]:
        """n_i of every candidate, in candidate order."""
        return [c.params for c in self.candidates]

    @property
    def total_params(self) -> int:
        return sum(self.params)

    def by_type(self) -> dict[str, dict[str, int]]:
        count, params = Counter(), Counter()
        for c in self.candidates:
            count[c.type] += 1
            params[c.type] += c.params
        return {t: {"count": count[t], "params": params[t]} for t in count}

    def summary(self) -> dict[str, Any]:
        return {
            "family": self.family.name,
            "space": self.name,
            "backbone_params": self.backbone_params,
            "candidates": len(self.candidates),
            "params": self.total_params,
            "fraction_of_backbone": self.total_params / self.backbone_params,
            "depths": dict(self.site_map.depths),
            "by_type": self.by_type(),
            "inert_left_out": len(self.inert),
        }


def backbone_params(model: nn.Module, family: Family) -> int:
    """All backbone parameters, not counting a task head the family trains anyway."""
    return count_params(model, exclude_prefixes=family.head_modules)


def rules_of(space: str) -> tuple[Rule, ...]:
    try:
        return SPACES[space]
    except KeyError:
        raise SearchSpaceError(f"unknown search space {space!r}; known spaces: {', '.join(SPACES)}") from None


def enumerate_space(
    model: nn.Module, space: str, *, family: Family | None = None, site_map: SiteMap | None = None
) -> SearchSpace:
    """Every candidate of ``space`` on ``model`` (any device, meta included; ZeRO-3-partitioned too).

    Candidates are ordered by site (stacks, then layers, then the family's component order) and,
    within a site, by the space's rule order, so indices are stable across runs and ranks.
    """
    family = family or family_for(model.config)
    site_map = site_map or SiteMap(model, family)
    inert: list[tuple[str, str, str]] = []
    candidates = enumerate_rules(site_map, rules_of(space), model, inert=inert)
    if not candidates:
        raise SearchSpaceError(f"search space {space!r} has no candidates on this {family.name} backbone")
    return SearchSpace(space, family, site_map, backbone_params(model, family), candidates, tuple(inert))


def enumerate_rules(
    site_map: SiteMap,
    rules: tuple[Rule, ...],
    model: nn.Module | None = None,
    *,
    inert: list[tuple[str, str, str]] | None = None,
) -> tuple[Candidate, ...]:
    """Candidates of ``rules`` on a site map, in canonical order (see :func:`enumerate_space`).
    ``model``: the site map's model, for rules that keep foldable sites only. ``inert``: a list to
    leave out the matches that cannot change the output, appending (site, type, why) for each (search
    spaces); None keeps every match (manual presets count as their papers do)."""
    per_site: dict[str, list[tuple[str, dict, int]]] = {}
    for rule in rules:
        for site in rule.sites(site_map, model):
            if inert is not None and (why := delta_class(rule.delta).inert_at(site, site_map)) is not None:
                inert.append((site.name, rule.delta, why))
                continue
            _, cfg, n = resolve(rule.delta, rule.kwargs, site.dims, site.name)
            per_site.setdefault(site.name, []).append((rule.delta, config_kwargs(cfg), n))
    candidates = []
    for site_name in site_map.sites:
        for type_name, kwargs, n in per_site.get(site_name, ()):
            candidates.append(Candidate(len(candidates), site_name, type_name, kwargs, n))
    return tuple(candidates)
