"""Merging for zero latency and export: merged outputs equal unmerged ones (fp32, 1e-5), the saved
model loads with plain transformers, unmergeable deltas are refused or kept explicitly, and the
PEFT adapters load with PeftModel and give the same outputs."""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification

from s3delta_ds.artifacts import export, peft_export
from s3delta_ds.artifacts.export import export_merged, load_run, save_hf
from s3delta_ds.artifacts.peft_export import export_peft, peft_base_name
from s3delta_ds.cli import main
from s3delta_ds.config import ModelConfig
from s3delta_ds.engine.backbone import materialise_embedded
from s3delta_ds.errors import StructureError
from s3delta_ds.method.supernet import attach
from s3delta_ds.run.checkpoint import load_deltas
from s3delta_ds.structure import Budget, ModuleChoice, Structure
from s3delta_ds.structure.builders import Backbone

from .helpers import tiny_inputs
from .launching import run

AUTO = {
    "tiny-t5": AutoModelForSeq2SeqLM,
    "tiny-llama": AutoModelForCausalLM,
    "tiny-bert": AutoModelForSequenceClassification,
}


def _structure(name: str, types: tuple[str, ...], space: str = "mixed+pafi+hiwi") -> Structure:
    plan = Backbone.plan(name)
    cands = [c for c in plan.space(space).candidates if c.type in types]
    if name == "tiny-llama":  # an RMSNorm has no bias to fold an added bias into (tested below for T5)
        cands = [c for c in cands if not (c.type == "bitfit" and c.site.endswith("norm"))]
    modules = tuple(ModuleChoice(c.site, c.type, c.kwargs, c.params) for c in cands)
    used = sum(m.params for m in modules)
    return Structure(kind="manual", backbone=plan.info, budget=Budget(None, None, used), modules=modules)


def _trained_run(tmp_path_factory, name: str, types: tuple[str, ...]):
    out = tmp_path_factory.mktemp(f"{name}-{'-'.join(types)}")
    s = _structure(name, types).save(out / "in.json")
    run(
        "python",
        "retrain",
        [
            f"model.name_or_path={name}",
            f"retrain.structure={s}",
            "retrain.steps=3",
            "retrain.eval_every=3",
            "retrain.lr=2e-2",
            "retrain.micro_batch_size=8",
            "data.task=tiny-sentiment",
            "data.max_eval_examples=8",
            "zero_stage=0",
            f"output_dir={out / 'run'}",
        ],
        1,
    )
    return out / "run"


@pytest.fixture(scope="module")
def t5_mergeable(tmp_path_factory):
    return _trained_run(tmp_path_factory, "tiny-t5", ("lora", "lnfit", "pafi", "hiwi"))


@pytest.fixture(scope="module")
def t5_with_bitfit(tmp_path_factory):
    return _trained_run(tmp_path_factory, "tiny-t5", ("lora", "bitfit", "lra"))


@pytest.fixture(scope="module")
def llama_all(tmp_path_factory):
    return _trained_run(tmp_path_factory, "tiny-llama", ("lora", "lnfit", "pafi", "hiwi", "bitfit"))


@pytest.fixture(scope="module")
def llama_peft(tmp_path_factory):
    """Only what PEFT can express: LoRA and LNFit."""
    return _trained_run(tmp_path_factory, "tiny-llama", ("lora", "lnfit"))


@pytest.fixture(scope="module")
def bert_with_lra(tmp_path_factory):
    """A classifier with a delta merging cannot fold (LRA), so its head travels in ``unmerged/``."""
    return _trained_run(tmp_path_factory, "tiny-bert", ("lora", "lra"))


@pytest.fixture(scope="module")
def bert_all(tmp_path_factory):
    return _trained_run(tmp_path_factory, "tiny-bert", ("lora", "lnfit", "pafi", "hiwi", "bitfit"))


def _logits(model, name):
    with torch.no_grad():
        return model(**tiny_inputs(name)).logits


def _check_merged_equals(run_dir, out, name):
    ref_model, _, _ = load_run(run_dir)
    reference = _logits(ref_model, name)
    plain = AUTO[name].from_pretrained(out)  # no s3delta_ds involved
    plain.eval()
    assert (_logits(plain, name) - reference).abs().max() < 1e-5
    return plain


@pytest.mark.parametrize(
    "fixture,name", [("t5_mergeable", "tiny-t5"), ("llama_all", "tiny-llama"), ("bert_all", "tiny-bert")]
)
@pytest.mark.distributed
def test_merged_model_equals_unmerged(fixture, name, request, tmp_path):
    run_dir = request.getfixturevalue(fixture)
    report = export_merged(run_dir, tmp_path / "merged")
    assert report["kept"] == [] and report["merged"] == len(Structure.load(run_dir / "structure.json").modules)
    plain = _check_merged_equals(run_dir, tmp_path / "merged", name)
    assert not any("s3delta" in n for n, _ in plain.named_parameters())
    if name == "tiny-llama":  # BitFit on q/k/v/o and the FFN became LLaMA's own biases
        cfg = json.loads((tmp_path / "merged" / "config.json").read_text())
        assert cfg["attention_bias"] is True and cfg["mlp_bias"] is True


@pytest.mark.distributed
def test_unmergeable_deltas_are_refused_or_kept_beside_the_model(t5_with_bitfit, tmp_path, capsys):
    assert main(["export", str(t5_with_bitfit), "--merge", "-o", str(tmp_path / "no")]) == 2
    err = capsys.readouterr().err
    assert "cannot be folded" in err and "lra" in err and "has no bias" in err
    assert not (tmp_path / "no").exists()
    assert main(["export", str(t5_with_bitfit), "--merge", "--keep-unmergeable", "-o", str(tmp_path / "cli")]) == 0
    said = capsys.readouterr().out  # the merged folder alone is not the trained model: say how to load the rest
    assert f"then s3delta_ds.load(model, {str(tmp_path / 'cli' / 'unmerged')!r})" in said
    report = export_merged(t5_with_bitfit, tmp_path / "kept", keep_unmergeable=True)
    assert report["kept"] and all(k.split()[1] in ("bitfit", "lra") for k in report["kept"])
    # the merged model + the kept deltas attached with s3delta_ds == the original run
    merged = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "kept")
    rest = Structure.load(tmp_path / "kept" / "unmerged" / "structure.json")
    # the merged folder, where it lives (it named the staging folder, gone after the rename)
    assert rest.backbone.name_or_path == str((tmp_path / "kept").resolve())
    plan = Backbone.from_model(merged, str(tmp_path / "kept"))
    attach(merged, plan.site_map, rest.specs())
    load_deltas(merged, tmp_path / "kept" / "unmerged" / "deltas.safetensors")
    merged.eval()
    ref_model, _, _ = load_run(t5_with_bitfit)
    assert (_logits(merged, "tiny-t5") - _logits(ref_model, "tiny-t5")).abs().max() < 1e-5


@pytest.mark.distributed
def test_kept_deltas_of_a_classifier_load_through_the_public_api(bert_with_lra, tmp_path):
    """The unmerged folder of a BERT export holds the head too, as every delta file s3delta_ds.load reads."""
    import s3delta_ds

    report = export_merged(bert_with_lra, tmp_path / "kept", keep_unmergeable=True)
    assert report["kept"] and all(k.split()[1] == "lra" for k in report["kept"])
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "kept")
    s3delta_ds.load(merged, tmp_path / "kept" / "unmerged")
    ref_model, _, _ = load_run(bert_with_lra)
    assert (_logits(merged, "tiny-bert") - _logits(ref_model, "tiny-bert")).abs().max() < 1e-5


@pytest.mark.distributed
def test_a_failed_export_leaves_nothing_behind(t5_mergeable, tmp_path, monkeypatch):
    """A crash after the weights are written (here: the tokenizer copy) must not leave an OUT that
    loads as a plain model, nor block the rerun."""
    real = export._copy_tokenizer

    def full_disk(run, out):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export, "_copy_tokenizer", full_disk)
    with pytest.raises(OSError, match="No space left"):
        export_merged(t5_mergeable, tmp_path / "merged")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    monkeypatch.setattr(export, "_copy_tokenizer", real)
    report = export_merged(t5_mergeable, tmp_path / "merged")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]
    assert all(Path(f).parent == tmp_path / "merged" and Path(f).is_file() for f in report["files"])
    recorded = json.loads((tmp_path / "merged" / "s3delta_export.json").read_text())
    assert recorded["merged"] == report["merged"]
    # its file list names the folder's own files (it named the staging folder's, which is gone)
    assert recorded["files"] == ["model.safetensors"] and (tmp_path / "merged" / "model.safetensors").is_file()
    _check_merged_equals(t5_mergeable, tmp_path / "merged", "tiny-t5")


@pytest.mark.distributed
def test_sharded_save_loads(t5_mergeable, tmp_path):
    model, plan, _ = load_run(t5_mergeable)
    from s3delta_ds.artifacts.merge import merge

    merge(model, plan.site_map)
    files = save_hf(model, tmp_path / "sharded", max_shard_bytes=200_000)
    assert len(files) > 1 and (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    _check_merged_equals(t5_mergeable, tmp_path / "sharded", "tiny-t5")


@pytest.mark.distributed
def test_peft_round_trip_lora_and_ln_tuning(llama_peft, llama_all, tmp_path, capsys):
    from peft import AutoPeftModelForCausalLM, PeftModel

    assert main(["export", str(llama_peft), "--peft", "-o", str(tmp_path / "peft")]) == 0
    said = capsys.readouterr().out
    assert "lora -> " in said and "ln_tuning -> " in said and "not expressible" not in said
    assert repr(str(materialise_embedded("tiny-llama").resolve())) in said  # the base the adapters name
    ref_model, plan, _ = load_run(llama_peft)
    reference = _logits(ref_model, "tiny-llama")
    # the code the command prints, and writes beside the adapters, rebuilds the trained model as it is
    printed = textwrap.dedent(said.split("load them in this order", 1)[1].split("\n", 1)[1])
    readme = (tmp_path / "peft" / "README.md").read_text()
    assert printed.strip() in readme and printed.index("ln_tuning") < printed.index("peft')")
    scope: dict = {}
    exec(printed, scope)
    assert (_logits(scope["model"].eval(), "tiny-llama") - reference).abs().max() < 1e-5
    base_dir = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["base_model_name_or_path"]
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    # PEFT cannot hold LoRA and LN tuning in one model: fold the LN-tuning adapter, then add LoRA
    tuned = PeftModel.from_pretrained(base, tmp_path / "peft" / "ln_tuning").merge_and_unload()
    model = PeftModel.from_pretrained(tuned, tmp_path / "peft").eval()
    assert (_logits(model, "tiny-llama") - reference).abs().max() < 1e-5
    # the same through PEFT's own loader, which finds the base from base_model_name_or_path alone
    tuned = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "peft" / "ln_tuning").merge_and_unload()
    model = PeftModel.from_pretrained(tuned, tmp_path / "peft").eval()
    assert (_logits(model, "tiny-llama") - reference).abs().max() < 1e-5
    # PEFT cannot express added biases, PaFi, HiWi: refused, or left out with --partial
    with pytest.raises(StructureError, match="PEFT cannot express"):
        export_peft(llama_all, tmp_path / "refused")
    partial = export_peft(llama_all, tmp_path / "partial", partial=True)
    assert partial["not_exported"] and "lora" in partial["adapters"]


def test_peft_base_keeps_hub_ids_and_makes_local_dirs_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert peft_base_name(ModelConfig(name_or_path="google-t5/t5-base")) == "google-t5/t5-base"
    assert peft_base_name(ModelConfig(name_or_path="t5-small")) == "t5-small"
    (tmp_path / "models" / "t5").mkdir(parents=True)
    assert peft_base_name(ModelConfig(name_or_path="models/t5")) == str(tmp_path / "models" / "t5")
    assert peft_base_name(ModelConfig(name_or_path="tiny-t5")) == str(materialise_embedded("tiny-t5").resolve())


@pytest.mark.distributed
def test_peft_export_of_a_hub_model_names_the_hub_id(llama_peft, tmp_path, monkeypatch):
    """A run on ``org/name`` writes ``org/name`` into both adapter configs, not ``$PWD/org/name``."""
    hub_run = shutil.copytree(llama_peft, tmp_path / "hub-run")
    cfg = yaml.safe_load((hub_run / "config.yaml").read_text())
    cfg["model"]["name_or_path"] = "s3delta-test/tiny-llama"
    (hub_run / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    # the hub id cannot be downloaded here (offline): the weights come from the original run
    real_load_run = export.load_run
    monkeypatch.setattr(peft_export, "load_run", lambda run, **kw: real_load_run(llama_peft, **kw))
    export_peft(hub_run, tmp_path / "peft")
    for adapter in ("adapter_config.json", "ln_tuning/adapter_config.json"):
        cfg = json.loads((tmp_path / "peft" / adapter).read_text())
        assert cfg["base_model_name_or_path"] == "s3delta-test/tiny-llama"


@pytest.mark.distributed
def test_peft_lora_with_per_module_ranks_and_a_classification_head(tmp_path_factory, tmp_path):
    from peft import PeftModel

    out = tmp_path_factory.mktemp("bert-ranks")
    plan = Backbone.plan("tiny-bert")
    q = [c for c in plan.space("lora").candidates if c.site.endswith("attn.q")]
    mods = tuple(
        ModuleChoice(c.site, "lora", {"r": 2 + i, "alpha": 8.0, "dropout": 0.0}, (2 + i) * 128) for i, c in enumerate(q)
    )
    s = Structure(
        kind="manual", backbone=plan.info, budget=Budget(None, None, sum(m.params for m in mods)), modules=mods
    ).save(out / "s.json")
    run(
        "python",
        "retrain",
        [
            "model.name_or_path=tiny-bert",
            f"retrain.structure={s}",
            "retrain.steps=3",
            "retrain.lr=2e-2",
            "data.task=tiny-sentiment",
            "data.max_eval_examples=8",
            "zero_stage=0",
            f"output_dir={out / 'run'}",
        ],
        1,
    )
    export_peft(out / "run", tmp_path / "peft")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["r"] == 2 and list(cfg["rank_pattern"].values()) == [3] and cfg["modules_to_save"] == ["classifier"]
    ref_model, _, _ = load_run(out / "run")
    base = AutoModelForSequenceClassification.from_pretrained(cfg["base_model_name_or_path"], num_labels=2)
    model = PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    assert (_logits(model, "tiny-bert") - _logits(ref_model, "tiny-bert")).abs().max() < 1e-5


# -- IA3: folds for --merge, exports as a PEFT IA3 adapter (its own folder, loaded last) ------------


def _trained_space_run(tmp_path_factory, name: str, types: tuple[str, ...], space: str):
    out = tmp_path_factory.mktemp(f"{name}-{space}")
    s = _structure(name, types, space).save(out / "in.json")
    run(
        "python",
        "retrain",
        [
            f"model.name_or_path={name}",
            f"retrain.structure={s}",
            "retrain.steps=3",
            "retrain.eval_every=3",
            "retrain.lr=2e-2",
            "retrain.micro_batch_size=8",
            "data.task=tiny-sentiment",
            "data.max_eval_examples=8",
            "zero_stage=0",
            f"output_dir={out / 'run'}",
        ],
        1,
    )
    return out / "run"


@pytest.fixture(scope="module")
def llama_ia3(tmp_path_factory):
    """LoRA, LNFit and IA3 (keys, values, FFN inputs) from the mixed+ia3 space: IA3 shares sites with LoRA."""
    return _trained_space_run(tmp_path_factory, "tiny-llama", ("lora", "lnfit", "ia3"), "mixed+ia3")


@pytest.mark.distributed
def test_ia3_merges_and_round_trips_through_peft(llama_ia3, tmp_path):
    from peft import PeftModel

    structure = Structure.load(llama_ia3 / "structure.json")
    assert {m.kwargs["position"] for m in structure.modules if m.type == "ia3"} == {"input", "output"}
    report = export_merged(llama_ia3, tmp_path / "merged")
    assert report["kept"] == [] and report["merged"] == len(structure.modules)
    _check_merged_equals(llama_ia3, tmp_path / "merged", "tiny-llama")

    result = export_peft(llama_ia3, tmp_path / "peft")
    assert set(result["adapters"]) == {"lora", "ln_tuning", "ia3"} and result["not_exported"] == []
    cfg = json.loads((tmp_path / "peft" / "ia3" / "adapter_config.json").read_text())
    plan = Backbone.plan("tiny-llama")
    ia3 = [m for m in structure.modules if m.type == "ia3"]
    assert cfg["peft_type"] == "IA3" and cfg["target_modules"] == sorted(plan.site_map.path(m.site) for m in ia3)
    assert cfg["feedforward_modules"] == sorted(
        plan.site_map.path(m.site) for m in ia3 if m.kwargs["position"] == "input"
    )
    reference = _logits(load_run(llama_ia3)[0], "tiny-llama")
    # the recipe: LN tuning and LoRA merged first, IA3 last (on a shared site it scales LoRA's update)
    base = AutoModelForCausalLM.from_pretrained(cfg["base_model_name_or_path"])
    tuned = PeftModel.from_pretrained(base, tmp_path / "peft" / "ln_tuning").merge_and_unload()
    tuned = PeftModel.from_pretrained(tuned, tmp_path / "peft").merge_and_unload()
    model = PeftModel.from_pretrained(tuned, tmp_path / "peft" / "ia3").eval()
    assert (_logits(model, "tiny-llama") - reference).abs().max() < 1e-5


@pytest.mark.distributed
def test_ia3_alone_carries_the_classification_head(tmp_path_factory, tmp_path):
    from peft import PeftModel

    run_dir = _trained_space_run(tmp_path_factory, "tiny-bert", ("ia3",), "mixed+ia3")
    result = export_peft(run_dir, tmp_path / "peft")
    assert list(result["adapters"]) == ["ia3"]
    cfg = json.loads((tmp_path / "peft" / "ia3" / "adapter_config.json").read_text())
    assert cfg["modules_to_save"] == ["classifier"]
    base = AutoModelForSequenceClassification.from_pretrained(cfg["base_model_name_or_path"], num_labels=2)
    model = PeftModel.from_pretrained(base, tmp_path / "peft" / "ia3").eval()
    reference = _logits(load_run(run_dir)[0], "tiny-bert")
    assert (_logits(model, "tiny-bert") - reference).abs().max() < 1e-5


# -- BitFit on Linears rides in the LoRA adapter as lora_bias ----------------------------------------


def _hand_made_run(tmp_path, name: str, keep) -> Path:
    """A finished retrain directory without training: the structure, perturbed deltas, config.yaml."""
    from s3delta_ds.config import dump_yaml, load_run_config
    from s3delta_ds.method.supernet import named_delta_parameters
    from s3delta_ds.run.checkpoint import save_deltas

    from .helpers import tiny_model

    plan = Backbone.plan(name)
    cands = [c for c in plan.space("mixed").candidates if keep(c)]
    modules = tuple(ModuleChoice(c.site, c.type, c.kwargs, c.params) for c in cands)
    structure = Structure(
        kind="manual", backbone=plan.info, budget=Budget(None, None, sum(m.params for m in modules)), modules=modules
    )
    run_dir = tmp_path / "run"
    structure.save(run_dir / "structure.json")
    model = tiny_model(name)
    attach(model, Backbone.from_model(model).site_map, structure.specs())
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _, p in named_delta_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    save_deltas(model, run_dir / "deltas.safetensors")
    cfg = load_run_config(None, [f"model.name_or_path={name}", "data.task=tiny-sentiment"])
    (run_dir / "config.yaml").write_text(dump_yaml(cfg))
    return run_dir


def test_bitfit_on_linears_exports_as_lora_bias(tmp_path):
    from peft import PeftModel

    def keep(c):  # LoRA on q only; BitFit on q (beside LoRA) and v, mlp.down (alone); LNFit on norms
        comp = c.site.split(".", 2)[-1]
        return (
            (c.type == "lora" and comp == "attn.q")
            or (c.type == "bitfit" and comp in ("attn.q", "attn.v", "mlp.down"))
            or c.type == "lnfit"
        )

    run_dir = _hand_made_run(tmp_path, "tiny-t5", keep)
    result = export_peft(run_dir, tmp_path / "peft")
    assert set(result["adapters"]) == {"lora", "ln_tuning"} and result["not_exported"] == []
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["lora_bias"] is True
    bias_only = [k for k in cfg["target_modules"] if k.endswith("SelfAttention.v")]
    assert bias_only and all(cfg["alpha_pattern"][k] == 1.0 for k in bias_only)  # zero rank-1 LoRA, α/r = 1
    reference = _logits(load_run(run_dir)[0], "tiny-t5")
    base = AutoModelForSeq2SeqLM.from_pretrained(cfg["base_model_name_or_path"])
    tuned = PeftModel.from_pretrained(base, tmp_path / "peft" / "ln_tuning").merge_and_unload()
    model = PeftModel.from_pretrained(tuned, tmp_path / "peft").eval()  # unmerged: T5 has no bias to merge into
    assert (_logits(model, "tiny-t5") - reference).abs().max() < 1e-5


def test_bitfit_where_peft_cannot_hold_it_is_refused_by_name(tmp_path):
    run_dir = _hand_made_run(tmp_path, "tiny-t5", lambda c: c.type == "bitfit" and c.site.endswith("attn_norm"))
    with pytest.raises(StructureError, match="bitfit on encoder.0.attn_norm: PEFT holds an added bias only on a Lin"):
        export_peft(run_dir, tmp_path / "peft")
