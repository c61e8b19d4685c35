"""Search spaces on full-size shapes (meta device) reproduce the original code's candidate counts,
less the candidates that cannot change the output (BitFit on attention keys of T5/BERT)."""

import pytest

from s3delta_ds.errors import SearchSpaceError
from s3delta_ds.structure.builders import Backbone


@pytest.mark.parametrize(
    "shape,space,original,inert,params",
    [
        # the original's 460 / 916, less one key bias per self-attention (768 / 1024 parameters each)
        ("t5-base", "mixed", 460, 24, 706_944 - 24 * 768),
        ("t5-base", "lora", 144, 0, 331_776),
        ("t5-large", "mixed", 916, 48, 1_881_088 - 48 * 1024),
        ("t5-large", "lora", 288, 0, 884_736),
        ("t5-v1_1-xxl", "mixed", 24 * 20 + 24 * 22 + 4, 48, None),
        ("llama-2-7b", "mixed", 32 * 20 + 2, 0, None),  # rotary embeddings: a key bias acts
        ("llama-2-7b", "lora", 32 * 7, 0, 32 * (4 * 2 * 4096 + 2 * (4096 + 11008) + (11008 + 4096))),
        ("llama-2-70b", "lora", 80 * 7, 0, None),
        ("bert-base-uncased", "mixed", 12 * 18, 12, None),
    ],
)
def test_candidate_counts(shape, space, original, inert, params):
    s = Backbone.plan(shape).space(space)
    assert len(s) == original - inert and len(s.inert) == inert
    assert all(t == "bitfit" and site.endswith(".attn.k") for site, t, _ in s.inert)
    if params is not None:
        assert s.total_params == params
    assert [c.index for c in s.candidates] == list(range(original - inert))


def test_t5_large_per_candidate_params_match_the_original():
    s = Backbone.plan("t5-large").space("mixed")
    by = {(c.site, c.type): c.params for c in s.candidates}
    assert by[("encoder.0.attn.q", "lora")] == 2048
    assert by[("decoder.23.mlp.up", "lora")] == 5120
    assert by[("encoder.5.attn.v", "bitfit")] == 1024
    assert by[("encoder.5.mlp.up", "bitfit")] == 4096
    assert by[("decoder.7.cross_attn_norm", "lnfit")] == 1024
    assert by[("decoder.7.cross_attn_norm", "bitfit")] == 1024
    assert by[("encoder.final_norm", "lnfit")] == 1024
    assert by[("encoder.3.attn", "lra")] == 3168
    assert by[("decoder.3.mlp", "lra")] == 3168
    assert s.by_type() == {
        "bitfit": {"count": 410 - 48, "params": 567_296 - 48 * 1024},  # the original's, less the key biases
        "lnfit": {"count": 122, "params": 124_928},
        "lra": {"count": 96, "params": 304_128},
        "lora": {"count": 288, "params": 884_736},
    }
    assert s.backbone_params == 737_668_096


def test_excluded_positions():
    s = Backbone.plan("t5-base").space("mixed")
    sites = {c.site for c in s.candidates}
    assert not any("cross_attn." in site for site in sites)  # cross-attention projections are never candidates
    assert not any("embed" in site or "lm_head" in site for site in sites)
    assert "decoder.0.cross_attn_norm" in sites


def test_bert_sequential_blocks_sit_on_output_projections():
    s = Backbone.plan("bert-base-uncased").space("mixed")
    types = {(c.site, c.type) for c in s.candidates}
    assert ("encoder.0.attn.o", "lra") in types and ("encoder.0.mlp.down", "lra") in types
    assert ("encoder.0.attn.o", "lora") in types
    assert s.backbone_params == 109_482_240  # the classifier head is not backbone


def test_unknown_space():
    with pytest.raises(SearchSpaceError, match="unknown search space 'nope'"):
        Backbone.plan("tiny-t5").space("nope")


@pytest.mark.parametrize("name,inert", [("tiny-t5", True), ("tiny-bert", True), ("tiny-llama", False)])
def test_left_out_key_biases_really_cannot_change_the_output(name, inert):
    """What justifies leaving BitFit on attention keys out of the spaces: a random bias added to
    every self-attention key output leaves T5/BERT logits unchanged; under LLaMA's rotary
    embeddings it changes them, and there the candidates stay."""
    import torch

    from s3delta_ds.backbones import SiteMap, family_for
    from s3delta_ds.method.space import enumerate_space
    from tests.helpers import logits_of, tiny_inputs, tiny_model

    model = tiny_model(name)
    family = family_for(model.config)
    site_map = SiteMap(model, family)
    batch = tiny_inputs(name)
    with torch.no_grad():
        before = logits_of(model, batch)
        g = torch.Generator().manual_seed(0)
        keys = [s for s in site_map.sites.values() if s.component == "attn.k"]
        hooks = [
            model.get_submodule(s.path).register_forward_hook(
                lambda m, i, o, b=torch.randn(s.dims.out_dim, generator=g): o + b
            )
            for s in keys
        ]
        after = logits_of(model, batch)
        for h in hooks:
            h.remove()
    moved = float((after - before).abs().max())
    left_out = {site for site, t, _ in enumerate_space(model, "mixed").inert}
    if inert:
        assert moved < 1e-4 and left_out == {s.name for s in keys}
    else:
        assert moved > 1e-3 and not left_out
