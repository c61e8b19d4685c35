"""GLUE/SuperGLUE task definitions, label handling, metrics, and local-file loading."""

from __future__ import annotations

import json

import numpy as np
import pytest

from s3delta_ds.data import get_task, load_rows
from s3delta_ds.data.glue import STSB_WORDS
from s3delta_ds.errors import DataError
from s3delta_ds.run.metrics import compute


def test_registry_has_glue_superglue_and_offline_tasks():
    for name in (
        "cola",
        "sst2",
        "mrpc",
        "qqp",
        "stsb",
        "mnli",
        "qnli",
        "rte",
        "wnli",
        "superglue-boolq",
        "superglue-cb",
        "superglue-rte",
        "superglue-wic",
        "superglue-copa",
        "rt-sentiment",
        "bb-strategyqa",
        "bb-epistemic",
    ):
        assert get_task(name).name == name
    assert get_task("cola").metric == "matthews" and get_task("mrpc").metric == "f1"
    assert get_task("stsb").metric == "pearson" and get_task("superglue-cb").metric == "f1_macro"
    assert get_task("rte").max_source_length == 256 and get_task("sst2").max_source_length == 128
    assert get_task("sst2").protocol == "large" and get_task("mrpc").protocol == "small"
    assert get_task("mnli").hub_splits == {
        "train": "train",
        "validation": "validation_mismatched",
        "test": "validation_matched",
    }


def test_templates_read_like_t5():
    t = get_task("mrpc")
    assert t.source({"sentence1": "a b", "sentence2": "c"}) == "mrpc sentence1: a b sentence2: c"


def test_stsb_scores_round_to_the_nearest_label_word():
    t = get_task("stsb")
    assert len(STSB_WORDS) == 26 and STSB_WORDS[0] == "0.0" and STSB_WORDS[-1] == "5.0"
    assert t.label_index(3.14) == STSB_WORDS.index("3.2") and t.label_index(0.09) == 0 and t.label_index(5) == 25


def test_stsb_ties_round_half_to_even_as_t5_does():
    """T5's preprocessing is round(x * 5) / 5, half to even: 0.3 -> 0.4, 0.7 -> 0.8, 1.5 -> 1.6,
    3.5 -> 3.6, 0.1 -> 0.0. The nearest-word search used to go wherever float noise fell (mostly down)."""
    t = get_task("stsb")
    for score in (0.1, 0.3, 0.5, 0.7, 1.5, 2.9, 3.5, 4.9, 1.37, 4.61):
        expected = f"{np.round(score * 5) / 5:.1f}"
        assert STSB_WORDS[t.label_index(score)] == expected, score


@pytest.mark.parametrize("score", [float("nan"), float("inf"), -0.2, 5.11, 99.0])
def test_a_score_that_is_not_finite_or_outside_the_words_range_is_refused(score):
    """NaN was nearest to every word (all comparisons false) and became "0.0"; -7 became "0.0"."""
    with pytest.raises(DataError, match=r"outside the label words' range \[0, 5\]"):
        get_task("stsb").label_index(score, "train.jsonl row 3")
    assert get_task("stsb").label_index(5.09) == 25 and get_task("stsb").label_index(-0.09) == 0


def test_string_labels_map_to_their_word():
    assert get_task("rte").label_index("not_entailment") == 1
    assert get_task("rte").label_index(0) == 0


def test_metrics_against_hand_computed_values():
    preds, labels = [1, 1, 0, 0, 1], [1, 0, 0, 1, 1]
    assert compute("accuracy", preds, labels) == {"accuracy": 0.6}
    # F1 of class 1: precision 2/3, recall 2/3
    assert compute("f1", preds, labels)["f1"] == pytest.approx(2 / 3)
    # Matthews: tp=2 tn=1 fp=1 fn=1 -> (2-1)/sqrt(3*3*2*2) = 1/6
    assert compute("matthews", preds, labels)["matthews"] == pytest.approx(1 / 6)
    cb = compute("f1_macro", [0, 1, 2, 2], [0, 1, 1, 2])
    assert cb["f1_macro"] == pytest.approx((1 + 2 / 3 + 2 / 3) / 3) and cb["accuracy"] == 0.75
    # a split without class 2 that nothing predicts as 2: still averaged over the task's 3 classes
    # (T5's mean_multiclass_f1), not over the 2 that occur
    few = compute("f1_macro", [0, 1, 1, 1], [0, 1, 0, 1], ("entailment", "contradiction", "neutral"))
    assert few["f1_macro"] == pytest.approx((2 / 3 + 0.8 + 0) / 3)
    p = compute("pearson", [0, 5, 10, 25], [0, 5, 11, 25], STSB_WORDS)
    # label words 0.0, 1.0, 2.0/2.2, 5.0 -> numpy's correlation of the numbers they spell
    assert p["pearson"] == pytest.approx(float(np.corrcoef([0, 1, 2, 5], [0, 1, 2.2, 5])[0, 1]))
    assert p["spearman"] == pytest.approx(1.0)
    assert compute("pearson", [3, 3, 3], [0, 5, 10], STSB_WORDS)["pearson"] == 0.0
    with pytest.raises(ValueError, match="unknown metric"):
        compute("bleu", [0], [0])


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_glue_task_from_local_files_with_the_small_protocol(tmp_path):
    rows = [{"sentence1": f"s{i}", "sentence2": f"t{i}", "label": i % 2} for i in range(40)]
    _write(tmp_path / "train.jsonl", rows)
    _write(tmp_path / "validation.jsonl", rows[:21])
    out = load_rows(get_task("mrpc"), str(tmp_path), split_seed=3)
    assert (len(out["train"]), len(out["validation"]), len(out["test"])) == (40, 10, 11)
    assert {r["sentence1"] for r in out["validation"]}.isdisjoint({r["sentence1"] for r in out["test"]})


def test_missing_column_is_named(tmp_path):
    _write(tmp_path / "train.jsonl", [{"sentence1": "a", "label": 0}])
    _write(tmp_path / "validation.jsonl", [{"sentence1": "a", "label": 0}])
    with pytest.raises(DataError, match="needs a column 'sentence2'"):
        load_rows(get_task("mrpc"), str(tmp_path))


def test_offline_tasks_explain_how_to_get_their_data(tmp_path, monkeypatch):
    monkeypatch.setenv("S3DELTA_ASSETS", str(tmp_path))
    with pytest.raises(DataError, match="s3delta fetch-assets"):
        load_rows(get_task("bb-strategyqa"), None)


def test_large_protocol_needs_enough_rows(tmp_path):
    rows = [{"sentence": f"x{i}", "label": i % 2} for i in range(100)]
    _write(tmp_path / "train.jsonl", rows)
    _write(tmp_path / "validation.jsonl", rows)
    with pytest.raises(DataError, match="2,000 training rows"):
        load_rows(get_task("sst2"), str(tmp_path))


def test_hub_unreachable_suggests_a_data_dir(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match="data.data_dir"):
        load_rows(get_task("cola"), None)
