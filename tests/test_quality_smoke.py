"""benchmarks/quality.py --smoke: every method of the benchmark, end to end, on the tiny defaults."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from s3delta_ds.structure.builders import Backbone

from .launching import ROOT, env


@pytest.mark.distributed
def test_quality_smoke(tmp_path):
    out = tmp_path / "q"
    proc = subprocess.run(
        [sys.executable, "benchmarks/quality.py", "--smoke", "--out", str(out), "--work", str(tmp_path / "w")],
        cwd=ROOT,
        env=env({"OMP_NUM_THREADS": "2"}),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(p.read_text()) for p in out.rglob("*.json")]
    # 2 backbones x (full + 7 manual + 2 budgets x (5 resized + random + searched))
    assert len(records) == 2 * (8 + 2 * 7)
    done = [r for r in records if "test" in r]
    assert {r["method"] for r in done} == {
        "full",
        "lora",
        "bitfit",
        "lnfit",
        "lra",
        "adapter",
        "pafi",
        "hiwi",
        "random",
        "searched",
    }
    sizes = {b: Backbone.plan(b).info.num_params for b in ("tiny-bert", "tiny-llama")}
    for r in done:
        assert 0.0 <= r["test"] <= 1.0 and r["trainable_params"] > 0
        if r["budget"] is not None:  # everything at a budget stays within it
            assert 0 < r["delta_params"] <= r["budget"] * sizes[r["backbone"]]
    table = (tmp_path / "q.md").read_text()
    assert "## tiny-bert · tiny-sentiment (accuracy)" in table and "| 0.02 | searched |" in table
