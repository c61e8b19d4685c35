"""Quantized frozen backbones: real parameter counts for budgets, refusals that name the reason,
and merging only into a full-precision base. (Search/retrain under every ZeRO stage with 4-bit and
8-bit backbones run in tests/test_compat_matrix.py.)"""

from __future__ import annotations

import pytest
import torch

from s3delta_ds.artifacts.export import export_merged
from s3delta_ds.backbones.loading import is_quantized, stored_quantization
from s3delta_ds.config import ModelConfig, dump_yaml, load_run_config
from s3delta_ds.engine.backbone import load_backbone, resolve_source
from s3delta_ds.errors import BackboneError, ConfigError, SearchSpaceError, StructureError
from s3delta_ds.method.supernet import DeltaSpec, attach
from s3delta_ds.run.preflight import preflight_retrain, preflight_search
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


def test_hiwi_on_the_bias_of_a_quantized_linear_is_allowed():
    """HiWi target=bias reads only the bias, which bitsandbytes leaves in full precision."""
    cfg = ModelConfig(name_or_path="tiny-bert", quantize="8bit")
    model = load_backbone(cfg, source=resolve_source(cfg), dtype="fp32", ds_config={}, num_labels=2)
    sm = Backbone.from_model(model).site_map
    site = sm.site("encoder.0.mlp.up")
    assert is_quantized(model.get_submodule(site.path).weight)
    attach(model, sm, [DeltaSpec(site.name, "hiwi", {"target": "bias", "bottleneck": 2})])
    with pytest.raises(SearchSpaceError, match="backbone is quantized"):
        attach(model, sm, [DeltaSpec("encoder.1.mlp.up", "hiwi", {"target": "weight"})])


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


# -- checkpoints stored quantized (an "...-bnb-8bit" repo) ------------------------------------------


@pytest.fixture(scope="module")
def stored_8bit(tmp_path_factory):
    """tiny-llama saved already quantized: its config.json carries a bitsandbytes quantization_config."""
    out = tmp_path_factory.mktemp("q8") / "tiny-llama-8bit"
    cfg = ModelConfig(name_or_path="tiny-llama", quantize="8bit")
    load_backbone(cfg, source=resolve_source(cfg), dtype="fp32", ds_config={}).save_pretrained(out)
    return out


@pytest.mark.parametrize("quantize", [None, "4bit"])
def test_a_checkpoint_stored_quantized_is_refused_unless_model_quantize_says_so(stored_8bit, quantize):
    """It loads 8-bit whatever model.quantize says: a run must not believe it has full-precision weights
    (a merge added deltas to its int8 entries: logits off by 0.5 where the largest was 0.58)."""
    cfg = ModelConfig(name_or_path=str(stored_8bit), quantize=quantize)
    with pytest.raises(BackboneError, match="already quantized by bitsandbytes \\(8bit\\).*set model.quantize=8bit"):
        load_backbone(cfg, source=str(stored_8bit), dtype="fp32", ds_config={})
    run_cfg = load_run_config(
        None,
        [f"model.name_or_path={stored_8bit}", "data.task=tiny-sentiment", "search.budget=0.01"]
        + ([f"model.quantize={quantize}"] if quantize else []),
    )
    with pytest.raises(BackboneError, match="set model.quantize=8bit"):  # before anything loads
        preflight_search(run_cfg, log=lambda m: None)


def test_a_checkpoint_stored_quantized_loads_when_model_quantize_agrees(stored_8bit):
    cfg = ModelConfig(name_or_path=str(stored_8bit), quantize="8bit")
    model = load_backbone(cfg, source=str(stored_8bit), dtype="fp32", ds_config={})
    assert any(is_quantized(p) for p in model.parameters())


def test_other_quantization_methods_are_named():
    from s3delta_ds.backbones.loading import check_stored_quantization, load_config

    config = load_config("tiny-llama")
    config.quantization_config = {"quant_method": "gptq", "bits": 4}
    assert stored_quantization(config) == "gptq"
    with pytest.raises(BackboneError, match="quantized with gptq"):
        check_stored_quantization(config, "4bit", "some/llama-gptq")
    config.quantization_config = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    assert stored_quantization(config) == "4bit"
    check_stored_quantization(config, "4bit", "some/llama-bnb-4bit")  # agrees: nothing to say


@pytest.mark.parametrize("full_precision_base", [False, True])
def test_merge_refuses_a_run_on_a_checkpoint_stored_quantized(stored_8bit, tmp_path, full_precision_base):
    """A run made before the load-time check (model.quantize unset): its config alone hid the packed
    weights; --full-precision-base cannot help, the checkpoint holds none."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = load_run_config(None, [f"model.name_or_path={stored_8bit}", "data.task=tiny-sentiment"])
    (run_dir / "config.yaml").write_text(dump_yaml(cfg))
    with pytest.raises(StructureError, match="stores its weights quantized \\(8bit\\).*no full-precision weights"):
        export_merged(run_dir, tmp_path / "out", full_precision_base=full_precision_base)
    assert not (tmp_path / "out").exists()


# -- refused at plan time, before a backbone loads ------------------------------------------------


def _structure_of(tmp_path, model: str, modules: list[tuple[str, str, dict]]):
    """A manual structure of ``model`` holding exactly ``modules`` (site, type, kwargs)."""
    from s3delta_ds.deltas import resolve
    from s3delta_ds.structure import Budget, ModuleChoice, Structure

    plan = Backbone.plan(model)
    chosen = []
    for site, type_, kwargs in modules:
        _, _, n = resolve(type_, kwargs, plan.site_map.site(site).dims, site)
        chosen.append(ModuleChoice(site, type_, kwargs, n))
    used = sum(m.params for m in chosen)
    s = Structure(kind="manual", backbone=plan.info, budget=Budget(None, None, used), modules=tuple(chosen))
    return s.save(tmp_path / f"{model}-{len(chosen)}.json")


def _cfg(tmp_path, *overrides):
    return load_run_config(None, [f"output_dir={tmp_path / 'out'}", "model.quantize=4bit", *overrides])


def test_a_search_space_with_pafi_or_hiwi_is_refused_on_a_quantized_backbone_before_it_loads(tmp_path):
    for space in ("mixed+pafi+hiwi", "mergeable"):
        with pytest.raises(ConfigError, match=r"has hiwi \(target=weight\), pafi, which need .* model.quantize=4bit"):
            preflight_search(_cfg(tmp_path, "model.name_or_path=tiny-llama", f"search.space={space}"))
    preflight_search(_cfg(tmp_path, "model.name_or_path=tiny-llama", "search.space=mixed"))


def test_a_structure_with_pafi_or_weight_hiwi_on_quantized_hosts_is_refused_before_it_loads(tmp_path):
    pafi = _structure_of(tmp_path, "tiny-llama", [("decoder.0.attn.q", "pafi", {"density": 0.1})])
    with pytest.raises(ConfigError, match=r"has pafi, which need the backbone's full-precision weights"):
        preflight_retrain(_cfg(tmp_path, f"retrain.structure={pafi}", "data.task=tiny-sentiment"))
    bias = _structure_of(tmp_path, "tiny-bert", [("encoder.0.mlp.up", "hiwi", {"target": "bias", "bottleneck": 2})])
    preflight_retrain(_cfg(tmp_path, f"retrain.structure={bias}", "data.task=tiny-sentiment"))


def test_hiwi_on_t5s_wo_passes_preflight_and_attach_because_bitsandbytes_keeps_it_full_precision(tmp_path):
    """T5 lists "wo" in _keep_in_fp32_modules, which transformers leaves out of bitsandbytes: the
    plan-time check must not refuse what attaching accepts."""
    hiwi = ("encoder.0.mlp.down", "hiwi", {"target": "weight", "bottleneck": 1})
    path = _structure_of(tmp_path, "tiny-t5", [hiwi])
    preflight_retrain(_cfg(tmp_path, f"retrain.structure={path}", "data.task=tiny-sentiment"))
    model = load_backbone(
        ModelConfig(name_or_path="tiny-t5", quantize="4bit"),
        source=resolve_source(ModelConfig(name_or_path="tiny-t5")),
        dtype="fp32",
        ds_config={},
    )
    sm = Backbone.from_model(model).site_map
    assert not is_quantized(model.get_submodule(sm.path("encoder.0.mlp.down")).weight)
    assert is_quantized(model.get_submodule(sm.path("encoder.0.mlp.up")).weight)
    attach(model, sm, [DeltaSpec(*hiwi)])
    up = _structure_of(tmp_path, "tiny-t5", [("encoder.0.mlp.up", "hiwi", {}), hiwi])
    with pytest.raises(ConfigError, match=r"has hiwi \(target=weight\)"):
        preflight_retrain(_cfg(tmp_path, f"retrain.structure={up}", "data.task=tiny-sentiment"))
