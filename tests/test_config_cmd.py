"""``s3delta config``: a complete, commented YAML that reads back to the same config."""

from __future__ import annotations

from pathlib import Path

import pytest

from s3delta_ds.cli import main
from s3delta_ds.cli.config_cmd import config_text
from s3delta_ds.config import load_run_config
from s3delta_ds.config_yaml import field_docs

EXAMPLES = sorted((Path(__file__).parents[1] / "examples").glob("*.yaml"))


@pytest.mark.parametrize("what", [None, "sst2", "custom", *map(str, EXAMPLES)])
def test_printed_config_reads_back_equal_and_is_commented(tmp_path, what):
    text = config_text(what, ["search.steps=7"])
    path = tmp_path / "c.yaml"
    path.write_text(text)
    cfg = load_run_config(path)
    assert cfg.search.steps == 7
    if what is not None and what.endswith(".yaml"):
        assert cfg == load_run_config(what, ["search.steps=7"])
    assert "# Trainable-parameter budget as a fraction of the backbone's parameters." in text
    assert text.count("\n  # ") > 40  # the keys carry their documentation


def test_custom_starts_from_a_usable_own_data_config():
    cfg = load_run_config(None, [])  # noqa: F841 - the defaults must load too
    text = config_text("custom", [])
    assert "task: custom" in text and "label_words: [negative, positive]" in text
    assert "template: 'review: {text}'" in text


def test_every_documented_field_exists():
    """The comments come from the docstrings under each field: none may be orphaned by a rename."""
    from s3delta_ds import config

    for cls_name, docs in field_docs().items():
        cls = getattr(config, cls_name)
        assert set(docs) <= {f for f in cls.__dataclass_fields__}, cls_name


def test_cli_prints_it_and_names_a_misspelt_task(capsys):
    assert main(["config", "--defaults"]) == 0
    assert "search:" in capsys.readouterr().out
    assert main(["config", "sst3"]) == 2
    assert "unknown task 'sst3'" in capsys.readouterr().err


def test_overrides_alone_are_of_the_defaults(capsys, tmp_path):
    """`s3delta config search.steps=5` read the override as a task name."""
    for argv in (["config", "search.steps=5"], ["config", "--defaults", "search.steps=5", "seed=3"]):
        assert main(argv) == 0
        path = tmp_path / "c.yaml"
        path.write_text(capsys.readouterr().out)
        assert load_run_config(path).search.steps == 5


def test_every_key_is_documented():
    """`s3delta config` promises every key with what it does: a field without a docstring prints bare."""
    import dataclasses

    from s3delta_ds import config

    docs = field_docs()
    bare = [
        f"{name}.{f.name}"
        for name in docs
        for f in dataclasses.fields(getattr(config, name))
        if not any(f.name in docs.get(base.__name__, {}) for base in getattr(config, name).__mro__)
        and not dataclasses.is_dataclass(f.default_factory)  # the sections themselves
    ]
    assert bare == []
