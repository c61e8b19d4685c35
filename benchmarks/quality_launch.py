"""One resumable run of a quality-study unit: the study's workers die with the machine's sessions
(every 3 hours), and a 1,600-step run takes 35-50 minutes, so a unit continues from its newest
checkpoint instead of starting over, but only when nothing it depends on has changed since.

    launch, summary = run_resumable(run_retrain, work, overrides, structure)

The run writes to ``work/run``; ``work/unit.json`` keeps what the run was started with (the
resolved config and the structure's modules) and the time spent by earlier launches.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from benchmarks.quality import _modules_key
from s3delta_ds.config import load_run_config
from s3delta_ds.errors import CheckpointError, ConfigError
from s3delta_ds.run.checkpoint import COMPLETE, latest_checkpoint
from s3delta_ds.structure import Structure
from s3delta_ds.util import atomic_write_text


def _inputs(overrides: list[str], structure: Path | None) -> dict:
    """What a checkpoint is only valid under: the whole resolved config (a package default that
    changed between sessions, e.g. a gate learning rate, must not mix into a half-done run) and the
    structure's modules (a search that reran may have replaced the structure)."""
    config = json.loads(json.dumps(load_run_config(None, overrides).to_dict(), default=str))
    return {"config": config, "modules": None if structure is None else _modules_key(Structure.load(structure))}


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


@dataclass(frozen=True)
class Launch:
    """This launch of a unit's run: whether it continues an interrupted one, and the time the unit
    took before it (earlier launches, each counted up to the checkpoint the next one resumed)."""

    run_dir: Path
    resume: bool
    spent_s: float
    launches: int
    start: float

    @classmethod
    def begin(cls, work: Path, overrides: list[str], structure: Path | None = None, *, fresh: bool = False) -> Launch:
        """Continue the run in ``work`` when it has a complete checkpoint made under the same inputs
        (and not ``fresh``); otherwise clear ``work`` and start over."""
        meta_path, run_dir = work / "unit.json", work / "run"
        meta, inputs = _read(meta_path), _inputs(overrides, structure)
        ckpt = latest_checkpoint(run_dir / "checkpoints") if run_dir.is_dir() and not fresh else None
        now = time.time()
        if ckpt is not None and meta.get("inputs") == inputs:
            spent = meta["spent_s"] + max(0.0, (ckpt / COMPLETE).stat().st_mtime - meta["start"])
            launch = cls(run_dir, True, spent, meta["launches"] + 1, now)
            print(f"[phase2] {work.name}: continuing from {ckpt.name} (launch {launch.launches})", flush=True)
        else:
            shutil.rmtree(work, ignore_errors=True)
            launch = cls(run_dir, False, 0.0, 1, now)
        work.mkdir(parents=True, exist_ok=True)
        meta = {"inputs": inputs, "spent_s": launch.spent_s, "launches": launch.launches, "start": now}
        atomic_write_text(meta_path, json.dumps(meta, indent=1) + "\n")
        return launch

    def timing(self) -> dict:
        """The record's cost fields: seconds over all launches, and how many there were."""
        return {"time_s": round(self.spent_s + time.time() - self.start, 1), "launches": self.launches}


def run_resumable(
    run: Callable[..., dict | None], work: Path, overrides: list[str], structure: Path | None = None
) -> tuple[Launch, dict]:
    """``run(cfg, resume=...)`` (``run_search`` or ``run_retrain``) in ``work/run``. A checkpoint the
    package can no longer load (it trains other parameters, or another geometry) starts the unit
    over once, instead of failing it at every worker start."""
    launch = Launch.begin(work, overrides, structure)
    try:
        return launch, run(load_run_config(None, overrides), resume=launch.resume)
    except (CheckpointError, ConfigError) as e:
        if not launch.resume:
            raise
        print(f"[phase2] {work.name}: cannot continue its checkpoint ({e}); starting over", flush=True)
    launch = Launch.begin(work, overrides, structure, fresh=True)
    return launch, run(load_run_config(None, overrides), resume=False)
