"""``accelerate launch`` with a DeepSpeed plugin runs search and retrain like torchrun: the plugin's
DeepSpeed config is the one used, progress prints on rank 0 only, and an input error prints once."""

from __future__ import annotations

import json
import re

import pytest

from .launching import TINY, run

pytestmark = pytest.mark.distributed

NO_DS = [a for a in TINY if not a.startswith("deepspeed=")]  # the plugin decides


def test_accelerate_launch_search_and_retrain(tmp_path):
    proc = run("accelerate", "search", [*NO_DS, f"output_dir={tmp_path / 's'}"])
    summary = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["zero_stage"] == 3  # zero3_cpu.json from the plugin
    out = proc.stdout + proc.stderr
    assert out.count("accelerate launch: DeepSpeed config from the plugin") == 1
    assert len(re.findall(r"structure: \d+ modules", out)) == 1  # rank 0 reports
    run(
        "accelerate",
        "retrain",
        [*NO_DS, f"retrain.structure={tmp_path / 's' / 'structure.json'}", f"output_dir={tmp_path / 'r'}"],
    )
    retrained = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert retrained["trainable_params"] == summary["params_used"] and retrained["world_size"] == 2


def test_an_input_error_prints_once(tmp_path):
    proc = run("accelerate", "search", [*NO_DS, "search.space=mixd", f"output_dir={tmp_path}"], check=False)
    assert proc.returncode != 0
    assert proc.stderr.count("error: unknown search space 'mixd'") == 1, proc.stderr[-3000:]
    assert not any(tmp_path.iterdir())
