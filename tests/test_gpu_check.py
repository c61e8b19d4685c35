"""benchmarks/gpu_check.sh: the stage orchestration (fast, with stand-in stages) and the whole
``--dry-run`` on the CPU (every stage's real command in a tiny form)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
STAGE_FILES = ["00-env.txt", "01-unit.txt", "02-search.json", "03-retrain.json", "04-step-xxl.json",
               "05-step-llama-7b.json"]  # fmt: skip


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up by name
    path = list(sys.path)
    spec.loader.exec_module(module)
    sys.path[:] = path  # gpu_check.py puts benchmarks/ first to import its runner: not for the other tests
    return module


gc = _load()
runner = sys.modules["gpu_check_runner"]  # imported by gpu_check.py


def _ok(ctx, until):
    return {"ok": True, "brief": {"answer": 42}, "value": [1, 2]}


def _broken(ctx, until):
    raise RuntimeError("stage bug")


def _sleeps(ctx, until):
    done = gc.run_command(
        ctx,
        [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"],
        until=until,
        log=ctx.work / "sleep.log",
    )
    return {"ok": done.ok, "timed_out": done.timed_out, **done.record()}


def _text(ctx, until):
    return {"ok": False, "text": "some report\n"}


@pytest.mark.slow
def test_stages_run_on_after_a_failure_and_write_their_results_at_once(tmp_path, monkeypatch):
    stages = (
        gc.Stage(name="00-bug", timeout_s=30, run=_broken),
        gc.Stage(name="01-slow", timeout_s=3, run=_sleeps),
        gc.Stage(name="02-text", timeout_s=30, run=_text, text=True),
        gc.Stage(name="03-ok", timeout_s=30, run=_ok),
    )
    monkeypatch.setattr(gc, "STAGES", stages)
    monkeypatch.setattr(runner, "MIN_STAGE_S", 1)
    t0 = time.monotonic()
    rc = gc.main(["--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"), "--dry-run"])
    assert time.monotonic() - t0 < 20  # the sleeper was stopped at its limit
    assert rc == 1
    out = tmp_path / "out"
    files = ["00-bug.json", "01-slow.json", "02-text.txt", "03-ok.json", "summary.json"]
    assert sorted(p.name for p in out.iterdir()) == files
    summary = json.loads((out / "summary.json").read_text())
    stages_ = summary["stages"]
    assert summary["passed"] is False
    statuses = [stages_[s]["status"] for s in ("00-bug", "01-slow", "02-text", "03-ok")]
    assert statuses == ["fail", "timeout", "fail", "pass"]
    assert stages_["00-bug"]["error"] == "RuntimeError: stage bug"
    assert stages_["03-ok"]["answer"] == 42
    slow = json.loads((out / "01-slow.json").read_text())
    assert slow["timed_out"] and "started" in slow["log_tail"] and 2.5 <= slow["seconds"] < 15
    assert json.loads((out / "03-ok.json").read_text())["value"] == [1, 2]
    assert (out / "02-text.txt").read_text().startswith("some report\n# 02-text: fail in ")


def test_a_stage_without_time_left_is_skipped_and_the_run_fails(tmp_path, monkeypatch):
    monkeypatch.setattr(gc, "STAGES", (gc.Stage(name="00-ok", timeout_s=30, run=_ok),))
    rc = gc.main(["--out", str(tmp_path / "out"), "--work", str(tmp_path / "w"), "--dry-run", "--budget-s", "10"])
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert rc == 1 and summary["stages"]["00-ok"]["status"] == "skipped"
    assert "budget" in summary["stages"]["00-ok"]["error"]


@pytest.mark.slow
def test_a_command_stopped_mid_build_leaves_no_build_lock_behind(tmp_path):
    """torch's JIT build of a DeepSpeed op holds ``<ext>/lock`` while it compiles: a stage stopped at
    its limit then would leave every later stage waiting for that lock forever."""
    ext = tmp_path / "torch_extensions"
    (ext / "older_op").mkdir(parents=True)
    (ext / "older_op" / "lock").touch()  # not the stopped command's: kept
    os.utime(ext / "older_op" / "lock", (1.0, 1.0))
    script = (
        f"import os, time; os.makedirs('{ext}/op', exist_ok=True); open('{ext}/op/lock', 'w').close(); time.sleep(60)"
    )
    ctx = runner.Context(
        out=tmp_path, work=tmp_path, dry_run=True, deadline=0.0, env={**os.environ, "TORCH_EXTENSIONS_DIR": str(ext)},
        python=sys.executable,
    )  # fmt: skip
    done = runner.run_command(ctx, [sys.executable, "-c", script], until=time.monotonic() + 3, log=tmp_path / "l.log")
    assert done.timed_out and not (ext / "op" / "lock").exists() and (ext / "older_op" / "lock").exists()
    assert f"removed {ext / 'op' / 'lock'}" in done.output


def test_unknown_stage_names_are_refused_with_the_list(tmp_path, capsys):
    with pytest.raises(SystemExit):
        gc.main(["--out", str(tmp_path), "--only", "02-serch"])
    assert "02-search" in capsys.readouterr().err


def test_the_stages_fit_what_the_device_brings_back():
    names = [s.name for s in gc.STAGES]
    assert names[:4] == ["00-env", "01-unit", "02-search", "03-retrain"]
    assert len(names) + 1 <= 8  # the device returns at most 8 files: one per stage and summary.json
    assert len(set(names)) == len(names)


@pytest.mark.slow
def test_dry_run_exercises_every_stage_on_the_cpu(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run", "--out", str(out), "--work", str(work)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == sorted([*STAGE_FILES, "summary.json"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["passed"] and summary["dry_run"]
    for name, entry in summary["stages"].items():
        assert entry["status"] == "pass", (name, entry)
        assert 0 < entry["seconds"] <= entry["timeout_s"]
    assert summary["stages"]["00-env"]["accelerator"] == "cpu"
    unit = summary["stages"]["01-unit"]
    assert unit["tests"] >= 4 and unit["skipped"] == unit["tests"]  # no CUDA here: every test skipped
    assert "needs a CUDA device" in (out / "01-unit.txt").read_text()

    search = json.loads((out / "02-search.json").read_text())
    s = search["summary"]
    assert search["status"] == "pass" and search["rc"] == 0 and search["problems"] == []
    assert s["steps"] == 3 and s["world_size"] == 1 and search["zero_stage"] == 2  # deepspeed=auto: replicated
    assert 0 < s["params_used"] <= s["budget_params"] and s["modules"] == sum(search["modules_by_type"].values())
    assert 0 < s["median_step_s"] < search["seconds"] and math.isfinite(s["search_score"])

    # the two step stages share the dry run's tiny shape: the plain variants in one, checkpointing in the other
    measured = {n: json.loads((out / f"{n}.json").read_text())["median_s"] for n in ("04-step-xxl", "05-step-llama-7b")}
    assert sorted(measured["04-step-xxl"]) == ["c", "c2", "d", "d2"] and list(measured["05-step-llama-7b"]) == [
        "c2+ckpt"
    ]
    assert all(v > 0 for m in measured.values() for v in m.values())

    retrain = json.loads((out / "03-retrain.json").read_text())
    r = retrain["summary"]
    assert retrain["status"] == "pass" and retrain["structure_source"] == "searched"
    assert "deepspeed.launcher.runner" in retrain["command"]
    assert r["steps"] == 3 and r["trainable_params"] > 0 and retrain["deltas_bytes"] > 1024
    assert 0 <= r["test_score"] <= 1
