"""The causal objective scores only the label tokens: it must equal the loss computed from the full
logits (every position projected onto the vocabulary), in value and in gradient."""

from __future__ import annotations

import torch

from s3delta_ds.method.objective import DeltaModel, per_example_nll
from s3delta_ds.method.supernet import attach, named_delta_parameters
from s3delta_ds.structure.builders import Backbone, manual

from .helpers import tiny_inputs, tiny_model


def _batch():
    batch = tiny_inputs("tiny-llama", batch=3, seq=10)
    labels = torch.full_like(batch["input_ids"], -100)
    labels[0, 5:8] = batch["input_ids"][0, 5:8]  # 3 scored tokens
    labels[1, 9] = batch["input_ids"][1, 9]  # 1 scored token, at the last position
    # row 2: nothing scored (its sum must be 0 and count 0, not NaN)
    return {**batch, "labels": labels}


def _reference(model, batch):
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    return per_example_nll(out.logits[:, :-1], batch["labels"][:, 1:])


def test_scored_positions_only_equals_full_logits_in_loss_and_gradient():
    model = tiny_model("tiny-llama")
    plan = Backbone.from_model(model)
    attach(model, plan.site_map, manual(plan, "lora").specs())
    for p in model.parameters():
        p.requires_grad_(False)
    deltas = dict(named_delta_parameters(model))
    for p in deltas.values():
        p.requires_grad_(True)
        with torch.no_grad():
            p.normal_(0, 0.1)  # LoRA's B starts at zero: make every delta matter
    model.lm_head.weight.requires_grad_(True)  # the projection's own gradient must match too
    batch = _batch()

    sums, counts = DeltaModel(model, "causal")(batch)
    ref_sums, ref_counts = _reference(model, batch)
    assert counts.tolist() == ref_counts.tolist() == [3, 1, 0]
    torch.testing.assert_close(sums, ref_sums, rtol=1e-5, atol=1e-6)
    assert sums[2] == 0 and sums[:2].min() > 0

    trainable = [*deltas.values(), model.lm_head.weight]
    grads = torch.autograd.grad(sums.sum(), trainable)
    ref_grads = torch.autograd.grad(_reference(model, batch)[0].sum(), trainable)
    for name, g, r in zip([*deltas, "lm_head"], grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6, msg=f"gradient of {name}")
    assert any(g.abs().sum() > 0 for g in grads[:-1])
