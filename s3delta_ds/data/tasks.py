"""The task registry and where rows come from. The embedded ``tiny-sentiment`` task ships with the
package; GLUE, SuperGLUE and the offline tasks are listed in ``glue``; ``data.task: custom`` builds
a task from the run config (``custom``). Registration is explicit: nothing registers on import."""

from __future__ import annotations

import hashlib
from importlib import resources
from pathlib import Path

from ..errors import ConfigError, DataError
from . import glue
from .task import Task

_EXTENSIONS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


TINY_SENTIMENT = Task(
    name="tiny-sentiment",
    template="sentiment: {sentence}",
    label_words=("negative", "positive"),
    columns=("sentence",),
    max_source_length=64,
    builtin_dir="assets/tiny/data",
)

#: Every built-in task by name. ``register`` adds one from Python (a config uses ``data.task: custom``).
TASKS: dict[str, Task] = {t.name: t for t in (TINY_SENTIMENT, *glue.TASKS)}


def register(task: Task) -> Task:
    TASKS[task.name] = task
    return task


def resolve_task(data) -> Task:
    """The task a ``DataConfig`` names: a registered one, or ``custom`` built from its keys."""
    if data.task == "custom":
        from .custom import custom_task

        return custom_task(data)
    return get_task(data.task)


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        import difflib

        close = difflib.get_close_matches(str(name).lower(), list(TASKS), n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(
            f"unknown task {name!r}; {hint}known tasks: {', '.join(sorted(TASKS))} (or data.task=custom with your "
            "own files, columns and label words: docs/your-data.md)"
        ) from None


def _split_file(data_dir: Path, split: str) -> Path | None:
    found = [data_dir / f"{split}{ext}" for ext in _EXTENSIONS if (data_dir / f"{split}{ext}").is_file()]
    if len(found) > 1:
        raise DataError(f"{data_dir}: several files for split {split!r}: {', '.join(p.name for p in found)}")
    return found[0] if found else None


def _content_cache(path: Path) -> str:
    """A datasets cache folder of this version of the file: datasets knows a local file by its path
    and modification time, so a file replaced by other rows with the same time (``cp -p``,
    ``rsync -t``, an unpacked archive) read back the old rows, with no error. The inode change time
    moves on every write and rename and cannot be set back, and costs no read of a large file (on
    every rank); a chmod only makes a new cache."""
    import datasets

    st = path.resolve().stat()
    key = f"{path.resolve()}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"
    return str(
        Path(datasets.config.HF_DATASETS_CACHE) / "s3delta-files" / hashlib.sha256(key.encode()).hexdigest()[:16]
    )


def _read(path: Path) -> list[dict]:
    import datasets

    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty")
    if path.suffix == ".csv":
        with path.open(encoding="utf-8", errors="replace") as f:
            header = f.readline().strip()
            if not any(line.strip() for line in f):  # datasets says 'Instruction "x" corresponds to no data!'
                raise DataError(f"{path}: has a header ({header[:80]}) but no data rows")
    # pandas reads the cells NA, None, null, NaN, N/A... as missing: a review that says "NA" became a
    # null text and the label word "NA" no label. Only an empty cell is missing here.
    na = {"keep_default_na": False, "na_values": [""]} if path.suffix == ".csv" else {}
    try:
        ds = datasets.load_dataset(
            _EXTENSIONS[path.suffix], data_files={"x": str(path)}, split="x", cache_dir=_content_cache(path), **na
        )
    except datasets.exceptions.DatasetGenerationError as e:
        # the parser's own error (which names the bad line) is wrapped in "An error occurred while
        # generating the dataset"
        inner = e.__cause__ or e.__context__ or e
        raise DataError(f"{path}: cannot parse its rows ({type(inner).__name__}: {str(inner).strip()})") from e
    except (StopIteration, ValueError) as e:  # a header-only CSV or a row-less parquet file, said several ways
        raise DataError(f"{path}: cannot read any rows ({type(e).__name__}: {e})") from e
    return ds


class RowAt:
    """A row as the person opening the file finds it: ``train.csv data row 3 (line 4)``. Rows count
    from 1; a text file's line adds what the reader skipped (a CSV's header and blank lines, a
    JSONL's blank lines, a quoted cell's line breaks). Worked out only when an error is said."""

    def __init__(self, where: str, index: int, path: Path | None = None):
        self.where, self.index, self.path = where, index, path

    def __str__(self) -> str:
        line = _line_of(self.path, self.index) if self.path is not None else None
        return f"{self.where} data row {self.index + 1}" + (f" (line {line})" if line else "")

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)


def _line_of(path: Path, index: int) -> int | None:
    """The 1-based line where data row ``index`` (0-based) starts, as ``datasets`` reads the file
    (blank lines skipped, a CSV's first record the header); None for a binary or a JSON array file."""
    import csv

    try:
        with path.open(newline="", encoding="utf-8") as f:
            if path.suffix == ".csv":
                reader, row, start = csv.reader(f), -1, 1
                for record in reader:
                    if any(cell.strip() for cell in record):  # pandas skips blank and all-space lines
                        if row == index:
                            return start
                        row += 1
                    start = reader.line_num + 1
                return None
            if path.suffix in (".jsonl", ".json"):
                row = 0
                for n, text in enumerate(f, start=1):
                    if not text.strip():
                        continue
                    if row == 0 and not text.lstrip().startswith("{"):
                        return None  # one JSON array (or columns): rows are not lines
                    if row == 0 and not text.rstrip().endswith("}"):
                        return None  # one object over several lines: {"data": [...]} or columns
                    if row == index:
                        return n
                    row += 1
    except (OSError, UnicodeDecodeError, csv.Error):
        return None
    return None


def _rows(ds, task: Task, where: str) -> list[dict]:
    """A ``datasets`` split as rows, with ``ClassLabel`` ids read as the names they stand for.

    A ``ClassLabel`` column stores ids in the dataset's own order (``names=['positive',
    'negative']``); read against ``data.label_words`` that order could invert the classes. When
    every name is a label word the ids become their names, so the words decide the class; when no
    name is, the ids are class ids as before (``neg``/``pos`` against ``negative``/``positive``).

    Raises:
        DataError: some names are label words and some are not (no reading is safe).
    """
    import datasets

    rows = [dict(r) for r in ds]
    feature = (getattr(ds, "features", None) or {}).get(task.label_column)
    if not isinstance(feature, datasets.ClassLabel):
        return rows
    names, words = list(feature.names), set(task.label_words)
    if not words & set(names):
        return rows
    if not set(names) <= words:
        raise DataError(
            f"{where}: column {task.label_column!r} is a ClassLabel with names {names}, only some of which are "
            f"label words {list(task.label_words)}: make data.label_words the names, or none of them"
        )
    for r in rows:
        v = r.get(task.label_column)
        if type(v) is int and 0 <= v < len(names):  # noqa: E721 - -1 marks an unlabelled row
            r[task.label_column] = names[v]
    return rows


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
        from .assets import asset_path

        data_dir = str(asset_path("data", task.asset_dir))
        if not Path(data_dir).is_dir():
            raise DataError(
                f"task {task.name!r} reads files that `s3delta fetch-assets` prepares; {data_dir} does not exist: "
                "run `s3delta fetch-assets` (or pass data.data_dir)"
            )
    if task.files:
        paths = {s: Path(f) for s, f in task.files.items()}
        for split, path in paths.items():
            if not path.is_file():
                raise DataError(
                    f"data.{split}_file {path} does not exist (looked for {path.absolute()}: a relative path is "
                    "read from the current directory, not from the config file's)"
                )
        where = {s: str(p) for s, p in paths.items()}
        rows = {s: _rows(_read(p), task, where[s]) for s, p in paths.items()}
        local = paths
    elif data_dir is not None:
        root = Path(data_dir)
        if not root.is_dir():
            raise DataError(
                f"data directory {data_dir} does not exist (looked for {root.absolute()}: a relative path is read "
                "from the current directory, not from the config file's)"
            )
        files = {s: _split_file(root, s) for s in ("train", "validation", "test")}
        if files["train"] is None or files["validation"] is None:
            raise DataError(
                f"{data_dir}: need at least train and validation files "
                f"({'/'.join(_EXTENSIONS)}); found {sorted(p.name for p in root.iterdir())}"
            )
        where = {s: str(p) for s, p in files.items() if p is not None}
        rows = {s: _rows(_read(p), task, where[s]) for s, p in files.items() if p is not None}
        local = files
    elif task.hub is not None:
        import datasets

        try:
            ds = datasets.load_dataset(task.hub[0], task.hub[1])
        except Exception as e:  # noqa: BLE001 - datasets raises many types when the hub is unreachable
            raise DataError(
                f"task {task.name!r}: cannot load {task.hub} from the hub ({type(e).__name__}: {e}); "
                "pass data.data_dir with local train/validation files"
            ) from e
        # a custom task names its test split only when data.test_split is set: a misspelt one must not
        # silently fall back to halving validation
        optional = () if task.name == "custom" else ("test",)
        missing = [theirs for ours, theirs in task.hub_splits.items() if ours not in optional and theirs not in ds]
        if missing:
            hint = " (data.*_split)" if task.name == "custom" else " (pass data.data_dir with local files)"
            raise DataError(f"{task.hub[0]} has no split {missing[0]!r}; it has {', '.join(ds)}{hint}")
        where = {ours: f"hub:{task.hub[0]}/{task.hub[1]}:{ours}" for ours in task.hub_splits}
        rows = {ours: _rows(ds[theirs], task, where[ours]) for ours, theirs in task.hub_splits.items() if theirs in ds}
        where = {s: where[s] for s in rows}
        local = {}
    else:
        raise DataError(f"task {task.name!r} has no shipped data: pass data.data_dir")
    for split, split_rows in rows.items():
        if not split_rows:
            raise DataError(f"{where[split]}: split {split!r} is empty")
        task.check_columns(list(split_rows[0].keys()), where[split])
    ints = {  # whole floats (1.0: a JSON float, a pandas column with gaps) read as the ints they are
        int(v)
        for split_rows in rows.values()
        for r in split_rows
        if type(v := r.get(task.label_column)) is int or (type(v) is float and v.is_integer())  # noqa: E721 - not bools
    }
    # a label such as 1.5 that is a word ("1.5") and can be no class id says the column holds words
    decimal_words = any(
        type(v := r.get(task.label_column)) is float and not v.is_integer() and v in task.numerals()
        for split_rows in rows.values()
        for r in split_rows
    )
    ints_are_words = task.int_labels_are_words(ints, ", ".join(where.values()), words=decimal_words)
    for split, split_rows in rows.items():
        for i, row in enumerate(split_rows):
            at = RowAt(where[split], i, local.get(split))
            task.check_text(row, at)
            if task.label_column not in row:
                raise DataError(f"{at}: label column {task.label_column!r} is missing")
            row[task.label_column] = task.label_index(row[task.label_column], at, ints_are_words=ints_are_words)
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
