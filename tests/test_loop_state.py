"""The loop state's model selection and the metrics log: what a run keeps and writes when its
evaluations misbehave (NaN scores; the -inf "best" before a selectable step)."""

from __future__ import annotations

import json
import math

import pytest

from s3delta_ds.errors import TrainingError
from s3delta_ds.recipes.state import LoopState
from s3delta_ds.run.report import MetricsLog


@pytest.mark.parametrize("select", ["metric", "loss"])
def test_a_run_whose_every_evaluation_is_nan_names_that_instead_of_crashing_at_the_end(select):
    """No step was ever better than NaN: the search used to fail on best_logits=None (AttributeError)
    and the retrain on test=None (TypeError), after the whole run."""
    state = LoopState()
    for step in (2, 4):
        state.step = step
        result = {"accuracy": math.nan, "loss": math.nan}
        assert not state.is_better(result, "accuracy", select)
    with pytest.raises(TrainingError, match=f"every evaluation's {select} was not a number"):
        state.check_selected(select)
    state.select({"accuracy": 0.5, "loss": 0.7}, "accuracy")
    state.check_selected(select)
    assert state.best_step == 4


def test_metrics_log_writes_strict_json(tmp_path):
    log = MetricsLog(tmp_path, enabled=True)
    log.log(2, "validation", {"accuracy": 0.5, "loss": 0.69, "best": -math.inf})
    log.log(4, "validation", {"accuracy": 0.6, "loss": math.nan, "best": 0.6})
    log.close()

    def refuse(constant):
        raise AssertionError(f"{constant} is not JSON")

    rows = [json.loads(line, parse_constant=refuse) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["best"], r["loss"]) for r in rows] == [(None, 0.69), (0.6, None)]
