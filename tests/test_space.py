"""Search spaces on full-size shapes (meta device) reproduce the original code's candidate counts."""

import pytest

from s3delta_ds.errors import SearchSpaceError
from s3delta_ds.structure.builders import Backbone


@pytest.mark.parametrize(
    "shape,space,count,params",
    [
        ("t5-base", "mixed", 460, 706_944),
        ("t5-base", "lora", 144, 331_776),
        ("t5-large", "mixed", 916, 1_881_088),
        ("t5-large", "lora", 288, 884_736),
        ("t5-v1_1-xxl", "mixed", 24 * 20 + 24 * 22 + 4, None),
        ("llama-2-7b", "mixed", 32 * 20 + 2, None),
        ("llama-2-7b", "lora", 32 * 7, 32 * (4 * 2 * 4096 + 2 * (4096 + 11008) + (11008 + 4096))),
        ("llama-2-70b", "lora", 80 * 7, None),
        ("bert-base-uncased", "mixed", 12 * 18, None),
    ],
)
def test_candidate_counts(shape, space, count, params):
    s = Backbone.plan(shape).space(space)
    assert len(s) == count
    if params is not None:
        assert s.total_params == params
    assert [c.index for c in s.candidates] == list(range(count))


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
        "bitfit": {"count": 410, "params": 567_296},
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
