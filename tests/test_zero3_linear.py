"""ZeRO-3 swaps ``torch.nn.functional.linear`` for DeepSpeed's autograd.Function process-wide;
``zero.destroy`` (the end of every run) puts the original back, so a later ZeRO-2 or plain run in
the same process (a notebook, step.py's baselines) is not slowed by it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.launching import ROOT, env

SCRIPT = r"""
import torch, torch.nn.functional as F
native = F.linear
from benchmarks import step as S
from s3delta_ds.engine import zero
zero.init_distributed()
config = S.load_config(S.SHAPES["tiny"])
batch = S.batch_for(config, 2, 16, 8, zero.device())
step, engine, _ = S.variant_s3delta("tiny", torch.float32, batch, zero.device(), 2, "fp32", stage=3, search=False)
step(0)
swapped = F.linear is not native
zero.destroy()
print("RESULT", swapped, F.linear is native)
"""


@pytest.mark.slow
def test_destroy_restores_the_native_linear_after_zero3():
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=ROOT, env=env({"PYTHONPATH": str(ROOT)}), capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "RESULT True True" in proc.stdout  # swapped by ZeRO-3, restored by destroy
