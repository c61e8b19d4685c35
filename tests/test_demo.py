"""The README's main job: ``s3delta demo`` (short settings) end to end, and its refusal to mix runs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from s3delta_ds.run.checkpoint import read_delta_metadata
from s3delta_ds.structure import Structure

from .launching import ROOT, env

pytestmark = pytest.mark.distributed

SHORT = [
    "search.steps=8",
    "search.eval_every=8",
    "retrain.steps=8",
    "retrain.eval_every=4",
    "data.max_eval_examples=24",
]


def demo(out, *extra):
    cmd = [sys.executable, "-m", "s3delta_ds", "demo", "--out", str(out), *extra]
    return subprocess.run(cmd, env=env(), cwd=ROOT, capture_output=True, text=True, timeout=900)


def test_demo_writes_everything_and_refuses_to_mix_runs(tmp_path):
    out = tmp_path / "demo"
    proc = demo(out, *SHORT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    structure = Structure.load(out / "structure.json")
    assert summary["world_size"] == 2 and summary["zero_stage"] == 3
    assert summary["params_used"] == structure.budget.used <= summary["budget_params"]
    assert summary["search_steps"] == 8 and summary["retrain_steps"] == 8
    assert 0.0 <= summary["retrain_test"] <= 1.0 and 0.0 <= summary["random_test"] <= 1.0
    assert summary["search_step_s"] > 0 and summary["retrain_step_s"] > 0
    assert (out / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert read_delta_metadata(out / "retrain" / "deltas.safetensors")["structure"] == structure.digest()
    assert "structure" in proc.stdout and str(out / "heatmap.png") in proc.stdout

    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    again = demo(out, *SHORT)
    assert again.returncode == 2 and "--overwrite" in again.stderr
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before
