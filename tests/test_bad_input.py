"""Bad input a first-hour user hits: a clear error naming the problem, never a traceback, and
nothing deleted or left behind that the corrected rerun would refuse. Each case here was found by
running the CLI on it (non-UTF-8 files, a wrong-typed model config field, fp16 on the CPU, an
unwritable output directory, a demo pointed at a data folder, conflicting retrain settings)."""

from __future__ import annotations

import json
import os

import pytest

from s3delta_ds.backbones.loading import load_config
from s3delta_ds.config import load_run_config
from s3delta_ds.engine import zero
from s3delta_ds.errors import BackboneError, ConfigError, TrainingError
from s3delta_ds.run import demo
from s3delta_ds.run.preflight import preflight_retrain
from s3delta_ds.run.runtime import _output_dir, release_unstarted, script_main
from s3delta_ds.structure import builders
from s3delta_ds.util import RUN_MARKER

LATIN1 = "model:\n  name_or_path: caf\xe9\n".encode("latin-1")


def test_a_non_utf8_run_config_is_named(tmp_path):
    path = tmp_path / "latin.yaml"
    path.write_bytes(LATIN1)
    with pytest.raises(ConfigError, match=r"latin\.yaml is not UTF-8 text \(byte 26"):
        load_run_config(path, [])


def test_a_non_utf8_deepspeed_config_is_named(tmp_path):
    path = tmp_path / "ds.json"
    path.write_bytes(b'{"train_batch_size": "\xe9"}')
    with pytest.raises(ConfigError, match=r"DeepSpeed config .*ds\.json is not valid JSON"):
        zero.read_ds_config(str(path))


def test_a_model_config_that_is_not_text_or_has_a_wrong_typed_field_is_named(tmp_path):
    binary = tmp_path / "weights.json"
    binary.write_bytes(b"\x00\xff\xfe{")
    with pytest.raises(BackboneError, match="weights.json: not a readable JSON config"):
        load_config(str(binary))
    folder = tmp_path / "t5bad"
    folder.mkdir()
    for where in (folder / "config.json", tmp_path / "t5bad.json"):
        where.write_text(json.dumps({"model_type": "t5", "d_model": "x", "num_layers": 2}))
    with pytest.raises(BackboneError, match="d_model"):
        load_config(str(folder))
    with pytest.raises(BackboneError, match="d_model"):
        load_config(str(tmp_path / "t5bad.json"))


class _Accelerator:
    def __init__(self, fp16: bool):
        self.fp16 = fp16

    def is_fp16_supported(self):
        return self.fp16

    def device_name(self):
        return "cpu"


def test_fp16_where_deepspeed_cannot_train_it_is_refused_before_anything_is_written(monkeypatch):
    monkeypatch.setattr(zero, "get_accelerator", lambda: _Accelerator(False))
    with pytest.raises(ConfigError, match=r"model.dtype=fp16: DeepSpeed has no fp16 training on the cpu .*bf16\)$"):
        zero.check_dtype_supported("fp16", "fp16", {})
    pinned = {"fp16": {"enabled": True}}  # model.dtype=fp32 alone would be refused next: say both
    with pytest.raises(ConfigError, match='fp16 \\(model.dtype=auto\\).*and fp16.enabled to "auto" in the DeepSpeed'):
        zero.check_dtype_supported(zero.resolve_dtype("auto", pinned), "auto", pinned)
    for dtype in ("fp32", "bf16"):
        zero.check_dtype_supported(dtype, dtype, {})
    monkeypatch.setattr(zero, "get_accelerator", lambda: _Accelerator(True))
    zero.check_dtype_supported("fp16", "fp16", pinned)


def test_an_output_directory_that_cannot_be_made_is_a_config_error_not_a_rank_traceback(tmp_path):
    """Under --nproc the rank-0 OSError was a traceback from every rank (the others waited in the
    broadcast, then raised too)."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match=r"cannot set up output directory .*file/run: Not a directory"):
        _output_dir(blocker / "run", 0, resume=False, overwrite=False)


def test_a_run_that_never_started_gives_back_the_directory_it_made(tmp_path, monkeypatch):
    from s3delta_ds.run.runtime import prepare_output_dir

    def unstarted(out):
        prepare_output_dir(out, resume=False, overwrite=False)
        for name in ("config.yaml", "ds_config.json"):
            (out / name).write_text("{}")
        release_unstarted(out)

    made = tmp_path / "made" / "run"
    unstarted(made)
    assert not made.exists()  # an empty directory left behind looked like a run that never was
    mine = tmp_path / "mine"  # made by the user (a job's folder, the cwd): emptied, never removed
    mine.mkdir()
    unstarted(mine)
    assert mine.is_dir() and not any(mine.iterdir())
    prepare_output_dir(tmp_path / "here", resume=False, overwrite=False)  # the run made it, but it is the cwd
    monkeypatch.chdir(tmp_path / "here")
    release_unstarted(tmp_path / "here")
    assert (tmp_path / "here").is_dir()
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / RUN_MARKER).write_text("{}")
    (kept / "metrics.jsonl").write_text("{}")
    release_unstarted(kept)  # a run that trained: left alone
    assert sorted(p.name for p in kept.iterdir()) == sorted([RUN_MARKER, "metrics.jsonl"])


def test_demo_overwrite_replaces_only_a_demos_directory(tmp_path, monkeypatch):
    """`s3delta demo --out data --overwrite` deleted every file in data/ (and `--out .` the checkout)."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.csv").write_text("text,label\na,b\n")
    (data / "summary.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"holds files the demo did not write \(train\.csv\)"):
        demo.run_demo(data, overwrite=True)
    assert (data / "train.csv").read_text() == "text,label\na,b\n"

    earlier = tmp_path / "demo"
    (earlier / "search").mkdir(parents=True)
    for name in ("structure.json", "summary.json", "random_structure.json"):
        (earlier / name).write_text("{}")
    demo._check_replaceable(earlier)  # an earlier demo's: replaced
    monkeypatch.chdir(earlier / "search")
    with pytest.raises(ConfigError, match="holds the current directory"):
        demo._check_replaceable(earlier)


def test_full_finetuning_with_a_structure_is_refused_not_silently_ignored(tmp_path):
    plan = builders.Backbone.plan("tiny-t5")
    structure = builders.manual(plan, "lora").save(tmp_path / "lora.json")
    cfg = load_run_config(
        None,
        [f"output_dir={tmp_path / 'out'}", f"retrain.structure={structure}", "retrain.full_finetune=true"],
    )
    with pytest.raises(ConfigError, match="retrain.structure would be ignored: set retrain.structure=null"):
        preflight_retrain(cfg)
    assert not (tmp_path / "out").exists()


def test_a_diverged_run_says_how_to_start_the_fixed_one(tmp_path, capsys, monkeypatch):
    """A NaN loss left a claimed directory, and the rerun at a lower learning rate was refused as
    "not empty" (and its --resume as "other settings") with no word of overwrite=true."""
    out = tmp_path / "run"
    monkeypatch.delenv("RANK", raising=False)

    def diverges(cfg, resume):
        os.makedirs(cfg.output_dir)
        (tmp_path / "run" / RUN_MARKER).write_text("{}")
        raise TrainingError("non-finite loss in the delta phase: lower the learning rate or check the data")

    assert script_main(diverges, [f"output_dir={out}"], "search") == 2
    err = capsys.readouterr().err
    assert "lower the learning rate" in err and f"stay in {out}: start the fixed run there with overwrite=true" in err

    def refused(cfg, resume):
        raise ConfigError("bad key")

    assert script_main(refused, [f"output_dir={out}"], "search") == 2
    assert "overwrite=true" not in capsys.readouterr().err  # only a run that trained says it


def test_a_delta_file_holding_nan_is_refused_not_merged(tmp_path):
    """`export --merge` of a damaged delta file exited 0 with NaN in every weight a delta touched."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    import s3delta_ds
    from s3delta_ds.errors import CheckpointError
    from s3delta_ds.run.checkpoint import save_deltas

    from .helpers import tiny_model

    trained = tiny_model("tiny-t5")
    structure = builders.manual(builders.Backbone.from_model(trained), "lora")
    structure.save(tmp_path / "structure.json")
    s3delta_ds.attach(trained, tmp_path / "structure.json")
    path = save_deltas(trained, tmp_path / "deltas.safetensors")
    s3delta_ds.load(tiny_model("tiny-t5"), tmp_path)  # as written: loads
    with safe_open(str(path), framework="pt") as f:
        values, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    name = sorted(values)[1]
    values[name][0, 0] = float("nan")
    save_file(values, str(path), metadata=meta)
    with pytest.raises(CheckpointError, match=rf"deltas\.safetensors: non-finite values \(NaN or inf\) in {name}"):
        s3delta_ds.load(tiny_model("tiny-t5"), tmp_path)


@pytest.mark.parametrize("template", ["{text:>{x}}", "{text!z}", "ok {title} {text:{w}}"])
def test_a_template_that_cannot_be_formatted_is_refused_before_the_ranks_start(template):
    """A nested field or an unknown conversion reached every rank's encoder and failed there as a
    KeyError/ValueError traceback; specs and conversions str.format takes still work."""
    from s3delta_ds.data.custom import placeholders

    with pytest.raises(ConfigError, match="cannot be formatted"):
        placeholders(template)
    for fine in ("a {{literal}} {text} and {title}", "review: {text:.20}", "{text!r}", "{text!s} / {n:>3}"):
        assert placeholders(fine)[0] == "text"


def test_a_model_directory_without_a_tokenizer_says_so(tmp_path):
    """transformers 5 builds an empty-vocabulary tokenizer from config.json alone; the run then
    failed on "label words 'negative' and 'positive' become the same tokens"."""
    from s3delta_ds.data import load_tokenizer
    from s3delta_ds.errors import DataError

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5", "d_model": 8, "num_layers": 1}))
    with pytest.raises(DataError, match=r"holds no tokenizer \(tokenizer\.json.*model\.tokenizer=DIR"):
        load_tokenizer("t5", str(tmp_path))
    assert len(load_tokenizer("t5", str(tmp_path), tokenizer="tiny-t5")) > 100  # named elsewhere: fine


@pytest.mark.parametrize("target", ["a directory", "the current directory"])
def test_writing_a_file_over_a_directory_names_the_path_given(tmp_path, monkeypatch, target):
    """`s3delta structure random ... -o runs` said "Is a directory: .../.runs.5srol5vu.tmp"."""
    from s3delta_ds.util import atomic_write_text

    monkeypatch.chdir(tmp_path)
    given = "runs" if target == "a directory" else ""
    (tmp_path / "runs").mkdir()
    with pytest.raises(IsADirectoryError) as e:
        atomic_write_text(given, "{}")
    assert e.value.filename == ("runs" if given else ".") and ".tmp" not in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"] and not any((tmp_path / "runs").iterdir())


def test_transfer_onto_a_model_without_layers_is_refused_not_written(tmp_path):
    """It wrote a structure of 0 modules that `s3delta inspect` then refused (depths must be positive)."""
    from s3delta_ds.errors import StructureError
    from s3delta_ds.structure.transfer import transfer

    source = builders.manual(builders.Backbone.plan("tiny-t5"), "lora")
    shape = {"model_type": "t5", "d_model": 8, "num_heads": 2, "d_kv": 4, "d_ff": 16, "vocab_size": 100}

    def target(encoder: int, decoder: int):
        folder = tmp_path / f"t5-{encoder}-{decoder}"
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({**shape, "num_layers": encoder, "num_decoder_layers": decoder}))
        return builders.Backbone.plan(str(folder))

    assert transfer(source, target(1, 1)).modules  # one layer each: the preset maps
    with pytest.raises(StructureError, match="has no layers in its decoder and encoder stacks"):
        transfer(source, target(0, 0))
