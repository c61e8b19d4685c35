"""The gate optimizer (``search.gate_optimizer``) and the gate warm-up (``search.gate_warmup``)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from s3delta_ds.config import ConfigError, SearchConfig
from s3delta_ds.engine.gatelogits import GateLogits, SharedMomentAdam


def _steps(opt_name: str, grads: list[torch.Tensor]) -> torch.Tensor:
    gates = GateLogits(
        [10, 10, 10], 12.0, lr=0.1, clip=0.0, total_steps=100, beta=1.0, temperature=1.0, seed=0,
        device=torch.device("cpu"), optimizer=opt_name,
    )  # fmt: skip
    for g in grads:
        gates.apply(g)
    return gates.logits.detach().clone()


def test_shared_moment_adam_matches_its_formula():
    torch.manual_seed(0)
    grads = [torch.randn(3) for _ in range(4)]
    x = torch.zeros(3, requires_grad=True)
    opt = SharedMomentAdam([x], lr=0.05)
    m, v = torch.zeros(3), 0.0
    ref = torch.zeros(3)
    for t, g in enumerate(grads, 1):
        x.grad = g.clone()
        opt.step()
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * float((g * g).mean())
        ref -= 0.05 * (m / (1 - 0.9**t)) / ((v / (1 - 0.999**t)) ** 0.5 + 1e-8)
    assert torch.allclose(x.detach(), ref, atol=1e-6)


def test_shared_moment_keeps_steps_proportional_to_gradients_and_adamw_does_not():
    """A steady gradient 100x smaller: per-logit AdamW moves that logit as far as the large one;
    one shared second moment moves it 100x less."""
    grads = [torch.tensor([1.0, 0.01, 0.0])] * 20
    adamw, shared = _steps("adamw", grads), _steps("adam-shared", grads)
    assert adamw[1] / adamw[0] == pytest.approx(1.0, rel=1e-3)
    assert shared[1] / shared[0] == pytest.approx(0.01, rel=1e-3)
    assert adamw[2] == shared[2] == 0


def test_shared_moment_state_round_trips():
    grads = [torch.tensor([0.5, -0.2, 0.1])] * 3
    a = GateLogits([10, 10, 10], 12.0, lr=0.1, clip=0.0, total_steps=10, beta=1.0, temperature=1.0, seed=0,
                   device=torch.device("cpu"), optimizer="adam-shared")  # fmt: skip
    for g in grads:
        a.apply(g)
    b = GateLogits([10, 10, 10], 12.0, lr=0.1, clip=0.0, total_steps=10, beta=1.0, temperature=1.0, seed=0,
                   device=torch.device("cpu"), optimizer="adam-shared")  # fmt: skip
    b.load_state_dict(copy.deepcopy(a.state_dict()))  # as through torch.save: no shared tensors
    a.apply(grads[0])
    b.apply(grads[0])
    assert torch.equal(a.logits, b.logits)


@pytest.mark.parametrize(
    "kw,msg",
    [({"gate_optimizer": "sgd"}, "gate_optimizer must be one of adamw, adam-shared"), ({"gate_warmup": 1.0}, "[0, 1)")],
)
def test_bad_gate_options_are_named(kw, msg):
    with pytest.raises(ConfigError, match=msg.replace("[", r"\[").replace(")", r"\)")):
        SearchConfig(**kw)


def test_warmup_steps_round_the_fraction():
    assert SearchConfig(steps=300, gate_warmup=0.25).gate_warmup_steps == 75
    assert SearchConfig(steps=6).gate_warmup_steps == 0


@pytest.mark.slow
def test_a_search_with_warmup_holds_the_gates_then_moves_them(tmp_path):
    """No gate step during the warm-up (no gate loss logged, equal logits in the checkpointed
    metrics), gate steps after it; the options are recorded in the structure."""
    from tests.launching import TINY, run

    out = tmp_path / "s"
    run(
        "python",
        "search",
        [
            *TINY,
            "deepspeed=zero2",
            f"output_dir={out}",
            "search.gate_warmup=0.5",
            "search.gate_optimizer=adam-shared",
            "search.eval_every=2",
        ],
    )

    def strict(constant):  # jq and JSON.parse refuse the -Infinity "best" Python wrote before a selectable step
        raise AssertionError(f"{constant} in metrics.jsonl")

    lines = (out / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line, parse_constant=strict) for line in lines if line.strip()]
    search = [r for r in rows if r.get("phase") == "search"]
    assert [r["step"] for r in search] == [1, 2, 3, 4, 5, 6]
    assert ["gate_loss" in r for r in search] == [False] * 3 + [True] * 3
    assert ["gate_grad_norm" in r for r in search] == [False] * 3 + [True] * 3  # no 0.0 for steps that had none
    assert all(r["gate_grad_norm"] > 0 for r in search[3:])
    # each step logs its own learning rate (linear decay from search.lr=3e-3 over 6 steps), not the next one's
    assert [r["lr"] for r in search] == pytest.approx([3e-3 * (1 - k / 6) for k in range(6)])
    validation = [r for r in rows if r.get("phase") == "validation"]
    assert [r["step"] for r in validation] == [2, 4, 6] and validation[0]["best"] is None
    meta = json.loads((out / "structure.json").read_text())["search"]
    assert (meta["gate_warmup"], meta["gate_optimizer"]) == (0.5, "adam-shared")
    alphas = [c["alpha"] for c in json.loads((out / "structure.json").read_text())["candidates"]]
    assert len(set(alphas)) > 1  # the gates moved after the warm-up


_SELECT_IN_WARMUP = """
import json, sys
from pathlib import Path
from s3delta_ds.config import load_run_config
from s3delta_ds.recipes import search as recipe
from s3delta_ds.search import run_search
from tests.launching import TINY

scores = iter([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])  # validation only falls: the best steps are in the warm-up
recipe.evaluate = lambda *a, **k: {"accuracy": next(scores), "loss": 1.0, "n": 24}
out = Path(sys.argv[1])
overrides = ["search.eval_every=1", "search.select=metric", "search.gate_warmup=0.5", f"output_dir={out}"]
run_search(load_run_config(None, [*TINY, *overrides]))
print(json.loads((out / "structure.json").read_text())["search"]["selected_step"])
"""


@pytest.mark.slow
def test_a_step_of_the_warmup_is_never_selected(tmp_path):
    """During the warm-up every gate logit is 0 (every p equal), so a structure selected there
    would be the first candidates in site order: selection starts after the first gate step, even
    when validation was best before it (here, steps 1-3 of 6)."""
    import subprocess
    import sys

    from tests.launching import ROOT, env

    proc = subprocess.run(
        [sys.executable, "-c", _SELECT_IN_WARMUP, str(tmp_path / "s")],
        cwd=ROOT,
        env=env({"PYTHONPATH": str(ROOT)}),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "4"
    assert "step 1: validation accuracy 0.9000 loss 1.0000 (selected: none yet, the gates are warming up)" in (
        proc.stdout + proc.stderr
    )


def test_a_warmup_that_leaves_no_gate_step_is_refused():
    with pytest.raises(ConfigError, match="leaves no gate step"):
        SearchConfig(steps=10, gate_warmup=0.96)


def _probs_with_resolved_shift(logits, n, budget, beta):
    """p with the shift solved again for these logits: what exact_shift must differentiate."""
    from s3delta_ds.method.gates import probabilities

    return probabilities(logits, n, budget, beta, renormalise=False)[0]


@pytest.mark.parametrize("beta", [1.0, 0.5])
def test_exact_shift_gradient_is_the_gradient_under_the_budget_constraint(beta):
    from s3delta_ds.method.gates import probabilities

    g = torch.Generator().manual_seed(0)
    n = torch.tensor([384.0, 1536.0, 768.0, 1920.0, 384.0, 1188.0, 96.0], dtype=torch.float64)
    logits = torch.randn(7, generator=g, dtype=torch.float64).requires_grad_()
    c = torch.randn(7, generator=g, dtype=torch.float64)  # a linear loss L = c · p
    budget = 2500.0
    p, _ = probabilities(logits, n, budget, beta, exact_shift=True)
    ref, _ = probabilities(logits.detach(), n, budget, beta)
    assert torch.allclose(p, ref, atol=1e-12)  # the value is the constrained p, unchanged
    (grad,) = torch.autograd.grad((c * p).sum(), logits)
    eps, fd = 1e-6, torch.zeros(7, dtype=torch.float64)
    for j in range(7):
        up, dn = logits.detach().clone(), logits.detach().clone()
        up[j] += eps
        dn[j] -= eps
        fd[j] = (c * _probs_with_resolved_shift(up, n, budget, beta)).sum() - (
            c * _probs_with_resolved_shift(dn, n, budget, beta)
        ).sum()
    fd /= 2 * eps
    assert torch.allclose(grad, fd, rtol=1e-5, atol=1e-9), (grad, fd)
    # and the renormalised gradient is a different one (it ignores what a module costs)
    p_r, _ = probabilities(logits, n, budget, beta)
    (grad_r,) = torch.autograd.grad((c * p_r).sum(), logits)
    assert not torch.allclose(grad_r, fd, rtol=1e-2)


def test_exact_shift_charges_a_module_that_does_nothing_for_its_parameters():
    """g_j = 0 for the two idle modules: under the exact gradient they move by −s_j n_j λ, so the
    expensive one moves 10x the cheap one; the renormalised gradient moves both by −s_j ḡ."""
    from s3delta_ds.method.gates import probabilities

    n = torch.tensor([100.0, 1000.0, 500.0, 500.0], dtype=torch.float64)
    logits = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    c = torch.tensor([0.0, 0.0, 1.0, 0.5], dtype=torch.float64)  # modules 0 and 1 do nothing
    p, _ = probabilities(logits, n, 1000.0, exact_shift=True)
    (g,) = torch.autograd.grad((c * p).sum(), logits)
    assert g[1] / g[0] == pytest.approx(10.0)
    p, _ = probabilities(logits, n, 1000.0)
    (g,) = torch.autograd.grad((c * p).sum(), logits)
    assert g[1] / g[0] == pytest.approx(1.0)


def test_shift_gradient_option_is_checked_and_recorded():
    from s3delta_ds.config import load_run_config

    assert load_run_config(None, ["search.shift_gradient=exact"]).search.shift_gradient == "exact"
    with pytest.raises(ConfigError, match="search.shift_gradient must be one of renormalise, exact, got 'exakt'"):
        load_run_config(None, ["search.shift_gradient=exakt"])
