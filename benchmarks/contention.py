"""What else was running while a benchmark timed something. The quality study's workers run for
hours in the background (one per core), and issue 15 asks that they never run while timings are
taken: a timing benchmark says so in its table and its JSON when they do, instead of publishing
contended numbers as if the machine were quiet.

    contention()          # {"cpus": 2, "load_1min": 2.1, "study_workers": [6138, 6171]}
    contention_note(c)    # a warning line for the markdown, or "" on a quiet machine
"""

from __future__ import annotations

import os
from pathlib import Path

#: What a study worker's command line holds (``python benchmarks/quality.py --phase 1|2``).
_STUDY = ("benchmarks/quality.py", "--phase")


def study_workers(proc: Path = Path("/proc")) -> list[int]:
    """PIDs of running quality-study workers (this process and its parents excluded), by command
    line; [] where ``proc`` cannot be read (not Linux)."""
    mine = {os.getpid(), os.getppid()}
    found = []
    try:
        entries = list(proc.iterdir())
    except OSError:
        return []
    for entry in entries:
        if not entry.name.isdigit() or int(entry.name) in mine:
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:  # gone meanwhile, or not ours to read
            continue
        args = [a.decode(errors="replace") for a in argv]
        if any(a.endswith(_STUDY[0]) for a in args) and _STUDY[1] in args and "--report" not in args:
            found.append(int(entry.name))
    return sorted(found)


def contention(proc: Path = Path("/proc")) -> dict:
    """The machine's state as a benchmark starts: CPUs, 1-minute load, study workers."""
    try:
        load = round(os.getloadavg()[0], 2)
    except OSError:
        load = None
    return {"cpus": os.cpu_count(), "load_1min": load, "study_workers": study_workers(proc)}


def contention_note(c: dict | None) -> str:
    """A warning for the benchmark's markdown when study workers were running ("" otherwise)."""
    if not c or not c.get("study_workers"):
        return ""
    n = len(c["study_workers"])
    return (
        f"**Contended:** {n} quality-study worker{'s were' if n > 1 else ' was'} running (pids "
        f"{', '.join(map(str, c['study_workers']))}; load {c['load_1min']} on {c['cpus']} CPUs). Absolute "
        "times are inflated; ratios measured in the same run less so. Rerun on a quiet machine to publish."
    )


def warn_if_contended(c: dict) -> None:
    """Say it on stderr as the benchmark starts, so nobody waits an hour for numbers to discard."""
    note = contention_note(c)
    if note:
        import sys

        print(note.replace("**", ""), file=sys.stderr, flush=True)
