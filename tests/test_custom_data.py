"""``data.task: custom``: your own CSV/JSONL/parquet files or a ``datasets`` directory, your template,
columns and label words; every mistake named; batched encoding equal to per-row encoding."""

from __future__ import annotations

import json

import pytest

from s3delta_ds.config import load_run_config
from s3delta_ds.data import Encoder, load_rows, load_tokenizer, resolve_task
from s3delta_ds.data.encode import encode_all
from s3delta_ds.errors import ConfigError, DataError

REVIEWS = [
    ("a wonderful , moving film", "positive"),
    ("dull and far too long", "negative"),
    ("sharp , funny , alive", "positive"),
]


def _csv(path, rows, header="review,stars,sentiment"):
    path.write_text(header + "\n" + "".join(f'"{t}",{i % 5},{lab}\n' for i, (t, lab) in enumerate(rows)))
    return path


def _cfg(tmp_path, *extra, files=True):
    base = ["data.task=custom", "data.template=review: {review}", "data.label_column=sentiment"]
    base.append("data.label_words=[negative, positive]")
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
        ("negative", "positive"),
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
            "".join(json.dumps({"text": t, "label": int(lab == "positive")}) + "\n" for t, lab in rows)
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
        # the answer in the input, or validation/test rows that are training rows: no error used to say so
        (["data.template=review: {review} ({sentiment})"], ConfigError, "reads the label column 'sentiment'"),
    ],
)
def test_custom_config_mistakes_are_named(tmp_path, overrides, error, message):
    with pytest.raises(error, match=message):
        resolve_task(_cfg(tmp_path, *overrides))


def test_validation_or_test_data_that_is_the_training_data_is_refused(tmp_path):
    train = tmp_path / "train.csv"
    with pytest.raises(ConfigError, match="data.train_file and data.validation_file name the same file"):
        resolve_task(_cfg(tmp_path, f"data.validation_file={tmp_path / '.' / 'train.csv'}"))
    with pytest.raises(ConfigError, match="data.validation_file and data.test_file name the same file"):
        resolve_task(_cfg(tmp_path, f"data.test_file={tmp_path / 'dev.csv'}"))
    hub = ["data.task=custom", f"data.hub_dataset={tmp_path}", "data.template={review}", "data.label_words=[a, b]"]
    for overrides, pair in (
        (["data.validation_split=train"], "data.train_split and data.validation_split"),
        (["data.test_split=train"], "data.train_split and data.test_split"),
        (["data.test_split=validation"], "data.validation_split and data.test_split"),
    ):
        with pytest.raises(ConfigError, match=f"{pair} name the same split"):
            resolve_task(load_run_config(None, [*hub, *overrides]).data)
    assert train.is_file() and resolve_task(load_run_config(None, [*hub, "data.test_split=test"]).data)


def test_csv_cells_that_pandas_reads_as_missing_are_text(tmp_path):
    """pandas reads NA, None, null, NaN, N/A as missing: the label word "NA" was refused as label None,
    and a review saying "null" was a null text. Only an empty cell is missing."""
    rows = [("NA", "yes"), ("null", "NA"), ("N/A", "no"), ("fine", "None")]
    body = "".join(f"{t},{lab}\n" for t, lab in rows)
    for split in ("train", "dev"):
        (tmp_path / f"{split}.csv").write_text("review,answer\n" + body)
    base = ["data.task=custom", "data.template={review}", "data.label_column=answer"]
    files = [f"data.train_file={tmp_path / 'train.csv'}", f"data.validation_file={tmp_path / 'dev.csv'}"]
    data = load_run_config(None, [*base, *files, "data.label_words=[yes, no, NA, None]"]).data
    got = load_rows(resolve_task(data), None)["train"]
    assert [(r["review"], r["answer"]) for r in got] == [("NA", 0), ("null", 2), ("N/A", 1), ("fine", 3)]
    (tmp_path / "train.csv").write_text("review,answer\nok,yes\n,no\n")
    with pytest.raises(DataError, match="text column 'review' is null"):
        load_rows(resolve_task(data), None)


def test_a_malformed_row_is_named_by_the_parsers_own_error(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"review": "ok", "sentiment": "positive"}\n{"review": "bad", \n')
    (tmp_path / "dev.jsonl").write_text('{"review": "ok", "sentiment": "positive"}\n')
    files = [f"data.train_file={tmp_path / 'train.jsonl'}", f"data.validation_file={tmp_path / 'dev.jsonl'}"]
    data = _cfg(tmp_path, *files, files=False)
    with pytest.raises(DataError, match=r"train.jsonl: cannot parse its rows \((?!DatasetGenerationError)"):
        load_rows(resolve_task(data), None)


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
        (
            ["positive", "negative", "neutral"],
            r"data row 3 \(line 4\): label 'neutral' in column 'sentiment' is not one of the label words",
        ),
        ([0, 1, 2], r"data row 3 \(line 4\): label 2 in column 'sentiment' is not a class id in \[0, 2\)"),
        ([0, 1, 0.5], r"data row 3 \(line 4\): label 0.5 in column 'sentiment' is not a class id"),
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
    with pytest.raises(DataError, match=r"validation_file .*dev.csv does not exist .looked for /.*current directory"):
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


@pytest.mark.parametrize(
    "name, content, message",
    [
        (
            "train.csv",
            'review,stars,sentiment\n"fine",1,pos\n,2,neg\n',
            r"train.csv data row 2 \(line 3\): text column 'review' is null",
        ),
        (
            "train.csv",
            'review,stars,sentiment\n"fine",1,pos\n"  ",2,neg\n',
            r"data row 2 \(line 3\): text column 'review' is empty",
        ),
        (
            "train.jsonl",
            '{"review": "fine", "sentiment": "pos"}\n{"sentiment": "neg"}\n',
            r"train.jsonl data row 2 \(line 2\): text column 'review'",
        ),
    ],
)
def test_a_missing_text_never_reads_as_none(tmp_path, name, content, message):
    """A missing value used to train as the text "review: None"."""
    data = _cfg(tmp_path, f"data.train_file={tmp_path / name}")
    (tmp_path / name).write_text(content.replace("pos", "positive").replace("neg", "negative"))
    with pytest.raises(DataError, match=message):
        load_rows(resolve_task(data), None)


_ARRAY = [{"review": r, "sentiment": s} for r, s in (("a", "positive"), ("b", "negative"), ("c", "x"))]


@pytest.mark.parametrize(
    "name, content, said",
    [
        # a quoted cell over two lines and a blank line: data row 3 starts on line 6
        ("train.csv", 'review,sentiment\n"fine",positive\n"two\nlines",negative\n\n"meh",neutral\n', "(line 6)"),
        # blank lines between JSON lines
        (
            "train.jsonl",
            '{"review": "fine", "sentiment": "positive"}\n\n{"review": "ok", "sentiment": "negative"}\n\n\n'
            '{"review": "meh", "sentiment": "neutral"}\n',
            "(line 6)",
        ),
        # an all-space line, skipped like a blank one: data row 3 starts on line 5
        ("train.csv", 'review,sentiment\n"fine",positive\n   \n"ok",negative\n"meh",neutral\n', "(line 5)"),
        # a JSON array after a blank line: still no line claimed
        (
            "train.json",
            "\n" + json.dumps(_ARRAY),
            "data row 3: label",
        ),
        # one JSON array: its rows are not lines, so no line is claimed
        (
            "train.json",
            json.dumps(_ARRAY),
            "data row 3: label",
        ),
    ],
)
def test_a_bad_row_is_named_by_the_line_an_editor_shows(tmp_path, name, content, said):
    """Errors said "row 2" for the third row (0-based) of a file whose editor line was 4, or 6."""
    data = _cfg(tmp_path, f"data.train_file={tmp_path / name}")
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError) as info:
        load_rows(resolve_task(data), None)
    assert f"{name} data row 3" in str(info.value) and said in str(info.value), str(info.value)


def test_a_misspelt_hub_test_split_is_an_error(tmp_path):
    """It used to fall back to halving validation without a word (other rows scored as test)."""
    d = tmp_path / "ds"
    d.mkdir()
    for split in ("train", "validation", "test"):
        (d / f"{split}.jsonl").write_text("".join(json.dumps({"text": t, "label": 0}) + "\n" for t, _ in REVIEWS))
    base = ["data.task=custom", f"data.hub_dataset={d}", "data.template={text}", "data.label_words=[a, b]"]
    with pytest.raises(DataError, match="has no split 'tst'"):
        load_rows(resolve_task(load_run_config(None, [*base, "data.test_split=tst"]).data), None)
    assert len(load_rows(resolve_task(load_run_config(None, [*base, "data.test_split=test"]).data), None)["test"]) == 3


@pytest.mark.parametrize(
    "labels, expected",
    [
        ([1, 2, 3, 4, 5], [0, 1, 2, 3, 4]),  # the words themselves (a 5 is no class id)
        ([0, 1, 2, 3, 4], [0, 1, 2, 3, 4]),  # class ids (a 0 is no word)
        (["1", "5", "3", "2", "4"], [0, 4, 2, 1, 3]),  # strings are always words
    ],
)
def test_numeral_label_words_read_by_the_whole_column(tmp_path, labels, expected):
    data = _cfg(tmp_path, "data.label_column=stars", "data.label_words=['1', '2', '3', '4', '5']")
    rows = "".join(f'"{t}",{lab}\n' for t, lab in zip(["a", "b", "c", "d", "e"], labels, strict=True))
    for split in ("train", "dev"):
        (tmp_path / f"{split}.csv").write_text("review,stars\n" + rows)
    assert [r["stars"] for r in load_rows(resolve_task(data), None)["train"]] == expected


@pytest.mark.parametrize(
    "labels, expected",
    [
        (["2.0", "1.0", "3.0"], [1, 0, 2]),  # a CSV reader makes floats of them: still the words
        (["3", "1", "2"], [2, 0, 1]),  # 3 is no class id of 3 words: the words
        (["1.5", "1.0", "3.0"], [None, 0, 2]),  # 1.5 is no word: refused
    ],
)
def test_decimal_label_words_read_from_a_csv_are_the_words(tmp_path, labels, expected):
    """Words "1.0".."3.0": a CSV label 2.0 became the int 2, read as class id 2 ("3.0"), one class off."""
    data = _cfg(tmp_path, "data.label_column=score", "data.label_words=['1.0', '2.0', '3.0']")
    rows = "".join(f'"{t}",{lab}\n' for t, lab in zip("abc", labels, strict=True))
    for split in ("train", "dev"):
        (tmp_path / f"{split}.csv").write_text("review,score\n" + rows)
    if None in expected:
        with pytest.raises(DataError, match="label 1.5 in column 'score' is not a class id"):
            load_rows(resolve_task(data), None)
    else:
        assert [r["score"] for r in load_rows(resolve_task(data), None)["train"]] == expected


def test_half_step_ratings_from_a_csv_are_the_words(tmp_path):
    """Words "1", "1.5", "2": a label 1.5 can only be a word, so the whole column reads as words (the
    whole numbers alone, {1, 2}, fit class ids too and were refused as ambiguous)."""
    data = _cfg(tmp_path, "data.label_column=score", "data.label_words=['1', '1.5', '2']")
    rows = "".join(f'"{t}",{lab}\n' for t, lab in zip("abc", ["2", "1.5", "1"], strict=True))
    for split in ("train", "dev"):
        (tmp_path / f"{split}.csv").write_text("review,score\n" + rows)
    assert [r["score"] for r in load_rows(resolve_task(data), None)["train"]] == [2, 1, 0]


def test_a_label_column_among_the_text_columns_but_not_in_the_template_is_no_leak(tmp_path):
    task = resolve_task(_cfg(tmp_path, "data.columns=[review, sentiment]"))
    assert task.source({"review": "fine", "sentiment": "positive"}) == "review: fine"


def test_decimal_label_words_that_fit_both_readings_are_refused(tmp_path):
    data = _cfg(tmp_path, "data.label_column=score", "data.label_words=['1.0', '2.0', '3.0']")
    rows = "".join(f'"{t}",{lab}\n' for t, lab in zip("ab", ["1.0", "2.0"], strict=True))
    for split in ("train", "dev"):
        (tmp_path / f"{split}.csv").write_text("review,score\n" + rows)
    with pytest.raises(DataError, match="ambiguous .* is label 1 class 1 \\('2.0'\\) or the word '1.0' \\(class 0\\)"):
        load_rows(resolve_task(data), None)


def test_numeral_label_words_that_fit_both_readings_are_refused(tmp_path):
    """Stars 1..4 against the words "1".."5": ids 1..4 or the words of classes 0..3? Row by row, a
    column holding 0..4 used to read 0 as an id and 1 as the word "1": two labels for class 0."""
    data = _cfg(tmp_path, "data.label_column=stars", "data.label_words=['1', '2', '3', '4', '5']")
    rows = "".join(f'"{t}",{lab}\n' for t, lab in zip("abcd", [1, 2, 3, 4], strict=True))
    for split in ("train", "dev"):
        (tmp_path / f"{split}.csv").write_text("review,stars\n" + rows)
    with pytest.raises(DataError, match="ambiguous .* is label 1 class 1 \\('2'\\) or the word '1' \\(class 0\\)"):
        load_rows(resolve_task(data), None)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.label_words=[a, b, c]", "data.metric=f1"], "f1 is binary, but there are 3 label words; use f1_macro"),
        (["data.label_words=[low, high]", "data.metric=pearson"], "every label word must be one"),
    ],
)
def test_a_metric_that_cannot_score_the_labels_is_refused_up_front(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        resolve_task(_cfg(tmp_path, *overrides))


@pytest.mark.parametrize(
    "words, max_target_length",
    [(["负面", "正面"], 16), (["positive", "positively"], 1)],  # both <unk>; cut to the same first token
)
def test_label_words_that_tokenise_alike_are_refused(tmp_path, words, max_target_length):
    import dataclasses

    task = resolve_task(_cfg(tmp_path))
    rows = load_rows(task, None)["train"]  # labels 0/1
    task = dataclasses.replace(task, label_words=tuple(words))
    enc = Encoder(task, load_tokenizer("t5", "tiny-t5"), "seq2seq", 16, max_target_length)
    with pytest.raises(DataError, match=f"label words '{words[0]}' and '{words[1]}' become the same tokens"):
        encode_all(enc, rows)


def test_caps_take_a_seeded_sample_in_file_order():
    """The first 10 rows of a file sorted by label are one class: the cap draws with split_seed instead."""
    from s3delta_ds.run.runtime import subsample

    rows = [{"i": i, "label": int(i >= 50)} for i in range(100)]
    picked = subsample(rows, 10, "random", 0, "train")
    assert len(picked) == 10 and {r["label"] for r in picked} == {0, 1}
    assert [r["i"] for r in picked] == sorted(r["i"] for r in picked)
    assert picked == subsample(rows, 10, "random", 0, "train")  # the same rows for search and retrain
    assert picked != subsample(rows, 10, "random", 1, "train")
    assert picked != subsample(rows, 10, "random", 0, "validation")  # each split its own draw
    assert subsample(rows, 10, "head", 0, "train") == rows[:10]
    assert subsample(rows, 200, "random", 0, "train") is rows
    with pytest.raises(ConfigError, match="data.subsample must be one of random, head"):
        load_run_config(None, ["data.subsample=first"])


def test_encoding_counts_the_sources_cut_to_the_length(tmp_path):
    task = resolve_task(_cfg(tmp_path))
    rows = load_rows(task, None)["train"]
    stats: dict = {}
    encode_all(Encoder(task, load_tokenizer("t5", "tiny-t5"), "seq2seq", 4, 8), rows, stats=stats)
    assert stats["truncated"] == len(rows)  # every review is longer than 4 tokens
    encode_all(Encoder(task, load_tokenizer("t5", "tiny-t5"), "seq2seq", 64, 8), rows, stats=stats)
    assert stats["truncated"] == 0


def test_a_template_cut_by_a_hash_or_naming_no_column_is_refused(tmp_path):
    data = _cfg(tmp_path, "data.template=Tweet #{review}: done")
    assert data.template == "Tweet #{review}: done" and resolve_task(data).columns == ("review",)
    with pytest.raises(ConfigError, match="names no column"):
        resolve_task(_cfg(tmp_path, "data.template=just this"))


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_whole_float_labels_are_checked_for_ambiguity_like_ints(tmp_path):
    """1.0, 2.0, 3.0 against the words "1".."5": class ids 1..3, or the words? Like ints: refused."""
    words = "data.label_words=['1', '2', '3', '4', '5']"
    rows = [{"review": f"r{i}", "stars": float(1 + i % 3)} for i in range(6)]
    for split in ("train", "dev"):
        _jsonl(tmp_path / f"{split}.jsonl", rows)
    data = _cfg(
        tmp_path, words, "data.label_column=stars", f"data.train_file={tmp_path / 'train.jsonl'}",
        f"data.validation_file={tmp_path / 'dev.jsonl'}",
    )  # fmt: skip
    with pytest.raises(DataError, match="ambiguous"):
        load_rows(resolve_task(data), None)
    rows = [{"review": f"r{i}", "stars": float(1 + i % 5)} for i in range(10)]  # 1..5: only the words fit
    for split in ("train", "dev"):
        _jsonl(tmp_path / f"{split}.jsonl", rows)
    got = load_rows(resolve_task(data), None)
    assert sorted({r["stars"] for r in got["train"]}) == [0, 1, 2, 3, 4]


def _classlabel_parquet(tmp_path, names):
    import datasets

    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=names)})
    rows = {"text": ["great film", "awful film"] * 4, "label": [names.index("positive"), names.index("negative")] * 4}
    d = tmp_path / "hub"
    d.mkdir(exist_ok=True)
    for split in ("train", "validation"):
        datasets.Dataset.from_dict(rows, features=features).to_parquet(str(d / f"{split}.parquet"))
    return d


@pytest.mark.parametrize("names", [["positive", "negative"], ["negative", "positive"]])
def test_classlabel_ids_are_read_by_their_names_when_those_are_the_label_words(tmp_path, names):
    d = _classlabel_parquet(tmp_path, names)
    data = load_run_config(
        None,
        ["data.task=custom", "data.template=review: {text}", "data.label_words=[negative, positive]",
         f"data.data_dir={d}"],
    ).data  # fmt: skip
    rows = load_rows(resolve_task(data), data.data_dir)
    great = [r["label"] for r in rows["train"] if r["text"] == "great film"]
    assert set(great) == {1}  # "positive" is label word 1, whatever the dataset's own order


def test_classlabel_names_that_only_partly_match_the_label_words_are_refused(tmp_path):
    d = _classlabel_parquet(tmp_path, ["positive", "negative"])
    data = load_run_config(
        None,
        ["data.task=custom", "data.template=review: {text}", "data.label_words=[negative, good]",
         f"data.data_dir={d}"],
    ).data  # fmt: skip
    with pytest.raises(DataError, match="ClassLabel with names"):
        load_rows(resolve_task(data), data.data_dir)


def test_a_builtin_hub_task_without_a_validation_split_is_named(tmp_path, monkeypatch):
    """It used to end in a bare KeyError deep in the split protocol."""
    import datasets

    rows = {"sentence": ["a", "b"], "label": [0, 1]}
    only_train = datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows)})
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: only_train)
    task = resolve_task(load_run_config(None, ["data.task=sst2"]).data)
    with pytest.raises(DataError, match="has no split 'validation'; it has train .*data.data_dir"):
        load_rows(task, None)


def test_a_header_only_csv_says_it_has_no_rows(tmp_path):
    (tmp_path / "train.csv").write_text("review,sentiment\n")
    (tmp_path / "dev.csv").write_text("review,sentiment\nok,positive\n")
    files = [f"data.train_file={tmp_path / 'train.csv'}", f"data.validation_file={tmp_path / 'dev.csv'}"]
    with pytest.raises(DataError, match=r"train.csv: has a header \(review,sentiment\) but no data rows"):
        load_rows(resolve_task(_cfg(tmp_path, *files, files=False)), None)


def test_a_file_replaced_with_the_same_modification_time_is_read_again(tmp_path):
    """datasets knows a local file by its path and modification time: rows replaced in place with
    the old time kept (cp -p, rsync -t, an unpacked archive) read back as the old ones, silently."""
    import os

    data = _cfg(tmp_path)
    train = tmp_path / "train.csv"
    before = load_rows(resolve_task(data), None, split_seed=0)["train"]
    stat = os.stat(train)
    flipped = [(t, "negative" if lab == "positive" else "positive") for t, lab in REVIEWS * 4]
    _csv(train, flipped)  # the same size: only the labels swap
    os.utime(train, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert os.stat(train).st_size == stat.st_size
    after = load_rows(resolve_task(data), None, split_seed=0)["train"]
    assert [r["sentiment"] for r in after] == [1 - r["sentiment"] for r in before]
