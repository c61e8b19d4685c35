"""``data.task: custom``: your own CSV/JSONL/parquet files or a ``datasets`` directory, your template,
columns and label words; every mistake named; batched encoding equal to per-row encoding."""

from __future__ import annotations

import json

import pytest

from s3delta_ds.config import load_run_config
from s3delta_ds.data import Encoder, load_rows, load_tokenizer, resolve_task
from s3delta_ds.data.encode import encode_all
from s3delta_ds.errors import ConfigError, DataError

REVIEWS = [("a wonderful , moving film", "pos"), ("dull and far too long", "neg"), ("sharp , funny , alive", "pos")]


def _csv(path, rows, header="review,stars,sentiment"):
    path.write_text(header + "\n" + "".join(f'"{t}",{i % 5},{lab}\n' for i, (t, lab) in enumerate(rows)))
    return path


def _cfg(tmp_path, *extra, files=True):
    base = ["data.task=custom", "data.template=review: {review}", "data.label_column=sentiment"]
    base.append("data.label_words=[neg, pos]")
    if files:
        base += [f"data.train_file={_csv(tmp_path / 'train.csv', REVIEWS * 4)}"]
        base += [f"data.validation_file={_csv(tmp_path / 'dev.csv', REVIEWS * 2)}"]
    return load_run_config(None, [*base, *extra]).data


def test_custom_task_from_csv_files_with_string_labels(tmp_path):
    data = _cfg(tmp_path)
    task = resolve_task(data)
    assert (task.name, task.columns, task.label_words, task.protocol) == (
        "custom",
        ("review",),
        ("neg", "pos"),
        "small",
    )
    rows = load_rows(task, None, split_seed=0)
    assert len(rows["train"]) == 12 and len(rows["validation"]) + len(rows["test"]) == 6  # no test file: halved
    assert rows["train"][0]["sentiment"] == 1 and rows["train"][1]["sentiment"] == 0
    assert task.source(rows["train"][0]) == "review: a wonderful , moving film"


def test_custom_task_from_a_datasets_directory_and_jsonl(tmp_path):
    d = tmp_path / "ds"
    d.mkdir()
    for split, rows in (("train", REVIEWS * 3), ("validation", REVIEWS), ("test", REVIEWS)):
        (d / f"{split}.jsonl").write_text(
            "".join(json.dumps({"text": t, "label": int(lab == "pos")}) + "\n" for t, lab in rows)
        )
    data = load_run_config(
        None,
        [
            "data.task=custom",
            f"data.hub_dataset={d}",
            "data.test_split=test",
            "data.template=text: {text}",
            "data.label_words=[negative, positive]",
        ],
    ).data
    rows = load_rows(resolve_task(data), None)
    assert {k: len(v) for k, v in rows.items()} == {"train": 9, "validation": 3, "test": 3}
    assert rows["test"][0]["label"] == 1


@pytest.mark.parametrize(
    "overrides, error, message",
    [
        (
            ["data.template=review: {text}", "data.columns=[review]"],
            ConfigError,
            "uses \\['text'\\] but data.columns is \\['review'\\]",
        ),
        (["data.label_words=[pos]"], ConfigError, "two or more distinct words"),
        (["data.metric=auc"], ConfigError, "data.metric must be one of"),
        (["data.hub_dataset=some/set"], ConfigError, "exactly one of .* got files, hub_dataset"),
    ],
)
def test_custom_config_mistakes_are_named(tmp_path, overrides, error, message):
    with pytest.raises(error, match=message):
        resolve_task(_cfg(tmp_path, *overrides))


def test_custom_keys_on_a_builtin_task_and_misspelt_tasks_are_errors(tmp_path):
    with pytest.raises(ConfigError, match="data.template only applies to data.task=custom"):
        load_run_config(None, ["data.task=sst2", "data.template=x: {x}"])
    with pytest.raises(ConfigError, match="unknown task 'custon'.*data.task=custom"):
        resolve_task(load_run_config(None, ["data.task=custon"]).data)
    with pytest.raises(ConfigError, match="needs data.template"):
        resolve_task(load_run_config(None, ["data.task=custom", "data.label_words=[a, b]"]).data)


@pytest.mark.parametrize(
    "labels, message",
    [
        (["pos", "neg", "neutral"], "row 2: label 'neutral' in column 'sentiment' is not one of the label words"),
        ([0, 1, 2], "row 2: label 2 in column 'sentiment' is not a class id in \\[0, 2\\)"),
        ([0, 1, 0.5], "row 2: label 0.5 in column 'sentiment' is not a class id"),
    ],
)
def test_bad_labels_are_named_with_file_and_row(tmp_path, labels, message):
    data = _cfg(tmp_path)
    rows = [(t, lab) for (t, _), lab in zip(REVIEWS, labels, strict=True)]
    _csv(tmp_path / "train.csv", rows)
    with pytest.raises(DataError, match=f"train.csv {message}"):
        load_rows(resolve_task(data), None)


def test_missing_column_and_empty_split_are_named(tmp_path):
    data = _cfg(tmp_path)
    _csv(tmp_path / "dev.csv", REVIEWS, header="text,stars,sentiment")
    with pytest.raises(DataError, match="dev.csv: task 'custom' needs a column 'review', but the data has only text"):
        load_rows(resolve_task(data), None)
    (tmp_path / "dev.csv").write_text("review,stars,sentiment\n")
    with pytest.raises(DataError, match="dev.csv"):
        load_rows(resolve_task(data), None)
    (tmp_path / "dev.csv").unlink()
    with pytest.raises(DataError, match="data.validation_file .*dev.csv does not exist"):
        load_rows(resolve_task(data), None)


@pytest.mark.parametrize(
    "family, model, objective",
    [("t5", "tiny-t5", "seq2seq"), ("llama", "tiny-llama", "causal"), ("bert", "tiny-bert", "classify")],
)
def test_batched_encoding_equals_per_row_encoding(tmp_path, family, model, objective):
    task = resolve_task(_cfg(tmp_path))
    rows = load_rows(task, None)["train"]
    enc = Encoder(task, load_tokenizer(family, model), objective, 16, 8)
    assert encode_all(enc, rows, chunk=5) == [enc.encode(r) for r in rows]
