"""The ground floor: standard-library helpers every other module may use (no package imports).

* ``atomic_path`` / ``atomic_write_text``: a reader never sees a half-written file, even if the
  writer is killed: write a temporary sibling, then rename it over the target (atomic on POSIX).
* ``strict_json``: non-finite floats as null, so that files parse outside Python (jq, JSON.parse).
* ``free_port``: a TCP port for a rendezvous (launchers, single-process runs, test clusters).
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary sibling of ``path`` to write to; renamed over ``path`` when the block exits
    normally, removed when it raises. ``suffix``: for writers that read the format from the name
    (``".tmp.png"`` for matplotlib). Creates the parent directory.

    Yields:
        The temporary file's path (the file exists, empty, with normal permissions).
    """
    path = Path(path)
    if path.is_dir():  # else the rename's error names the temporary file, not the path given
        raise IsADirectoryError(errno.EISDIR, "is a directory, not a file name", str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file normal permissions
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (flushed to disk before the rename). Returns ``path``."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    return Path(path)


RUN_MARKER = ".s3delta-run"
"""The file a run claims its output directory with (``claim_run_dir``)."""


def claim_run_dir(out: str | os.PathLike, info: dict, *, replace: bool = False) -> bool:
    """Create ``out/RUN_MARKER`` holding ``info`` (JSON), atomically: of two runs started on one
    directory at once, exactly one gets True. ``replace``: rewrite it (a resumed run records its
    own job). Returns False when another run claimed the directory first."""
    path = Path(out) / RUN_MARKER
    if replace:
        atomic_write_text(path, json.dumps(info))
        return True
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(info))
    return True


def read_run_claim(out: str | os.PathLike) -> dict | None:
    """What ``claim_run_dir`` recorded in ``out`` (None: nothing readable)."""
    try:
        info = json.loads((Path(out) / RUN_MARKER).read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a directory's entries (the renames into it) to disk; a no-op where the OS cannot."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a directory
        pass
    finally:
        os.close(fd)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago ("" for every interface)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def slurm_count(raw: str | None) -> int | None:
    """A per-node count as Slurm writes it (``8``, ``4(x2)``, ``a100:8``), None when absent or 0."""
    value = (raw or "").split("(")[0].rsplit(":", 1)[-1].strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


def strict_json(value):
    """``value`` with every non-finite float (nested in dicts, lists and tuples) as None: strict JSON
    has no NaN or Infinity, and only Python reads back the ``-Infinity`` that ``json.dumps`` writes."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value
