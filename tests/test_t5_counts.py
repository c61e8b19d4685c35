"""T5 parameter sharing and counts: v1.1 / flan-T5 / mT5 have one input embedding for encoder and
decoder and their own lm_head, v1.0 ties all three. transformers 5 reports tie_word_embeddings=True
for every T5 config, so the planner, random init and from_pretrained must all be checked against a
real saved checkpoint, not against from_config alone."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForSeq2SeqLM, MT5Config

from s3delta_ds.backbones.loading import build_model, count_params, load_config
from s3delta_ds.config import ModelConfig
from s3delta_ds.engine.backbone import load_backbone
from s3delta_ds.errors import BackboneError
from s3delta_ds.structure.builders import Backbone


def _shares_embeddings(model) -> bool:
    shared = model.shared.weight
    return model.encoder.embed_tokens.weight is shared and model.decoder.embed_tokens.weight is shared


@pytest.fixture(scope="module")
def v1_1_checkpoint(tmp_path_factory):
    """A tiny v1.1 checkpoint whose lm_head is visibly not the embedding: (directory, lm_head weight)."""
    model = build_model(load_config("tiny-t5-v1_1"))
    shape = model.shared.weight.shape
    model.lm_head.weight = torch.nn.Parameter(torch.arange(shape.numel(), dtype=torch.float32).reshape(shape) / 1e4)
    assert not torch.equal(model.lm_head.weight, model.shared.weight)
    out = tmp_path_factory.mktemp("t5-v1_1")
    model.save_pretrained(out)
    return str(out), model.lm_head.weight.detach().clone()


def test_v1_1_checkpoint_reloads_with_its_own_lm_head_and_one_embedding(v1_1_checkpoint):
    path, lm_head = v1_1_checkpoint
    reloaded = AutoModelForSeq2SeqLM.from_pretrained(path)
    assert torch.equal(reloaded.lm_head.weight, lm_head)
    assert reloaded.lm_head.weight is not reloaded.shared.weight
    assert _shares_embeddings(reloaded)
    n = count_params(reloaded)
    config = load_config(path)
    assert n == config.vocab_size * config.d_model + count_params(reloaded, exclude_prefixes=("lm_head",))
    assert Backbone.plan(path).info.num_params == n
    assert Backbone.from_model(reloaded, path).info == Backbone.plan(path).info


@pytest.mark.parametrize("pretrained", [False, True], ids=["random_init", "from_pretrained"])
def test_load_backbone_builds_the_checkpoint_structure(v1_1_checkpoint, pretrained):
    path, lm_head = v1_1_checkpoint
    cfg = ModelConfig(name_or_path=path, random_init=not pretrained)
    model = load_backbone(cfg, source=path, dtype="fp32", ds_config={})
    assert model.lm_head.weight is not model.shared.weight
    assert _shares_embeddings(model)
    assert torch.equal(model.lm_head.weight, lm_head) == pretrained
    assert count_params(model) == count_params(AutoModelForSeq2SeqLM.from_pretrained(path))
    assert Backbone.from_model(model, path).info == Backbone.plan(path).info


def test_random_init_gives_the_lm_head_its_own_values():
    model = build_model(load_config("tiny-t5-v1_1"))
    assert not torch.equal(model.lm_head.weight, model.shared.weight)
    assert model.lm_head.weight.std().item() == pytest.approx(1.0, rel=0.1)  # T5's init of an untied head
    model.tie_weights()  # recomputing the tying map must not tie the head again
    assert model.lm_head.weight is not model.shared.weight


def test_v1_0_keeps_its_tied_lm_head(tmp_path):
    model = build_model(load_config("tiny-t5"))
    assert model.lm_head.weight is model.shared.weight
    assert _shares_embeddings(model)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path)
    assert reloaded.lm_head.weight is reloaded.shared.weight
    assert count_params(reloaded) == count_params(model) == Backbone.plan(str(tmp_path)).info.num_params


def test_mt5_has_its_own_lm_head():
    config = MT5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=24, num_layers=1, num_heads=2)
    model = build_model(config)
    assert model.lm_head.weight is not model.shared.weight
    assert _shares_embeddings(model)


@pytest.mark.parametrize(
    "name, num_params",
    [
        # the released checkpoints' own counts (shared + lm_head + blocks)
        ("t5-v1_1-base", 247_577_856),
        ("google/flan-t5-base", 247_577_856),
        ("flan-t5-base", 247_577_856),
        ("t5-v1_1-xxl", 11_135_332_352),
        ("google/flan-t5-xxl", 11_135_332_352),
        ("flan-t5-xxl", 11_135_332_352),
        ("t5-base", 222_903_552),
        ("t5-large", 737_668_096),
    ],
)
def test_shipped_shapes_plan_the_checkpoint_counts(name, num_params):
    assert Backbone.plan(name).info.num_params == num_params


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_a_zero3_models_live_deepspeed_config_does_not_reach_the_next_load(v1_1_checkpoint, dtype):
    """A ZeRO-3 run keeps transformers' HfDeepSpeedConfig alive with its model (a weakref that
    transformers consults in from_pretrained). A later ZeRO-0/2 run in the same process (the Python
    API, a notebook, a compat launch) must load whole weights, not ZeRO-3 placeholders."""
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    from s3delta_ds.engine import zero

    path, lm_head = v1_1_checkpoint
    live = zero.hf_deepspeed_config({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1})
    assert is_deepspeed_zero3_enabled()  # what the earlier ZeRO-3 run leaves while its model lives
    model = load_backbone(ModelConfig(name_or_path=path), source=path, dtype=dtype, ds_config={})
    assert model.shared.weight.dim() == 2 and not hasattr(model.shared.weight, "ds_id")
    assert torch.equal(model.lm_head.weight.float(), lm_head.to(model.lm_head.weight.dtype).float())
    assert is_deepspeed_zero3_enabled() and live is not None  # the other run's context is left as it was
    with pytest.raises(BackboneError, match="cannot find a model or config"):  # restored when a load fails too
        load_backbone(ModelConfig(name_or_path=path), source=str(path) + "-missing", dtype=dtype, ds_config={})
    assert is_deepspeed_zero3_enabled()
