"""fp16 loss scaling of the gate pass (engine/gatelogits.py ``GateLossScale``, engine/bilevel.py).

DeepSpeed scales the delta pass's loss; the gate pass takes its gradients outside the engine and
needs its own scale, or gradients below fp16's smallest subnormal flush to zero and the gates stop
moving. In-process on the tiny T5 supernet in fp16 (a DeepSpeed fp16 engine cannot run on the
CPU); the rules are checked against DeepSpeed's own ``DynamicLossScaler``.
"""

from __future__ import annotations

import random

import pytest
import torch

from s3delta_ds.engine.bilevel import BiLevel
from s3delta_ds.engine.gatelogits import GateLogits, GateLossScale
from s3delta_ds.errors import TrainingError

from .test_second_order import fake_engine, items, t5_batches, tiny_t5_supernet

CPU = torch.device("cpu")


# -- configuration and rules ---------------------------------------------------------------------


def test_disabled_unless_fp16():
    for ds_config in ({}, {"bf16": {"enabled": True}}, {"fp16": {"enabled": False, "loss_scale": 128}}):
        scaler = GateLossScale.from_ds_config(ds_config)
        assert not scaler.enabled and scaler.scale == 1.0
        assert scaler.update(True)
        with pytest.raises(TrainingError, match="non-finite gate gradient"):  # nothing to back off: stop
            scaler.update(False)


def test_reads_deepspeeds_fp16_keys_with_its_defaults():
    default = GateLossScale.from_ds_config({"fp16": {"enabled": True}})
    assert (default.scale, default.dynamic, default.window, default.min_scale, default.hysteresis) == (
        2.0**16,
        True,
        1000,
        1.0,
        2,
    )
    custom = GateLossScale.from_ds_config(
        {
            "fp16": {
                "enabled": True,
                "initial_scale_power": 8,
                "loss_scale_window": 50,
                "hysteresis": 1,
                "min_loss_scale": 4,
                "consecutive_hysteresis": True,
            }
        }
    )
    assert (custom.scale, custom.window, custom.hysteresis, custom.min_scale, custom.consecutive_hysteresis) == (
        256.0,
        50,
        1,
        4.0,
        True,
    )
    static = GateLossScale.from_ds_config({"fp16": {"enabled": True, "loss_scale": 128}})
    assert static.scale == 128.0 and not static.dynamic
    for _ in range(5):
        static.update(False)
    assert static.scale == 128.0 and static.skipped == 5


def test_fp16_run_with_a_shipped_config_gets_a_dynamic_gate_scale():
    from s3delta_ds.engine.zero import read_ds_config, resolve_ds_config

    template, _ = read_ds_config("zero3")
    ds_config = resolve_ds_config(template, micro_batch=2, grad_accum=1, world=2, clip=1.0, dtype="fp16",
                                  hidden_size=64)  # fmt: skip
    scaler = GateLossScale.from_ds_config(ds_config)
    assert scaler.enabled and scaler.dynamic and scaler.scale == 2.0**16


@pytest.mark.parametrize("hysteresis,consecutive", [(1, False), (2, False), (3, True)])
def test_dynamic_rules_are_deepspeeds(monkeypatch, hysteresis, consecutive):
    """The same overflow sequence moves both scalers through the same scales."""
    from deepspeed.runtime.fp16 import loss_scaler

    monkeypatch.setattr(loss_scaler.dist, "get_rank", lambda: 0)  # its log line asks for a rank
    theirs = loss_scaler.DynamicLossScaler(
        init_scale=2.0**10, scale_window=3, min_scale=1, delayed_shift=hysteresis, consecutive_hysteresis=consecutive
    )
    ours = GateLossScale(2.0**10, dynamic=True, window=3, min_scale=1, hysteresis=hysteresis)
    ours.consecutive_hysteresis = consecutive
    rng = random.Random(0)
    scales = []
    for _ in range(200):
        overflow = rng.random() < 0.2
        theirs.update_scale(overflow)
        assert ours.update(not overflow) is (not overflow)
        assert ours.scale == theirs.cur_scale
        scales.append(ours.scale)
    assert len(set(scales)) > 3  # the sequence both halved and doubled the scale


def test_overflow_at_the_minimum_scale_is_a_training_error():
    scaler = GateLossScale(2.0, dynamic=True, min_scale=1, hysteresis=1)
    assert not scaler.update(False) and scaler.scale == 1.0
    with pytest.raises(TrainingError, match="minimum loss scale 1.*model.dtype"):
        scaler.update(False)


def test_state_round_trips_through_the_gate_checkpoint():
    def gates(scaler):
        return GateLogits([10, 20], 15.0, lr=0.1, clip=1.0, total_steps=10, beta=1.0, temperature=1.0, seed=0,
                          device=CPU, loss_scale=scaler)  # fmt: skip

    a = gates(GateLossScale(2.0**16, dynamic=True, window=2, hysteresis=1))
    for finite in (False, True, True, True, False):
        a.loss_scale.update(finite)
    state = a.state_dict()
    b = gates(GateLossScale(2.0**16, dynamic=True, window=2, hysteresis=1))
    b.load_state_dict(state)
    assert b.loss_scale.state_dict() == a.loss_scale.state_dict() and b.loss_scale.skipped == 2
    old = {k: v for k, v in state.items() if k != "loss_scale"}  # a checkpoint from before the scale
    c = gates(GateLossScale(2.0**16, dynamic=True))
    c.load_state_dict(old)
    assert c.loss_scale.scale == 2.0**16


# -- the gate pass in fp16 -----------------------------------------------------------------------


def _bilevel(module) -> BiLevel:
    return BiLevel(fake_engine(module, 0.1), None, mode="first-order", device=CPU)


def test_scaled_fp16_gate_gradient_is_the_fp32_one():
    """A large normaliser (2^16 × this batch's items) stands in for the far smaller per-activation
    gradients of a deep, wide model: unscaled, a third of the fp16 gate gradients flush to zero."""
    fp32, n = tiny_t5_supernet()
    fp16 = tiny_t5_supernet()[0].half()  # built afresh: a deepcopy would keep fp32's hook closures
    batches = t5_batches(fp32, 1)
    normaliser = items(batches) * 2**16
    z = torch.rand(n, generator=torch.Generator().manual_seed(0))

    def gz(module, scale=1.0):
        return _bilevel(module)._z_grad(batches, z.clone().requires_grad_(True), normaliser, scale=scale)[0]

    reference = gz(fp32)
    unscaled, scaled = gz(fp16), gz(fp16, 2.0**16)
    assert int((unscaled == 0).sum()) > n // 5 and int((reference == 0).sum()) == 0
    assert (unscaled - reference).norm() > 0.5 * reference.norm()
    assert scaled.dtype == torch.float32 and (scaled - reference).norm() < 0.01 * reference.norm()


def _gate_step(module, n: int, scaler: GateLossScale) -> GateLogits:
    gates = GateLogits([1000] * n, 100.0 * n, lr=0.1, clip=0.0, total_steps=10, beta=1.0, temperature=1.0, seed=0,
                       device=CPU, loss_scale=scaler)  # fmt: skip
    bilevel = BiLevel(fake_engine(module, 0.1), gates, mode="first-order", device=CPU)
    bilevel.gate_step(t5_batches(module, 1), step=0)
    return gates


def test_fp16_gate_step_moves_the_gates_like_fp32():
    fp32, n = tiny_t5_supernet()
    fp16 = tiny_t5_supernet()[0].half()
    want = _gate_step(fp32, n, GateLossScale()).logits
    got = _gate_step(fp16, n, GateLossScale.from_ds_config({"fp16": {"enabled": True}}))
    assert got.loss_scale.skipped == 0 and want.abs().min() > 0
    torch.testing.assert_close(got.logits, want, rtol=0.05, atol=1e-4)


def test_fp16_gate_step_that_overflows_is_skipped_and_the_scale_halves():
    fp16, n = tiny_t5_supernet()
    fp16 = fp16.half()
    gates = _gate_step(fp16, n, GateLossScale(2.0**40, dynamic=True, hysteresis=1))
    assert torch.equal(gates.logits, torch.zeros(n))  # not updated
    assert gates.loss_scale.skipped == 1 and gates.loss_scale.scale == 2.0**39
    assert gates.optimizer.state_dict()["state"] == {}  # the optimizer never stepped


def test_deepspeeds_delta_loss_scale_round_trips_through_the_checkpoint_state(monkeypatch):
    """The delta pass's scale is DeepSpeed's (``optimizer.loss_scaler``): its state is saved and
    restored with the trainable state, so a resumed fp16 run does not restart at 2^16."""
    from types import SimpleNamespace

    from deepspeed.runtime.fp16 import loss_scaler

    from s3delta_ds.engine.zero import load_loss_scaler_state, loss_scaler_state

    monkeypatch.setattr(loss_scaler.dist, "get_rank", lambda: 0)

    def engine(fp16: bool):
        scaler = loss_scaler.DynamicLossScaler(
            init_scale=2.0**16, scale_window=3, min_scale=1, delayed_shift=2, consecutive_hysteresis=False
        )
        return SimpleNamespace(optimizer=SimpleNamespace(loss_scaler=scaler), fp16_enabled=lambda: fp16)

    trained = engine(True)
    for overflow in (True, True, False, True, True, False, False):
        trained.optimizer.loss_scaler.update_scale(overflow)
    state = loss_scaler_state(trained)
    assert state["cur_scale"] < 2.0**16 and state["cur_iter"] == 7 and state["last_overflow_iter"] == 4
    resumed = engine(True)
    load_loss_scaler_state(resumed, state)
    for overflow in (False, False, False, True, True, False):  # and it goes on exactly as the original
        trained.optimizer.loss_scaler.update_scale(overflow)
        resumed.optimizer.loss_scaler.update_scale(overflow)
        assert resumed.optimizer.loss_scaler.cur_scale == trained.optimizer.loss_scaler.cur_scale
    assert loss_scaler_state(engine(False)) is None
    load_loss_scaler_state(resumed, None)  # a bf16/fp32 checkpoint, or one from before the field
