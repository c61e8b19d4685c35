"""Quantized frozen backbones: real parameter counts for budgets, refusals that name the reason,
and merging only into a full-precision base. (Search/retrain under every ZeRO stage with 4-bit and
8-bit backbones run in tests/test_compat_matrix.py.)"""

from __future__ import annotations

import pytest
import torch

from s3delta_ds.artifacts.export import export_merged
from s3delta_ds.config import ModelConfig
from s3delta_ds.engine.backbone import load_backbone, resolve_source
from s3delta_ds.errors import SearchSpaceError, StructureError
from s3delta_ds.method.supernet import DeltaSpec, attach
from s3delta_ds.structure.builders import Backbone, manual

from .helpers import tiny_inputs
from .launching import run


@pytest.mark.parametrize("quantize", ["4bit", "8bit"])
def test_quantized_backbone_counts_its_real_parameters(quantize):
    cfg = ModelConfig(name_or_path="tiny-llama", quantize=quantize)
    model = load_backbone(cfg, source=resolve_source(cfg), dtype="fp32", ds_config={})
    assert any(type(p).__name__ in ("Params4bit", "Int8Params") for p in model.parameters())
    assert Backbone.from_model(model, "tiny-llama").info.num_params == Backbone.plan("tiny-llama").info.num_params
    with torch.no_grad():
        assert torch.isfinite(model(**tiny_inputs("tiny-llama")).logits).all()


def test_pafi_and_hiwi_refuse_quantized_weights():
    cfg = ModelConfig(name_or_path="tiny-llama", quantize="4bit")
    model = load_backbone(cfg, source=resolve_source(cfg), dtype="fp32", ds_config={})
    sm = Backbone.from_model(model).site_map
    for spec in (DeltaSpec("decoder.0.attn.q", "pafi", {"density": 0.1}), DeltaSpec("decoder.0.mlp.up", "hiwi", {})):
        with pytest.raises(SearchSpaceError, match="backbone is quantized"):
            attach(model, sm, [spec])


@pytest.mark.distributed
def test_merge_refuses_a_quantized_base_unless_asked_for_full_precision(tmp_path):
    s = manual(Backbone.plan("tiny-llama"), "lora").save(tmp_path / "s.json")
    run(
        "python",
        "retrain",
        [
            "model.name_or_path=tiny-llama",
            "model.quantize=4bit",
            f"retrain.structure={s}",
            "data.task=tiny-sentiment",
            "retrain.steps=2",
            "retrain.eval_every=2",
            "data.max_eval_examples=8",
            "zero_stage=0",
            f"output_dir={tmp_path / 'run'}",
        ],
        1,
    )
    with pytest.raises(StructureError, match="--full-precision-base"):
        export_merged(tmp_path / "run", tmp_path / "out")
    report = export_merged(tmp_path / "run", tmp_path / "out", full_precision_base=True)
    assert report["kept"] == [] and report["merged"] == 4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_4bit_computes_in_the_model_dtype(dtype):
    """model.dtype=fp16 (a GPU without bf16) must not compute in bf16; fp32 asks for fp32."""
    from s3delta_ds.engine.backbone import quantization_config

    q = quantization_config("4bit", dtype)
    assert q.bnb_4bit_compute_dtype == dtype and q.bnb_4bit_quant_storage == dtype
