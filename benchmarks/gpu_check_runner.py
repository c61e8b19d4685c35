"""The machinery of the GPU check (benchmarks/gpu_check.py holds the stages): time-limited commands,
one result file per stage written as soon as it finishes, and summary.json rewritten after each.

The device tool brings back at most 8 files from $OUT: the summary and at most seven stages, and
nothing else may be written there (logs and run directories go to the work folder).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # s3delta_ds.util is standard library only: importable before any install

from s3delta_ds.util import atomic_write_text, free_port  # noqa: E402, F401 - gpu_check.py imports free_port here

TAIL = 3000  # characters of a command's output kept in its result
MIN_STAGE_S = 15  # a stage with less time than this left is skipped, not started


@dataclass(frozen=True, kw_only=True, slots=True)
class Context:
    out: Path
    """Result files (what comes back from the device): one per stage plus summary.json."""
    work: Path
    """Run directories and full logs (stays on the machine)."""
    dry_run: bool
    deadline: float
    """time.monotonic() by which everything must be over (the summary included)."""
    env: dict[str, str]
    python: str


@dataclass(frozen=True, kw_only=True, slots=True)
class Stage:
    name: str
    """Result file stem under $OUT (``02-search`` → ``02-search.json``) and the key in summary.json."""
    timeout_s: int
    """Wall-clock limit of the stage (cut further when the overall budget is nearly spent)."""
    run: Callable[[Context, float], dict]
    """``run(ctx, until)`` does the work, finishing by ``time.monotonic() == until``, and returns the
    result: ``ok`` (bool), optionally ``text`` (the body of a .txt result), ``brief`` (a few numbers
    for summary.json) and anything else (the body of a .json result)."""
    text: bool = False
    """The result file is text (``text`` of the result, then a status line) instead of JSON."""


@dataclass(frozen=True, slots=True)
class Finished:
    """One command that ran to its end, failed, or was stopped at its time limit."""

    cmd: list[str]
    rc: int | None
    seconds: float
    timed_out: bool
    output: str

    @property
    def ok(self) -> bool:
        return self.rc == 0 and not self.timed_out

    def record(self, tail: int = TAIL) -> dict:
        return {
            "command": display(self.cmd),
            "rc": self.rc,
            "seconds": round(self.seconds, 2),
            "timed_out": self.timed_out,
            "log_tail": self.output[-tail:],
        }


def run_command(ctx: Context, cmd: list[str], *, until: float, log: Path, env: dict | None = None) -> Finished:
    """Run ``cmd`` in ROOT, output to ``log``, stopped (with all its children: the DeepSpeed launcher
    starts one per rank) when ``until`` passes."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    timed_out = False
    with log.open("w") as f:
        f.write(f"$ {display(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env={**ctx.env, **(env or {})}, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )
        started = time.time()
        try:
            proc.wait(timeout=max(1.0, until - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True
            _stop_group(proc)
    output = log.read_text(errors="replace")
    if timed_out:
        output += f"\n[gpu_check: stopped after {time.monotonic() - t0:.0f}s, the stage's time limit]\n"
        for lock in clear_build_locks(ctx.env.get("TORCH_EXTENSIONS_DIR"), since=started):
            output += f"[gpu_check: removed {lock}, left by the stopped command's JIT build]\n"
    return Finished(cmd, proc.returncode, time.monotonic() - t0, timed_out, output)


def clear_build_locks(extensions_dir: str | None, *, since: float) -> list[Path]:
    """Remove the ``lock`` files that torch's JIT extension builds (DeepSpeed's ops) created after
    ``since``. A build holds its lock while it compiles, and a command stopped at its limit in the
    middle leaves it behind: every later load of that op then waits for it forever, so one slow
    compile would hang every stage after it. The stages run one at a time, so a lock newer than the
    stopped command's start is its own."""
    if not extensions_dir or not Path(extensions_dir).is_dir():
        return []
    stale = [p for p in Path(extensions_dir).glob("*/lock") if p.stat().st_mtime >= since]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def display(cmd: list[str]) -> str:
    """The command as a shell line, with long arguments (an inline script) elided."""
    return shlex.join(a if len(a) <= 200 else f"<{len(a)} characters>" for a in cmd)


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the command's own process group (it was started in a new session), then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def fresh(run_dir: Path) -> Path:
    """``run_dir`` emptied: files of an earlier check must never pass for this one's."""
    shutil.rmtree(run_dir, ignore_errors=True)
    return run_dir


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def run_stage(ctx: Context, stage: Stage) -> dict:
    """Run one stage within its limit and the overall deadline; write its result file. Returns its
    entry of summary.json."""
    path = ctx.out / f"{stage.name}.{'txt' if stage.text else 'json'}"
    left = ctx.deadline - time.monotonic() - 5  # keep a few seconds for the summary
    limit = min(stage.timeout_s, left)
    entry = {"file": path.name, "timeout_s": round(limit, 1)}
    if limit < MIN_STAGE_S:
        entry.update(status="skipped", seconds=0.0, error=f"only {max(left, 0):.0f}s of the overall budget left")
        result = {"ok": False, "text": f"skipped: {entry['error']}\n"}
    else:
        t0 = time.monotonic()
        try:
            result = stage.run(ctx, time.monotonic() + limit)
        except Exception as e:  # noqa: BLE001 - one broken stage must not stop the others
            result = {"ok": False, "error": f"{type(e).__name__}: {e}", "text": traceback.format_exc()}
        status = "pass" if result.get("ok") else ("timeout" if result.get("timed_out") else "fail")
        entry.update(status=status, seconds=round(time.monotonic() - t0, 1))
        if result.get("error"):
            entry["error"] = result["error"]
    entry.update(result.get("brief", {}))
    if stage.text:
        text = result.get("text", "")
        text += ("" if text.endswith("\n") or not text else "\n") + (
            f"# {stage.name}: {entry['status']} in {entry['seconds']}s (limit {entry['timeout_s']}s)\n"
        )
        atomic_write_text(path, text)
    else:
        body = {"stage": stage.name, **entry, **{k: v for k, v in result.items() if k not in ("brief", "text", "ok")}}
        atomic_write_text(path, json.dumps(body, indent=2, default=str) + "\n")
    return entry


def environment(dry_run: bool, work: Path) -> dict[str, str]:
    """The environment of every command: offline HF, the repo importable, the accelerator named."""
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
        PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p),
    )
    if dry_run:
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"))
        # the suite's cache of DeepSpeed's JIT-compiled shared-memory op (~30 s to build)
        env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    else:
        # Name CUDA outright rather than let DeepSpeed probe: a wrong guess then fails in 00-env, loudly.
        env["DS_ACCELERATOR"] = "cuda"
        env.setdefault("TORCH_EXTENSIONS_DIR", str(work / "torch_extensions"))  # a fresh machine: writable, empty
    return env


def run_all(stages: tuple[Stage, ...], *, out: Path, work: Path, dry_run: bool, budget_s: float) -> int:
    """Run ``stages`` in order within ``budget_s``. Returns 0 when every one passed, else 1."""
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    ctx = Context(
        out=out,
        work=work,
        dry_run=dry_run,
        deadline=started + budget_s,
        env=environment(dry_run, work),
        python=sys.executable,
    )
    summary = {
        "passed": False,
        "dry_run": dry_run,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "budget_s": budget_s,
        "elapsed_s": 0.0,
        "stages": {},
    }
    for stage in stages:
        print(f"[gpu_check] {stage.name} ...", flush=True)
        entry = run_stage(ctx, stage)
        summary["stages"][stage.name] = entry
        summary["elapsed_s"] = round(time.monotonic() - started, 1)
        summary["passed"] = all(e["status"] == "pass" for e in summary["stages"].values())
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
        done = f"{entry['status']} in {entry['seconds']}s -> {out / entry['file']}"
        print(f"[gpu_check] {stage.name}: {done}", flush=True)
    print(f"[gpu_check] {'PASSED' if summary['passed'] else 'FAILED'} in {summary['elapsed_s']}s", flush=True)
    return 0 if summary["passed"] else 1
