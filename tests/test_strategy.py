"""deepspeed=auto: replicate the frozen backbone (ZeRO-2) when it fits on a device, ZeRO-3 when not;
the decision and the estimate behind it are printed, and an explicit config overrides it."""

from __future__ import annotations

import json

import pytest

from s3delta_ds.engine.zero import choose_strategy

from .launching import TINY, run

GIB = 2**30


def test_choose_strategy_branches():
    name, why = choose_strategy(frozen_bytes=22 * GIB, trainable_params=10**6, memory=80 * GIB)
    assert name == "zero2" and "replicate" in why and "22.00 GiB" in why
    name, why = choose_strategy(frozen_bytes=44 * GIB, trainable_params=10**6, memory=80 * GIB)
    assert name in ("zero3", "zero3_cpu") and "shard it (ZeRO-3)" in why
    # the trainable state counts too: 16 bytes per trainable parameter (weights, grads, Adam)
    assert choose_strategy(30 * GIB, 0, 80 * GIB)[0] == "zero2"
    assert choose_strategy(30 * GIB, 10**9, 80 * GIB)[0] != "zero2"  # 30 + 14.9 GiB > 40 GiB


def _search(tmp_path, memory: str):
    out = tmp_path / memory
    proc = run(
        "python",
        "search",
        [*TINY, "deepspeed=auto", f"output_dir={out}"],
        1,
        extra_env={"S3DELTA_DEVICE_MEMORY": memory},
    )
    return json.loads((out / "summary.json").read_text()), proc.stdout


@pytest.mark.distributed
def test_auto_replicates_when_the_backbone_fits_and_shards_when_not(tmp_path):
    summary, log = _search(tmp_path, str(64 * GIB))
    assert summary["zero_stage"] == 2 and "deepspeed=auto" in log and "-> zero2" in log
    summary, log = _search(tmp_path, "100000")  # 100 kB per rank: the tiny backbone (724 kB fp32) does not fit
    assert summary["zero_stage"] == 3 and "shard it (ZeRO-3)" in log


@pytest.mark.distributed
def test_explicit_config_overrides_auto(tmp_path):
    out = tmp_path / "explicit"
    run(
        "python",
        "search",
        [*TINY, "deepspeed=zero2", f"output_dir={out}"],
        1,
        extra_env={"S3DELTA_DEVICE_MEMORY": "100000"},
    )
    assert json.loads((out / "summary.json").read_text())["zero_stage"] == 2


def test_a_zero_stage_set_under_auto_takes_that_stages_template():
    """zero_stage=3 under deepspeed=auto ran stage 3 on the zero2 template (none of stage 3's
    settings: DeepSpeed's default persistence threshold, no prefetch sizing) when the backbone fit."""
    name, why = choose_strategy(22 * GIB, 10**6, 80 * GIB, cpu=False, stage=3)
    assert name == "zero3" and "zero_stage=3 set" in why
    assert choose_strategy(22 * GIB, 10**6, 80 * GIB, cpu=True, stage=3)[0] == "zero3_cpu"
    assert choose_strategy(22 * GIB, 10**6, 80 * GIB, world=32, local_world=8, cpu=False, stage=3)[0] == (
        "zero3_multinode"
    )
    name, why = choose_strategy(44 * GIB, 10**6, 80 * GIB, cpu=False, stage=2)
    assert name == "zero2" and "zero_stage=2 set" in why
    assert choose_strategy(44 * GIB, 10**6, 80 * GIB, cpu=False)[0] == "zero3"  # unset: the sizes decide


def test_the_run_plan_passes_zero_stage_to_auto():
    from s3delta_ds.config import load_run_config
    from s3delta_ds.run.plan import RunPlan

    def plan(*overrides):
        cfg = load_run_config(None, ["deepspeed=auto", *overrides])
        return RunPlan._with_strategy(cfg, kind="setup", source="tiny-t5", num_params=181_056, trainable=1_000)

    assert plan().deepspeed == "zero2"  # tiny-t5 fits: replicated
    assert plan("zero_stage=3").deepspeed == "zero3_cpu" and "zero_stage=3 set" in plan("zero_stage=3").strategy
    assert plan("zero_stage=1").deepspeed == "zero2"
