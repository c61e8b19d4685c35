"""``retrain.test_at``: scoring test once at the end, on the reloaded deltas of the selected step,
gives exactly the scores of scoring it at every new best validation step."""

from __future__ import annotations

import json

import pytest

from s3delta_ds.config import load_run_config
from s3delta_ds.errors import ConfigError
from s3delta_ds.structure import builders

from .launching import TINY, run


def test_bad_test_at_is_named():
    with pytest.raises(ConfigError, match="retrain.test_at must be end or best, got 'never'"):
        load_run_config(None, ["retrain.test_at=never"])


@pytest.mark.slow
@pytest.mark.parametrize(
    "model, deepspeed",
    [
        ("tiny-t5", "zero2"),
        # the default's other paths: deltas reloaded into ZeRO-3's partitioned parameters, and a
        # classifier head (trained whole, saved with the deltas) on mean pooling
        ("tiny-bert", "zero3_cpu"),
    ],
)
def test_test_at_end_scores_the_selected_step_like_test_at_best(tmp_path, model, deepspeed):
    plan = builders.Backbone.plan(model)
    structure = builders.random_baseline(plan.space("mixed"), plan.info, 0.02, seed=0).save(tmp_path / "s.json")
    # validation every 2 steps; lr 1.0 makes validation peak before step 8, so "end" must reload the
    # selected step's deltas (the weights it ends with are another step's) to match the test scores "best" took
    args = [
        *TINY,
        f"model.name_or_path={model}",
        f"deepspeed={deepspeed}",
        "retrain.steps=8",
        "retrain.eval_every=2",
        "retrain.lr=1.0",
        f"retrain.structure={structure}",
    ]
    out = {}
    for when in ("best", "end"):
        proc = run("python", "retrain", [*args, f"retrain.test_at={when}", f"output_dir={tmp_path / when}"], 1)
        out[when] = (json.loads((tmp_path / when / "summary.json").read_text()), proc.stdout + proc.stderr)
    best, end = out["best"][0], out["end"][0]
    assert best["best_step"] == end["best_step"] and 0 < end["best_step"] < 8
    assert end["test"].keys() == best["test"].keys()
    for k, v in best["test"].items():
        assert end["test"][k] == pytest.approx(v, abs=1e-6), k
    assert f"test scored on the deltas of step {end['best_step']}" in out["end"][1]
    assert "test scored on the deltas" not in out["best"][1]
