"""``data.task: custom``: a task built from the run config — your files (or a ``datasets`` name),
your template, text columns, label column and label words — checked before any data is read."""

from __future__ import annotations

import string
from pathlib import Path

from ..errors import ConfigError
from .task import Task

METRICS = ("accuracy", "f1", "f1_macro", "matthews", "pearson")
_SUFFIXES = (".csv", ".jsonl", ".json", ".parquet")


def placeholders(template: str) -> tuple[str, ...]:
    """The ``{column}`` names of a template, in order, each once."""
    try:
        parsed = [(f, spec, conversion) for _, f, spec, conversion in string.Formatter().parse(template)]
    except ValueError as e:
        raise ConfigError(f"data.template {template!r} is not a valid template: {e}") from None
    names = [f for f, _, _ in parsed if f is not None]
    # {text:.200} and {text!r} format as str.format does; a nested field ({text:>{x}}) or another
    # conversion ({text!z}) failed in every rank's encoder, as a traceback
    unformattable = [
        f"{{{f}{'!' + c if c else ''}{':' + s if s else ''}}}"
        for f, s, c in parsed
        if f is not None and ("{" in (s or "") or (c or "r") not in "rsa")
    ]
    if unformattable:
        raise ConfigError(
            f"data.template {template!r}: {', '.join(unformattable)} cannot be formatted (a format spec may not hold "
            "another {field}, and a conversion is !r, !s or !a). Write a literal brace as {{ or }}"
        )
    bad = [n for n in names if not n or not n.isidentifier()]
    if bad:
        raise ConfigError(f"data.template {template!r}: placeholders must name columns, e.g. {{text}}; got {bad}")
    return tuple(dict.fromkeys(names))


def _distinct(named: dict[str, str], what: str) -> None:
    """Train, validation and test must be different data: a validation split that is the training
    split selects on rows the deltas trained on, and a test split among them scores memory."""
    seen: dict[str, str] = {}
    for key, value in named.items():
        if value in seen:
            raise ConfigError(
                f"{seen[value]} and {key} name the same {what} ({value}): validation and test rows must be "
                "held out from training and from each other (leave data.test_split unset to halve validation)"
            )
        seen[value] = key


def custom_task(data) -> Task:
    """The ``Task`` that a ``DataConfig`` with ``task: custom`` describes.

    Raises:
        ConfigError: a missing or inconsistent key, named (no template, fewer than two label
            words, no data source or two of them, a file of an unknown kind, a template column not
            among ``columns``, an unknown metric).
    """
    if not data.template:
        raise ConfigError('data.task=custom needs data.template, e.g. "review: {text}"')
    fields = placeholders(data.template)
    if not fields:  # every example would read the same: nothing to learn from
        raise ConfigError(
            f"data.template {data.template!r} names no column: every example would read the same; put one in "
            'braces, e.g. "review: {text}"'
        )
    columns = tuple(data.columns) if data.columns else fields
    missing = [f for f in fields if f not in columns]
    if missing:
        raise ConfigError(f"data.template uses {missing} but data.columns is {list(columns)}")
    if data.label_column in fields:  # every source would carry its answer: training and test scores mean nothing
        raise ConfigError(
            f"data.template reads the label column {data.label_column!r}: the model would see each answer in its "
            "input; take it out of the template"
        )
    words = tuple(data.label_words or ())
    if len(words) < 2 or len(set(words)) != len(words):
        raise ConfigError(f"data.task=custom needs data.label_words: two or more distinct words, got {list(words)}")
    if data.metric not in METRICS:
        raise ConfigError(f"data.metric must be one of {', '.join(METRICS)}, got {data.metric!r}")
    if data.metric == "f1" and len(words) > 2:  # caught here, not at the first evaluation
        raise ConfigError(f"data.metric=f1 is binary, but there are {len(words)} label words; use f1_macro")
    if data.metric == "pearson":
        try:
            [float(w) for w in words]
        except ValueError:
            raise ConfigError(
                f"data.metric=pearson scores numbers: every label word must be one (e.g. 0, 1, 2.5), got {list(words)}"
            ) from None
    files = {s: getattr(data, f"{s}_file") for s in ("train", "validation", "test")}
    files = {s: f for s, f in files.items() if f}
    given = (("files", files), ("hub_dataset", data.hub_dataset), ("data_dir", data.data_dir))
    sources = [name for name, value in given if value]
    if len(sources) != 1:
        raise ConfigError(
            "data.task=custom reads from exactly one of data.train_file + data.validation_file, data.hub_dataset "
            f"or data.data_dir; got {', '.join(sources) or 'none'}"
        )
    if files:
        for split in ("train", "validation"):
            if split not in files:
                raise ConfigError(f"data.task=custom with files needs data.{split}_file")
        for split, f in files.items():
            if Path(f).suffix not in _SUFFIXES:
                raise ConfigError(f"data.{split}_file {f}: use {', '.join(_SUFFIXES)}")
        _distinct({f"data.{s}_file": str(Path(f).resolve()) for s, f in files.items()}, "file")
    splits = {"train": data.train_split, "validation": data.validation_split}
    if data.test_split:
        splits["test"] = data.test_split
    if data.hub_dataset:
        _distinct({f"data.{s}_split": name for s, name in splits.items()}, "split")
    return Task(
        name="custom",
        template=data.template,
        label_words=words,
        columns=columns,
        label_column=data.label_column,
        metric=data.metric,
        max_source_length=data.max_source_length or 128,
        protocol="small",
        hub=(data.hub_dataset, data.hub_config) if data.hub_dataset else None,
        hub_splits=splits if data.hub_dataset else {},
        files=files,
    )
