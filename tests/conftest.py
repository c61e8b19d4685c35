"""Test tiers: the unit tier (``pytest -m "not slow and not distributed"``) must stay under a minute,
so a test that starts a process must say so with ``@pytest.mark.slow`` or ``distributed``. An
unmarked test that spawns one, in its body or in a fixture it sets up (module fixtures included),
fails here with the fix named, instead of silently slowing the tier."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess

import pytest

_TIER_MARKS = ("slow", "distributed")


@contextlib.contextmanager
def _no_processes(item):
    if any(item.get_closest_marker(m) for m in _TIER_MARKS):
        yield
        return
    real_init = subprocess.Popen.__init__

    def refuse(self, args, *a, **kw):
        raise pytest.fail.Exception(
            f"{item.nodeid} starts a process ({args!r:.120}) but is not marked slow or distributed: "
            "mark it (the unit tier must stay under a minute)",
            pytrace=False,
        )

    subprocess.Popen.__init__ = refuse
    try:
        yield
    finally:
        subprocess.Popen.__init__ = real_init


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    with _no_processes(item):
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    with _no_processes(item):
        yield


# What this package, its launchers and the libraries it drives read: a leak of one changes what a
# later test (or every process it starts) does. Variables that libraries set for themselves on
# import or first use (deepspeed's PYTORCH_NVML_BASED_CUDA_CHECK, OpenMP's KMP_*, inductor's cache
# folder) depend on which test imported them first, and are not watched.
_WATCHED_PREFIXES = ("SLURM_", "S3DELTA_", "HF_", "DS_", "TORCH_", "NCCL_", "CUDA_", "MASTER_", "LOCAL_", "OMP_")
_WATCHED_NAMES = frozenset({"PATH", "PYTHONPATH", "RANK", "WORLD_SIZE"})


def _watched(name: str) -> bool:
    return name in _WATCHED_NAMES or name.startswith(_WATCHED_PREFIXES)


@pytest.fixture(autouse=True)
def _environment_is_left_as_found(request):
    """A test that leaves a watched variable changed fails: a leaked one reaches every later test
    of its worker and every process those start (a leaked SLURM_JOB_ID once made a later launch
    call ``scontrol requeue``). Autouse and function-scoped, it is torn down after the test's own
    fixtures (monkeypatch included) have put things back."""
    before = dict(os.environ)
    yield
    after = dict(os.environ)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k) and _watched(k))
    if changed:
        os.environ.clear()
        os.environ.update(before)
        pytest.fail(
            f"{request.node.nodeid} left the environment changed ({', '.join(changed)}): "
            "set variables with monkeypatch.setenv",
            pytrace=False,
        )


@pytest.fixture(scope="session")
def zero3_search(tmp_path_factory):
    """One 2-rank ZeRO-3 search (deepspeed launcher, the tiny default, micro-batch 2) that several
    modules read instead of each launching the same run: test_distributed's ``ds_stage3`` shape,
    test_checkpointing's search without activation checkpointing, and the structure that
    test_retrain_distributed retrains. Tests read it and never write into it.

    Under pytest-xdist the workers of one session share it: the first to need it runs it under a
    file lock in the session's common base folder, the others wait and read it."""
    from filelock import FileLock

    from .launching import TINY, run

    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # each worker's base folder sits in the session's common one
    home = base / "zero3-search"
    out, done = home / "run", home / "done"
    with FileLock(str(base / "zero3-search.lock")):
        if not done.exists():
            shutil.rmtree(home, ignore_errors=True)
            home.mkdir(parents=True)
            run("deepspeed", "search", [*TINY, "zero_stage=3", "search.micro_batch_size=2", f"output_dir={out}"])
            done.touch()
    return out
