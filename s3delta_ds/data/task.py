"""A task: how its rows read as text, which columns they need, and its label words and metric.

The class has no registry and imports nothing of the package's: built-in task lists (``glue``) and
the registry (``tasks``) import it, never the other way round."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ..errors import DataError


@dataclass(frozen=True)
class Task:
    """A classification task read as text.

    ``template`` formats a row into the source text (``{column}`` placeholders); ``label_words``
    are what text-to-text and decoder models must produce (label i ↔ word i); encoders use the
    integer label with a classification head.
    """

    name: str
    template: str
    label_words: tuple[str, ...]
    columns: tuple[str, ...]
    label_column: str = "label"
    metric: str = "accuracy"
    max_source_length: int = 128
    #: Split protocol when the data has no test split: "small" halves validation into val/test,
    #: "large" takes 2,000 training rows as validation and uses validation as test (Compacter).
    protocol: str = "given"
    hub: tuple[str, str | None] | None = None
    hub_splits: dict[str, str] = field(default_factory=dict)
    builtin_dir: str | None = None
    #: Directory under the asset cache (``s3delta fetch-assets``) holding this task's files.
    asset_dir: str | None = None
    #: Split → file path (``data.task: custom`` with data.train_file etc.).
    files: dict[str, str] = field(default_factory=dict)

    def numerals(self) -> dict[float, int]:
        """Label words that are numbers ("1", "2.0"), by value: a CSV reader makes numbers of them."""
        out: dict[float, int] = {}
        for i, w in enumerate(self.label_words):
            try:
                value = float(w)
            except ValueError:
                continue
            if math.isfinite(value):
                out.setdefault(value, i)
        return out

    def int_labels_are_words(self, values: set[int], where: str = "", *, words: bool = False) -> bool:
        """How integer labels read when the label words are numerals too (star ratings ``"1".."5"``,
        or ``"1.0".."3.0"``, that a CSV reader turned into numbers): as the words (True) or as class
        ids (False).

        The whole label column decides, never a row alone: read row by row, labels 0..4 against the
        words "1".."5" would map both 0 and 1 to class 0.

        Raises:
            DataError: both readings fit every label yet disagree (labels 1..4 against the words
                "1".."5": class ids 1..4, or the words of classes 0..3?).
        """
        numerals = self.numerals()
        if self.metric == "pearson" or not values or not numerals:
            return False
        as_words = all(float(v) in numerals for v in values)
        if words and as_words:  # the column also holds labels such as 1.5 that only a word reads
            return True
        as_ids = all(0 <= v < len(self.label_words) for v in values)
        if as_words and as_ids and any(numerals[float(v)] != v for v in values):
            v = next(v for v in sorted(values) if numerals[float(v)] != v)
            word = self.label_words[numerals[float(v)]]
            where = f"{where}: " if where else ""
            raise DataError(
                f"{where}integer labels {sorted(values)} in column {self.label_column!r} are ambiguous against the "
                f"label words {list(self.label_words)}: is label {v} class {v} ({self.label_words[v]!r}) or the "
                f"word {word!r} (class {numerals[float(v)]})? Write the labels as strings in JSONL (a CSV reader "
                "reads quoted numbers as numbers), or use label words that are not numerals (e.g. '1 star')"
            )
        return as_words and not as_ids

    def check_text(self, row: dict[str, Any], where: object) -> None:
        """Every text column present and non-empty: a missing value would read as "None"."""
        for c in self.columns:
            value = row.get(c)
            if value is None or (isinstance(value, str) and not value.strip()):
                what = "is missing" if c not in row else "is empty" if value is not None else "is null"
                raise DataError(f"{where}: text column {c!r} {what}; fill or drop the row")

    def label_index(self, value: Any, where: object = "", *, ints_are_words: bool = False) -> int:
        """Integer class of a raw label: ints as they are; a float score (STS-B) rounded to the
        nearest label word; a string that is one of the label words; a whole float (1.0, as CSV
        readers make of integer columns with gaps) as its int.

        Raises:
            DataError: a label that is none of these (named, with the label words).
        """

        def error(msg: str) -> DataError:  # ``where`` (a data.tasks.RowAt) is said only on error
            return DataError(f"{where}: {msg}" if where else msg)

        if isinstance(value, bool):
            raise error(f"label column {self.label_column!r} holds booleans; use 0/1 or the label words")
        if self.metric == "pearson" and isinstance(value, (int, float)):
            return self._nearest_word(float(value), error)
        if isinstance(value, float) and not value.is_integer() and value in self.numerals():
            return self.numerals()[value]  # "2.5" read by a CSV reader: never a class id
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if ints_are_words and isinstance(value, int):
            return self.numerals()[float(value)]
        if isinstance(value, str):
            if value in self.label_words:
                return self.label_words.index(value)
            raise error(
                f"label {value!r} in column {self.label_column!r} is not one of the label words "
                f"{list(self.label_words)}"
            )
        if isinstance(value, int) and 0 <= value < len(self.label_words):
            return value
        raise error(
            f"label {value!r} in column {self.label_column!r} is not a class id in [0, {len(self.label_words)}) "
            f"nor one of the label words {list(self.label_words)}"
        )

    def _nearest_word(self, value: float, error) -> int:
        """A score's label word: the nearest, ties to the even index (T5 rounds STS-B's scores
        half to even, ``round(x * 5) / 5``, and word k there is k/5). A score that is not finite
        or lies more than half a step outside the words' range is refused: NaN compared as the
        nearest to every word and became class 0."""
        words = [float(w) for w in self.label_words]
        ordered = sorted(words)
        half = min((b - a for a, b in zip(ordered, ordered[1:], strict=False)), default=0.0) / 2
        if not math.isfinite(value) or not ordered[0] - half <= value <= ordered[-1] + half:
            raise error(
                f"score {value!r} in column {self.label_column!r} is outside the label words' range "
                f"[{ordered[0]:g}, {ordered[-1]:g}]"
            )
        distance = [abs(w - value) for w in words]
        nearest = min(distance)
        ties = [i for i, d in enumerate(distance) if d - nearest <= 1e-9 * max(1.0, abs(value))]
        return next((i for i in ties if i % 2 == 0), ties[0])

    def source(self, row: dict[str, Any]) -> str:
        return self.template.format(**{c: row[c] for c in self.columns})

    def check_columns(self, rows_columns: list[str], where: str) -> None:
        for col in (*self.columns, self.label_column):
            if col not in rows_columns:
                raise DataError(
                    f"{where}: task {self.name!r} needs a column {col!r}, but the data has only "
                    f"{', '.join(rows_columns) or 'no columns'}"
                )
