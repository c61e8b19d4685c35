"""benchmarks/contention.py: timing benchmarks notice the quality study's background workers (issue
15: the study must not run while timings are taken) and say so in their tables."""

from __future__ import annotations

import os

from benchmarks import latency, step, zero3_profile
from benchmarks.contention import contention, contention_note, study_workers


def _proc(tmp_path, commands: dict[int, list[str]]):
    """A /proc tree with these command lines (NUL-separated, as Linux writes them)."""
    for pid, argv in commands.items():
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
    (tmp_path / "self").mkdir()  # not a pid
    (tmp_path / "77").mkdir()  # a process that exited between the listing and the read: no cmdline
    return tmp_path


def test_study_workers_are_found_by_their_command_line(tmp_path):
    proc = _proc(
        tmp_path,
        {
            101: ["python", "benchmarks/quality.py", "--phase", "2", "--work", "/w"],
            102: ["/venv/bin/python", "/repo/benchmarks/quality.py", "--phase", "1"],
            103: ["python", "benchmarks/quality.py", "--phase", "2", "--report"],  # seconds, not a worker
            104: ["python", "benchmarks/quality.py", "--smoke"],  # not the study
            105: ["vim", "benchmarks/quality.py"],
            os.getpid(): ["python", "benchmarks/quality.py", "--phase", "2"],  # this process itself
        },
    )
    assert study_workers(proc) == [101, 102]
    assert study_workers(tmp_path / "missing") == []


def test_a_contended_run_says_so_in_every_timing_table(tmp_path, monkeypatch):
    monkeypatch.setattr(latency.platform, "processor", lambda: "x86_64")  # not `uname -p`: no process here
    machine = contention(_proc(tmp_path, {7: ["python", "benchmarks/quality.py", "--phase", "2"]}))
    assert machine["study_workers"] == [7] and machine["cpus"] == os.cpu_count()
    note = contention_note(machine)
    assert note.startswith("**Contended:** 1 quality-study worker was running (pids 7;")
    assert contention_note({**machine, "study_workers": []}) == "" == contention_note(None)

    variant = {
        "variant": "s3delta",
        "median_s": 0.5,
        "tokens_per_s": 10.0,
        "mfu": 0.1,
        "peak_memory_bytes": 2**20,
        "step_memory_bytes": 2**20,
        "frozen_bytes_per_rank": 0,
    }
    r = {
        "shape": "tiny",
        "config": "c",
        "params": 1,
        "world": 1,
        "device": "cpu",
        "dtype": "fp32",
        "batch_per_rank": 4,
        "tokens_per_rank": 256,
        "matmul_peak_flops": 1e12,
        "auto_strategy": "zero2",
        "variants": {"c": variant},
        "ratios": {},
        "contention": machine,
    }
    assert note in step.render(r) and note not in step.render({**r, "contention": None})
    shares = {"fetch": 0.5}
    row = dict(zero2_s=1.0, zero3_s=1.2, ratio=1.2, module_forward_hooks_per_step=10, shares=shares)
    profile = {"shape": "tiny", "world": 1, "device": "cpu", "rows": {"retrain": row}, "contention": machine}
    assert note in zero3_profile.render(profile)
    shape = {
        "shape": "tiny-t5",
        "params": 1,
        "batch": 8,
        "seq": 64,
        "variants": {"base": {"median_ms": 1.0, "ratio_to_base": 1.0}},
        "merged_vs_unmerged_max_abs_diff": 0.0,
    }
    assert note in latency.table([shape], machine) and note not in latency.table([shape])
