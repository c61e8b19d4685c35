"""MFU's numerator (benchmarks/flops.py): weights are charged for the tokens they see."""

from __future__ import annotations

import pytest

from benchmarks.flops import PASSES, matmul_params, pass_flops
from s3delta_ds.backbones.loading import build_model, load_config


def _meta(name: str):
    return build_model(load_config(name), device="meta")


def test_t5_base_encoder_weights_see_source_tokens_and_decoder_weights_target_tokens():
    mp = matmul_params(_meta("t5-base"))
    d, ff, layers, vocab = 768, 3072, 12, 32128
    assert mp.encoder == layers * (4 * d * d + 2 * d * ff)
    assert mp.decoder == layers * (8 * d * d + 2 * d * ff) + d * vocab  # self + cross attention, FFN, lm_head
    b, src, tgt = 4, 64, 32
    attn = 4 * b * d * layers * (src * src + tgt * tgt + tgt * src)
    assert pass_flops(_meta("t5-base"), b, src, tgt) == 4 * (mp.encoder * b * src + mp.decoder * b * tgt) + 3 * attn
    # what step.py charged before (all 222.9M parameters for source + target tokens): ~2.2x too much
    old = 4 * 222_903_552 * b * (src + tgt)
    assert old / pass_flops(_meta("t5-base"), b, src, tgt) == pytest.approx(2.2, abs=0.1)


def test_a_decoder_charges_every_linear_for_every_token():
    m = _meta("llama-2-7b")
    mp = matmul_params(m)
    d, ff, layers, vocab = 4096, 11008, 32, 32000
    assert mp.encoder == 0 and mp.decoder == layers * (4 * d * d + 3 * d * ff) + d * vocab
    assert pass_flops(m, 1, 128, 0) == 4 * mp.decoder * 128 + 3 * 4 * d * layers * 128 * 128


def test_search_steps_count_their_passes():
    assert PASSES["c"] == PASSES["c2"] == 1 and PASSES["d"] == PASSES["d2"] == 2 and PASSES["e"] == 5
