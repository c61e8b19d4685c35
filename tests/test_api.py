"""The public Python API: attach/load on a user's own model (trained by HF Trainer), search and
retrain called several times in one process, and what ``__all__`` promises."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

import s3delta_ds
from s3delta_ds.errors import StructureError
from s3delta_ds.method.supernet import DeltaSlot, named_delta_parameters
from s3delta_ds.run.checkpoint import save_deltas
from s3delta_ds.structure.builders import Backbone, manual

from .helpers import tiny_inputs, tiny_model
from .launching import env


def test_all_names_resolve_and_nothing_else_is_public():
    assert set(s3delta_ds.__all__) == {"__version__", *s3delta_ds._PUBLIC}
    for name in s3delta_ds.__all__:
        assert getattr(s3delta_ds, name) is not None, name
    assert callable(s3delta_ds.attach) and callable(s3delta_ds.load)
    assert callable(s3delta_ds.search) and callable(s3delta_ds.retrain)
    assert "mixed" in s3delta_ds.SPACES
    with pytest.raises(AttributeError, match="no attribute 'supernet_internals'"):
        s3delta_ds.supernet_internals  # noqa: B018


def test_no_public_name_is_shadowed_by_a_submodule():
    """Importing ``s3delta_ds.x`` binds the package attribute ``x`` to the module: a public function
    of that name would vanish after the first import. Only the callable launcher modules may share."""
    import importlib.util

    for name in s3delta_ds.__all__:
        if importlib.util.find_spec(f"s3delta_ds.{name}") is not None:
            assert name in ("search", "retrain"), name
            assert callable(importlib.import_module(f"s3delta_ds.{name}"))


def test_structure_transfers_and_rediscretises():
    from s3delta_ds.structure.builders import searched

    plan = s3delta_ds.Backbone.plan("tiny-t5")
    space = plan.space("mixed")
    g = torch.Generator().manual_seed(0)
    p = torch.rand(len(space), generator=g).tolist()
    structure = searched(space, plan.info, p, [0.0] * len(space), 0.02)
    big = structure.transfer("tiny-t5-v1_1")
    assert big.backbone.name_or_path == "tiny-t5-v1_1" and 0 < big.budget.used <= big.budget.absolute
    smaller = structure.rediscretise(0.01)
    assert 0 < smaller.budget.used <= 0.01 * plan.info.num_params < structure.budget.used


def test_attach_makes_exactly_the_structure_trainable_and_starts_as_the_backbone(tmp_path):
    model = tiny_model("tiny-t5")
    batch = tiny_inputs("tiny-t5")
    with torch.no_grad():
        before = model(**batch).logits
    structure = manual(Backbone.from_model(model), "lora").save(tmp_path / "s.json")
    assert s3delta_ds.attach(model, structure) is model
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == s3delta_ds.Structure.load(structure).budget.used > 0
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, before)  # LoRA's B starts at zero


def test_attach_refuses_a_structure_of_another_model(tmp_path):
    llama = manual(Backbone.plan("tiny-llama"), "lora").save(tmp_path / "s.json")
    with pytest.raises(StructureError, match="llama backbone but this one is t5"):
        s3delta_ds.attach(tiny_model("tiny-t5"), llama)


def test_hf_trainer_trains_the_attached_deltas_only(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = tiny_model("tiny-t5")
    s3delta_ds.attach(model, manual(Backbone.from_model(model), "lora").save(tmp_path / "s.json"))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    deltas = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    batch = tiny_inputs("tiny-t5", batch=8)
    rows = [{k: v[i] for k, v in batch.items()} for i in range(8)]
    args = TrainingArguments(
        output_dir=str(tmp_path / "hf"),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    Trainer(model=model, args=args, train_dataset=rows).train()
    after = dict(model.named_parameters())
    assert all(torch.equal(after[n], p) for n, p in frozen.items())
    assert any(not torch.equal(after[n], p) for n, p in deltas.items())


def test_load_attaches_and_loads_trained_deltas_like_peft(tmp_path):
    trained = tiny_model("tiny-t5")
    structure = manual(Backbone.from_model(trained), "lora")
    structure.save(tmp_path / "structure.json")
    s3delta_ds.attach(trained, tmp_path / "structure.json")
    with torch.no_grad():
        for _, p in named_delta_parameters(trained):
            p.normal_(0, 0.2)
    save_deltas(trained, tmp_path / "deltas.safetensors")
    batch = tiny_inputs("tiny-t5")
    fresh = s3delta_ds.load(tiny_model("tiny-t5"), tmp_path)
    with torch.no_grad():
        assert not fresh.training
        torch.testing.assert_close(fresh(**batch).logits, trained.eval()(**batch).logits, atol=1e-6, rtol=0)


def test_load_refuses_deltas_trained_with_another_structure_of_the_same_shapes(tmp_path):
    """Another LoRA alpha has the same shapes: without the recorded digest the deltas loaded and
    every output changed (x2 here)."""
    from s3delta_ds.errors import CheckpointError

    trained = tiny_model("tiny-t5")
    structure = manual(Backbone.from_model(trained), "lora")
    structure.save(tmp_path / "structure.json")
    s3delta_ds.attach(trained, tmp_path / "structure.json")
    save_deltas(trained, tmp_path / "deltas.safetensors", metadata={"structure": structure.digest()})
    s3delta_ds.load(tiny_model("tiny-t5"), tmp_path)  # its own structure: loads
    d = json.loads((tmp_path / "structure.json").read_text())
    for m in d["modules"]:
        m["kwargs"]["alpha"] = 2 * m["kwargs"]["alpha"]
    (tmp_path / "structure.json").write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match="trained with another structure"):
        s3delta_ds.load(tiny_model("tiny-t5"), tmp_path)


def test_attach_gives_each_delta_its_hosts_dtype_in_a_half_precision_t5(tmp_path):
    """transformers keeps T5's ``wo`` in fp32 in an fp16 model; a LoRA there cast to fp16 met fp32
    inputs ("expected m1 and m2 to have the same dtype")."""
    from transformers import AutoModelForSeq2SeqLM

    tiny_model("tiny-t5").save_pretrained(tmp_path / "m")
    model = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "m", dtype=torch.float16)
    backbone = Backbone.from_model(model)
    wo = model.get_submodule(backbone.site_map.site("encoder.0.mlp.down").path)
    assert (
        wo.weight.dtype == torch.float32
        and model.get_submodule(backbone.site_map.site("encoder.0.attn.q").path).weight.dtype == torch.float16
    )
    structure = manual(backbone, "lora-all-r1").save(tmp_path / "s.json")
    s3delta_ds.attach(model, structure)
    assert {p.dtype for p in wo.s3delta.parameters()} == {torch.float32}
    q = model.get_submodule(backbone.site_map.site("encoder.0.attn.q").path)
    assert {p.dtype for p in q.s3delta.parameters()} == {torch.float16}
    with torch.no_grad():
        model(**tiny_inputs("tiny-t5"))  # no dtype error


@pytest.mark.parametrize("preset", ["lra", "adapter"])
def test_adapters_on_a_half_t5_ffn_block_take_its_fp32_output(tmp_path, preset):
    """The FFN block returns fp32 in an fp16 T5 (its ``wo`` is kept in fp32): the block's adapter,
    given the backbone's fp16, failed at the first forward ("expected m1 and m2 to have the same
    dtype"). It now takes fp32, as the block's output."""
    from transformers import AutoModelForSeq2SeqLM

    tiny_model("tiny-t5").save_pretrained(tmp_path / "m")
    model = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "m", dtype=torch.float16)
    reference = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "m", dtype=torch.float16)
    backbone = Backbone.from_model(model)
    structure = manual(backbone, preset).save(tmp_path / "s.json")
    s3delta_ds.attach(model, structure)
    blocks = {m.site: {p.dtype for p in m.parameters()} for m in model.modules() if isinstance(m, DeltaSlot)}
    assert {s.rsplit(".", 1)[1] for s in blocks} == {"attn", "mlp"}, blocks
    for site, dtypes in blocks.items():  # the attention block is all fp16, and so is its output
        assert dtypes == {torch.float32 if site.endswith(".mlp") else torch.float16}, site
    for slot in (m for m in model.modules() if isinstance(m, DeltaSlot)):
        for delta in slot.deltas.values():  # a zero change, so the outputs must be the plain model's
            for name, p in delta.named_parameters():
                if "up" in name:
                    torch.nn.init.zeros_(p)
    with torch.no_grad():
        got = model(**tiny_inputs("tiny-t5")).logits
        want = reference(**tiny_inputs("tiny-t5")).logits
    assert torch.equal(got, want)


def test_a_block_and_a_linear_inside_it_both_take_a_bf16_models_dtype(tmp_path):
    """A block site's dtype read its child site's delta (still fp32 before its own cast) as the
    block's own fp32 module: the block's adapter went fp32 in a bf16 model, and ZeRO-3 refused the
    mixed trainable dtypes at start-up."""
    from transformers import AutoModelForSeq2SeqLM

    from s3delta_ds.deltas import resolve
    from s3delta_ds.structure import Budget, ModuleChoice, Structure

    tiny_model("tiny-t5").save_pretrained(tmp_path / "m")
    model = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "m", dtype=torch.bfloat16)
    backbone = Backbone.from_model(model)
    chosen = [("encoder.0.mlp", "lra", {}), ("encoder.0.mlp.down", "lora", {"r": 1})]
    modules = []
    for site, kind, kwargs in chosen:
        _, _, n = resolve(kind, kwargs, backbone.site_map.site(site).dims, site)
        modules.append(ModuleChoice(site, kind, kwargs, n))
    used = sum(m.params for m in modules)
    Structure(kind="manual", backbone=backbone.info, budget=Budget(None, None, used), modules=tuple(modules)).save(
        tmp_path / "s.json"
    )
    s3delta_ds.attach(model, tmp_path / "s.json")
    assert {p.dtype for _, p in named_delta_parameters(model)} == {torch.bfloat16}
    with torch.no_grad():
        model(**tiny_inputs("tiny-t5"))


def _mean_pooled_bert_run(tmp_path, *, pooling_metadata: bool = True):
    """A tiny BERT trained with model.pooling=mean (what auto gives a sentence-transformers checkpoint)."""
    from s3delta_ds.backbones.pooling import use_mean_pooling

    trained = tiny_model("tiny-bert")
    use_mean_pooling(trained)
    manual(Backbone.from_model(trained), "lora").save(tmp_path / "structure.json")
    s3delta_ds.attach(trained, tmp_path / "structure.json")
    torch.manual_seed(0)
    with torch.no_grad():
        for _, p in named_delta_parameters(trained):
            p.normal_(0, 0.2)
        trained.classifier.weight.normal_(0, 1.0)
    save_deltas(trained, tmp_path / "deltas.safetensors", head_prefixes=("classifier",))
    if not pooling_metadata:  # a delta file written before the pooling was recorded
        from safetensors.torch import load_file, save_file

        from s3delta_ds.run.checkpoint import read_delta_metadata

        meta = read_delta_metadata(tmp_path / "deltas.safetensors")
        del meta["pooling"]
        save_file(load_file(tmp_path / "deltas.safetensors"), tmp_path / "deltas.safetensors", metadata=meta)
    return trained.eval()


@pytest.mark.parametrize("source", ["delta file", "config.yaml"])
def test_load_pools_as_the_run_was_trained(tmp_path, source):
    """A mean-pooled classifier reloaded on the CLS pooler predicted other classes, silently."""
    trained = _mean_pooled_bert_run(tmp_path, pooling_metadata=source == "delta file")
    if source == "config.yaml":
        (tmp_path / "config.yaml").write_text("model:\n  name_or_path: tiny-bert\n  pooling: mean\n")
    batch = tiny_inputs("tiny-bert")
    plain = tiny_model("tiny-bert")
    fresh = s3delta_ds.load(tiny_model("tiny-bert"), tmp_path)
    with torch.no_grad():
        expected = trained(**batch).logits
        torch.testing.assert_close(fresh(**batch).logits, expected, atol=1e-6, rtol=0)
        s3delta_ds.attach(plain, tmp_path / "structure.json")  # the same deltas on the CLS pooler differ
        from s3delta_ds.run.checkpoint import load_deltas

        load_deltas(plain, tmp_path / "deltas.safetensors", head_prefixes=("classifier",))
        assert (plain.eval()(**batch).logits - expected).abs().max() > 1e-3


def test_load_refuses_cls_trained_deltas_on_a_mean_pooled_model(tmp_path):
    from s3delta_ds.backbones.pooling import use_mean_pooling

    trained = tiny_model("tiny-bert")
    manual(Backbone.from_model(trained), "lora").save(tmp_path / "structure.json")
    s3delta_ds.attach(trained, tmp_path / "structure.json")
    save_deltas(trained, tmp_path / "deltas.safetensors", head_prefixes=("classifier",))
    model = tiny_model("tiny-bert")
    use_mean_pooling(model)
    with pytest.raises(s3delta_ds.S3DeltaError, match="trained on the CLS pooler"):
        s3delta_ds.load(model, tmp_path)


def test_load_names_what_is_missing(tmp_path):
    with pytest.raises(s3delta_ds.S3DeltaError, match="retrian does not exist: pass a retrain run"):
        s3delta_ds.load(tiny_model("tiny-t5"), tmp_path / "retrian")  # a typo, not a run lacking a file
    with pytest.raises(s3delta_ds.S3DeltaError, match="deltas.safetensors is missing"):
        (tmp_path / "structure.json").write_text("{}")
        s3delta_ds.load(tiny_model("tiny-t5"), tmp_path)


def test_run_config_takes_a_dict_overrides_and_keywords():
    cfg = s3delta_ds.run_config(
        {"search": {"steps": 7}, "data": {"task": "cola"}}, ["search.lr=1e-3"], {"search__budget": 0.01, "seed": 3}
    )
    assert (cfg.search.steps, cfg.search.lr, cfg.search.budget, cfg.seed, cfg.data.task) == (7, 1e-3, 0.01, 3, "cola")
    with pytest.raises(s3delta_ds.S3DeltaError, match="unknown key search.stepz"):
        s3delta_ds.run_config(None, [], {"search__stepz": 1})


def test_a_yaml_is_validated_with_its_overrides_as_the_command_line_does(tmp_path):
    """A file valid only with the overrides that come with it (custom-data keys, with
    data.task=custom on the command line) was refused on its own by the API."""
    from s3delta_ds.config import load_run_config

    path = tmp_path / "mine.yaml"
    path.write_text("data:\n  train_file: train.csv\n  validation_file: dev.csv\n  label_words: [bad, good]\n")
    cli = load_run_config(path, ["data.task=custom"])  # what `s3delta search --config` builds
    assert s3delta_ds.run_config(path, ["data.task=custom"]) == cli
    assert s3delta_ds.run_config(path, keys={"data__task": "custom"}) == cli
    assert cli.data.task == "custom" and cli.data.train_file == "train.csv"
    with pytest.raises(s3delta_ds.S3DeltaError, match="data.train_file only applies to data.task=custom"):
        s3delta_ds.run_config(path)


NOTEBOOK = """
import json, os, sys
import torch.distributed as dist
import s3delta_ds

out = sys.argv[1]
tiny = dict(search__steps=4, search__eval_every=2, search__budget=0.02, retrain__steps=4, retrain__eval_every=2,
            data__max_train_examples=48, data__max_eval_examples=16, deepspeed="zero3_cpu")
first = s3delta_ds.search(output_dir=f"{out}/s1", **tiny)
second = s3delta_ds.search({"seed": 1}, f"output_dir={out}/s2", **tiny)
again = s3delta_ds.retrain(output_dir=f"{out}/r", retrain__structure=first["structure"], **tiny)
try:  # a time-limited job: stop at step 2, then resume from Python
    s3delta_ds.retrain(output_dir=f"{out}/r2", retrain__structure=first["structure"], retrain__stop_after=2, **tiny)
    stopped = None
except s3delta_ds.S3DeltaError as e:
    stopped = str(e)
resumed = s3delta_ds.retrain(output_dir=f"{out}/r2", retrain__structure=first["structure"], resume=True, **tiny)
print(json.dumps({
    "first": first["modules"], "second": second["modules"], "retrain_params": again["trainable_params"],
    "used": first["params_used"], "initialised": dist.is_initialized(), "stopped": stopped,
    "test": [again["test"]["loss"], resumed["test"]["loss"]],
    "env": sorted(k for k in ("RANK", "WORLD_SIZE", "MASTER_PORT", "MASTER_ADDR") if k in os.environ),
}))
"""


@pytest.mark.slow
def test_search_then_retrain_several_times_in_one_process(tmp_path):
    """A notebook: two searches and a retrain in one interpreter, with no process group or
    rendezvous variable left behind (run in a subprocess so the test process stays clean)."""
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(NOTEBOOK), str(tmp_path)],
        env=env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["first"] > 0 and result["second"] > 0
    assert result["retrain_params"] == result["used"]
    assert result["initialised"] is False and result["env"] == []
    assert "stopped early" in result["stopped"] and "resume=True" in result["stopped"]
    uninterrupted, resumed = result["test"]
    assert resumed == pytest.approx(uninterrupted, abs=1e-5), "the resumed retrain must end where the whole one did"


OWN_GROUP = """
import json, socket, sys
import torch.distributed as dist
import s3delta_ds

with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
s3delta_ds.search(output_dir=sys.argv[1], search__steps=2, search__eval_every=2, search__budget=0.02,
                  data__max_train_examples=32, data__max_eval_examples=16)
alive = dist.is_initialized()
dist.barrier()  # the caller's group still works
print(json.dumps({"initialised": alive}))
"""


@pytest.mark.slow
def test_a_process_group_the_caller_made_is_left_alone(tmp_path):
    """``init_process_group`` by the caller, no RANK variable: the call used the group and then
    destroyed it, and the caller's next collective failed."""
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(OWN_GROUP), str(tmp_path / "s")],
        env=env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"initialised": True}


def test_search_takes_its_config_as_a_keyword_too(tmp_path):
    """``search(config="run.yaml")``: no setting is called config, so it is the YAML, not an unknown key."""
    from s3delta_ds.errors import ConfigError

    bad = tmp_path / "run.yaml"
    bad.write_text("search:\n  stepz: 3\n")
    with pytest.raises(ConfigError, match="unknown key search.stepz"):  # the YAML was read
        s3delta_ds.search(config=bad)
    with pytest.raises(ConfigError, match="config given twice"):
        s3delta_ds.retrain(bad, config=bad)


def test_the_embedded_models_load_with_from_pretrained_offline_for_the_api_examples():
    """The docs' examples on the models the CLI's embedded default trains, without a download."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from s3delta_ds.config import ModelConfig
    from s3delta_ds.engine.backbone import resolve_source

    path = s3delta_ds.embedded_model("tiny-t5")
    assert str(path) == resolve_source(ModelConfig(name_or_path="tiny-t5"))  # the weights a run trains
    model = AutoModelForSeq2SeqLM.from_pretrained(path)
    assert Backbone.from_model(model).info.num_params == Backbone.plan("tiny-t5").info.num_params
    assert isinstance(AutoModelForCausalLM.from_pretrained(s3delta_ds.embedded_model("tiny-llama")), torch.nn.Module)
    with pytest.raises(s3delta_ds.S3DeltaError, match="no embedded model 't5-base'; embedded: tiny-t5"):
        s3delta_ds.embedded_model("t5-base")


def test_load_warns_when_the_deltas_were_trained_on_another_config_of_the_same_shapes(tmp_path):
    """T5 with another activation has every shape of the original: the deltas loaded without a word
    and every output changed. The delta file records the config it was trained on."""
    import warnings

    from s3delta_ds.backbones.loading import config_hash

    trained = tiny_model("tiny-t5")
    structure = manual(Backbone.from_model(trained), "lora")
    structure.save(tmp_path / "structure.json")
    s3delta_ds.attach(trained, tmp_path / "structure.json")
    meta = {"structure": structure.digest(), "backbone": "tiny-t5", "config_hash": config_hash(trained.config)}
    save_deltas(trained, tmp_path / "deltas.safetensors", metadata=meta)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s3delta_ds.load(tiny_model("tiny-t5"), tmp_path)  # its own config: no warning
    quantized = tiny_model("tiny-t5")  # from_pretrained(quantization_config=...) adds it to the config
    quantized.config.quantization_config = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s3delta_ds.load(quantized, tmp_path)  # the same model, quantized here: no warning
    # and the other way round, QLoRA's: trained quantized, loaded plain for inference
    qlora = tmp_path / "qlora"
    qlora.mkdir()
    (qlora / "structure.json").write_bytes((tmp_path / "structure.json").read_bytes())
    save_deltas(trained, qlora / "deltas.safetensors", metadata={**meta, "config_hash": config_hash(quantized.config)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s3delta_ds.load(tiny_model("tiny-t5"), qlora)
    # a file a quantized run wrote before the hash left quantization out, loaded as it was trained
    legacy = {**meta, "config_hash": config_hash(quantized.config, legacy=True)}
    assert legacy["config_hash"] != config_hash(quantized.config)
    save_deltas(trained, qlora / "deltas.safetensors", metadata=legacy)
    again = tiny_model("tiny-t5")
    again.config.quantization_config = quantized.config.quantization_config
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s3delta_ds.load(again, qlora)
    other = tiny_model("tiny-t5")
    other.config.dense_act_fn = "gelu_new" if other.config.dense_act_fn != "gelu_new" else "relu"
    with pytest.warns(UserWarning, match=r"trained on tiny-t5 \(config sha256:.*this model's config differs"):
        s3delta_ds.load(other, tmp_path)
