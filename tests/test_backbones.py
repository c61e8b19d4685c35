"""Backbone families, site maps (both directions, dimensions, ZeRO-3 shapes), config hashing and loading."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import GPT2Config, MistralConfig, Qwen2Config, RobertaConfig, T5EncoderModel

from s3delta_ds.backbones import FAMILIES, SiteDims, SiteMap, family_for, format_site, get_family, parse_site
from s3delta_ds.backbones.loading import build_model, builtin_shapes, config_hash, count_params, load_config
from s3delta_ds.engine.backbone import resolve_source
from s3delta_ds.errors import BackboneError, SearchSpaceError, StructureError
from s3delta_ds.structure.builders import Backbone

TINY = ("tiny-t5", "tiny-t5-v1_1", "tiny-llama", "tiny-bert")


def _build(name: str):
    config = load_config(name)
    model = build_model(config)
    return config, model, SiteMap(model, family_for(config))


@pytest.fixture(scope="module")
def tiny():
    """name -> (config, real randomly initialised CPU model, SiteMap); built once per module."""
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = _build(name)
        return cache[name]

    return get


# -- families, depths, prefixes --------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, family, cls_name, prefix, depths, n_sites",
    [
        # T5 v1.0: per encoder layer 10 sites (attn_norm, attn, q, k, v, o, mlp, mlp.up, mlp.down, mlp_norm),
        # per decoder layer 16 (+ cross_attn_norm, cross_attn, 4 cross projections), + one final_norm per stack.
        ("tiny-t5", "t5", "T5ForConditionalGeneration", "", {"encoder": 2, "decoder": 2}, 2 * 10 + 1 + 2 * 16 + 1),
        # gated FFN adds mlp.gate: 11 / 17 per layer; 2 encoder and 3 decoder layers.
        ("tiny-t5-v1_1", "t5", "T5ForConditionalGeneration", "", {"encoder": 2, "decoder": 3}, 2 * 11 + 1 + 3 * 17 + 1),
        ("tiny-llama", "llama", "LlamaForCausalLM", "model.", {"decoder": 2}, 2 * 11 + 1),
        ("tiny-bert", "bert", "BertForSequenceClassification", "bert.", {"encoder": 2}, 2 * 8),
    ],
)
def test_family_depths_and_site_count(tiny, name, family, cls_name, prefix, depths, n_sites):
    config, model, sm = tiny(name)
    assert family_for(config).name == family
    assert type(model).__name__ == cls_name
    assert sm.family.name == family
    assert sm.prefix == prefix
    assert sm.depths == depths
    assert len(sm) == n_sites
    # depths agree with the real layer lists of the model
    for stack, (layers_path, depth) in sm.family.stacks(config).items():
        assert len(model.get_submodule(prefix + layers_path)) == depth == depths[stack]
    # every layer index of every stack has sites, and nothing beyond
    layers = {(s.stack, s.layer) for s in sm.sites.values() if s.layer is not None}
    assert layers == {(stack, i) for stack, d in depths.items() for i in range(d)}


@pytest.mark.parametrize("name", TINY)
def test_every_site_maps_to_a_module_and_back(tiny, name):
    _, model, sm = tiny(name)
    paths = [s.path for s in sm.sites.values()]
    assert len(set(paths)) == len(paths), "two sites share a module path"
    for site_name, site in sm.sites.items():
        assert site.name == site_name
        assert site_name in sm
        model.get_submodule(sm.path(site_name))  # raises AttributeError if the module does not exist
        assert sm.name_of(sm.path(site_name)) == site_name
        assert parse_site(site_name) == (site.stack, site.layer, site.component)
        assert format_site(site.stack, site.layer, site.component) == site_name


@pytest.mark.parametrize(
    "name, stack, components",
    [
        (
            "tiny-t5",
            "encoder",
            ["attn_norm", "attn", "attn.q", "attn.k", "attn.v", "attn.o", "mlp", "mlp.up", "mlp.down", "mlp_norm"],
        ),
        (
            "tiny-t5",
            "decoder",
            [
                "attn_norm",
                "attn",
                "attn.q",
                "attn.k",
                "attn.v",
                "attn.o",
                "cross_attn_norm",
                "cross_attn",
                "cross_attn.q",
                "cross_attn.k",
                "cross_attn.v",
                "cross_attn.o",
                "mlp",
                "mlp.up",
                "mlp.down",
                "mlp_norm",
            ],
        ),
        (
            "tiny-t5-v1_1",
            "encoder",
            [
                "attn_norm",
                "attn",
                "attn.q",
                "attn.k",
                "attn.v",
                "attn.o",
                "mlp",
                "mlp.gate",
                "mlp.up",
                "mlp.down",
                "mlp_norm",
            ],
        ),
        (
            "tiny-llama",
            "decoder",
            [
                "attn_norm",
                "attn",
                "attn.q",
                "attn.k",
                "attn.v",
                "attn.o",
                "mlp_norm",
                "mlp",
                "mlp.gate",
                "mlp.up",
                "mlp.down",
            ],
        ),
        (
            "tiny-bert",
            "encoder",
            ["attn.q", "attn.k", "attn.v", "attn.o", "attn_norm", "mlp.up", "mlp.down", "mlp_norm"],
        ),
    ],
)
def test_layer_components_in_canonical_order(tiny, name, stack, components):
    _, _, sm = tiny(name)
    got = [s.component for s in sm.sites.values() if s.stack == stack and s.layer == 1]
    assert got == components


@pytest.mark.parametrize(
    "name, site, path",
    [
        ("tiny-t5", "decoder.1.cross_attn_norm", "decoder.block.1.layer.1.layer_norm"),
        ("tiny-t5", "encoder.final_norm", "encoder.final_layer_norm"),
        ("tiny-t5", "decoder.final_norm", "decoder.final_layer_norm"),
        ("tiny-t5", "encoder.1.mlp.up", "encoder.block.1.layer.1.DenseReluDense.wi"),
        ("tiny-t5", "encoder.0.mlp", "encoder.block.0.layer.1.DenseReluDense"),
        ("tiny-t5", "decoder.0.mlp.down", "decoder.block.0.layer.2.DenseReluDense.wo"),
        ("tiny-t5", "decoder.1.mlp_norm", "decoder.block.1.layer.2.layer_norm"),
        ("tiny-t5", "decoder.0.cross_attn.k", "decoder.block.0.layer.1.EncDecAttention.k"),
        ("tiny-t5", "decoder.1.attn", "decoder.block.1.layer.0.SelfAttention"),
        ("tiny-t5-v1_1", "encoder.0.mlp.gate", "encoder.block.0.layer.1.DenseReluDense.wi_0"),
        ("tiny-t5-v1_1", "encoder.0.mlp.up", "encoder.block.0.layer.1.DenseReluDense.wi_1"),
        ("tiny-t5-v1_1", "decoder.2.mlp.gate", "decoder.block.2.layer.2.DenseReluDense.wi_0"),
        ("tiny-t5-v1_1", "decoder.2.mlp.up", "decoder.block.2.layer.2.DenseReluDense.wi_1"),
        ("tiny-t5-v1_1", "decoder.2.cross_attn_norm", "decoder.block.2.layer.1.layer_norm"),
        ("tiny-llama", "decoder.0.mlp.down", "model.layers.0.mlp.down_proj"),
        ("tiny-llama", "decoder.final_norm", "model.norm"),
        ("tiny-llama", "decoder.1.attn_norm", "model.layers.1.input_layernorm"),
        ("tiny-llama", "decoder.1.mlp_norm", "model.layers.1.post_attention_layernorm"),
        ("tiny-llama", "decoder.0.attn", "model.layers.0.self_attn"),
        ("tiny-llama", "decoder.1.mlp.gate", "model.layers.1.mlp.gate_proj"),
        ("tiny-bert", "encoder.1.attn.o", "bert.encoder.layer.1.attention.output.dense"),
        ("tiny-bert", "encoder.0.attn.q", "bert.encoder.layer.0.attention.self.query"),
        ("tiny-bert", "encoder.0.attn_norm", "bert.encoder.layer.0.attention.output.LayerNorm"),
        ("tiny-bert", "encoder.1.mlp.up", "bert.encoder.layer.1.intermediate.dense"),
        ("tiny-bert", "encoder.1.mlp.down", "bert.encoder.layer.1.output.dense"),
        ("tiny-bert", "encoder.1.mlp_norm", "bert.encoder.layer.1.output.LayerNorm"),
    ],
)
def test_specific_site_paths(tiny, name, site, path):
    _, _, sm = tiny(name)
    assert sm.path(site) == path
    assert sm.name_of(path) == site


@pytest.mark.parametrize(
    "name, absent",
    [
        ("tiny-t5", ["encoder.0.mlp.gate", "encoder.0.cross_attn.q", "decoder.2.attn.q", "encoder.2.attn.q"]),
        ("tiny-t5-v1_1", ["encoder.2.attn.q", "decoder.3.attn.q", "encoder.1.cross_attn_norm"]),
        ("tiny-llama", ["encoder.0.attn.q", "decoder.0.cross_attn.q", "decoder.2.attn.q"]),
        ("tiny-bert", ["encoder.final_norm", "encoder.0.attn", "encoder.0.mlp", "encoder.0.mlp.gate"]),
    ],
)
def test_sites_that_do_not_exist(tiny, name, absent):
    _, _, sm = tiny(name)
    for site in absent:
        assert site not in sm
        with pytest.raises(SearchSpaceError, match="unknown site"):
            sm.site(site)


# -- dimensions ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, site, dims",
    [
        ("tiny-t5", "encoder.0.attn.q", SiteDims("linear", 64, 64)),
        ("tiny-t5", "encoder.0.mlp.up", SiteDims("linear", 64, 128)),
        ("tiny-t5", "decoder.1.mlp.down", SiteDims("linear", 128, 64)),
        ("tiny-t5", "encoder.0.attn_norm", SiteDims("norm", 64, 64, norm="rms", eps=1e-6)),
        ("tiny-t5", "decoder.final_norm", SiteDims("norm", 64, 64, norm="rms", eps=1e-6)),
        ("tiny-t5", "encoder.1.attn", SiteDims("block", 64, 64)),
        ("tiny-t5", "decoder.0.cross_attn", SiteDims("block", 64, 64)),
        ("tiny-t5", "decoder.1.mlp", SiteDims("block", 64, 64)),
        ("tiny-t5-v1_1", "encoder.0.mlp.gate", SiteDims("linear", 64, 96)),
        ("tiny-t5-v1_1", "decoder.2.mlp.up", SiteDims("linear", 64, 96)),
        ("tiny-t5-v1_1", "decoder.2.mlp.down", SiteDims("linear", 96, 64)),
        ("tiny-llama", "decoder.0.attn.q", SiteDims("linear", 64, 64)),
        ("tiny-llama", "decoder.0.attn.k", SiteDims("linear", 64, 32)),  # 2 kv heads x head_dim 16
        ("tiny-llama", "decoder.1.attn.v", SiteDims("linear", 64, 32)),
        ("tiny-llama", "decoder.1.mlp.gate", SiteDims("linear", 64, 128)),
        ("tiny-llama", "decoder.1.mlp.down", SiteDims("linear", 128, 64)),
        ("tiny-llama", "decoder.0.attn_norm", SiteDims("norm", 64, 64, norm="rms", eps=1e-5)),
        ("tiny-llama", "decoder.final_norm", SiteDims("norm", 64, 64, norm="rms", eps=1e-5)),
        ("tiny-llama", "decoder.0.mlp", SiteDims("block", 64, 64)),
        ("tiny-bert", "encoder.0.mlp.up", SiteDims("linear", 64, 128)),
        ("tiny-bert", "encoder.0.mlp.down", SiteDims("linear", 128, 64)),
        ("tiny-bert", "encoder.1.attn_norm", SiteDims("norm", 64, 64, norm="layer", eps=1e-12)),
        ("tiny-bert", "encoder.1.mlp_norm", SiteDims("norm", 64, 64, norm="layer", eps=1e-12)),
    ],
)
def test_site_dims(tiny, name, site, dims):
    _, _, sm = tiny(name)
    assert sm.site(site).dims == dims


@pytest.mark.parametrize("name", TINY)
def test_dims_agree_with_the_modules(tiny, name):
    """Linear sites report the module's features; norm sites its weight width; block sites the hidden size."""
    config, model, sm = tiny(name)
    hidden = sm.family.hidden_size(config)
    assert hidden == 64
    kinds = set()
    for site in sm.sites.values():
        module = model.get_submodule(site.path)
        kinds.add(site.dims.kind)
        if isinstance(module, torch.nn.Linear):
            assert site.dims == SiteDims("linear", module.in_features, module.out_features)
        elif site.component.endswith("norm"):
            assert site.dims.kind == "norm"
            assert site.dims.in_dim == site.dims.out_dim == module.weight.shape[-1]
        else:
            assert site.dims == SiteDims("block", hidden, hidden)
    assert kinds == ({"linear", "norm"} if name == "tiny-bert" else {"linear", "norm", "block"})


@pytest.mark.parametrize(
    "name, norm_site, attr, norm_kind",
    [
        ("tiny-t5", "decoder.1.cross_attn_norm", "variance_epsilon", "rms"),
        ("tiny-llama", "decoder.final_norm", "variance_epsilon", "rms"),
        ("tiny-bert", "encoder.0.mlp_norm", "eps", "layer"),
    ],
)
def test_norm_eps_is_read_from_the_module(name, norm_site, attr, norm_kind):
    """The eps comes from the module itself, not from the config (patch the module, not the config)."""
    config = load_config(name)
    model = build_model(config)
    path = SiteMap(model, family_for(config)).path(norm_site)
    setattr(model.get_submodule(path), attr, 0.125)
    sm = SiteMap(model, family_for(config))
    assert sm.site(norm_site).dims == SiteDims("norm", 64, 64, norm=norm_kind, eps=0.125)
    other = next(s for s in sm.sites.values() if s.dims.kind == "norm" and s.name != norm_site)
    assert other.dims.eps != 0.125


@pytest.mark.parametrize(
    "name, key, value, site",
    [
        ("tiny-t5", "layer_norm_epsilon", 3e-4, "encoder.1.mlp_norm"),
        ("tiny-llama", "rms_norm_eps", 2e-6, "decoder.1.attn_norm"),
        ("tiny-bert", "layer_norm_eps", 1e-7, "encoder.1.attn_norm"),
    ],
)
def test_norm_eps_follows_the_config(name, key, value, site):
    config = load_config(name)
    setattr(config, key, value)
    sm = SiteMap(build_model(config), family_for(config))
    assert sm.site(site).dims.eps == pytest.approx(value, rel=1e-12)


@pytest.mark.parametrize("name", TINY)
def test_meta_device_plan_matches_the_real_model(tiny, name):
    _, _, sm = tiny(name)
    planned = Backbone.plan(name)
    assert next(planned.model.parameters()).device.type == "meta"
    assert {k: (s.path, s.dims) for k, s in planned.site_map.sites.items()} == {
        k: (s.path, s.dims) for k, s in sm.sites.items()
    }
    assert planned.info.depths == sm.depths
    assert planned.info.hidden_size == 64


# -- other architectures of the families -----------------------------------------------------------


def _mistral():
    return MistralConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        max_position_embeddings=64,
    )


def _qwen2():
    return Qwen2Config(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=1,
        vocab_size=64,
        max_position_embeddings=64,
    )


def _roberta():
    return RobertaConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=64,
        max_position_embeddings=64,
        layer_norm_eps=1e-5,
    )


@pytest.mark.parametrize(
    "make, family, cls_name, depths, n_sites, checks",
    [
        (
            _mistral,
            "llama",
            "MistralForCausalLM",
            {"decoder": 2},
            2 * 11 + 1,
            {
                "decoder.1.attn.k": ("model.layers.1.self_attn.k_proj", SiteDims("linear", 32, 16)),
                "decoder.0.mlp.up": ("model.layers.0.mlp.up_proj", SiteDims("linear", 32, 48)),
                "decoder.final_norm": ("model.norm", SiteDims("norm", 32, 32, norm="rms", eps=1e-6)),
            },
        ),
        (
            _qwen2,
            "llama",
            "Qwen2ForCausalLM",
            {"decoder": 3},
            3 * 11 + 1,
            {
                "decoder.2.attn.v": ("model.layers.2.self_attn.v_proj", SiteDims("linear", 32, 8)),
                "decoder.2.mlp.down": ("model.layers.2.mlp.down_proj", SiteDims("linear", 48, 32)),
                "decoder.0.mlp": ("model.layers.0.mlp", SiteDims("block", 32, 32)),
            },
        ),
        (
            _roberta,
            "bert",
            "RobertaForSequenceClassification",
            {"encoder": 2},
            2 * 8,
            {
                "encoder.1.attn.o": ("roberta.encoder.layer.1.attention.output.dense", SiteDims("linear", 32, 32)),
                "encoder.0.mlp_norm": (
                    "roberta.encoder.layer.0.output.LayerNorm",
                    SiteDims("norm", 32, 32, norm="layer", eps=1e-5),
                ),
            },
        ),
    ],
)
def test_other_architectures_are_recognised(make, family, cls_name, depths, n_sites, checks):
    config = make()
    assert family_for(config).name == family
    model = build_model(config)
    assert type(model).__name__ == cls_name
    sm = SiteMap(model, family_for(config))
    assert sm.depths == depths
    assert len(sm) == n_sites
    for site, (path, dims) in checks.items():
        assert sm.path(site) == path
        assert sm.site(site).dims == dims
        assert sm.name_of(path) == site
    for name in sm.sites:
        assert sm.name_of(sm.path(name)) == name


def test_t5_encoder_model_has_only_the_encoder_stack():
    config = load_config("tiny-t5")
    model = T5EncoderModel(config)
    sm = SiteMap(model, family_for(config))
    assert sm.depths == {"encoder": 2}
    assert len(sm) == 2 * 10 + 1
    assert {s.stack for s in sm.sites.values()} == {"encoder"}
    assert sm.path("encoder.final_norm") == "encoder.final_layer_norm"
    assert sm.path("encoder.1.mlp.up") == "encoder.block.1.layer.1.DenseReluDense.wi"
    assert "decoder.0.attn.q" not in sm
    assert "decoder.final_norm" not in sm
    with pytest.raises(SearchSpaceError, match=r"unknown site 'decoder\.0\.attn\.q'.*\(encoder: 2 layers\)"):
        sm.site("decoder.0.attn.q")


# -- errors ----------------------------------------------------------------------------------------


def test_unknown_architecture_lists_the_supported_families():
    config = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)
    with pytest.raises(BackboneError) as info:
        family_for(config)
    msg = str(info.value)
    assert "unsupported architecture: model_type 'gpt2'" in msg
    assert (
        "supported families: t5 (model_type t5, mt5); llama (model_type llama, mistral, qwen2); "
        "bert (model_type bert, roberta)" in msg
    )
    with pytest.raises(BackboneError, match="supported families: t5"):
        build_model(config, device="meta")


def test_unknown_architecture_from_a_config_file(tmp_path):
    path = tmp_path / "gpt2.json"
    path.write_text(json.dumps({"model_type": "gpt2", "n_layer": 1, "n_embd": 32, "n_head": 2, "vocab_size": 64}))
    with pytest.raises(BackboneError, match=r"model_type 'gpt2'.*supported families: t5 .*llama .*bert "):
        Backbone.plan(str(path))


def test_get_family():
    assert set(FAMILIES) == {"t5", "llama", "bert"}
    assert get_family("llama") is FAMILIES["llama"]
    with pytest.raises(BackboneError, match=r"unknown backbone family 'gpt'; supported families: t5 .*llama .*bert"):
        get_family("gpt")


@pytest.mark.parametrize(
    "name, bad, suggestion",
    [
        ("tiny-t5", "encoder.0.attn.qq", "encoder.0.attn.q"),
        ("tiny-t5", "decoder.1.cross_atn.k", "decoder.1.cross_attn.k"),
        ("tiny-llama", "decoder.0.mlp.gate_proj", "decoder.0.mlp.gate"),
        ("tiny-bert", "encoder.1.attn_nrom", "encoder.1.attn_norm"),
    ],
)
def test_unknown_site_suggests_close_names(tiny, name, bad, suggestion):
    _, _, sm = tiny(name)
    with pytest.raises(SearchSpaceError) as info:
        sm.site(bad)
    msg = str(info.value)
    assert msg.startswith(f"unknown site {bad!r} on this {sm.family.name} backbone (")
    assert "did you mean" in msg
    hint = msg.split("did you mean ", 1)[1].rstrip("?").split(", ")
    assert suggestion in hint
    with pytest.raises(SearchSpaceError, match="unknown site"):
        sm.path(bad)


def test_unknown_site_message_gives_depths(tiny):
    _, _, sm = tiny("tiny-t5-v1_1")
    with pytest.raises(
        SearchSpaceError,
        match=r"unknown site 'decoder\.7\.attn\.q' on this t5 backbone "
        r"\(encoder: 2 layers, decoder: 3 layers\)",
    ):
        sm.site("decoder.7.attn.q")


@pytest.mark.parametrize(
    "bad",
    [
        "encoder..q",
        "3.attn",
        "",
        "Encoder.0.attn.q",
        "encoder.0.",
        "encoder.-1.attn.q",
        "encoder",
        "encoder.0.attn.q.",
        "encoder 0 attn",
    ],
)
def test_malformed_site_names(tiny, bad):
    _, _, sm = tiny("tiny-t5")
    expected = (
        r"malformed site name .*expected 'stack\.layer\.component' \(e\.g\. 'encoder\.3\.attn\.q'\) "
        r"or 'stack\.component'"
    )
    with pytest.raises(SearchSpaceError, match=expected):
        parse_site(bad)
    with pytest.raises(SearchSpaceError, match=expected):
        sm.site(bad)


def test_parse_and_format_site():
    assert parse_site("decoder.5.attn.q") == ("decoder", 5, "attn.q")
    assert parse_site("decoder.12.cross_attn_norm") == ("decoder", 12, "cross_attn_norm")
    assert parse_site("encoder.final_norm") == ("encoder", None, "final_norm")
    assert format_site("decoder", 5, "attn.q") == "decoder.5.attn.q"
    assert format_site("encoder", None, "final_norm") == "encoder.final_norm"
    assert format_site("encoder", 0, "mlp") == "encoder.0.mlp"


def test_name_of_a_non_site_path(tiny):
    _, _, sm = tiny("tiny-llama")
    with pytest.raises(SearchSpaceError, match=r"module 'model\.embed_tokens' is not a delta site of this llama"):
        sm.name_of("model.embed_tokens")
    with pytest.raises(SearchSpaceError, match="is not a delta site"):
        sm.name_of("layers.0.mlp.down_proj")  # path without the base-model prefix


def test_unknown_role(tiny):
    _, _, sm = tiny("tiny-t5")
    assert sm.components_for("mlp.in") == ("mlp.up",)
    assert tiny("tiny-t5-v1_1")[2].components_for("mlp.in") == ("mlp.gate", "mlp.up")
    assert tiny("tiny-bert")[2].components_for("cross_attn.proj") == ()
    with pytest.raises(SearchSpaceError, match=r"unknown role 'mlp\.inner'; roles are attn\.proj, cross_attn\.proj"):
        sm.components_for("mlp.inner")


# -- ZeRO-3 partitioned parameters -----------------------------------------------------------------


def _partition(param: torch.nn.Parameter) -> None:
    """What ZeRO-3 does to a parameter on a rank: empty local data, the real shape in ds_shape/ds_numel."""
    shape = param.shape
    param.data = torch.empty(0, dtype=param.dtype)
    param.ds_shape = torch.Size(shape)
    param.ds_numel = shape.numel()


@pytest.mark.parametrize(
    "name, norm_site",
    [("tiny-t5", "encoder.0.attn_norm"), ("tiny-llama", "decoder.final_norm"), ("tiny-bert", "encoder.1.mlp_norm")],
)
def test_partitioned_norm_weight_uses_ds_shape(name, norm_site):
    config = load_config(name)
    model = build_model(config)
    family = family_for(config)
    before = SiteMap(model, family).site(norm_site).dims
    weight = model.get_submodule(SiteMap(model, family).path(norm_site)).weight
    weight.data = torch.empty(0)
    assert weight.shape == (0,)
    weight.ds_shape = torch.Size([64])
    after = SiteMap(model, family).site(norm_site).dims
    assert after.out_dim == 64
    assert after.in_dim == 64
    assert after == before


def test_partitioned_weight_without_ds_shape_shows_the_empty_tensor():
    """Control for the test above: without ds_shape the empty local tensor would give width 0."""
    config = load_config("tiny-t5")
    model = build_model(config)
    sm = SiteMap(model, family_for(config))
    model.get_submodule(sm.path("encoder.0.attn_norm")).weight.data = torch.empty(0)
    assert SiteMap(model, family_for(config)).site("encoder.0.attn_norm").dims.out_dim == 0


@pytest.mark.parametrize("name", TINY)
def test_fully_partitioned_model_has_the_same_site_map_and_param_count(name):
    config = load_config(name)
    model = build_model(config)
    family = family_for(config)
    before = {k: (s.path, s.dims) for k, s in SiteMap(model, family).sites.items()}
    n_before = count_params(model)
    for p in model.parameters():
        _partition(p)
    assert sum(p.numel() for p in model.parameters()) == 0
    after = {k: (s.path, s.dims) for k, s in SiteMap(model, family).sites.items()}
    assert after == before
    assert count_params(model) == n_before


# -- config hash -----------------------------------------------------------------------------------


def test_config_hash_is_stable():
    a, b = load_config("tiny-t5"), load_config("tiny-t5")
    h = config_hash(a)
    assert h.startswith("sha256:") and len(h) == len("sha256:") + 64
    assert int(h[len("sha256:") :], 16) >= 0
    assert config_hash(b) == h
    assert config_hash(a) == h  # hashing twice gives the same


@pytest.mark.parametrize(
    "key, value, same",
    [
        ("d_model", 128, False),
        ("num_layers", 3, False),
        ("d_ff", 256, False),
        ("feed_forward_proj", "gated-gelu", False),
        ("_name_or_path", "somewhere/else", True),
        ("use_cache", False, True),
        ("output_hidden_states", True, True),
    ],
)
def test_config_hash_depends_only_on_shape_fields(key, value, same):
    base = load_config("tiny-t5")
    changed = load_config("tiny-t5")
    assert getattr(changed, key) != value
    setattr(changed, key, value)
    assert (config_hash(changed) == config_hash(base)) is same


@pytest.mark.parametrize("name", TINY)
def test_config_hash_survives_save_and_reload(tmp_path, name):
    config = load_config(name)
    config.save_pretrained(tmp_path)
    reloaded = load_config(tmp_path)
    assert config_hash(reloaded) == config_hash(config)


def test_config_hash_differs_between_shapes():
    hashes = {config_hash(load_config(n)) for n in TINY + ("t5-base", "t5-large")}
    assert len(hashes) == len(TINY) + 2


# -- load_config -----------------------------------------------------------------------------------


def test_load_config_from_a_model_directory(tmp_path):
    load_config("tiny-llama").save_pretrained(tmp_path / "model")
    assert (tmp_path / "model" / "config.json").is_file()
    config = load_config(tmp_path / "model")
    assert config.model_type == "llama"
    assert (config.hidden_size, config.num_hidden_layers, config.num_key_value_heads) == (64, 2, 2)
    assert config._name_or_path == str(tmp_path / "model")
    assert config_hash(config) == config_hash(load_config("tiny-llama"))


def test_load_config_from_a_bare_json_file(tmp_path):
    d = {
        "model_type": "t5",
        "d_model": 32,
        "d_ff": 40,
        "d_kv": 8,
        "num_heads": 4,
        "num_layers": 3,
        "num_decoder_layers": 1,
        "vocab_size": 64,
        "feed_forward_proj": "gated-gelu",
    }
    path = tmp_path / "my-shape.json"
    path.write_text(json.dumps(d))
    config = load_config(str(path))
    assert config.model_type == "t5"
    assert (config.d_model, config.d_ff, config.num_layers, config.num_decoder_layers) == (32, 40, 3, 1)
    assert config._name_or_path == str(path)
    plan = Backbone.plan(str(path))
    assert plan.site_map.depths == {"encoder": 3, "decoder": 1}
    assert plan.site_map.site("decoder.0.mlp.gate").dims == SiteDims("linear", 32, 40)


def test_load_config_shipped_shape_and_alias():
    shapes = builtin_shapes()
    assert shapes["google/flan-t5-xxl"] == shapes["t5-v1_1-xxl"] == shapes["flan-t5-xxl"]
    assert "aliases" not in shapes
    canonical = load_config("t5-v1_1-xxl")
    alias = load_config("google/flan-t5-xxl")
    assert alias._name_or_path == "google/flan-t5-xxl"
    assert canonical._name_or_path == "t5-v1_1-xxl"
    assert config_hash(alias) == config_hash(canonical)
    assert (alias.d_model, alias.d_ff, alias.num_layers, alias.num_heads) == (4096, 10240, 24, 64)
    assert alias.feed_forward_proj == "gated-gelu"
    strip = lambda c: {k: v for k, v in c.to_dict().items() if k != "_name_or_path"}  # noqa: E731
    assert strip(alias) == strip(canonical)


def test_every_alias_points_at_a_shipped_shape():
    shapes = builtin_shapes()
    aliases = json.loads((shapes["t5-base"].parent / "aliases.json").read_text())
    for name, names in aliases.items():
        assert name in shapes
        for alias in names:
            assert shapes[alias] == shapes[name]
    for name in (
        "tiny-t5",
        "tiny-t5-v1_1",
        "tiny-llama",
        "tiny-bert",
        "t5-base",
        "t5-large",
        "llama-2-7b",
        "llama-2-70b",
        "bert-base-uncased",
    ):
        assert shapes[name].name == f"{name}.json"


@pytest.mark.parametrize(
    "name, family, depths, hidden",
    [
        ("t5-base", "t5", {"encoder": 12, "decoder": 12}, 768),
        ("t5-large", "t5", {"encoder": 24, "decoder": 24}, 1024),
        ("llama-2-7b", "llama", {"decoder": 32}, 4096),
        ("bert-base-uncased", "bert", {"encoder": 12}, 768),
    ],
)
def test_full_size_shapes_plan_on_meta(name, family, depths, hidden):
    plan = Backbone.plan(name)
    assert plan.family.name == family
    assert plan.info.depths == depths
    assert plan.info.hidden_size == hidden


def test_load_config_directory_without_config_json(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(BackboneError) as info:
        load_config(tmp_path)
    assert str(info.value) == f"{tmp_path}: directory has no config.json"


def test_load_config_json_without_model_type(tmp_path):
    path = tmp_path / "shape.json"
    path.write_text(json.dumps({"d_model": 64, "num_layers": 2}))
    with pytest.raises(BackboneError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: config has no 'model_type' field, so its architecture is unknown"


@pytest.mark.parametrize(
    "text, message",
    [
        ("[1, 2]", "a config file must hold a JSON object"),
        ("{not json", "not a readable JSON config"),
        ('{"model_type": "no-such-type", "d_model": 3}', "no-such-type"),
    ],
)
def test_load_config_bad_files(tmp_path, text, message):
    path = tmp_path / "config.json"
    path.write_text(text)
    with pytest.raises(BackboneError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: ")
    assert message in str(info.value)


def test_load_config_nonexistent_path_lists_shipped_shapes(tmp_path):
    with pytest.raises(BackboneError) as info:
        load_config(tmp_path / "nope")
    msg = str(info.value)
    assert msg.startswith(
        f"cannot find a model or config called {str(tmp_path / 'nope')!r}: not a file, not a "
        "directory, not a shipped shape ("
    )
    assert "tiny-t5, tiny-t5-v1_1" in msg
    assert "google/flan-t5-xxl" not in msg  # hub-id aliases are not listed as shape names


def test_a_missing_local_path_is_not_looked_up_on_the_hub(tmp_path, monkeypatch):
    """A path that cannot be a hub id fails as a missing path, not with the hub's "Repo id must be in
    the form" complaint (what a fresh machine without the study's assets used to print)."""
    import transformers

    def no_hub(*a, **k):
        raise AssertionError("the hub was asked about a local path")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", no_hub)
    for spec in (str(tmp_path / "nope"), "./nope", "~/nope", "a/b/c"):
        with pytest.raises(BackboneError) as info:
            load_config(spec)
        assert str(info.value).endswith("; no such path"), str(info.value)


def test_a_missing_asset_model_names_the_fetch_command(tmp_path, monkeypatch):
    from s3delta_ds.data.assets import asset_path

    monkeypatch.setenv("S3DELTA_ASSETS", str(tmp_path / "assets"))
    with pytest.raises(BackboneError) as info:
        load_config(asset_path("models", "all-MiniLM-L6-v2"))
    assert str(info.value).endswith("no such path (its weights come from `s3delta fetch-assets minilm`)")


@pytest.mark.parametrize("typo, meant", [("tiny-t55", "tiny-t5"), ("llama2-7b", "llama-2-7b"), ("t5-bsae", "t5-base")])
def test_a_misspelt_model_name_suggests_the_shipped_one(monkeypatch, typo, meant):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the hub lookup of the typo fails fast, as it would online
    with pytest.raises(BackboneError) as info:
        load_config(typo)
    assert str(info.value).startswith(f"cannot find a model or config called {typo!r} (did you mean {meant!r}?): ")


def test_no_suggestion_for_a_name_like_no_shipped_one(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BackboneError) as info:
        load_config("no-such-model-s3delta-test")
    assert "did you mean" not in str(info.value)


@pytest.mark.parametrize("name, base", [("tiny-t5", "T5EncoderModel"), ("tiny-llama", "LlamaModel")])
def test_a_checkpoint_without_weights_the_model_computes_with_is_refused(tmp_path, name, base):
    """A T5EncoderModel folder loaded as T5ForConditionalGeneration trained on a random frozen decoder
    and lm_head, a LlamaModel on a random lm_head: transformers only prints a table of MISSING keys."""
    import transformers

    from s3delta_ds.backbones.loading import load_config
    from s3delta_ds.config import ModelConfig
    from s3delta_ds.engine.backbone import load_backbone

    config = load_config(name)
    config.tie_word_embeddings = False  # tied, LLaMA's lm_head would be the (saved) embedding
    getattr(transformers, base)(config).save_pretrained(tmp_path / "part")
    with pytest.raises(BackboneError, match=rf"lacks \d+ weight tensor\(s\) .* saved as {base}"):
        load_backbone(ModelConfig(name_or_path=str(tmp_path / "part")), source=str(tmp_path / "part"), dtype="fp32",
                      ds_config={})  # fmt: skip
    cfg = ModelConfig(name_or_path=name)
    load_backbone(cfg, source=resolve_source(cfg), dtype="fp32", ds_config={})  # the whole model loads


def test_a_new_classifier_head_and_an_unused_pooler_may_be_missing(tmp_path):
    import transformers

    from s3delta_ds.backbones.loading import load_config
    from s3delta_ds.config import ModelConfig
    from s3delta_ds.engine.backbone import load_backbone

    transformers.BertModel(load_config("tiny-bert"), add_pooling_layer=False).save_pretrained(tmp_path / "enc")
    src = str(tmp_path / "enc")
    model = load_backbone(ModelConfig(name_or_path=src, pooling="mean"), source=src, dtype="fp32", ds_config={},
                          num_labels=3)  # fmt: skip
    assert model.classifier.out_features == 3
    with pytest.raises(BackboneError, match=r"has no pooler \(bert.pooler.dense.bias, .* Use model.pooling=mean"):
        load_backbone(ModelConfig(name_or_path=src, pooling="cls"), source=src, dtype="fp32", ds_config={},
                      num_labels=3)  # fmt: skip


def test_a_gguf_file_plans_loads_and_preflights_like_its_model(tmp_path):
    """model.gguf_file: the config comes from the file's metadata, for the plan and the preflight as
    for the load (a search used to stop at 'directory has no config.json')."""
    from s3delta_ds.config import ModelConfig, load_run_config
    from s3delta_ds.engine.backbone import load_backbone
    from s3delta_ds.run.preflight import preflight_retrain, preflight_search
    from s3delta_ds.structure import builders

    from .helpers import write_tiny_gguf

    hf, name = write_tiny_gguf(tmp_path)
    src = str(tmp_path)
    model = load_backbone(ModelConfig(name_or_path=src, gguf_file=name), source=src, dtype="fp32", ds_config={})
    ids = torch.randint(0, hf.config.vocab_size, (2, 7))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, hf(input_ids=ids).logits)
    plan = Backbone.plan(src, name)
    assert plan.info.num_params == Backbone.from_model(hf).info.num_params
    with pytest.raises(BackboneError, match=f"no config.json; it holds {name}: set model.gguf_file={name}"):
        Backbone.plan(src)
    overrides = [f"model.name_or_path={src}", f"model.gguf_file={name}", "data.task=tiny-sentiment"]
    preflight_search(load_run_config(None, [*overrides, f"output_dir={tmp_path / 'out'}"]))
    t5 = builders.manual(Backbone.plan("tiny-t5"), "lora").save(tmp_path / "t5.json")
    with pytest.raises(StructureError, match="is for a t5 backbone but model .* is llama"):
        retrain = [*overrides, f"retrain.structure={t5}", f"output_dir={tmp_path / 'o'}"]
        preflight_retrain(load_run_config(None, retrain))


@pytest.mark.slow
def test_a_search_and_a_retrain_run_on_a_gguf_file(tmp_path):
    from .helpers import write_tiny_gguf
    from .launching import TINY, run

    _, name = write_tiny_gguf(tmp_path)
    args = [a for a in TINY if not a.startswith("model.name_or_path=")]
    args += [f"model.name_or_path={tmp_path}", f"model.gguf_file={name}", "model.tokenizer=tiny-llama"]
    run("python", "search", [*args, f"output_dir={tmp_path / 's'}"], nproc=1)
    structure = json.loads((tmp_path / "s" / "structure.json").read_text())
    assert structure["backbone"]["family"] == "llama" and structure["modules"]
    run("python", "retrain", [*args, f"retrain.structure={tmp_path / 's' / 'structure.json'}",
                              f"output_dir={tmp_path / 'r'}"], nproc=1)  # fmt: skip
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["params_used"] == sum(m["params"] for m in structure["modules"]) and summary["best_step"] > 0


def test_materialising_an_embedded_model_prints_nothing(tmp_path, monkeypatch, capsys):
    """Its save's progress bar came before the first thing a run or a refusal says: `s3delta search
    --nproc 2 search.budget=0.9` on a fresh machine printed "Writing model shards" above its error."""
    from s3delta_ds.engine.backbone import materialise_embedded

    monkeypatch.setenv("S3DELTA_CACHE", str(tmp_path))
    path = materialise_embedded("tiny-t5")
    assert (path / "config.json").is_file() and path.is_relative_to(tmp_path)
    out, err = capsys.readouterr()
    assert (out, err) == ("", "")
    monkeypatch.delenv("S3DELTA_CACHE")
