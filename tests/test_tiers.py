"""The unit tier stays honest: a test that starts a process without a slow/distributed mark fails,
in its body or through a module fixture, and a marked one runs."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

INNER = """
import subprocess
import pytest

@pytest.fixture(scope="module")
def spawned():
    return subprocess.run(["true"]).returncode

@pytest.fixture(scope="module")
def spawned_too():  # a module fixture's failure is cached: the marked case gets its own
    return subprocess.run(["true"]).returncode

def test_unmarked_body():
    subprocess.run(["true"])

def test_unmarked_fixture(spawned):
    pass

@pytest.mark.slow
def test_marked_slow():
    assert subprocess.run(["true"]).returncode == 0

@pytest.mark.distributed
def test_marked_distributed(spawned_too):
    assert spawned_too == 0

def test_pure():
    assert 1 + 1 == 2
"""


@pytest.mark.slow  # the marked inner tests really start `true`
def test_unmarked_process_spawns_fail_and_marked_ones_run(pytester):
    pytester.makeconftest((Path(__file__).parent / "conftest.py").read_text())
    pytester.makeini("[pytest]\nmarkers =\n    slow: s\n    distributed: d\n")
    pytester.makepyfile(test_inner=INNER)
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=3, failed=1, errors=1)
    result.stdout.fnmatch_lines(["*test_unmarked_body starts a process*mark it*"])
    result.stdout.fnmatch_lines(["*test_unmarked_fixture starts a process*"])
