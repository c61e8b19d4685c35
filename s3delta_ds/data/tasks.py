"""Tasks: where the rows come from, which columns they need, how they read as text, and their
label words and metric. The embedded ``tiny-sentiment`` task ships with the package."""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DataError

_EXTENSIONS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


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

    def label_index(self, value: Any) -> int:
        """Integer class of a raw label: ints as they are; a float score (STS-B) rounded to the
        nearest label word; a string that is one of the label words."""
        if self.metric == "pearson" and isinstance(value, (int, float)) and not isinstance(value, bool):
            words = [float(w) for w in self.label_words]
            return min(range(len(words)), key=lambda i: abs(words[i] - float(value)))
        if isinstance(value, str) and value in self.label_words:
            return self.label_words.index(value)
        return value

    def source(self, row: dict[str, Any]) -> str:
        return self.template.format(**{c: row[c] for c in self.columns})

    def check_columns(self, rows_columns: list[str], where: str) -> None:
        for col in (*self.columns, self.label_column):
            if col not in rows_columns:
                raise DataError(
                    f"{where}: task {self.name!r} needs a column {col!r}, but the data has only "
                    f"{', '.join(rows_columns) or 'no columns'}"
                )


TASKS: dict[str, Task] = {
    "tiny-sentiment": Task(
        name="tiny-sentiment",
        template="sentiment: {sentence}",
        label_words=("negative", "positive"),
        columns=("sentence",),
        max_source_length=64,
        builtin_dir="assets/tiny/data",
    ),
}


def register(task: Task) -> Task:
    TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    from . import glue  # noqa: F401  (registers GLUE, SuperGLUE and the offline tasks)

    try:
        return TASKS[name]
    except KeyError:
        raise ConfigError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}") from None


def _split_file(data_dir: Path, split: str) -> Path | None:
    found = [data_dir / f"{split}{ext}" for ext in _EXTENSIONS if (data_dir / f"{split}{ext}").is_file()]
    if len(found) > 1:
        raise DataError(f"{data_dir}: several files for split {split!r}: {', '.join(p.name for p in found)}")
    return found[0] if found else None


def _read(path: Path) -> list[dict]:
    import datasets

    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty")
    try:
        ds = datasets.load_dataset(_EXTENSIONS[path.suffix], data_files={"x": str(path)}, split="x")
    except (StopIteration, ValueError, datasets.exceptions.DatasetGenerationError) as e:
        # datasets reports a header-only CSV or a row-less parquet file in several ways
        raise DataError(f"{path}: cannot read any rows ({type(e).__name__}: {e})") from e
    return [dict(r) for r in ds]


def load_rows(task: Task, data_dir: str | None, split_seed: int = 0) -> dict[str, list[dict]]:
    """Rows of ``train``, ``validation`` and ``test`` for ``task``.

    From ``data_dir`` (local files, the path that works everywhere), else the task's shipped data,
    else the hub through ``datasets``. Missing test splits follow the task's protocol, drawn with
    ``split_seed`` (``data.split_seed``, never the run seed: see ``DataConfig.split_seed``).

    Raises:
        DataError: no data found, an empty split, or a missing column (named).
    """
    if data_dir is None and task.builtin_dir is not None:
        data_dir = str(resources.files("s3delta_ds") / task.builtin_dir)
    if data_dir is None and task.asset_dir is not None:
        from ..assets import asset_path

        data_dir = str(asset_path("data", task.asset_dir))
        if not Path(data_dir).is_dir():
            raise DataError(
                f"task {task.name!r} reads files that `s3delta fetch-assets` prepares; {data_dir} does not exist: "
                "run `s3delta fetch-assets` (or pass data.data_dir)"
            )
    if data_dir is not None:
        root = Path(data_dir)
        if not root.is_dir():
            raise DataError(f"data directory {data_dir} does not exist")
        files = {s: _split_file(root, s) for s in ("train", "validation", "test")}
        if files["train"] is None or files["validation"] is None:
            raise DataError(
                f"{data_dir}: need at least train and validation files "
                f"({'/'.join(_EXTENSIONS)}); found {sorted(p.name for p in root.iterdir())}"
            )
        rows = {s: _read(p) for s, p in files.items() if p is not None}
        where = {s: str(p) for s, p in files.items() if p is not None}
    elif task.hub is not None:
        import datasets

        try:
            ds = datasets.load_dataset(task.hub[0], task.hub[1])
        except Exception as e:  # noqa: BLE001 - datasets raises many types when the hub is unreachable
            raise DataError(
                f"task {task.name!r}: cannot load {task.hub} from the hub ({type(e).__name__}: {e}); "
                "pass data.data_dir with local train/validation files"
            ) from e
        rows = {ours: [dict(r) for r in ds[theirs]] for ours, theirs in task.hub_splits.items() if theirs in ds}
        where = {s: f"hub:{task.hub[0]}/{task.hub[1]}:{s}" for s in rows}
    else:
        raise DataError(f"task {task.name!r} has no shipped data: pass data.data_dir")
    for split, split_rows in rows.items():
        if not split_rows:
            raise DataError(f"{where[split]}: split {split!r} is empty")
        task.check_columns(list(split_rows[0].keys()), where[split])
        for row in split_rows:
            row[task.label_column] = task.label_index(row[task.label_column])
    return apply_protocol(task, rows, split_seed)


def apply_protocol(task: Task, rows: dict[str, list[dict]], split_seed: int) -> dict[str, list[dict]]:
    """Make train/validation/test from what exists, the way the original (Compacter) code does."""
    import random

    if "test" in rows:
        return rows
    if task.protocol == "large":
        if len(rows["train"]) <= 2000:
            raise DataError(
                f"task {task.name!r}: the 'large' split protocol takes 2,000 training rows as validation, but "
                f"there are only {len(rows['train'])}; provide a test split or use a smaller task"
            )
        train = list(rows["train"])
        random.Random(split_seed).shuffle(train)
        return {"train": train[2000:], "validation": train[:2000], "test": rows["validation"]}
    val = list(rows["validation"])
    random.Random(split_seed).shuffle(val)
    half = len(val) // 2
    return {"train": rows["train"], "validation": val[:half], "test": val[half:]}
