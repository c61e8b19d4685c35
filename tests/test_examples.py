"""Every shipped example config is valid: known keys, in-range values, a registered task, a
shipped DeepSpeed config (or auto)."""

from __future__ import annotations

from pathlib import Path

import pytest

from s3delta_ds.config import load_run_config
from s3delta_ds.data import get_task
from s3delta_ds.engine.zero import shipped_ds_configs

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_config_is_valid(path):
    cfg = load_run_config(path)
    assert get_task(cfg.data.task).name == cfg.data.task
    assert cfg.deepspeed == "auto" or cfg.deepspeed in shipped_ds_configs()
    assert 0 < cfg.search.budget < 1


def test_examples_exist():
    assert {p.name for p in EXAMPLES} >= {"tiny_t5.yaml", "rte_t5_base.yaml"}
