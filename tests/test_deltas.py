"""Delta modules: exact parameter counts, exact initialisation, and their forward formulas."""

import math

import pytest
import torch
import torch.nn as nn
from transformers.activations import ACT2FN

from s3delta_ds.backbones import SiteDims
from s3delta_ds.deltas import DELTAS, build_config, resolve
from s3delta_ds.deltas.lnfit import normalise
from s3delta_ds.errors import SearchSpaceError

LIN = SiteDims("linear", 48, 80)
RMS = SiteDims("norm", 64, 64, norm="rms", eps=1e-6)
LN = SiteDims("norm", 64, 64, norm="layer", eps=1e-12)
BLOCK = SiteDims("block", 64, 64)

CASES = [
    ("lora", LIN, {"r": 3, "alpha": 12.0}, 3 * (48 + 80)),
    ("bitfit", LIN, {}, 80),
    ("bitfit", RMS, {}, 64),
    ("lnfit", RMS, {}, 64),
    ("lnfit", LN, {}, 64),
    ("lra", BLOCK, {"reduction": 8, "rank": 1}, (1 * (64 + 8) + 8) + (1 * (8 + 64) + 64)),
    ("lra", BLOCK, {"reduction": 4, "rank": 2}, (2 * (64 + 16) + 16) + (2 * (16 + 64) + 64)),
    ("adapter", BLOCK, {"bottleneck": 24}, 2 * 64 * 24 + 24 + 64),
]


@pytest.mark.parametrize("name,dims,kwargs,expected", CASES)
def test_param_count_is_exact_and_matches_the_module(name, dims, kwargs, expected):
    cls, cfg, n = resolve(name, kwargs, dims, "site")
    assert n == expected
    assert sum(p.numel() for p in cls(dims, cfg).parameters()) == expected


def test_original_t5_large_counts():
    d = 1024
    assert resolve("lra", {}, SiteDims("block", d, d), "s")[2] == 3168  # 1,088 + 2,080
    assert resolve("lra", {}, SiteDims("block", 768, 768), "s")[2] == 2376
    assert resolve("adapter", {}, SiteDims("block", d, d), "s")[2] == 50_200
    assert resolve("lora", {"r": 1}, SiteDims("linear", d, 4096), "s")[2] == 5120


def _build(name, dims, **kwargs):
    cls, cfg, _ = resolve(name, kwargs, dims, "site")
    torch.manual_seed(0)
    return cls(dims, cfg)


@pytest.mark.parametrize("name,dims", [("lora", LIN), ("bitfit", LIN), ("lnfit", RMS), ("lnfit", LN)])
def test_zero_init_deltas_contribute_exactly_zero(name, dims):
    d = _build(name, dims)
    x = torch.randn(2, 5, dims.in_dim)
    assert torch.count_nonzero(d(x)) == 0


def test_lora_init_and_formula():
    d = _build("lora", LIN, r=4, alpha=8.0)
    bound = 1 / math.sqrt(LIN.in_dim)  # kaiming_uniform(a=sqrt(5)) on (r, in): bound = 1/sqrt(fan_in)
    assert d.lora_A.abs().max() <= bound and d.lora_A.abs().max() > 0.5 * bound
    assert torch.count_nonzero(d.lora_B) == 0
    nn.init.normal_(d.lora_B)
    x = torch.randn(3, LIN.in_dim)
    expected = (8.0 / 4) * x @ d.lora_A.T @ d.lora_B.T
    assert torch.allclose(d(x), expected, atol=1e-5)
    assert torch.allclose(x @ d.merged_weight_delta().T, expected, atol=1e-5)


@pytest.mark.parametrize("dims", [RMS, LN])
def test_lnfit_equals_a_shifted_norm_scale(dims):
    """norm(x; g) + Δg ⊙ normalise(x) == norm(x; g + Δg)."""
    d = _build("lnfit", dims)
    nn.init.normal_(d.scale)
    g = torch.randn(dims.out_dim)
    x = torch.randn(4, 7, dims.out_dim) * 3
    if dims.norm == "layer":
        base = nn.LayerNorm(dims.out_dim, eps=dims.eps, elementwise_affine=True, bias=False)
    else:
        from transformers.models.t5.modeling_t5 import T5LayerNorm

        base = T5LayerNorm(dims.out_dim, eps=dims.eps)
    with torch.no_grad():
        base.weight.copy_(g)
        y = base(x) + d(x)
        base.weight.copy_(g + d.scale)
        assert torch.allclose(y, base(x), atol=1e-5)


def test_normalise_keeps_low_precision_dtype():
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    assert normalise(x, "rms", 1e-6).dtype == torch.bfloat16


def test_lra_init_and_formula():
    d = _build("lra", BLOCK, reduction=8)
    for lin in (d.down, d.up):
        for w in (lin.W_left, lin.W_right):
            bound = math.sqrt(2) * math.sqrt(6 / (w.shape[0] + w.shape[1]))  # glorot-uniform, gain √2
            assert w.abs().max() <= bound
        assert torch.count_nonzero(lin.bias) == 0
    h = torch.randn(2, 3, 64)
    act = ACT2FN["gelu_new"]
    down = h @ (d.down.W_left @ d.down.W_right)
    expected = act(down) @ (d.up.W_left @ d.up.W_right)
    assert torch.allclose(d(h), expected, atol=1e-5)
    assert d(h).abs().sum() > 0  # not zero at init: the gate decides its weight


def test_lra_init_matches_the_original_gain():
    """OpenDelta's LowRankLinear uses glorot_uniform = xavier_uniform_(gain=√2): at d=768 the factors
    fill U(-a, a) with a = √2·√(6/(768+1)), and the adapter's median output RMS on unit inputs is ~0.06
    (~0.012 with gain 1)."""
    dims = SiteDims("block", 768, 768)
    cls, cfg, _ = resolve("lra", {}, dims, "site")
    bound = math.sqrt(2) * math.sqrt(6 / (768 + 1))
    rms = []
    torch.manual_seed(0)
    for _ in range(20):
        d = cls(dims, cfg)
        w = d.down.W_left
        assert 0.97 * bound < w.abs().max() <= bound
        # uniform on (-a, a): std = a / √3
        assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.08)
        with torch.no_grad():
            rms.append(d(torch.randn(64, 768)).pow(2).mean().sqrt().item())
    median = sorted(rms)[len(rms) // 2]
    assert 0.04 < median < 0.09, median


def test_adapter_init_statistics():
    dims = SiteDims("block", 512, 512)
    d = _build("adapter", dims, bottleneck=64)
    assert d.down_weight.std().item() == pytest.approx(0.01, rel=0.05)
    assert d.up_weight.std().item() == pytest.approx(0.01, rel=0.05)
    assert torch.count_nonzero(d.down_bias) == 0 and torch.count_nonzero(d.up_bias) == 0


@pytest.mark.parametrize(
    "name,dims,kwargs,match",
    [
        ("lora", LIN, {"rank": 2}, "unknown kwargs"),
        ("lora", LIN, {"r": 0}, "r must be >= 1"),
        ("lora", LIN, {"r": "8"}, "must be int"),
        ("lora", LIN, {"r": True}, "must be int"),
        ("lora", RMS, {}, "cannot go on"),
        ("lnfit", LIN, {}, "cannot go on"),
        ("lra", BLOCK, {"reduction": 128}, "no bottleneck"),
        ("lra", BLOCK, {"activation": "nope"}, "unknown activation"),
        ("adapter", BLOCK, {"init_std": -1.0}, "init_std"),
        ("prefix", BLOCK, {}, "unknown delta type"),
    ],
)
def test_bad_kwargs_and_sites_are_named(name, dims, kwargs, match):
    with pytest.raises(SearchSpaceError, match=match):
        resolve(name, kwargs, dims, "encoder.0.attn.q")


def test_registry_and_full_kwargs():
    assert set(DELTAS) >= {"lora", "bitfit", "lnfit", "lra", "adapter"}
    cfg = build_config(DELTAS["lora"], {"r": 2})
    assert (cfg.r, cfg.alpha, cfg.dropout) == (2, 16.0, 0.0)
