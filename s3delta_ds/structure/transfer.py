"""Transfer a structure to another backbone of the same family (T5-base 12+12 → T5-XXL 24+24,
LLaMA 32 → 80 layers), or re-discretise it at other budgets, from the gate probabilities it stores.

Mapping rule (``overlap-mean``): layer t of a stack with T layers covers the relative-depth interval
[t/T, (t+1)/T). A target candidate's p is the overlap-weighted mean of the p of the source
candidates with the same component and delta type whose layer intervals overlap its own. So
12 → 24 copies each p to two layers, 24 → 12 averages pairs, and 32 → 80 blends neighbours.
Per-stack candidates (``final_norm``) map one to one. A target component the source lacks (T5
v1.0 → v1.1 adds ``mlp.gate``) takes the p of the source components with the same role. Parameter
counts are recomputed on the target's shapes, then the greedy knapsack re-discretises at the budget;
a target candidate nothing maps to (p = 0) is never chosen.

A manual preset (``s3delta structure manual``, scaled or not, all of it and nothing else) is
rebuilt on the target: the same rules on the target's sites, so a component the source lacks
(v1.1's ``mlp.gate``) is covered whenever the preset covers its role. A random baseline is drawn
again on the target with its space and seed, at its relative budget (or ``budget``): it exists to
sit at the budget of what it is compared with. Any other structure without probabilities (edited
by hand) transfers its modules as they are: each goes to every target layer its source layer
overlaps, and it cannot be re-discretised. A searched structure's candidates that map nowhere on
the target (v1.1's ``mlp.gate`` on v1.0) are listed in the provenance (``unmapped_source``). A
per-matrix PaFi module's position count is recomputed from its density on the target's matrix.
Globally ranked PaFi is refused: its positions come from the source's weights (``s3delta
pafi-mask`` makes the target's).
"""

from __future__ import annotations

import json
from collections import defaultdict

from ..backbones import parse_site
from ..deltas import resolve
from ..errors import BudgetError, S3DeltaError, SearchSpaceError, StructureError
from ..method.gates import discretise
from ..method.space import Candidate, SearchSpace, rules_of
from . import Budget, ModuleChoice, Structure
from .builders import (
    MANUAL_PRESETS,
    Backbone,
    absolute_budget,
    budget_range,
    from_indices,
    preset_modules,
    random_baseline,
)

RULE = "overlap-mean"


def _interval(layer: int, depth: int) -> tuple[float, float]:
    return layer / depth, (layer + 1) / depth


def _overlap(a: tuple[float, float], b: tuple[float, float]) -> float:
    return max(0.0, min(a[1], b[1]) - max(a[0], b[0]))


def _source_table(source: Structure, field: str) -> dict[tuple[str, str, str], dict[int | None, float]]:
    """(stack, component, type) → {layer: the candidate's ``field``} (p, or alpha: 0 where none is stored)."""
    table: dict[tuple[str, str, str], dict[int | None, float]] = defaultdict(dict)
    for c in source.candidates:
        stack, layer, component = parse_site(c.site)
        table[(stack, component, c.type)][layer] = getattr(c, field) or 0.0
    return table


def map_probabilities(source: Structure, space: SearchSpace) -> tuple[list[float], dict[str, int]]:
    """p for every candidate of the target ``space`` (see the module docstring for the rule)."""
    return _map_field(source, space, "p")


def _source_keys(cand: Candidate, table, roles, role_of) -> list[tuple[str, str, str]]:
    """The source's (stack, component, type) entries a target candidate takes its value from: its
    own component, else the components of the same role (v1.1's mlp.gate from v1.0's mlp.up)."""
    stack, _, component = parse_site(cand.site)
    keys = [(stack, component, cand.type)]
    if keys[0] not in table and component in role_of:
        keys = [(stack, c, cand.type) for c in roles[role_of[component]]]
    return [k for k in keys if k in table]


def _roles(space: SearchSpace):
    roles = space.family.roles(space.site_map.config)
    return roles, {c: r for r, comps in roles.items() for c in comps}


def _unmapped_source(source: Structure, space: SearchSpace) -> list[str]:
    """The source's candidate groups no target candidate reads (e.g. v1.1's ``mlp.gate`` on v1.0,
    whose one FFN input maps from ``mlp.up``), as ``stack.*.component type``: their gates are lost."""
    table = _source_table(source, "p")
    roles, role_of = _roles(space)
    used = {k for cand in space.candidates for k in _source_keys(cand, table, roles, role_of)}
    return sorted(f"{stack}.*.{component} {type_name}" for stack, component, type_name in set(table) - used)


def _map_field(source: Structure, space: SearchSpace, field: str) -> tuple[list[float], dict[str, int]]:
    table = _source_table(source, field)
    depths = source.backbone.depths
    roles, role_of = _roles(space)
    stats = {"matched": 0, "by_role": 0, "unmatched": 0}
    p_out = []
    for cand in space.candidates:
        stack, layer, component = parse_site(cand.site)
        keys = _source_keys(cand, table, roles, role_of)
        if not keys:
            p_out.append(0.0)
            stats["unmatched"] += 1
            continue
        stats["matched" if keys[0][1] == component else "by_role"] += 1
        values = []
        for key in keys:
            src = table[key]
            if layer is None:
                values.append(src.get(None, 0.0))
                continue
            target = _interval(layer, space.site_map.depths[stack])
            weights = {s: _overlap(target, _interval(s, depths[stack])) for s in src if s is not None}
            total = sum(weights.values())
            values.append(sum(w * src[s] for s, w in weights.items()) / total if total > 0 else 0.0)
        p_out.append(sum(values) / len(values))
    return p_out, stats


def _check_compatible(source: Structure, target: Backbone) -> None:
    global_pafi = [m.site for m in source.modules if m.type == "pafi" and m.kwargs.get("ranking") == "global"]
    if global_pafi:
        raise StructureError(
            f"the structure holds globally ranked PaFi modules ({global_pafi[0]}, ...): their positions and counts "
            "come from the source's weights, not its shapes. Build the target's own with "
            "`s3delta pafi-mask TARGET --density D -o MASK --structure OUT.json`"
        )
    if source.backbone.family != target.family.name:
        raise StructureError(
            f"cannot transfer a {source.backbone.family} structure to a {target.family.name} backbone: no mapping "
            f"between these families (sites are only mapped within a family)"
        )
    missing = sorted(set(source.backbone.depths) - set(target.site_map.depths))
    if missing:
        raise StructureError(f"the target backbone has no {', '.join(missing)} stack(s), which the structure uses")
    if source.candidates:
        return  # a searched structure maps its candidates; what maps nowhere is counted in provenance
    target_components = {s.component for s in target.site_map.sites.values()}
    role_components = {c for comps in target.family.roles(target.config).values() for c in comps}
    unknown = sorted(
        {m.site for m in source.modules if parse_site(m.site)[2] not in target_components | role_components}
    )
    if unknown:
        raise StructureError(f"sites unknown on the target backbone: {', '.join(unknown[:8])}")


def transfer(source: Structure, target: Backbone, budget: float | None = None) -> Structure:
    """Map ``source`` onto ``target`` and re-discretise at ``budget`` (relative; default: the
    source's relative budget).

    Raises:
        StructureError: other family, a missing stack, a stack without layers, sites the target
            does not have, a source without gate probabilities asked to meet a new budget, or
            nothing mapped (a structure with no modules would only be refused by the retrain).
        BudgetError: the budget is impossible on the target.
    """
    name = target.info.name_or_path
    empty = sorted(stack for stack, depth in target.info.depths.items() if depth < 1)
    if empty:  # the file written would not load again (depths must be positive)
        stacks = " and ".join(empty) + (" stacks" if len(empty) > 1 else " stack")
        raise StructureError(f"{name} has no layers in its {stacks}: nothing to transfer onto")
    out = _transfer(source, target, budget)
    if not out.modules:
        raise StructureError(f"no module of the source structure maps onto {name}: the transferred structure is empty")
    return out


def _transfer(source: Structure, target: Backbone, budget: float | None) -> Structure:
    _check_compatible(source, target)
    redraw = _is_random_draw(source)
    if not source.candidates and budget is not None and not redraw:  # manual: no probabilities to re-discretise
        raise StructureError(
            f"the source structure ({source.kind}) stores no gate probabilities, so it cannot be "
            "re-discretised at a new budget: transfer it without --budget"
        )
    provenance = {
        "source": {
            "digest": source.digest(),
            "backbone": source.backbone.name_or_path,
            "config_hash": source.backbone.config_hash,
            "depths": dict(source.backbone.depths),
            "kind": source.kind,
            "budget": source.budget.relative,
        },
        "rule": RULE,
    }
    if redraw:
        try:
            return _redrawn(source, target, budget, provenance)
        except BudgetError as e:
            if budget is not None:
                raise
            fits = budget_range(target.space(source.space).params, target.info.num_params)
            if fits is None:  # one candidate: nothing to draw at any budget
                raise
            raise BudgetError(
                f"{e} (the source's relative budget, {source.budget.relative:g}, on {target.info.name_or_path}): "
                f"pass --budget (budget= in Python) for the target in [{fits[0]:.3g}, {fits[1]:.3g}] (from its "
                "cheapest candidate to just under all of them)"
            ) from e
    if any(m.type == "pafi" and m.kwargs.get("count") for m in source.modules):
        # the counts are recounted from the densities below: one that is not its density's (set by
        # hand) would change size silently, so check them on the source's own backbone if at hand
        planned = _source_backbone(source)
        if planned is not None:
            source.check_backbone(planned.site_map)
    if not source.candidates:
        rebuilt = _rebuilt_preset(source, target, provenance)
        if rebuilt is not None:
            return rebuilt
        # Its modules are all it says: "not chosen" is all that is known of the rest (a random
        # structure has a space but no probabilities, and must not read as p = 1 for its roles).
        return _transfer_modules(source, target, provenance)
    rules_of(source.space)
    space = target.space(source.space)
    p, stats = map_probabilities(source, space)
    unmapped = _unmapped_source(source, space)
    if unmapped:  # e.g. v1.1's mlp.gate onto v1.0, whose one FFN input maps from v1.1's mlp.up
        stats["unmapped_source"] = unmapped
    # the logits by the same rule: ties in p (gates saturated at 1, or clamped at sigmoid(-200)) go
    # to the higher logit, as when the search discretised, not to site order
    alpha, _ = _map_field(source, space, "alpha")
    relative = budget if budget is not None else source.budget.relative
    if relative is None:
        raise StructureError("the source structure records no relative budget: pass --budget")
    absolute = absolute_budget(relative, target.info.num_params)
    # A candidate no source candidate maps to (p = 0) is never chosen: it would only fill the
    # leftover budget in site order, encoder first.
    chosen = [i for i in discretise(p, space.params, absolute, logits=alpha, allow_all=True) if p[i] > 0]
    provenance |= {"budget_rule": "explicit" if budget is not None else "same relative budget", **stats}
    return from_indices(
        space,
        target.info,
        chosen,
        kind="transferred",
        relative=relative,
        absolute=absolute,
        p=p,
        alpha=alpha,
        search=dict(source.search),
        provenance=provenance,
    )


def _is_random_draw(source: Structure) -> bool:
    """A random baseline that records what drew it (its space and seed) and has no gates."""
    seed = source.search.get("seed")
    return (
        source.search.get("method") == "random"
        and not source.candidates
        and source.space is not None
        and isinstance(seed, int)
        and not isinstance(seed, bool)
    )


def _redrawn(source: Structure, target: Backbone, budget: float | None, provenance: dict) -> Structure:
    """A random baseline drawn again on the target: the same space, seed and relative budget.

    Mapping its modules layer by layer would keep its sites but not its budget (each goes to every
    target layer it overlaps: LLaMA-2-70B at 1e-4 onto 7B lands at 4.4e-4), and a random baseline
    exists to sit at the budget of the structure it is compared with."""
    relative = budget if budget is not None else source.budget.relative
    if relative is None:
        raise StructureError("the source structure records no relative budget: pass --budget")
    rules_of(source.space)
    drawn = random_baseline(target.space(source.space), target.info, relative, source.search["seed"])
    return Structure(
        kind="transferred",
        backbone=drawn.backbone,
        budget=drawn.budget,
        modules=drawn.modules,
        space=drawn.space,
        search=dict(source.search),
        provenance=provenance
        | {
            "rule": "random redrawn on the target (same space, seed and relative budget)",
            "budget_rule": "explicit" if budget is not None else "same relative budget",
        },
    )


def _module_keys(modules, role_of: dict[str, str]) -> dict[tuple, set]:
    """(stack, role, stack-level?, type, kwargs) -> the layers holding it."""
    out: dict[tuple, set] = defaultdict(set)
    for m in modules:
        stack, layer, component = parse_site(m.site)
        # a stack-level site (final_norm) apart from its role's per-layer ones (the layer norms)
        key = (stack, role_of.get(component, component), layer is None, m.type, repr(sorted(m.kwargs.items())))
        out[key].add(layer)
    return out


def _source_backbone(source: Structure) -> Backbone | None:
    """The source's backbone planned from its recorded name (no weights), when its config is at hand
    and still the one the structure was made on; else None."""
    try:
        planned = Backbone.plan(source.backbone.name_or_path)
    except (S3DeltaError, OSError, ValueError):
        return None
    return planned if planned.info.config_hash == source.backbone.config_hash else None


def _is_whole_preset(source: Structure, target: Backbone, made: tuple[ModuleChoice, ...], preset: str, overrides):
    """Does ``source`` hold everything its preset makes, on every layer? Exactly, when the source
    backbone can be planned (its config is at hand); else: the same (stack, role, type, settings)
    as the preset makes on the target, each on every layer of its stack (roles, not components: a
    v1.0 source has no mlp.gate; so one component dropped beside another of its role goes unseen)."""
    planned = _source_backbone(source)
    try:
        own = None if planned is None else preset_modules(planned, preset, overrides)
    except SearchSpaceError:
        own = None
    if own is not None:
        canonical = lambda ms: sorted(json.dumps(m.to_dict(), sort_keys=True) for m in ms)  # noqa: E731
        return canonical(own) == canonical(source.modules)
    role_of = {c: r for r, comps in target.family.roles(target.config).items() for c in comps}
    have, want = _module_keys(source.modules, role_of), _module_keys(made, role_of)
    if set(have) != set(want):
        return False
    depths = source.backbone.depths
    return all(layers == {None} or layers == set(range(depths[key[0]])) for key, layers in have.items())


def _rebuilt_preset(source: Structure, target: Backbone, provenance: dict) -> Structure | None:
    """A manual preset's structure built on the target with the source's settings, or None when
    ``source`` is not one: no preset recorded, or not all of it and nothing else (edited by hand:
    a module removed, or a whole stack; those transfer module by module).

    Mapping its modules site by site would miss what the source backbone lacks: a preset on every
    FFN projection of T5 v1.0 covers ``mlp.up`` only, and on v1.1 it must also cover ``mlp.gate``."""
    preset = source.search.get("preset") if source.search.get("method") == "manual" else None
    if preset not in MANUAL_PRESETS:
        return None
    overrides = dict(source.search.get("scaled") or {})
    try:
        modules = preset_modules(target, preset, overrides)
    except SearchSpaceError:
        return None
    if not _is_whole_preset(source, target, modules, preset, overrides):
        return None
    used = sum(m.params for m in modules)
    return Structure(
        kind="transferred",
        backbone=target.info,
        budget=Budget(used / target.info.num_params, None, used),
        modules=modules,
        space=None,
        search=dict(source.search),
        provenance=provenance | {"rule": "preset rebuilt on the target"},
    )


def _transfer_modules(source: Structure, target: Backbone, provenance: dict) -> Structure:
    """A structure without probabilities (manual, random): every target layer whose interval
    overlaps a chosen source layer gets the module (p = 1 there), with the settings (e.g. LoRA's
    rank) of the source layer it overlaps most, at the target's own parameter counts."""
    kwargs_of: dict[tuple[str, str, str], dict[int | None, dict]] = defaultdict(dict)
    for m in source.modules:
        stack, layer, component = parse_site(m.site)
        kwargs_of[(stack, component, m.type)][layer] = m.kwargs
    candidates = []
    for key in sorted(kwargs_of, key=str):
        stack, component, type_name = key
        by_layer = kwargs_of[key]
        layers = [None] if None in by_layer else range(target.site_map.depths[stack])
        for layer in layers:
            kwargs = by_layer.get(None)
            if layer is not None:
                t = _interval(layer, target.site_map.depths[stack])
                overlaps = {s: _overlap(t, _interval(s, source.backbone.depths[stack])) for s in by_layer}
                best = max(sorted(overlaps), key=lambda s: overlaps[s])  # ties: the lower source layer
                if overlaps[best] <= 0:
                    continue
                kwargs = by_layer[best]
            if type_name == "pafi" and kwargs.get("count"):
                # a per-matrix count is the source matrix's share of its density (PaFi refuses any
                # other; transfer() checked the source when it could): recount on the target's
                kwargs = {k: v for k, v in kwargs.items() if k != "count"}
            site = f"{stack}.{component}" if layer is None else f"{stack}.{layer}.{component}"
            dims = target.site_map.site(site).dims
            _, _, n = resolve(type_name, kwargs, dims, site)
            candidates.append(Candidate(len(candidates), site, type_name, kwargs, n))
    order = {name: i for i, name in enumerate(target.site_map.sites)}
    candidates.sort(key=lambda c: (order[c.site], c.type))
    candidates = [Candidate(i, c.site, c.type, c.kwargs, c.params) for i, c in enumerate(candidates)]
    space = SearchSpace("manual", target.family, target.site_map, target.info.num_params, tuple(candidates))
    used = sum(c.params for c in candidates)
    structure = from_indices(
        space,
        target.info,
        range(len(candidates)),
        kind="transferred",
        relative=used / target.info.num_params,
        absolute=None,
        search=dict(source.search),
        provenance=provenance,
    )
    return Structure(
        kind=structure.kind,
        backbone=structure.backbone,
        budget=structure.budget,
        modules=structure.modules,
        space=None,
        search=structure.search,
        provenance=structure.provenance,
    )


def rediscretise(structure: Structure, relative: float, target: Backbone | None = None) -> Structure:
    """The structure the same search gives at another budget, from its stored p (no re-search).

    On its own backbone (``target`` None) the stored candidates hold everything needed, sizes
    included: nothing is loaded, so a structure of a GGUF directory, of a relative path written
    elsewhere, or of a hub id on an offline machine re-discretises too. With ``target``: ``transfer``.
    """
    if not structure.candidates:
        raise StructureError("the structure stores no gate probabilities (candidates): it cannot be re-discretised")
    if target is not None:
        return transfer(structure, target, budget=relative)
    absolute = absolute_budget(relative, structure.backbone.num_params)
    p = [c.p for c in structure.candidates]
    params = [c.params for c in structure.candidates]
    alpha = [c.alpha for c in structure.candidates]
    chosen = [i for i in discretise(p, params, absolute, logits=alpha, allow_all=True) if p[i] > 0]
    modules = tuple(ModuleChoice(c.site, c.type, c.kwargs, c.params) for c in (structure.candidates[i] for i in chosen))
    used = sum(m.params for m in modules)
    return Structure(  # created and versions: now
        kind=structure.kind,
        backbone=structure.backbone,
        budget=Budget(relative, absolute, used),
        modules=modules,
        space=structure.space,
        candidates=structure.candidates,
        search=dict(structure.search),
        provenance={
            **structure.provenance,
            "rediscretised": {"source_digest": structure.digest(), "source_budget": structure.budget.relative},
        },
    )
