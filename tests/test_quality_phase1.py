"""benchmarks/quality.py phase 1 without training: the queue's order and names when a variant moves to
another budget or another task, and the ablation table read against the random rows of the same
setting."""

from __future__ import annotations

import json

import pytest

from benchmarks import quality as q


@pytest.mark.parametrize("variant", [*q.P1_VARIANTS, *q.P1_REFERENCES])
def test_a_variants_random_row_names_its_setting(variant):
    task, budget = q._variant_setting(variant)
    name = q._random_name(budget, task)
    assert q._variant_setting(name) == (task, budget)
    assert (name == "random") == ((task, budget) == (q.P1_TASK, q.P1_BUDGET))


def test_the_names_of_records_already_made_are_kept():
    assert q._random_name(q.P1_BUDGET) == "random"
    assert q._random_name(3e-4) == "random@0.0003"  # phase 1's committed records use this name
    assert q._random_name(q.P1_BUDGET, "newsgroups-20") == "random@20ng"
    assert q._variant_setting("random@20ng@0.0003") == ("newsgroups-20", 3e-4)


def test_unknown_variants_and_tags_are_named():
    with pytest.raises(ValueError, match="'random@2Ong': '2Ong' is neither a task tag"):
        q._variant_setting("random@2Ong")
    with pytest.raises(ValueError, match="unknown variant 'bsae'"):
        q._variant_setting("bsae")


def test_units_put_a_settings_baselines_before_its_searches_and_retrains_after_their_search():
    units = q._p1_units()
    keys = [k for k, _ in units]
    assert len(keys) == len(set(keys))
    first = {}
    for i, (_, spec) in enumerate(units):
        if spec[0] == "search":
            first.setdefault(q._variant_setting(spec[1]), i)
        if spec[0] == "retrain":  # after its search
            assert keys.index(f"search/{spec[1]}-s{spec[3]}") < i
    for (task, budget), i in first.items():
        for s in q.P1_SEEDS:  # every setting's random rows come before its first search
            assert keys.index(f"retrain/{q._random_name(budget, task)}-s{s}") < i
    # full fine-tuning and LoRA are run once on another task, never on the default one
    refs = [spec[1] for _, spec in units if spec[0] == "reference"]
    assert sorted(refs) == sorted(q.P1_REFERENCES)
    assert all(q._variant_setting(r)[0] != q.P1_TASK for r in refs)
    # a unit on another task trains on that task
    cmd = q._p1_common(0, q.ROOT / "x", "newsgroups-20")
    assert "data.task=newsgroups-20" in cmd and f"data.max_source_length={q.P1_SOURCE_LENGTH}" in cmd


def test_the_ablation_reads_each_row_against_the_random_structures_of_its_own_task(tmp_path, monkeypatch):
    monkeypatch.setattr(q, "P1_OUT", tmp_path / "quality-phase1")
    (tmp_path / "quality-phase1" / "retrain").mkdir(parents=True)

    def rec(variant, seed, val, rule="metric"):
        r = {"variant": variant, "rule": rule, "seed": seed, "validation": val, "params_used": 100}
        r["composition"] = {"lora": 1}
        name = f"{variant}-{rule}-s{seed}" if rule else f"{variant}-s{seed}"
        (tmp_path / "quality-phase1" / "retrain" / f"{name}.json").write_text(json.dumps(r))

    for s in (0, 1):
        rec("random", s, 0.80, None)
        rec("random@20ng", s, 0.50, None)
        rec("base", s, 0.81)
        rec("base@20ng", s, 0.55)
    rec("full@20ng", 0, 0.70, None)
    rec("dropped-variant", 0, 0.60)  # a record of a variant no longer planned is listed, not a crash
    text = q.report_phase1()
    rows = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines() if line.startswith("| ")}
    assert "| +1.0 |" in rows["base"]  # 81 against RT's random 80
    assert "| +5.0 |" in rows["base@20ng"]  # 55 against 20NG's random 50, not RT's
    assert "| 70.0 | 70.0 |  |" in rows["full@20ng"]  # a reference row has no Δ rand
    order = [line.split(" | ")[0].lstrip("| ") for line in text.splitlines() if line.startswith("| ")]
    assert order.index("full@20ng") < order.index("random@20ng") < order.index("base@20ng")
