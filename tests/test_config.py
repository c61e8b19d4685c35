"""Run configuration (YAML + overrides, validation, round trip) and DeepSpeed config resolution."""

from __future__ import annotations

import copy
import json

import pytest
import yaml

from s3delta_ds.config import (
    DataConfig,
    ModelConfig,
    RetrainConfig,
    RunConfig,
    SearchConfig,
    dump_yaml,
    load_run_config,
    parse_overrides,
)
from s3delta_ds.engine.zero import read_ds_config, resolve_ds_config, resolve_dtype, shipped_ds_configs
from s3delta_ds.errors import ConfigError

SHIPPED = ("zero2", "zero3", "zero3_offload", "zero3_cpu", "zero3_multinode")


def _write(tmp_path, text: str, name: str = "run.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


# -- load_run_config ----------------------------------------------------------------------------


YAML_TEXT = """\
output_dir: runs/x
seed: 7
deepspeed: zero2
model:
  name_or_path: tiny-llama
  random_init: true
data:
  max_source_length: 48
search:
  steps: 20
  lr: 1e-4
  gate_lr: 1.0e-2
  budget: 0.001
  micro_batch_size: 4
retrain:
  steps: 30
  clip: 1
"""


def test_load_yaml_values_and_types(tmp_path):
    cfg = load_run_config(_write(tmp_path, YAML_TEXT))
    assert cfg.output_dir == "runs/x"
    assert cfg.seed == 7 and type(cfg.seed) is int
    assert cfg.deepspeed == "zero2"
    assert cfg.model.name_or_path == "tiny-llama"
    assert cfg.model.random_init is True
    assert cfg.data.max_source_length == 48 and type(cfg.data.max_source_length) is int
    assert cfg.search.steps == 20 and type(cfg.search.steps) is int
    assert cfg.search.micro_batch_size == 4
    # "1e-4" is a string to YAML 1.1, 1.0e-2 a float: both become floats
    assert cfg.search.lr == pytest.approx(1e-4) and type(cfg.search.lr) is float
    assert cfg.search.gate_lr == pytest.approx(1e-2) and type(cfg.search.gate_lr) is float
    assert cfg.search.budget == pytest.approx(0.001)
    # an int for a float field is accepted and stored as a float
    assert cfg.retrain.clip == 1.0 and type(cfg.retrain.clip) is float
    assert cfg.retrain.steps == 30
    # untouched values keep their defaults
    assert cfg.search.grad_accum == SearchConfig().grad_accum
    assert cfg.retrain.lr == RetrainConfig().lr
    assert cfg.model.dtype == "auto"
    assert cfg.data.task is None  # resolved per run kind by preflight (tests/test_preflight.py)


def test_overrides_win_over_yaml(tmp_path):
    cfg = load_run_config(
        _write(tmp_path, YAML_TEXT),
        ["search.steps=5", "seed=11", "model.name_or_path=tiny-bert", "search.lr=2e-3", "retrain.lr=1", "zero_stage=2"],
    )
    assert cfg.search.steps == 5 and type(cfg.search.steps) is int
    assert cfg.seed == 11
    assert cfg.model.name_or_path == "tiny-bert"
    assert cfg.model.random_init is True  # the rest of the section survives the override
    assert cfg.search.lr == pytest.approx(2e-3) and type(cfg.search.lr) is float
    assert cfg.search.budget == pytest.approx(0.001)
    assert cfg.retrain.lr == 1.0 and type(cfg.retrain.lr) is float
    assert cfg.retrain.steps == 30
    assert cfg.zero_stage == 2


def test_overrides_without_file():
    cfg = load_run_config(None, ["search.mode=second-order", "model.tokenizer=", "data.max_train_examples=100"])
    assert cfg.search.mode == "second-order"
    assert cfg.model.tokenizer is None
    assert cfg.data.max_train_examples == 100
    assert load_run_config() == RunConfig()


def test_parse_overrides_nested():
    assert parse_overrides(["search.steps=50", "output_dir=runs/a=b", "model.random_init=true", "x.y.z=1.5"]) == {
        "search": {"steps": 50},
        "output_dir": "runs/a=b",
        "model": {"random_init": True},
        "x": {"y": {"z": 1.5}},
    }


def test_empty_yaml_gives_defaults(tmp_path):
    assert load_run_config(_write(tmp_path, "")) == RunConfig()


@pytest.mark.parametrize(
    "overrides,needles",
    [
        (["stepz=3"], ["stepz"]),
        (["search.stepz=3"], ["search.stepz", "did you mean 'steps'"]),
        (["model.nam_or_path=x"], ["model.nam_or_path", "did you mean 'name_or_path'"]),
        (["search.steps=abc"], ["search.steps", "abc"]),
        (["search.steps=1.5"], ["search.steps"]),
        (["model.random_init=3"], ["model.random_init", "3"]),
        (["search.lr=abc"], ["search.lr", "abc"]),
        (["search.budget=0"], ["search.budget"]),
        (["search.budget=1"], ["search.budget"]),
        (["search.budget=-1"], ["search.budget"]),
        (["search.steps=0"], ["search.steps", ">= 1"]),
        (["retrain.micro_batch_size=0"], ["retrain.micro_batch_size"]),
        (["search.mode=third-order"], ["search.mode", "third-order", "first-order", "second-order"]),
        (["search.select=best"], ["search.select", "best", "metric"]),
        (["zero_stage=5"], ["zero_stage", "5"]),
        (["zero_stage=-1"], ["zero_stage"]),
        (["data.max_source_length=0"], ["data.max_source_length"]),
        (["data.max_target_length=0"], ["data.max_target_length"]),
        (["retrain.lr=0"], ["retrain.lr", "> 0"]),
        (["model.dtype=int8"], ["model.dtype", "int8"]),
        (["model.quantize=2bit"], ["model.quantize", "2bit"]),
        (["search=3"], ["search", "mapping"]),
        (["model=tiny-t5"], ["model", "mapping"]),
        (["search.steps"], ["search.steps", "="]),
    ],
)
def test_override_errors_name_the_key(overrides, needles):
    with pytest.raises(ConfigError) as err:
        load_run_config(None, overrides)
    for needle in needles:
        assert needle in str(err.value)


def test_unknown_top_level_key_in_yaml_lists_valid_keys(tmp_path):
    with pytest.raises(ConfigError, match="outptu_dir") as err:
        load_run_config(_write(tmp_path, "outptu_dir: x\n"))
    assert "did you mean 'output_dir'" in str(err.value)
    assert "valid keys" in str(err.value) and "seed" in str(err.value)


def test_section_as_scalar_in_yaml(tmp_path):
    with pytest.raises(ConfigError, match="search must be a mapping"):
        load_run_config(_write(tmp_path, "search: 3\n"))


def test_invalid_yaml(tmp_path):
    path = _write(tmp_path, "search: [1, 2\nmodel: {\n")
    with pytest.raises(ConfigError, match="not valid YAML") as err:
        load_run_config(path)
    assert str(path) in str(err.value)


def test_yaml_top_level_list(tmp_path):
    path = _write(tmp_path, "- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping at the top level") as err:
        load_run_config(path)
    assert str(path) in str(err.value)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="cannot read config") as err:
        load_run_config(path)
    assert str(path) in str(err.value)


def test_dataclasses_validate_directly():
    with pytest.raises(ConfigError, match="search.budget"):
        SearchConfig(budget=1.5)
    with pytest.raises(ConfigError, match="retrain.clip"):
        RetrainConfig(clip=-1.0)
    with pytest.raises(ConfigError, match="model.name_or_path"):
        ModelConfig(name_or_path="")
    with pytest.raises(ConfigError, match="data.max_eval_examples"):
        DataConfig(max_eval_examples=0)


def test_dump_yaml_round_trip(tmp_path):
    cfg = load_run_config(
        _write(tmp_path, YAML_TEXT),
        [
            "search.budget=2.5e-5",
            "search.mode=second-order",
            "search.select=loss",
            "retrain.structure=s.json",
            "retrain.full_finetune=true",
            "model.dtype=bf16",
            "model.tokenizer=tok",
            "data.data_dir=/d",
            "zero_stage=0",
            "overwrite=true",
        ],
    )
    assert cfg != RunConfig()
    text = dump_yaml(cfg)
    assert isinstance(yaml.safe_load(text), dict)
    again = load_run_config(_write(tmp_path, text, "dumped.yaml"))
    assert again == cfg
    assert again.to_dict() == cfg.to_dict()
    assert again.search.budget == 2.5e-5 and again.zero_stage == 0
    # defaults round-trip too
    assert load_run_config(_write(tmp_path, dump_yaml(RunConfig()), "defaults.yaml")) == RunConfig()


# -- DeepSpeed configs --------------------------------------------------------------------------


def _walk(obj, path=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _walk(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _walk(v, f"{path}[{i}]")
    else:
        yield path, obj


GEOMETRY = dict(micro_batch=2, grad_accum=3, world=4, clip=1.5, hidden_size=64, local_world=2)


def test_shipped_names():
    assert set(shipped_ds_configs()) == set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_resolve_shipped(name):
    template, _ = read_ds_config(name)
    before = copy.deepcopy(template)
    cfg = resolve_ds_config(template, dtype="fp32", **GEOMETRY)
    assert template == before  # not mutated
    assert cfg["train_batch_size"] == 24
    assert cfg["gradient_accumulation_steps"] == 3
    assert cfg["train_micro_batch_size_per_gpu"] == 2
    assert cfg["gradient_clipping"] == 1.5
    assert cfg["bf16"]["enabled"] is False
    assert cfg.get("fp16", {}).get("enabled", False) is False
    zero, tzero = cfg["zero_optimization"], template["zero_optimization"]
    assert zero["stage"] == tzero["stage"]
    expected = {
        "reduce_bucket_size": 64 * 64,
        "stage3_prefetch_bucket_size": int(0.9 * 64 * 64),
        "stage3_param_persistence_threshold": 640,
    }
    for key, value in expected.items():
        if tzero.get(key) == "auto":
            assert zero[key] == value, key
        elif key in tzero:
            assert zero[key] == tzero[key], key
        else:
            assert key not in zero, key
    assert zero["reduce_bucket_size"] == 4096  # every shipped config leaves it to us
    if name == "zero3_cpu":
        assert zero["stage3_param_persistence_threshold"] == 0
        assert zero["stage3_prefetch_bucket_size"] == 3686
    if name in ("zero3", "zero3_offload", "zero3_multinode"):
        assert zero["stage3_param_persistence_threshold"] == 640
    if name == "zero3_multinode":  # ZeRO++ hpZ: the secondary partition spans the 2 ranks of a node
        assert zero["zero_hpz_partition_size"] == 2
    else:
        assert "zero_hpz_partition_size" not in zero
    leftovers = [p for p, v in _walk(cfg) if v == "auto"]
    assert leftovers == []
    # explicit values elsewhere are kept
    for path, value in _walk(template):
        if value != "auto":
            node = cfg
            for part in path.strip(".").split("."):
                node = node[part]
            assert node == value, path


@pytest.mark.parametrize("name", SHIPPED)
def test_resolve_bf16_and_stage_override(name):
    template, _ = read_ds_config(name)
    cfg = resolve_ds_config(template, dtype="bf16", zero_stage=1, **GEOMETRY)
    assert cfg["bf16"]["enabled"] is True
    assert cfg["zero_optimization"]["stage"] == 1
    # delta gradients are reduced in fp32, not rounded to bf16 at every hop of the ring
    assert cfg["communication_data_type"] == "fp32"
    assert "communication_data_type" not in resolve_ds_config(template, dtype="fp32", **GEOMETRY)
    kept = resolve_ds_config({**template, "communication_data_type": "bf16"}, dtype="bf16", **GEOMETRY)
    assert kept["communication_data_type"] == "bf16"
    assert template["zero_optimization"]["stage"] in (2, 3)
    assert template["bf16"]["enabled"] == "auto"


@pytest.mark.parametrize("name", SHIPPED)
def test_resolve_fp16_with_shipped_configs(name):
    """The shipped configs name only bf16: a precision section they leave out follows model.dtype."""
    template, _ = read_ds_config(name)
    cfg = resolve_ds_config(template, dtype="fp16", **GEOMETRY)
    assert cfg["fp16"]["enabled"] is True and cfg["bf16"]["enabled"] is False
    assert resolve_ds_config({}, dtype="bf16", **GEOMETRY)["bf16"]["enabled"] is True
    # DeepSpeed's own check of the ZeRO section, before anything loads (it came after the backbone)
    with pytest.raises(ConfigError, match="zero_optimization: stagee: Extra inputs are not permitted"):
        resolve_ds_config({"zero_optimization": {"stagee": 3}}, dtype="fp32", **GEOMETRY)


def test_resolve_explicit_matching_values_pass():
    template = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 3,
        "train_batch_size": 24,
        "gradient_clipping": 1.5,
        "bf16": {"enabled": True},
    }
    cfg = resolve_ds_config(template, dtype="bf16", **GEOMETRY)
    assert cfg["train_batch_size"] == 24 and cfg["bf16"]["enabled"] is True


def test_resolve_missing_keys_are_filled():
    cfg = resolve_ds_config({}, dtype="fp32", **GEOMETRY)
    assert cfg["train_batch_size"] == 24
    assert cfg["train_micro_batch_size_per_gpu"] == 2
    assert cfg["gradient_accumulation_steps"] == 3
    assert cfg["gradient_clipping"] == 1.5
    assert cfg["bf16"]["enabled"] is False
    assert cfg["zero_optimization"]["stage"] == 0


@pytest.mark.parametrize(
    "template,needles",
    [
        ({"train_micro_batch_size_per_gpu": 5}, ["train_micro_batch_size_per_gpu", "5", "2"]),
        ({"gradient_accumulation_steps": 7}, ["gradient_accumulation_steps", "7", "3"]),
        ({"train_batch_size": 16}, ["train_batch_size", "16", "24"]),
        ({"gradient_clipping": 1.0}, ["gradient_clipping", "1.0", "1.5"]),
        ({"optimizer": {"type": "AdamW"}}, ["remove", "optimizer"]),
        ({"scheduler": {"type": "WarmupLR"}}, ["remove", "scheduler"]),
        ({"optimizer": {}, "scheduler": {}}, ["remove", "optimizer", "scheduler"]),
        ({"bf16": {"enabled": True}}, ["bf16.enabled", "fp32"]),
        ({"fp16": {"enabled": True}}, ["fp16.enabled", "fp32"]),
        ({"zero_optimization": {"sub_group_size": "auto"}}, ["zero_optimization.sub_group_size", "auto"]),
        ({"zero_optimization": {"offload_param": {"device": "auto"}}}, ["zero_optimization.offload_param.device"]),
        ({"steps_per_print": "auto"}, ["steps_per_print"]),
    ],
)
def test_resolve_errors(template, needles):
    before = copy.deepcopy(template)
    with pytest.raises(ConfigError) as err:
        resolve_ds_config(template, dtype="fp32", **GEOMETRY)
    for needle in needles:
        assert needle in str(err.value)
    assert template == before


def test_resolve_micro_batch_message_has_both_values():
    with pytest.raises(ConfigError) as err:
        resolve_ds_config({"train_micro_batch_size_per_gpu": 16}, dtype="fp32", **{**GEOMETRY, "micro_batch": 3})
    msg = str(err.value)
    assert "train_micro_batch_size_per_gpu=16" in msg and "run uses 3" in msg


def test_resolve_bf16_disabled_but_dtype_bf16():
    with pytest.raises(ConfigError, match="bf16.enabled"):
        resolve_ds_config({"bf16": {"enabled": False}}, dtype="bf16", **GEOMETRY)


def test_read_ds_config_by_name_and_path(tmp_path):
    cfg, path = read_ds_config("zero3")
    assert path.endswith("zero3.json")
    assert cfg["zero_optimization"]["stage"] == 3
    assert cfg["zero_optimization"]["stage3_param_persistence_threshold"] == "auto"
    cfg_json, path_json = read_ds_config("zero3.json")
    assert cfg_json == cfg and path_json == path
    cfg2, _ = read_ds_config("zero2")
    assert cfg2["zero_optimization"]["stage"] == 2
    own = tmp_path / "mine.json"
    own.write_text(json.dumps({"zero_optimization": {"stage": 1}, "train_batch_size": "auto"}))
    cfg3, path3 = read_ds_config(str(own))
    assert cfg3 == {"zero_optimization": {"stage": 1}, "train_batch_size": "auto"}
    assert path3 == str(own)


def test_read_ds_config_unknown_name():
    with pytest.raises(ConfigError, match="zero4") as err:
        read_ds_config("zero4")
    for name in SHIPPED:
        assert name in str(err.value)


def test_read_ds_config_invalid_json(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"train_batch_size": ')
    with pytest.raises(ConfigError, match="not valid JSON") as err:
        read_ds_config(str(bad))
    assert str(bad) in str(err.value)


def test_read_ds_config_json_list(tmp_path):
    bad = tmp_path / "list.json"
    bad.write_text("[1, 2, 3]")
    with pytest.raises(ConfigError, match="JSON object") as err:
        read_ds_config(str(bad))
    assert str(bad) in str(err.value)


def test_resolve_dtype():
    assert resolve_dtype("fp32", {"bf16": {"enabled": True}}) == "fp32"
    assert resolve_dtype("bf16", {"bf16": {"enabled": False}}) == "bf16"
    assert resolve_dtype("fp16", {}) == "fp16"
    assert resolve_dtype("auto", {"bf16": {"enabled": True}}) == "bf16"
    assert resolve_dtype("auto", {"fp16": {"enabled": True}}) == "fp16"
    assert resolve_dtype("auto", {"bf16": {"enabled": False}}) == "fp32"
    assert resolve_dtype("auto", {}) == "fp32"


def test_resolve_dtype_auto_on_cpu():
    from s3delta_ds.engine.zero import device_type

    assert device_type() == "cpu"  # the tests run with DS_ACCELERATOR=cpu
    assert resolve_dtype("auto", {"bf16": {"enabled": "auto"}}) == "fp32"
    for name in SHIPPED:
        assert resolve_dtype("auto", read_ds_config(name)[0]) == "fp32"


def test_text_settings_on_the_command_line_are_kept_as_typed():
    """YAML would cut a template at " #" (a comment) and read ``review: {text}`` as a mapping."""
    got = parse_overrides(
        [
            "data.template=Tweet #{n}: {text}",
            "data.label_words=[no, yes]",
            "output_dir=123",
            "model.name_or_path='t5-base'",
            "data.test_file=null",
            "search.steps=50",
        ]
    )
    assert got["data"] == {"template": "Tweet #{n}: {text}", "label_words": ["no", "yes"], "test_file": None}
    assert got["output_dir"] == "123" and got["model"] == {"name_or_path": "t5-base"} and got["search"] == {"steps": 50}
    assert parse_overrides(["data.label_words=[1, 2, 3]"])["data"]["label_words"] == ["1", "2", "3"]


def test_yaml_label_words_read_as_booleans_get_a_hint(tmp_path):
    with pytest.raises(ConfigError, match=r"quote them, e.g. \['no', 'yes'\]"):
        load_run_config(_write(tmp_path, "data:\n  task: custom\n  label_words: [no, yes]\n"))
