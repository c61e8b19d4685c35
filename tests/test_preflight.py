"""What a run resolves and checks before it writes or loads anything: names, the structure, the task
and model a retrain takes from the structure, the data split seed, and label-word scoring."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from s3delta_ds.config import load_run_config
from s3delta_ds.data import Collator, Encoder, get_task, load_tokenizer
from s3delta_ds.errors import BackboneError, ConfigError, SearchSpaceError, StructureError
from s3delta_ds.method.objective import DeltaModel
from s3delta_ds.retrain import run_retrain
from s3delta_ds.run.evaluate import evaluate
from s3delta_ds.run.preflight import preflight_retrain, preflight_search
from s3delta_ds.run.runtime import load_data, prepare_output_dir
from s3delta_ds.search import run_search
from s3delta_ds.structure import builders

from .helpers import tiny_model


def _cfg(tmp_path, *overrides):
    return load_run_config(None, [f"output_dir={tmp_path / 'out'}", *overrides])


def _searched_structure(tmp_path, model="tiny-t5", **search):
    plan = builders.Backbone.plan(model)
    s = builders.random_baseline(plan.space("mixed"), plan.info, 0.02, seed=0)
    s = dataclasses.replace(s, search={"method": "s3delta-first-order", "seed": 0, **search})
    return s.save(tmp_path / f"{model}.json")


# -- names fail before anything is written (no process group, no load, no output dir) ---------------


@pytest.mark.parametrize(
    "overrides, error, named",
    [
        (["search.space=mixd", "deepspeed=zero3_cpu"], SearchSpaceError, "mixd"),
        (["data.task=sst3", "deepspeed=zero3"], ConfigError, "sst3"),
        (["deepspeed=zero4"], ConfigError, "zero4"),
        (["model.name_or_path=/nowhere/model"], BackboneError, "/nowhere/model"),
    ],
)
def test_search_refuses_bad_names_before_writing(tmp_path, overrides, error, named):
    cfg = _cfg(tmp_path, *overrides)
    with pytest.raises(error, match=named):
        run_search(cfg)
    assert not (tmp_path / "out").exists()


def test_retrain_refuses_a_malformed_structure_before_writing(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "s3delta-structure", "version": 1, "kind": "searched"}))
    with pytest.raises(StructureError, match="backbone"):
        run_retrain(_cfg(tmp_path, f"retrain.structure={bad}", "data.task=tiny-sentiment"))
    assert not (tmp_path / "out").exists()


def test_retrain_refuses_a_structure_of_another_family_before_loading(tmp_path):
    llama = _searched_structure(tmp_path, "tiny-llama", task="tiny-sentiment")
    cfg = _cfg(tmp_path, f"retrain.structure={llama}", "model.name_or_path=tiny-t5")
    with pytest.raises(StructureError, match="llama backbone but model tiny-t5 is t5"):
        run_retrain(cfg)
    assert not (tmp_path / "out").exists()


def test_retrain_refuses_a_structure_of_another_size_before_writing(tmp_path):
    """Same family, other widths: refused in preflight, so the corrected rerun is not "not empty"."""
    plan = builders.Backbone.plan("t5-base")
    base = builders.random_baseline(plan.space("mixed"), plan.info, 1e-3, seed=0).save(tmp_path / "base.json")
    cfg = _cfg(tmp_path, f"retrain.structure={base}", "model.name_or_path=tiny-t5", "data.task=tiny-sentiment")
    with pytest.raises(StructureError, match="it was made for google-t5/t5-base .*use `s3delta transfer`"):
        run_retrain(cfg)
    assert not (tmp_path / "out").exists()


# -- retrain takes task and model from the structure, and says so ------------------------------------


def test_retrain_takes_task_and_model_from_the_structure(tmp_path):
    path = _searched_structure(tmp_path, "tiny-llama", task="cola")
    said = []
    cfg, structure = preflight_retrain(_cfg(tmp_path, f"retrain.structure={path}"), log=said.append)
    assert cfg.data.task == "cola" and cfg.model.name_or_path == "tiny-llama"
    assert structure.backbone.family == "llama"
    assert any("data.task not set: using cola" in s for s in said)
    assert any("model.name_or_path not set: using tiny-llama" in s for s in said)


def test_retrain_of_a_structure_searched_on_your_own_data_asks_for_its_config(tmp_path):
    """The structure records data.task=custom, not the files and template: retrained without the
    search's config, it failed on "data.task=custom needs data.template", naming the wrong fix."""
    path = _searched_structure(tmp_path, "tiny-t5", task="custom")
    with pytest.raises(ConfigError, match="searched on your own data.*--config mine.yaml.*CONFIG=mine.yaml"):
        preflight_retrain(_cfg(tmp_path, f"retrain.structure={path}"), log=lambda s: None)


def test_retrain_without_a_task_anywhere_is_an_error(tmp_path):
    plan = builders.Backbone.plan("tiny-t5")
    random_path = builders.random_baseline(plan.space("mixed"), plan.info, 0.02, seed=0).save(tmp_path / "r.json")
    with pytest.raises(ConfigError, match="data.task is not set and the structure records no search task"):
        preflight_retrain(_cfg(tmp_path, f"retrain.structure={random_path}"), log=lambda s: None)
    cfg, _ = preflight_retrain(
        _cfg(tmp_path, f"retrain.structure={random_path}", "data.task=tiny-sentiment"), log=lambda s: None
    )
    assert cfg.data.task == "tiny-sentiment"


def test_search_defaults_are_the_embedded_ones():
    """With no model, or an embedded one named, the default budget (for real backbones: 25
    parameters of tiny-t5, below its cheapest module) becomes the embedded models'; a budget the
    user set, or a real model, keeps its own."""
    said = []
    cfg = preflight_search(load_run_config(None, []), log=said.append)
    assert (cfg.model.name_or_path, cfg.data.task, cfg.search.budget) == ("tiny-t5", "tiny-sentiment", 0.02)
    assert any("search.budget=0.02" in s for s in said)
    assert preflight_search(load_run_config(None, ["search.budget=0.01"]), log=said.append).search.budget == 0.01
    for name in ("tiny-t5", "tiny-llama", "tiny-bert"):  # named outright: it failed on the default budget
        named = preflight_search(load_run_config(None, [f"model.name_or_path={name}"]), log=said.append)
        assert named.search.budget == 0.02
        assert f"model.name_or_path is the embedded {name} at search.budget=0.02" in said[-1]
    kept = preflight_search(load_run_config(None, ["model.name_or_path=tiny-t5", "search.budget=1e-2"]))
    assert kept.search.budget == 1e-2
    real = preflight_search(load_run_config(None, ["model.name_or_path=t5-base", "model.random_init=true"]))
    assert real.search.budget == 1.389e-4


@pytest.mark.parametrize("space", ["lora", "bias", "mixed", "mergeable", "mixed+adapter"])
@pytest.mark.parametrize("name", ["tiny-t5", "tiny-llama", "tiny-bert"])
def test_the_embedded_default_budget_leaves_every_space_something_to_search(name, space):
    """All of tiny-t5's LoRA candidates hold 1.98% of it: search.space=lora (what a PEFT export
    asks for) was refused at the 2% default as "nothing to search"."""
    from s3delta_ds.method.gates import check_budget

    cfg = preflight_search(load_run_config(None, [f"model.name_or_path={name}", f"search.space={space}"]))
    plan = builders.Backbone.plan(name)
    n = plan.space(space).params
    check_budget(n, cfg.search.budget * plan.info.num_params)  # raises BudgetError when impossible
    assert cfg.search.budget == 0.02 or cfg.search.budget * plan.info.num_params < sum(n) / 1.9


def test_an_unreachable_budget_names_the_range_that_fits():
    from s3delta_ds.errors import BudgetError
    from s3delta_ds.run.plan import RunPlan

    cfg = load_run_config(None, ["model.name_or_path=tiny-t5"])
    with pytest.raises(
        BudgetError,
        match=r"search.budget=0.0001389 of tiny-t5's 181,056 parameters: .* must lie in \[0.000354, 0.0455\]",
    ):
        RunPlan.for_search(cfg, "tiny-t5")
    # either end copied from the message is a budget that fits (the low end once printed 0.000353, under
    # the cheapest candidate's 0.0003535, and was refused in turn)
    for fits in (0.000354, 0.0455):
        RunPlan.for_search(load_run_config(None, ["model.name_or_path=tiny-t5", f"search.budget={fits}"]), "tiny-t5")
    with pytest.raises(BudgetError):
        RunPlan.for_search(load_run_config(None, ["model.name_or_path=tiny-t5", "search.budget=0.000353"]), "tiny-t5")


# -- data splits depend on data.split_seed, never on the run seed -----------------------------------


@pytest.mark.parametrize(
    "search_meta, warned",
    [({"split_seed": 3}, False), ({"split_seed": 0}, True), ({}, True)],  # {}: old files split with the seed
)
def test_retrain_warns_when_the_structure_was_searched_on_another_split(tmp_path, search_meta, warned):
    path = _searched_structure(tmp_path, task="tiny-sentiment", **search_meta)
    said = []
    preflight_retrain(_cfg(tmp_path, f"retrain.structure={path}", "data.split_seed=3"), log=said.append)
    assert any("WARNING" in s and "split seed" in s for s in said) is warned


def _split_files(tmp_path):
    rows = [{"sentence": f"sentence number {i} .", "label": i % 2} for i in range(60)]
    d = tmp_path / "data"
    d.mkdir()
    for split, part in (("train", rows[:40]), ("validation", rows[40:])):  # no test split: the protocol draws one
        (d / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    return d


def test_validation_and_test_rows_do_not_depend_on_the_run_seed(tmp_path):
    data_dir = _split_files(tmp_path)
    task = get_task("cola")  # the "small" protocol: validation is halved into validation and test
    tok = load_tokenizer("t5", "tiny-t5", None, None)
    enc = Encoder(task, tok, "seq2seq", 32, 4)

    def splits(*overrides):
        cfg = _cfg(tmp_path, "data.task=cola", f"data.data_dir={data_dir}", *overrides)
        return load_data(cfg, task, enc)

    a, b = splits("seed=0"), splits("seed=1")
    assert a["validation"] == b["validation"] and a["test"] == b["test"]
    c = splits("seed=0", "data.split_seed=5")
    assert c["test"] != a["test"]
    assert sorted(map(str, c["validation"] + c["test"])) == sorted(map(str, a["validation"] + a["test"]))


# -- label-word scoring --------------------------------------------------------------------------------


def test_length_normalised_scoring_does_not_favour_short_label_words():
    """A random tiny T5 gives every token a similar NLL, so the summed score prefers the one-token
    word almost always; the mean per token does not. Both match a by-hand scoring of the same model."""
    task = dataclasses.replace(
        get_task("tiny-sentiment"), label_words=("no", "positive review of a very good film indeed")
    )
    tok = load_tokenizer("t5", "tiny-t5", None, None)
    lengths = [len(tok(w)["input_ids"]) for w in task.label_words]
    assert lengths[1] >= 3 * lengths[0]
    enc = Encoder(task, tok, "seq2seq", 32, 16)
    rows = [{"sentence": f"film number {i} was {'good' if i % 2 else 'bad'} .", "label": i % 2} for i in range(24)]
    examples = [enc.encode(r) for r in rows]
    collate = Collator("seq2seq", tok.pad_token_id, 0)
    model = DeltaModel(tiny_model("tiny-t5"), "seq2seq")

    with torch.no_grad():
        per_word = [model(collate(examples, choice=k)) for k in range(2)]
    sums = torch.stack([s for s, _ in per_word], -1)
    means = sums / torch.stack([c for _, c in per_word], -1)
    want = {"sum": sums.argmin(-1), "length-normalised": means.argmin(-1)}
    assert (want["sum"] == 0).all()  # the short word always wins the sum
    assert (want["length-normalised"] == 1).any()

    for scoring, pred in want.items():
        out = evaluate(model, examples, collate, task, batch_size=8, device=torch.device("cpu"), label_scoring=scoring)
        gold = torch.tensor([r["label"] for r in rows])
        assert out["accuracy"] == pytest.approx(float((pred == gold).float().mean()))
    # the loss is the gold word's per-token NLL whatever the scoring
    total = sums.gather(1, torch.tensor([r["label"] for r in rows])[:, None]).sum()
    count = torch.stack([c for _, c in per_word], -1).gather(1, torch.tensor([r["label"] for r in rows])[:, None]).sum()
    assert out["loss"] == pytest.approx(float(total / count), rel=1e-5)


# -- accelerate launch: the DeepSpeed plugin's choice wins over deepspeed=auto ------------------------


def test_accelerate_plugin_config_replaces_auto(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", "zero3_cpu")
    said = []
    assert preflight_search(_cfg(tmp_path), log=said.append).deepspeed == "zero3_cpu"
    assert any("accelerate launch" in s for s in said)
    # an explicit run setting is the user's word: kept
    assert preflight_search(_cfg(tmp_path, "deepspeed=zero2"), log=said.append).deepspeed == "zero2"
    monkeypatch.delenv("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    cfg = preflight_search(_cfg(tmp_path), log=said.append)
    assert (cfg.deepspeed, cfg.zero_stage) == ("zero3", 3)


def test_overwrite_replaces_only_a_runs_directory(tmp_path, monkeypatch):
    """overwrite=true deletes the whole output directory: never one that is not an earlier run's,
    nor one holding the current directory."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    for name in ("config.yaml", "ds_config.json", "metrics.jsonl"):
        (run / name).write_text("x")
    prepare_output_dir(run, resume=False, overwrite=True)
    assert [p.name for p in run.iterdir()] == [".s3delta-run"]  # emptied, and claimed by the new run

    mine = tmp_path / "thesis"
    (mine / "ch1").mkdir(parents=True)
    (mine / "ch1" / "intro.tex").write_text("keep me")
    (mine / "config.yaml").write_text("a config of my own")
    with pytest.raises(ConfigError, match="not an s3delta_ds run"):
        prepare_output_dir(mine, resume=False, overwrite=True)
    assert (mine / "ch1" / "intro.tex").read_text() == "keep me"

    (run / "config.yaml").write_text("x")
    (run / "ds_config.json").write_text("x")
    monkeypatch.chdir(run)
    with pytest.raises(ConfigError, match="current directory"):
        prepare_output_dir(run, resume=False, overwrite=True)
    assert (run / "config.yaml").exists()


# -- inputs a retrain would refuse only after writing its output directory -----------------------------


def _global_pafi(tmp_path, density: float):
    """A global PaFi mask of tiny-t5's weights and the structure made from it (`s3delta pafi-mask`)."""
    from s3delta_ds.backbones import SiteMap, family_for
    from s3delta_ds.backbones.loading import build_model, load_config
    from s3delta_ds.structure.pafi import compute_mask, mask_structure, save_mask

    torch.manual_seed(0)
    model = build_model(load_config("tiny-t5"))
    plan = builders.Backbone.from_model(model, "tiny-t5")
    mask = compute_mask(model, SiteMap(model, family_for(model.config)), density=density)
    path = save_mask(mask, tmp_path / f"mask-{density}.safetensors", backbone=plan, density=density,
                     ranking="global", eligible=("linear",))  # fmt: skip
    structure = mask_structure(plan, mask, {"density": repr(density), "ranking": "global", "eligible": "linear"})
    structure = dataclasses.replace(structure, search={**structure.search, "task": "tiny-sentiment"})
    return path, structure.save(tmp_path / f"pafi-{density}.json")


def test_retrain_checks_a_global_pafi_mask_before_writing(tmp_path):
    mask, structure = _global_pafi(tmp_path, 0.02)
    other_mask, _ = _global_pafi(tmp_path, 0.05)
    with pytest.raises(ConfigError, match="globally ranked PaFi modules: pass retrain.pafi_mask"):
        run_retrain(_cfg(tmp_path, f"retrain.structure={structure}"))
    with pytest.raises(StructureError, match="does not match the structure's global PaFi modules"):
        run_retrain(_cfg(tmp_path, f"retrain.structure={structure}", f"retrain.pafi_mask={other_mask}"))
    assert not (tmp_path / "out").exists()
    cfg, _ = preflight_retrain(_cfg(tmp_path, f"retrain.structure={structure}", f"retrain.pafi_mask={mask}"))
    assert cfg.retrain.pafi_mask == str(mask)


def test_retrain_refuses_an_empty_structure_and_a_config_only_backbone_before_writing(tmp_path):
    path = _searched_structure(tmp_path, task="tiny-sentiment")
    d = json.loads(path.read_text())
    d["modules"], d["budget"]["used"] = [], 0
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps(d))
    with pytest.raises(StructureError, match="has no modules: nothing to train"):
        run_retrain(_cfg(tmp_path, f"retrain.structure={empty}"))
    config = tmp_path / "config.json"
    config.write_text(json.dumps(load_config_dict("tiny-t5")))
    planned = builders.random_baseline(
        builders.Backbone.plan(str(config)).space("mixed"), builders.Backbone.plan(str(config)).info, 0.02, seed=0
    )
    planned = dataclasses.replace(planned, search={"task": "tiny-sentiment"}).save(tmp_path / "planned.json")
    with pytest.raises(ConfigError, match="planned on the config file .* pass model.name_or_path=MODEL"):
        run_retrain(_cfg(tmp_path, f"retrain.structure={planned}"))
    assert not (tmp_path / "out").exists()


def load_config_dict(name: str) -> dict:
    from s3delta_ds.backbones.loading import load_config

    return load_config(name).to_dict()


def test_a_structure_planned_on_a_shape_name_records_its_hub_id():
    assert builders.Backbone.plan("flan-t5-small").info.name_or_path == "google/flan-t5-small"
    assert builders.Backbone.plan("t5-large").info.name_or_path == "google-t5/t5-large"
    assert builders.Backbone.plan("tiny-t5").info.name_or_path == "tiny-t5"  # embedded: loadable as it is


def test_resume_refuses_settings_the_run_did_not_use(tmp_path):
    """A restored scheduler would keep the old lr while config.yaml records the new one; another seed
    re-cuts the data halves mid-run. Cadence and batch geometry may change."""
    from s3delta_ds.config import dump_yaml
    from s3delta_ds.run.runtime import check_resume_config

    out = tmp_path / "run"
    out.mkdir()
    first = _cfg(tmp_path, "search.lr=3e-4", "search.budget=1e-3", "data.task=tiny-sentiment")
    (out / "config.yaml").write_text(dump_yaml(first))
    same = _cfg(tmp_path, "search.lr=3e-4", "search.budget=1e-3", "data.task=tiny-sentiment",
                "search.micro_batch_size=2", "search.grad_accum=4", "search.stop_after=5", "retrain.lr=1")  # fmt: skip
    check_resume_config(out, same, "search")
    changed = _cfg(tmp_path, "search.lr=1e-2", "search.budget=1e-3", "data.task=tiny-sentiment", "seed=3")
    with pytest.raises(ConfigError, match=r"seed 0 -> 3; search.lr 0.0003 -> 0.01\).*another output_dir"):
        check_resume_config(out, changed, "search")
    check_resume_config(out, dataclasses.replace(changed, seed=0, search=first.search), "search")
    for key in ("search.clip=0.001", "search.gate_clip=0.001", "search.select=loss", "search.virtual_step=sgd"):
        with pytest.raises(ConfigError, match=key.split("=")[0]):  # the optimisation was let through
            check_resume_config(
                out, _cfg(tmp_path, "search.lr=3e-4", "search.budget=1e-3", "data.task=tiny-sentiment", key), "search"
            )


def test_resume_refuses_another_reading_of_the_labels_or_another_validation_set(tmp_path):
    from s3delta_ds.config import dump_yaml
    from s3delta_ds.run.runtime import check_resume_config

    out = tmp_path / "run"
    out.mkdir()
    base = ["data.task=custom", "data.template=r: {text}", "data.train_file=t.csv", "data.validation_file=v.csv"]
    first = _cfg(tmp_path, *base, "data.label_words=[negative, positive]")
    (out / "config.yaml").write_text(dump_yaml(first))
    same = _cfg(tmp_path, *base, "data.label_words=[negative, positive]", "data.test_file=x.csv")
    check_resume_config(out, same, "search")  # the test set scored at the end may change
    for changed, key in (
        ("data.label_words=[positive, negative]", "data.label_words"),
        ("data.max_eval_examples=10", "data.max_eval_examples"),
        ("data.metric=f1", "data.metric"),
        ("data.label_column=y", "data.label_column"),
        ("data.max_source_length=32", "data.max_source_length"),
    ):
        cfg = _cfg(tmp_path, *base, "data.label_words=[negative, positive]", changed)
        with pytest.raises(ConfigError, match=key):
            check_resume_config(out, cfg, "search")
    moved = [b if "validation_file" not in b else "data.validation_file=other.csv" for b in base]
    with pytest.raises(ConfigError, match="data.validation_file"):
        check_resume_config(out, _cfg(tmp_path, *moved, "data.label_words=[negative, positive]"), "search")


def test_resume_compares_the_backbone_settings_and_resolves_paths(tmp_path, monkeypatch):
    from s3delta_ds.config import dump_yaml
    from s3delta_ds.run.runtime import check_resume_config

    out = tmp_path / "run"
    out.mkdir()
    (tmp_path / "s.json").write_text("{}")
    first = _cfg(tmp_path, f"retrain.structure={tmp_path / 's.json'}", "model.dtype=bf16")
    (out / "config.yaml").write_text(dump_yaml(first))
    monkeypatch.chdir(tmp_path)
    check_resume_config(out, _cfg(tmp_path, "retrain.structure=./s.json", "model.dtype=bf16"), "retrain")
    with pytest.raises(ConfigError, match="model.dtype 'bf16' -> 'fp16'"):  # the gates' fp16 scale would restart
        check_resume_config(out, _cfg(tmp_path, "retrain.structure=s.json", "model.dtype=fp16"), "retrain")


def test_the_rows_digest_follows_token_ids_and_labels_only():
    from s3delta_ds.run.runtime import rows_digest

    rows = [{"input_ids": [5, 6, 7], "label": 1, "choices": None}, {"input_ids": [8], "label": 0, "choices": None}]
    same = [{"input_ids": torch.tensor([5, 6, 7]), "label": 1, "choices": [{"x": 1}]}, dict(rows[1])]
    assert rows_digest(rows) == rows_digest(same)  # tensors or lists; choices follow from the rest
    assert rows_digest(rows).startswith("2:")
    for changed in (
        [{**rows[0], "input_ids": [5, 6, 9]}, rows[1]],
        [{**rows[0], "label": 0}, rows[1]],
        [rows[1], rows[0]],  # the order is the data
        [{**rows[0], "input_ids": [5, 6]}, {**rows[1], "input_ids": [7, 8]}],  # boundaries count
    ):
        assert rows_digest(changed) != rows_digest(rows)


@pytest.mark.parametrize(
    "name,dtype,warned", [("tiny-t5", "fp16", True), ("tiny-t5", "bf16", False), ("tiny-llama", "fp16", False)]
)
def test_fp16_on_a_t5_is_warned_about(name, dtype, warned):
    cfg = load_run_config(None, [f"model.name_or_path={name}", f"model.dtype={dtype}", "data.task=tiny-sentiment"])
    said = []
    preflight_search(cfg, log=said.append)
    assert any("fp16 on a T5" in s and "bf16" in s for s in said) == warned


def test_a_source_longer_than_an_encoders_position_table_is_refused_before_writing(tmp_path):
    """tiny-bert reads 128 positions: 200 tokens failed at the first step with a size mismatch, after
    the output directory was claimed. RoBERTa's table starts after its padding index."""
    with pytest.raises(ConfigError, match=r"max_source_length=200 exceeds the 128 positions .* bert"):
        run_search(_cfg(tmp_path, "model.name_or_path=tiny-bert", "data.max_source_length=200"))
    assert not (tmp_path / "out").exists()
    preflight_search(_cfg(tmp_path, "model.name_or_path=tiny-bert", "data.max_source_length=128"))
    from transformers import RobertaConfig

    roberta = tmp_path / "roberta"
    RobertaConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, max_position_embeddings=130
    ).save_pretrained(roberta)
    with pytest.raises(ConfigError, match="max_source_length=129 exceeds the 128 positions this roberta"):
        preflight_search(_cfg(tmp_path, f"model.name_or_path={roberta}", "data.max_source_length=129"))
    preflight_search(_cfg(tmp_path, f"model.name_or_path={roberta}", "data.max_source_length=128"))
    preflight_search(_cfg(tmp_path, "model.name_or_path=tiny-t5", "data.max_source_length=4096"))


def test_resume_refuses_a_classifier_pooled_another_way():
    """A BERT head trained on CLS features resumed on mean pooling with no word: model.pooling=auto
    resolves from the model directory, so the resolved mode is a checkpoint fact, not a config key."""
    from types import SimpleNamespace

    from s3delta_ds.run.runtime import Runtime, check_resume_facts

    def rt(family: str, pooling: str):
        cfg = _cfg(Path("/tmp"), f"model.pooling={pooling}")
        ns = SimpleNamespace(
            cfg=cfg,
            data={"train": [], "validation": []},
            ds_config={},
            dtype="fp32",
            plan=SimpleNamespace(deepspeed="zero2", structure=None),
        )
        ns.family = SimpleNamespace(name=family)
        ns.resume_facts = Runtime.resume_facts.func(ns)
        return ns

    saved = rt("bert", "cls").resume_facts
    assert saved["pooling"] == "cls" and rt("t5", "auto").resume_facts["pooling"] is None
    check_resume_facts(rt("bert", "cls"), saved)
    with pytest.raises(ConfigError, match="trained on cls pooling and this launch pools by mean: .*model.pooling=cls"):
        check_resume_facts(rt("bert", "mean"), saved)
    check_resume_facts(rt("bert", "mean"), {k: v for k, v in saved.items() if k != "pooling"})  # older checkpoints


def test_resume_refuses_another_resolved_dtype(tmp_path):
    """model.dtype=auto resolved to bf16 on the first nodes and to fp32 (or fp16) after a requeue
    onto nodes without bf16: the config key reads "auto" both times, so the resolved dtype is a
    checkpoint fact. An explicit model.dtype that names the checkpoint's dtype resumes."""
    from types import SimpleNamespace

    from s3delta_ds.run.runtime import Runtime, check_resume_facts

    def rt(setting: str, resolved: str):
        cfg = _cfg(Path("/tmp"), f"model.dtype={setting}")
        ns = SimpleNamespace(
            cfg=cfg,
            data={"train": [], "validation": []},
            ds_config={},
            dtype=resolved,
            plan=SimpleNamespace(deepspeed="zero2", structure=None),
            out=tmp_path,
        )
        ns.family = SimpleNamespace(name="t5")
        ns.resume_facts = Runtime.resume_facts.func(ns)
        return ns

    saved = rt("auto", "bf16").resume_facts
    check_resume_facts(rt("auto", "bf16"), saved)
    check_resume_facts(rt("bf16", "bf16"), saved)
    with pytest.raises(
        ConfigError, match="trained in bf16 and this launch resolves model.dtype=auto to fp32.*model.dtype=bf16"
    ):
        check_resume_facts(rt("auto", "fp32"), saved)
    older = {k: v for k, v in saved.items() if k != "dtype"}  # a checkpoint from before the fact
    check_resume_facts(rt("auto", "fp32"), older)  # no config.yaml to compare with
    from s3delta_ds.config import dump_yaml

    (tmp_path / "config.yaml").write_text(dump_yaml(_cfg(tmp_path, "model.dtype=fp32")))
    check_resume_facts(rt("fp32", "fp32"), older)
    # check_resume_config let fp32 -> auto through for the fact to decide, and there is none
    with pytest.raises(ConfigError, match="the run used model.dtype=fp32 and this launch model.dtype=auto"):
        check_resume_facts(rt("auto", "bf16"), older)
    # and a checkpoint older still, with no facts at all (the same hole)
    with pytest.raises(ConfigError, match="the run used model.dtype=fp32 and this launch model.dtype=auto"):
        check_resume_facts(rt("auto", "bf16"), None)
    check_resume_facts(rt("fp32", "fp32"), None)


def test_resume_config_leaves_an_auto_dtype_to_the_checkpoint(tmp_path):
    from s3delta_ds.run.runtime import check_resume_config

    out = tmp_path / "run"
    out.mkdir()
    from s3delta_ds.config import dump_yaml

    (out / "config.yaml").write_text(dump_yaml(_cfg(tmp_path, "model.dtype=auto")))
    check_resume_config(out, _cfg(tmp_path, "model.dtype=bf16"), "search")  # what auto resolved to: the facts decide
    (out / "config.yaml").write_text(dump_yaml(_cfg(tmp_path, "model.dtype=fp16")))
    with pytest.raises(ConfigError, match="model.dtype 'fp16' -> 'bf16'"):
        check_resume_config(out, _cfg(tmp_path, "model.dtype=bf16"), "search")


def test_the_demo_checks_its_overrides_and_budget_before_it_launches(tmp_path, monkeypatch):
    """`s3delta demo search.space=lora`: the demo's YAML named 0.02, over all of tiny-t5's LoRA
    candidates (1.98%), and the refusal came from the ranks after the launcher's start-up; the
    random baseline drew at the unresolved budget."""
    import s3delta_ds.run.demo as demo_mod
    from s3delta_ds.errors import BudgetError
    from s3delta_ds.run.preflight import _embedded_budget, checked_search

    launched = []
    monkeypatch.setattr(demo_mod, "launch", lambda *a: launched.append(a) or 1)
    with pytest.raises(BudgetError, match=r"must lie in \[0.000354, 0.0455\]"):
        demo_mod.run_demo(tmp_path / "out", overrides=["search.budget=0.9"])
    assert launched == [] and not (tmp_path / "out").exists()
    lora = checked_search(load_run_config(demo_mod.DEMO_CONFIG, ["search.space=lora"]))
    assert lora.search.budget == _embedded_budget("tiny-t5", "lora") < 0.02
    assert checked_search(load_run_config(demo_mod.DEMO_CONFIG, [])).search.budget == 0.02  # the README's demo
