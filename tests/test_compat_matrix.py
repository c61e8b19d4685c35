"""The README's compatibility matrix is generated, not written: regenerate it (2 CPU ranks per
family × precision, search and retrain under ZeRO 0, 2, 3) and fail if README.md is stale."""

from __future__ import annotations

import subprocess
import sys

import pytest

from .launching import ROOT, env

pytestmark = pytest.mark.distributed


def test_readme_matrix_is_current(tmp_path):
    proc = subprocess.run(
        [sys.executable, "scripts/compat_matrix.py", "--check", "--out", str(tmp_path)],
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert proc.returncode == 0, (
        "README.md's compatibility matrix differs from a fresh run; run `python scripts/compat_matrix.py` and "
        f"commit the result.\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
