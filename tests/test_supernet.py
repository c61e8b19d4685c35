"""Attaching deltas: gate 0 is exactly the frozen backbone, slots compute the documented formula,
and detaching gives the plain model back."""

import pytest
import torch
import torch.nn as nn

from s3delta_ds.backbones import SiteMap, family_for
from s3delta_ds.method.space import enumerate_space
from s3delta_ds.method.supernet import (
    DeltaSpec,
    GateContext,
    attach,
    delta_parameters,
    detach,
    freeze_backbone,
    named_delta_parameters,
    slots,
)

from .helpers import logits_of, tiny_inputs, tiny_model

MODELS = ["tiny-t5", "tiny-t5-v1_1", "tiny-llama", "tiny-bert"]


def _supernet(name, space="mixed+adapter"):
    model = tiny_model(name)
    sm = SiteMap(model, family_for(model.config))
    s = enumerate_space(model, space, site_map=sm)
    ctx = GateContext()
    torch.manual_seed(5)
    attach(model, sm, [DeltaSpec(c.site, c.type, c.kwargs, c.index) for c in s.candidates], ctx)
    # make every delta non-zero, so a gate that failed to switch it off would show
    with torch.no_grad():
        for _, p in delta_parameters(model):
            p.normal_(0, 0.05)
    return model, s, ctx


@pytest.mark.parametrize("name", MODELS)
def test_all_gates_zero_is_exactly_the_frozen_backbone(name):
    batch = tiny_inputs(name)
    with torch.no_grad():
        reference = logits_of(tiny_model(name), batch)
        model, s, ctx = _supernet(name)
        ctx.z = torch.zeros(len(s))
        assert torch.equal(logits_of(model, batch), reference)
        ctx.z = torch.ones(len(s))
        assert (logits_of(model, batch) - reference).abs().max() > 1e-3


@pytest.mark.parametrize("name", MODELS)
def test_detach_restores_the_plain_backbone(name):
    batch = tiny_inputs(name)
    reference_model = tiny_model(name)
    model, s, ctx = _supernet(name)
    ctx.z = torch.ones(len(s))
    assert detach(model) > 0
    assert slots(model) == {}
    assert list(model.state_dict()) == list(reference_model.state_dict())
    with torch.no_grad():
        assert torch.equal(logits_of(model, batch), logits_of(reference_model, batch))


@pytest.mark.parametrize("name", MODELS)
def test_gate_gradients_reach_every_candidate(name):
    model, s, ctx = _supernet(name)
    freeze_backbone(model)
    logits = torch.zeros(len(s), requires_grad=True)
    ctx.z = torch.sigmoid(logits)
    loss = model(**tiny_inputs(name)).loss
    (g,) = torch.autograd.grad(loss, logits)
    assert torch.count_nonzero(g) == len(s)
    # autograd.grad w.r.t. the gates leaves the delta weights' .grad untouched
    assert all(p.grad is None for _, p in delta_parameters(model))


@pytest.mark.parametrize("name", MODELS)
def test_freeze_backbone_trains_exactly_the_deltas(name):
    model, s, _ = _supernet(name, "mixed")
    head = family_for(model.config).head_modules
    n = freeze_backbone(model, head)
    head_params = sum(p.numel() for n_, p in model.named_parameters() if n_.startswith(head))
    assert n == s.total_params + head_params
    trainable = {n_ for n_, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n_ for n_, _ in delta_parameters(model)} | {
        n_ for n_, _ in model.named_parameters() if n_.startswith(head)
    }


@pytest.mark.parametrize("name", ["tiny-t5", "tiny-llama"])
def test_zero_init_structure_is_the_identity(name):
    model = tiny_model(name)
    batch = tiny_inputs(name)
    with torch.no_grad():
        reference = logits_of(model, batch)
    sm = SiteMap(model, family_for(model.config))
    s = enumerate_space(model, "mixed", site_map=sm)
    specs = [DeltaSpec(c.site, c.type, c.kwargs) for c in s.candidates if c.type != "lra"]
    attach(model, sm, specs)  # ungated, fresh init: LoRA B = 0, added biases and scales 0
    with torch.no_grad():
        assert torch.equal(logits_of(model, batch), reference)


def test_parallel_then_summed_sequential_semantics():
    model = tiny_model("tiny-t5")
    sm = SiteMap(model, family_for(model.config))
    site = "encoder.0.attn.o"
    ctx = GateContext(torch.tensor([0.7, 0.3, 0.4]))
    attach(
        model,
        sm,
        [
            DeltaSpec(site, "lora", {"r": 2}, 0),
            DeltaSpec(site, "bitfit", {}, 1),
            DeltaSpec(site, "lra", {"reduction": 8}, 2),
        ],
        ctx,
    )
    module = model.get_submodule(sm.path(site))
    slot = module.s3delta
    with torch.no_grad():
        nn.init.normal_(slot.deltas["lora"].lora_B)
        nn.init.normal_(slot.deltas["bitfit"].bias)
        x = torch.randn(2, 3, 64)
        y0 = nn.functional.linear(x, module.weight)
        y1 = y0 + 0.7 * slot.deltas["lora"](x)
        expected = y1 + 0.3 * slot.deltas["bitfit"].bias + 0.4 * slot.deltas["lra"](y1)
        assert torch.allclose(module(x), expected, atol=1e-6)


def test_tuple_outputs_modify_only_the_hidden_states():
    model = tiny_model("tiny-t5")
    sm = SiteMap(model, family_for(model.config))
    attention = model.get_submodule(sm.path("encoder.0.attn"))
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        before = attention(x)
        attach(model, sm, [DeltaSpec("encoder.0.attn", "bitfit", {})])
        nn.init.ones_(attention.s3delta.deltas["bitfit"].bias)
        after = attention(x)
    assert isinstance(after, tuple) and len(after) == len(before)
    assert torch.allclose(after[0], before[0] + 1)
    assert torch.equal(after[1], before[1])


def test_named_delta_parameters_are_family_neutral():
    model, s, _ = _supernet("tiny-llama", "lora")
    keys = [k for k, _ in named_delta_parameters(model)]
    assert "decoder.0.attn.q/lora.lora_A" in keys and "decoder.1.mlp.down/lora.lora_B" in keys
    assert len(keys) == 2 * len(s)


def test_attaching_twice_is_refused():
    model = tiny_model("tiny-t5")
    sm = SiteMap(model, family_for(model.config))
    attach(model, sm, [DeltaSpec("encoder.0.attn.q", "lora", {})])
    from s3delta_ds.errors import SearchSpaceError

    with pytest.raises(SearchSpaceError, match="already has deltas"):
        attach(model, sm, [DeltaSpec("encoder.0.attn.q", "bitfit", {})])


def test_parallel_deltas_keep_the_output_dtype_of_an_fp16_t5_whose_wo_stays_fp32(tmp_path):
    """transformers keeps T5's wo in fp32 under fp16, so the residual stream (and every later norm's
    input) is fp32 while the norm's output is fp16. A parallel delta's term came back in the input's
    dtype and promoted the norm's output to fp32: the next fp16 Linear failed (float != Half)."""
    from transformers import T5Config, T5ForConditionalGeneration

    import s3delta_ds
    from s3delta_ds.structure.builders import Backbone, manual

    config = T5Config(
        vocab_size=96, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu",
        tie_word_embeddings=False, decoder_start_token_id=0,
    )  # fmt: skip
    T5ForConditionalGeneration(config).save_pretrained(tmp_path / "t5")
    model = T5ForConditionalGeneration.from_pretrained(tmp_path / "t5", dtype=torch.float16)
    assert model.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float32
    ids = torch.randint(1, 96, (2, 7))
    with torch.no_grad():
        before = model(input_ids=ids, decoder_input_ids=ids[:, :5]).logits
    for preset in ("lnfit", "lora"):
        s3delta_ds.attach(model, manual(Backbone.from_model(model), preset).save(tmp_path / f"{preset}.json"))
    with torch.no_grad():
        after = model(input_ids=ids, decoder_input_ids=ids[:, :5]).logits
    assert after.dtype == torch.float16 and torch.equal(after, before)  # zero-initialised deltas change nothing
