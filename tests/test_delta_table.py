"""One table, every delta type: exact parameter count, zero-init behaviour, gate 0 is the identity,
folding equals the unmerged model (or a typed refusal), and the delta state saves and loads.

A new type in ``DELTAS`` must add its row here (``test_table_covers_the_registry``): the generic
checks then run on it, PEFT's ``TEST_CASES`` pattern on tiny random backbones."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
import torch.nn as nn

from s3delta_ds.artifacts.merge import merge
from s3delta_ds.backbones import SiteDims, SiteMap, family_for
from s3delta_ds.deltas import DELTAS, FoldError, Slot, resolve
from s3delta_ds.method.supernet import DeltaSpec, GateContext, attach, delta_parameters, freeze_backbone, slots
from s3delta_ds.run.checkpoint import load_deltas, save_deltas

from .helpers import logits_of, tiny_inputs, tiny_model


@dataclass(frozen=True)
class Case:
    """One delta on one site of one tiny backbone."""

    model: str
    site: str
    kwargs: dict[str, Any]
    params: Any
    """Hand-written count: a function of the site's SiteDims."""
    slot: Slot
    zero_init: bool = True
    """Is the fresh delta exactly the identity? (LRA and Adapter are not, by design.)"""
    refusal: str | None = None
    """None: folds; else the FoldError message (regex)."""
    extra: dict[str, Any] = field(default_factory=dict)


def _ceil_density(density):
    return lambda d: math.ceil(density * (d.in_dim * d.out_dim if d.kind == "linear" else d.out_dim))


TABLE: dict[str, list[Case]] = {
    "lora": [
        Case("tiny-t5", "encoder.0.attn.q", {"r": 2, "alpha": 4.0}, lambda d: 2 * (d.in_dim + d.out_dim), Slot.PARALLEL)
    ],
    "bitfit": [
        Case("tiny-bert", "encoder.0.attn.v", {}, lambda d: d.out_dim, Slot.SEQUENTIAL),
        Case("tiny-bert", "encoder.0.attn_norm", {}, lambda d: d.out_dim, Slot.SEQUENTIAL),
        Case("tiny-t5", "encoder.0.attn.v", {}, lambda d: d.out_dim, Slot.SEQUENTIAL, refusal="has no bias"),
        Case("tiny-llama", "decoder.0.mlp_norm", {}, lambda d: d.out_dim, Slot.SEQUENTIAL, refusal="has no bias"),
    ],
    "lnfit": [
        Case("tiny-llama", "decoder.0.attn_norm", {}, lambda d: d.out_dim, Slot.PARALLEL),
        Case("tiny-bert", "encoder.0.mlp_norm", {}, lambda d: d.out_dim, Slot.PARALLEL),
    ],
    "lra": [
        Case(
            "tiny-t5",
            "encoder.0.attn",
            {"reduction": 8, "rank": 2},
            lambda d: (
                (2 * (d.out_dim + d.out_dim // 8) + d.out_dim // 8) + (2 * (d.out_dim // 8 + d.out_dim) + d.out_dim)
            ),
            Slot.SEQUENTIAL,
            zero_init=False,
            refusal="non-linear",
        )
    ],
    "adapter": [
        Case(
            "tiny-llama",
            "decoder.0.mlp",
            {"bottleneck": 4},
            lambda d: 2 * d.out_dim * 4 + 4 + d.out_dim,
            Slot.SEQUENTIAL,
            zero_init=False,
            refusal="non-linear",
        )
    ],
    "pafi": [
        Case("tiny-t5", "encoder.0.mlp.up", {"density": 0.05}, _ceil_density(0.05), Slot.PARALLEL),
        Case("tiny-llama", "decoder.0.mlp_norm", {"density": 0.25}, _ceil_density(0.25), Slot.PARALLEL),
    ],
    "hiwi": [
        Case(
            "tiny-llama",
            "decoder.0.mlp.down",
            {"bottleneck": 2},
            lambda d: 2 * d.in_dim * 2 + 2 + d.in_dim,
            Slot.PARALLEL,
        ),
        Case(
            "tiny-bert",
            "encoder.0.mlp.up",
            {"target": "bias", "bottleneck": 3},
            lambda d: 2 * d.out_dim * 3 + 3 + d.out_dim,
            Slot.PARALLEL,
        ),
    ],
    "ia3": [
        Case("tiny-t5", "encoder.0.attn.k", {}, lambda d: d.out_dim, Slot.SEQUENTIAL),
        Case("tiny-llama", "decoder.0.attn.v", {"position": "output"}, lambda d: d.out_dim, Slot.SEQUENTIAL),
        Case("tiny-bert", "encoder.0.attn.v", {}, lambda d: d.out_dim, Slot.SEQUENTIAL),  # scales the bias too
        Case("tiny-t5", "encoder.0.mlp.down", {"position": "input"}, lambda d: d.in_dim, Slot.INPUT),
        Case("tiny-llama", "decoder.0.mlp.down", {"position": "input"}, lambda d: d.in_dim, Slot.INPUT),
        Case("tiny-bert", "encoder.0.mlp.down", {"position": "input"}, lambda d: d.in_dim, Slot.INPUT),
    ],
}

CASES = [pytest.param(t, c, id=f"{t}-{c.model}-{c.site}") for t, cases in TABLE.items() for c in cases]


def test_table_covers_the_registry():
    assert set(TABLE) == set(DELTAS)
    assert all(TABLE.values()), "every type needs at least one case"
    assert all(any(c.refusal is None for c in TABLE[t]) for t, cls in DELTAS.items() if cls.mergeable)


def _model(name: str) -> nn.Module:
    """A tiny backbone whose biases (BERT's start at 0) are non-zero, so folds that touch them show."""
    model = tiny_model(name)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.add_(torch.randn(module.bias.shape, generator=g) * 0.1)
    return model


def _attached(type_name: str, case: Case, *, gated: bool = False, seed: int = 3):
    """(model, site module, delta, gate context) with the delta's weights made non-zero."""
    model = _model(case.model)
    sm = SiteMap(model, family_for(model.config))
    ctx = GateContext() if gated else None
    torch.manual_seed(seed)
    attach(model, sm, [DeltaSpec(case.site, type_name, case.kwargs, 0 if gated else None)], ctx)
    module = model.get_submodule(sm.path(case.site))
    return model, module, module.s3delta.deltas[type_name], ctx


def _perturb(delta: nn.Module, seed: int = 7) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in delta.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)


def _reference(case: Case) -> torch.Tensor:
    with torch.no_grad():
        return logits_of(_model(case.model), tiny_inputs(case.model))


@pytest.mark.parametrize("type_name,case", CASES)
def test_exact_parameter_count_and_binding(type_name, case):
    _, _, delta, _ = _attached(type_name, case)
    dims: SiteDims = delta.dims
    _, _, n = resolve(type_name, case.kwargs, dims, case.site)
    assert n == case.params(dims) == sum(p.numel() for p in delta.parameters())
    assert delta.slot is case.slot


@pytest.mark.parametrize("type_name,case", CASES)
def test_zero_init_behaviour(type_name, case):
    model, _, _, _ = _attached(type_name, case)
    with torch.no_grad():
        out = logits_of(model, tiny_inputs(case.model))
    if case.zero_init:
        assert torch.equal(out, _reference(case))
    else:
        assert (out - _reference(case)).abs().max() > 0


@pytest.mark.parametrize("type_name,case", CASES)
def test_gate_zero_is_the_identity(type_name, case):
    model, _, delta, ctx = _attached(type_name, case, gated=True)
    _perturb(delta)
    batch = tiny_inputs(case.model)
    with torch.no_grad():
        ctx.z = torch.zeros(1)
        assert torch.equal(logits_of(model, batch), _reference(case))
        ctx.z = torch.ones(1)
        assert (logits_of(model, batch) - _reference(case)).abs().max() > 1e-6


@pytest.mark.parametrize("gate", [1.0, 0.3])
@pytest.mark.parametrize("type_name,case", CASES)
def test_fold_equals_the_unmerged_model_or_is_refused(type_name, case, gate):
    model, module, delta, ctx = _attached(type_name, case, gated=True)
    _perturb(delta)
    batch = tiny_inputs(case.model)
    ctx.z = torch.full((1,), gate)
    if case.refusal is not None:
        with pytest.raises(FoldError, match=case.refusal):
            delta.fold(module, gate)
        return
    with torch.no_grad():
        unmerged = logits_of(model, batch)
    delta.fold(module, gate)
    slot = module.s3delta
    slot.remove(type_name)
    slot.unhook(module)
    assert slots(model) == {}
    with torch.no_grad():
        merged = logits_of(model, batch)
    assert (merged - unmerged).abs().max() < 1e-5
    assert (merged - _reference(case)).abs().max() > 1e-6  # the fold changed the backbone


@pytest.mark.parametrize("type_name,case", CASES)
def test_delta_state_saves_and_loads(type_name, case, tmp_path):
    model, _, delta, _ = _attached(type_name, case)
    _perturb(delta)
    freeze_backbone(model)
    save_deltas(model, tmp_path / "d.safetensors")
    fresh, _, _, _ = _attached(type_name, case, seed=11)
    freeze_backbone(fresh)
    load_deltas(fresh, tmp_path / "d.safetensors")
    assert [(n, p.tolist()) for n, p in delta_parameters(fresh)] == [
        (n, p.tolist()) for n, p in delta_parameters(model)
    ]
    batch = tiny_inputs(case.model)
    with torch.no_grad():
        assert torch.equal(logits_of(fresh, batch), logits_of(model, batch))


# -- several types on one site: the fold order (parallel, input, sequential) is the slot's -----------


@pytest.mark.parametrize(
    "model_name,site,specs,kept",
    [
        # IA3 on an output scales LoRA's and HiWi's update and the bias, then BitFit adds its own
        ("tiny-bert", "encoder.0.attn.v", [("lora", {"r": 2}), ("hiwi", {}), ("ia3", {}), ("bitfit", {})], set()),
        # IA3 on the input scales W's columns after LoRA and PaFi were added
        ("tiny-llama", "decoder.0.mlp.down", [("lora", {"r": 2}), ("pafi", {}), ("ia3", {"position": "input"})], set()),
        # a kept LRA keeps the sequential deltas that feed it, not the input or parallel ones
        (
            "tiny-bert",
            "encoder.0.mlp.down",
            [("lora", {"r": 2}), ("ia3", {"position": "input"}), ("bitfit", {}), ("lra", {"reduction": 8})],
            {"bitfit", "lra"},
        ),
    ],
)
def test_merge_folds_several_types_on_one_site(model_name, site, specs, kept):
    model = _model(model_name)
    sm = SiteMap(model, family_for(model.config))
    torch.manual_seed(2)
    attach(model, sm, [DeltaSpec(site, t, kw) for t, kw in specs])
    for d in model.get_submodule(sm.path(site)).s3delta.deltas.values():
        _perturb(d)
    batch = tiny_inputs(model_name)
    with torch.no_grad():
        unmerged = logits_of(model, batch)
        report = merge(model, sm)
        assert {t for _, t, _ in report.kept} == kept
        assert (logits_of(model, batch) - unmerged).abs().max() < 1e-5


# -- the mixed+ia3 space ---------------------------------------------------------------------------


def test_mixed_ia3_space_adds_keys_values_and_ffn_inputs():
    from s3delta_ds.structure.builders import Backbone

    plan = Backbone.plan("t5-base")
    mixed, with_ia3 = plan.space("mixed"), plan.space("mixed+ia3")
    assert len(mixed) == 436 and len(with_ia3) == 436 + 12 * 2 + 12 * 2 + 24
    assert with_ia3.by_type()["ia3"] == {"count": 72, "params": 24 * (768 + 768) + 24 * 3072}
    by = {(c.site, c.type): c.kwargs for c in with_ia3.candidates}
    assert by[("decoder.5.attn.v", "ia3")] == {"position": "output"}
    assert by[("encoder.0.mlp.down", "ia3")] == {"position": "input"}
    assert not any(c.type == "ia3" and "cross_attn" in c.site for c in with_ia3.candidates)


@pytest.mark.parametrize("name", ["tiny-t5", "tiny-llama", "tiny-bert"])
def test_mixed_ia3_supernet_gates(name):
    from s3delta_ds.method.space import enumerate_space

    model = _model(name)
    sm = SiteMap(model, family_for(model.config))
    space = enumerate_space(model, "mixed+ia3", site_map=sm)
    ctx = GateContext()
    torch.manual_seed(5)
    attach(model, sm, [DeltaSpec(c.site, c.type, c.kwargs, c.index) for c in space.candidates], ctx)
    for slot in slots(model).values():
        _perturb(slot)
    batch = tiny_inputs(name)
    with torch.no_grad():
        ctx.z = torch.zeros(len(space))
        assert torch.equal(logits_of(model, batch), logits_of(_model(name), batch))
    freeze_backbone(model, family_for(model.config).head_modules)
    logits = torch.zeros(len(space), requires_grad=True)
    ctx.z = torch.sigmoid(logits)
    (g,) = torch.autograd.grad(model(**batch).loss, logits)
    ia3 = [c.index for c in space.candidates if c.type == "ia3"]
    assert ia3 and torch.count_nonzero(g[ia3]) == len(ia3)
