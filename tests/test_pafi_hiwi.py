"""PaFi (sparse smallest-magnitude fine-tuning) and HiWi (adapters on weights): masks, counts,
init, what changes, and their place in a search space."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from s3delta_ds.backbones import SiteDims, SiteMap, family_for
from s3delta_ds.deltas import resolve
from s3delta_ds.deltas.pafi import smallest_magnitude
from s3delta_ds.errors import SearchSpaceError, StructureError
from s3delta_ds.method.supernet import DeltaSpec, attach, delta_parameters
from s3delta_ds.structure import Structure
from s3delta_ds.structure.builders import Backbone
from s3delta_ds.structure.pafi import check_weights, compute_mask, load_mask, mask_structure, save_mask, weights_probe

from .helpers import logits_of, tiny_inputs, tiny_model


def _with_map(name):
    m = tiny_model(name)
    return m, SiteMap(m, family_for(m.config))


def test_smallest_magnitude_ties_and_order():
    w = torch.tensor([[0.5, -0.1, 0.3], [0.1, -2.0, 0.0]])
    assert smallest_magnitude(w, 3).tolist() == [1, 3, 5]  # 0.0 (5), then the tie 0.1 (1) and 0.1 (3)


def test_global_mask_takes_the_globally_smallest_entries():
    m, sm = _with_map("tiny-t5")
    mask = compute_mask(m, sm, density=0.01, ranking="global")
    again = compute_mask(m, sm, density=0.01, ranking="global")
    assert mask.keys() == again.keys() and all(torch.equal(mask[k], again[k]) for k in mask)  # data-free, deterministic
    sites = [s for s in sm.sites.values() if s.dims.kind == "linear" and not s.component.startswith("cross_attn")]
    total = sum(s.dims.in_dim * s.dims.out_dim for s in sites)
    assert sum(v.numel() for v in mask.values()) == math.ceil(0.01 * total)
    chosen, rest = [], []
    for s in sites:
        w = m.get_submodule(s.path).weight.detach().reshape(-1).abs()
        sel = torch.zeros_like(w, dtype=torch.bool)
        if s.name in mask:
            sel[mask[s.name]] = True
        chosen.append(w[sel])
        rest.append(w[~sel])
    assert torch.cat(chosen).max() <= torch.cat(rest).min()


def test_per_matrix_mask_and_norm_eligibility():
    m, sm = _with_map("tiny-llama")
    mask = compute_mask(m, sm, density=0.05, ranking="per-matrix", eligible=("linear", "norm"))
    site = sm.site("decoder.0.mlp.up")
    assert mask[site.name].numel() == math.ceil(0.05 * site.dims.in_dim * site.dims.out_dim)
    assert "decoder.0.attn_norm" in mask and mask["decoder.0.attn_norm"].numel() == math.ceil(0.05 * 64)


def test_no_eligible_kind_is_refused_by_name():
    from s3delta_ds.errors import ConfigError

    m, sm = _with_map("tiny-t5")
    with pytest.raises(ConfigError, match="at least one eligible kind"):
        compute_mask(m, sm, density=0.01, eligible=())


def test_mask_file_is_shared_and_refused_for_another_backbone(tmp_path):
    m, sm = _with_map("tiny-t5")
    plan = Backbone.from_model(m, "tiny-t5")
    mask = compute_mask(m, sm, density=0.02)
    save_mask(mask, tmp_path / "mask.safetensors", backbone=plan, density=0.02, ranking="global", eligible=("linear",))
    loaded, meta = load_mask(tmp_path / "mask.safetensors", plan)
    assert all(torch.equal(loaded[k], mask[k]) for k in mask) and meta["ranking"] == "global"
    structure = mask_structure(plan, loaded, meta)
    assert structure.budget.used == sum(v.numel() for v in mask.values())
    other = Backbone.plan("tiny-t5-v1_1")
    with pytest.raises(StructureError, match="compute a mask for this backbone"):
        load_mask(tmp_path / "mask.safetensors", other)


def test_mask_of_other_weights_with_the_same_config_is_refused(tmp_path):
    """A fine-tune shares its base's config hash; its smallest entries are not the base's, so a
    mask ranked on one must not train the other. Another dtype of the same weights is accepted."""
    import s3delta_ds

    m, sm = _with_map("tiny-t5")
    plan = Backbone.from_model(m, "tiny-t5")
    mask = compute_mask(m, sm, density=0.02)
    path = tmp_path / "mask.safetensors"
    probe = weights_probe(m, sm, mask)
    assert len(probe) == 2 and all(len(p["value"]) == 16 for p in probe.values())
    save_mask(mask, path, backbone=plan, density=0.02, ranking="global", eligible=("linear",), probe=probe)
    _, meta = load_mask(path, plan)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):  # the same weights, rounded
        same = tiny_model("tiny-t5").to(dtype)
        check_weights(meta, same, SiteMap(same, family_for(same.config)), path)
    tuned = tiny_model("tiny-t5")
    with torch.no_grad():
        g = torch.Generator().manual_seed(3)
        for p in tuned.parameters():  # a small fine-tune: 1e-4 against weights of ~0.05
            p.add_(1e-4 * torch.randn(p.shape, generator=g))
    other = tiny_model("tiny-t5", seed=1)
    for model in (tuned, other):
        assert Backbone.from_model(model, "tiny-t5").info.config_hash == plan.info.config_hash
        with pytest.raises(StructureError, match="ranked on other weights.*s3delta pafi-mask"):
            check_weights(meta, model, SiteMap(model, family_for(model.config)), path)
        structure = mask_structure(plan, *load_mask(path, plan))
        with pytest.raises(StructureError, match="ranked on other weights"):
            s3delta_ds.attach(model, structure, pafi_mask=str(path))
    del meta["weights_probe"]  # a mask written before the probe existed: not checked
    check_weights(meta, other, SiteMap(other, family_for(other.config)), path)


def test_pafi_trains_only_its_entries_and_merges_exactly():
    m, sm = _with_map("tiny-t5")
    site = sm.site("encoder.0.mlp.up")
    attach(m, sm, [DeltaSpec(site.name, "pafi", {"density": 0.05})])
    module = m.get_submodule(site.path)
    d = module.s3delta.deltas["pafi"]
    n = math.ceil(0.05 * site.dims.in_dim * site.dims.out_dim)
    assert d.values.numel() == n and [p.numel() for _, p in delta_parameters(m)] == [n]  # no dense copy
    assert torch.equal(d.indices, smallest_magnitude(module.weight, n))
    with torch.no_grad():
        d.values.normal_()
    x = torch.randn(3, site.dims.in_dim)
    w_eff = module.weight.detach().clone().reshape(-1)
    w_eff[d.indices] += d.values.detach()
    assert torch.allclose(module(x), x @ w_eff.view_as(module.weight).T, atol=1e-5)
    changed = torch.nonzero(d.dense().reshape(-1)).flatten()
    assert set(changed.tolist()) <= set(d.indices.tolist())


def test_hiwi_counts_init_and_bias_variant():
    dims = SiteDims("linear", 64, 128)
    cls, cfg, n = resolve("hiwi", {"bottleneck": 4}, dims, "s")
    assert n == 2 * 64 * 4 + 4 + 64 and cls.stored_params(dims, cfg) == 64 * 128
    _, cfg_b, n_b = resolve("hiwi", {"target": "bias", "bottleneck": 4}, dims, "s")
    assert n_b == 2 * 128 * 4 + 4 + 128 and cls.stored_params(dims, cfg_b) == 128
    # zero-initialised up projection: the model is unchanged at init
    m, sm = _with_map("tiny-llama")
    batch = tiny_inputs("tiny-llama")
    with torch.no_grad():
        ref = logits_of(m, batch)
        attach(
            m,
            sm,
            [
                DeltaSpec("decoder.0.mlp.up", "hiwi", {"bottleneck": 2}),
                DeltaSpec("decoder.1.mlp.down", "hiwi", {"bottleneck": 2}),
            ],
        )
        assert torch.equal(logits_of(m, batch), ref)
    # T5/LLaMA FFN linears have no bias: the bias variant is refused with the reason
    with pytest.raises(SearchSpaceError, match="needs a Linear with a bias"):
        attach(m, sm, [DeltaSpec("decoder.0.mlp.gate", "hiwi", {"target": "bias"})])


def test_hiwi_weight_formula():
    m, sm = _with_map("tiny-bert")
    site = sm.site("encoder.0.mlp.up")
    attach(m, sm, [DeltaSpec(site.name, "hiwi", {"bottleneck": 3, "activation": "relu"})])
    module = m.get_submodule(site.path)
    h = module.s3delta.deltas["hiwi"]
    with torch.no_grad():
        for p in h.parameters():
            p.normal_()
    W = module.weight.detach()
    f = torch.relu(W @ h.A + h.a) @ h.B + h.c
    x = torch.randn(2, site.dims.in_dim)
    assert torch.allclose(module(x), x @ (W + f).T + module.bias, atol=1e-4)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-t5"])
def test_hiwi_read_by_columns_counts_its_width_and_merges_exactly(name):
    """tokens=columns: the paper's x W1 reading, each of W's in_dim columns a token of width out_dim."""
    from s3delta_ds.artifacts.merge import merge

    m, sm = _with_map(name)
    site = next(s for s in sm.sites.values() if s.component == "mlp.up" and s.dims.in_dim != s.dims.out_dim)
    dims = site.dims
    _, cfg, n = resolve("hiwi", {"bottleneck": 3, "tokens": "columns"}, dims, site.name)
    assert n == 2 * dims.out_dim * 3 + 3 + dims.out_dim
    attach(m, sm, [DeltaSpec(site.name, "hiwi", {"bottleneck": 3, "tokens": "columns"})])
    module = m.get_submodule(site.path)
    h = module.s3delta.deltas["hiwi"]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in h.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    W = module.weight.detach().clone()
    f = (torch.relu(W.T @ h.A + h.a) @ h.B + h.c).T
    x = torch.randn(2, dims.in_dim, generator=g)
    assert torch.allclose(module(x), x @ (W + f).T, atol=1e-5)
    batch = tiny_inputs(name)
    with torch.no_grad():
        unmerged = logits_of(m, batch)
        merge(m, sm)
        assert torch.allclose(module.weight, W + f, atol=1e-6)
        assert (logits_of(m, batch) - unmerged).abs().max() < 1e-5
    with pytest.raises(SearchSpaceError, match="tokens must be one of rows, columns"):
        resolve("hiwi", {"tokens": "cols"}, dims, site.name)


def test_space_with_pafi_and_hiwi_accounts_trainable_parameters():
    s = Backbone.plan("t5-base").space("mixed+pafi+hiwi")
    by = {(c.site, c.type): c.params for c in s.candidates}
    assert by[("encoder.0.attn.q", "pafi")] == math.ceil(768 * 768 / 512)
    assert by[("encoder.0.mlp.up", "hiwi")] == 2 * 768 + 1 + 768  # trainable, not the 768 x 3072 it stores
    assert by[("encoder.0.mlp.down", "hiwi")] == 2 * 3072 + 1 + 3072
    assert len(s) == 436 + 144 + 48


def test_search_step_with_pafi_and_hiwi_candidates_moves_their_gates():
    m, sm = _with_map("tiny-t5")
    from s3delta_ds.method.space import enumerate_space
    from s3delta_ds.method.supernet import GateContext

    space = enumerate_space(m, "mixed+pafi+hiwi", site_map=sm)
    ctx = GateContext()
    attach(m, sm, [DeltaSpec(c.site, c.type, c.kwargs, c.index) for c in space.candidates], ctx)
    with torch.no_grad():
        for _, p in delta_parameters(m):
            p.normal_(0, 0.01)
    logits = torch.zeros(len(space), requires_grad=True)
    ctx.z = torch.sigmoid(logits)
    (g,) = torch.autograd.grad(m(**tiny_inputs("tiny-t5")).loss, logits)
    for c in space.candidates:
        if c.type in ("pafi", "hiwi"):
            assert g[c.index] != 0


def test_pafi_linear_module_unchanged_outside_its_site():
    m, sm = _with_map("tiny-t5")
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    attach(m, sm, [DeltaSpec("encoder.0.attn.q", "pafi", {"density": 0.1})])
    assert all(torch.equal(before[n], p) for n, p in m.named_parameters() if n in before)
    assert isinstance(m.get_submodule(sm.path("encoder.0.attn.q")), nn.Linear)


def test_pafi_mask_cli_reads_a_bf16_checkpoint_in_bf16_and_ranks_its_stored_values(tmp_path, capsys, monkeypatch):
    """`s3delta pafi-mask` on a checkpoint stored in bf16: the model is loaded in bf16 (half the
    memory of fp32), and the mask is the one of the stored values upcast exactly."""
    import s3delta_ds.engine.backbone as backbone_module
    from s3delta_ds.cli import main
    from s3delta_ds.cli.pafi_cmd import stored_dtype

    loaded_as = []
    real_load = backbone_module.load_backbone

    def recording(*args, **kwargs):
        loaded_as.append(kwargs["dtype"])
        return real_load(*args, **kwargs)

    monkeypatch.setattr(backbone_module, "load_backbone", recording)
    model = tiny_model("tiny-llama").to(torch.bfloat16)
    model.save_pretrained(tmp_path / "model")
    assert stored_dtype(str(tmp_path / "model")) == "bf16"
    assert main(["pafi-mask", str(tmp_path / "model"), "--density", "0.01", "-o", str(tmp_path / "m.safetensors")]) == 0
    assert loaded_as == ["bf16"]
    mask, meta = load_mask(tmp_path / "m.safetensors")
    check_weights(meta, model, SiteMap(model, family_for(model.config)), "m")  # its probe holds the bf16 values
    assert "weights_probe" in meta
    exact = model.float()
    want = compute_mask(exact, SiteMap(exact, family_for(exact.config)), density=0.01)
    assert mask.keys() == want.keys() and all(torch.equal(mask[k], want[k]) for k in want)


def test_a_hiwi_structure_written_before_tokens_existed_keeps_its_digest(tmp_path):
    """A setting added later is written only when it differs from its default: an older structure
    file reads back to the same digest its trained deltas recorded (else load/export refuse them)."""
    from s3delta_ds.structure.builders import manual

    s = manual(Backbone.plan("tiny-t5"), "hiwi")
    assert all("tokens" not in m.kwargs for m in s.modules)
    s.save(tmp_path / "rows.json")
    assert Structure.load(tmp_path / "rows.json").digest() == s.digest()
    d = s.to_dict()
    for m in d["modules"]:
        m["kwargs"]["tokens"] = "columns"
        m["params"] = resolve("hiwi", m["kwargs"], Backbone.plan("tiny-t5").site_map.site(m["site"]).dims, "")[2]
    cols = Structure.from_dict(d)
    assert all(m.kwargs["tokens"] == "columns" for m in cols.modules) and cols.digest() != s.digest()
