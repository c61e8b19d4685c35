"""Test tiers: the unit tier (``pytest -m "not slow and not distributed"``) must stay under a minute,
so a test that starts a process must say so with ``@pytest.mark.slow`` or ``distributed``. An
unmarked test that spawns one, in its body or in a fixture it sets up (module fixtures included),
fails here with the fix named, instead of silently slowing the tier."""

from __future__ import annotations

import contextlib
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


@pytest.fixture(scope="session")
def zero3_search(tmp_path_factory):
    """One 2-rank ZeRO-3 search (deepspeed launcher, the tiny default, micro-batch 2) that several
    modules read instead of each launching the same run: test_distributed's ``ds_stage3`` shape,
    test_checkpointing's search without activation checkpointing, and the structure that
    test_retrain_distributed retrains. Tests read it and never write into it."""
    from .launching import TINY, run

    out = tmp_path_factory.mktemp("zero3-search") / "run"
    run("deepspeed", "search", [*TINY, "zero_stage=3", "search.micro_batch_size=2", f"output_dir={out}"])
    return out
