"""Gate math: the shifted global sigmoid, concrete samples, discretisation, random baselines."""

import math

import pytest
import torch

from s3delta_ds.errors import BudgetError, TrainingError
from s3delta_ds.method.gates import (
    BUDGET_SLACK,
    concrete_sample,
    discretise,
    expected_params,
    probabilities,
    random_structure,
    solve_shift,
    step_generator,
)


def _case(seed, k, spread):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(k, generator=g, dtype=torch.float64) * spread
    n = torch.randint(64, 5000, (k,), generator=g)
    return logits, n


@pytest.mark.parametrize("seed,k,spread", [(0, 10, 0.0), (1, 460, 1.0), (2, 916, 10.0), (3, 1602, 50.0)])
@pytest.mark.parametrize("frac", [1e-3, 0.05, 0.5, 0.97])
def test_shift_meets_budget_exactly(seed, k, spread, frac):
    logits, n = _case(seed, k, spread)
    budget = max(frac * float(n.sum()), float(n.min()) + 1)  # never below the cheapest candidate
    p, b = probabilities(logits, n, budget)
    target = budget * (1 - BUDGET_SLACK)
    assert abs(expected_params(p, n) - target) <= 1e-6 * target
    assert math.isfinite(b)


def test_tiny_budget_like_0_0009_percent_of_t5_large():
    # 0.0009% of T5-large is ~6.6k parameters against 1.88M of candidates (S3PET-M).
    logits, n = _case(7, 916, 3.0)
    n = n * 2  # ~2.4M total
    budget = 9e-6 * 737_668_096
    p, _ = probabilities(logits, n, budget)
    assert abs(expected_params(p, n) - budget * (1 - BUDGET_SLACK)) <= 1e-6 * budget


def test_initial_gates_equal_budget_over_total():
    # all logits 0 -> all p equal to B / sum(n): 0.0545 for S3PET-M on T5-large at 1.389e-4
    n = torch.tensor([1000] * 50 + [3000] * 50)
    budget = 0.0545 * float(n.sum())
    p, _ = probabilities(torch.zeros(100), n, budget)
    assert torch.allclose(p, torch.full((100,), 0.0545 * (1 - BUDGET_SLACK)), rtol=1e-6)


def test_shift_is_monotone_in_budget_and_logits_order_is_kept():
    logits, n = _case(4, 200, 2.0)
    b_small = solve_shift(logits, n, 0.01 * float(n.sum()))
    b_large = solve_shift(logits, n, 0.2 * float(n.sum()))
    assert b_small > b_large  # a larger budget needs a lower shift
    p, _ = probabilities(logits, n, 0.1 * float(n.sum()))
    order_logits = torch.argsort(logits, descending=True)
    assert torch.all(p[order_logits][:-1] >= p[order_logits][1:])


def test_renormalisation_keeps_values_and_removes_common_mode_gradient():
    logits = torch.randn(50, dtype=torch.float64, requires_grad=True)
    n = torch.full((50,), 100)
    p_raw, b = probabilities(logits, n, 1000.0, renormalise=False)
    p, _ = probabilities(logits, n, 1000.0, shift=b)
    assert torch.allclose(p, p_raw, atol=1e-15)
    # Σ_i ∂p_i/∂α_j = 0 for every j: the unweighted gate sum cannot be moved by the gradient.
    (g,) = torch.autograd.grad(p.sum(), logits, retain_graph=True)
    assert g.abs().max() < 1e-12
    # but a loss that prefers one gate does move the logits apart
    (g1,) = torch.autograd.grad(p[0] - p[1], logits)
    assert g1[0] > 0 and g1[1] < 0


def test_shift_is_a_constant_for_autograd():
    logits = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    n = torch.tensor([1, 1, 1, 1])
    p, b = probabilities(logits, n, 2.0, renormalise=False)
    (g,) = torch.autograd.grad(p[0], logits)
    # d sigmoid(α0 - b)/dα0 = p0 (1 - p0), and nothing flows to the other logits through b
    assert g[0].item() == pytest.approx(0.25, rel=1e-6)
    assert torch.all(g[1:] == 0)


@pytest.mark.parametrize(
    "budget,match",
    [(0.0, "positive"), (-5.0, "positive"), (float("nan"), "positive"), (50.0, "cheapest"), (10_000.0, "not below")],
)
def test_impossible_budgets_raise(budget, match):
    n = torch.tensor([100, 200, 300])
    with pytest.raises(BudgetError, match=match):
        solve_shift(torch.zeros(3), n, budget)
    with pytest.raises(BudgetError, match=match):
        discretise([0.1, 0.2, 0.3], n.tolist(), budget)
    with pytest.raises(BudgetError, match=match):
        random_structure(n.tolist(), budget, seed=0)


def test_concrete_samples_are_shared_by_seed_and_calibrated():
    p = torch.tensor([0.05, 0.3, 0.5, 0.9], dtype=torch.float64)
    z1 = concrete_sample(p, step_generator(seed=3, step=10))
    z2 = concrete_sample(p, step_generator(seed=3, step=10))
    z3 = concrete_sample(p, step_generator(seed=3, step=11))
    assert torch.equal(z1, z2)  # every rank seeded alike draws the same z
    assert not torch.equal(z1, z3)
    # binary concrete at temperature 1: P(z > 1/2) = p
    draws = torch.stack([concrete_sample(p, step_generator(0, s)) for s in range(4000)])
    frac = (draws > 0.5).double().mean(0)
    assert torch.allclose(frac, p, atol=0.025)


def test_concrete_sample_is_differentiable_in_p():
    logits = torch.zeros(3, requires_grad=True)
    p = torch.sigmoid(logits)
    z = concrete_sample(p, step_generator(0, 0))
    (g,) = torch.autograd.grad(z.sum(), logits)
    assert torch.all(g > 0)


def test_lower_temperature_sharpens_samples():
    p = torch.full((2000,), 0.5, dtype=torch.float64)
    soft = concrete_sample(p, step_generator(1, 1), temperature=1.0)
    hard = concrete_sample(p, step_generator(1, 1), temperature=0.1)
    dist = lambda z: (z - 0.5).abs().mean()  # noqa: E731
    assert dist(hard) > dist(soft) + 0.2


def test_discretise_greedy_knapsack_by_hand():
    p = [0.9, 0.8, 0.7, 0.6, 0.1]
    n = [600, 500, 300, 100, 50]
    # 600 fits (600); 500 does not (1100 > 1000); 300 fits (900); 100 fits (1000); 50 does not
    assert discretise(p, n, 1000) == [0, 2, 3]
    # ties keep the lower index first
    assert discretise([0.5, 0.5, 0.5], [10, 10, 10], 25) == [0, 1]


def test_random_structure_terminates_maximal_and_seeded():
    n = [int(x) for x in torch.randint(10, 1000, (300,), generator=torch.Generator().manual_seed(0))]
    budget = 5000
    a = random_structure(n, budget, seed=1)
    assert a == random_structure(n, budget, seed=1)
    assert a != random_structure(n, budget, seed=2)
    used = sum(n[i] for i in a)
    assert used <= budget
    # maximal: no unchosen candidate still fits
    assert all(used + n[i] > budget for i in range(len(n)) if i not in set(a))


def test_random_structure_when_everything_affordable_is_taken():
    # the original's loop spun forever here: every affordable candidate gets chosen, then stop
    n = [10, 10, 10, 10_000]
    assert random_structure(n, 100, seed=0) == [0, 1, 2]


def test_the_exact_shift_gradient_runs_with_logits_off_the_cpu():
    """GateLogits.n stays a CPU float64 tensor; on CUDA the exact branch multiplied it with the
    logits' device (the meta device stands in for CUDA here: a mixed-device product fails the same way)."""
    n = torch.tensor([768.0, 1536.0, 2376.0], dtype=torch.float64)
    logits = torch.zeros(3, device="meta", requires_grad=True)
    p, _ = probabilities(logits, n, 2000.0, shift=0.5, exact_shift=True)
    assert p.device.type == "meta" and p.shape == (3,)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_gates_are_an_error_not_a_structure_in_candidate_order(bad):
    logits = torch.tensor([0.5, bad, -0.3, 1.0])
    n = torch.tensor([10.0, 10.0, 10.0, 10.0])
    with pytest.raises(TrainingError, match="1 of 4 gate logits are not finite \\(first: index 1"):
        solve_shift(logits, n, 20.0)
    with pytest.raises(TrainingError, match="gate probabilities are not finite"):
        discretise([0.5, bad, 0.2, 0.1], [10, 10, 10, 10], 20.0)


def test_discretise_breaks_ties_in_p_by_the_higher_logit():
    """Gates far below the shift all read p = sigmoid(-200): the leftover budget goes to the least
    rejected (higher logit), not to the first in site order."""
    logits = [-300.0, -260.0, 0.0, 0.0]
    p, _ = probabilities(torch.tensor(logits, dtype=torch.float64), torch.tensor([5, 5, 10, 10]), 15.0)
    assert p[0] == p[1]  # both clamped
    assert discretise(p, [5, 5, 10, 10], 15) == [0, 2]  # by index, as before
    assert discretise(p, [5, 5, 10, 10], 15, logits=logits) == [1, 2]


def test_discretise_takes_every_candidate_when_allowed_and_all_fit():
    with pytest.raises(BudgetError, match="nothing to search"):
        discretise([0.5, 0.2], [3, 4], 10)
    assert discretise([0.5, 0.2], [3, 4], 10, allow_all=True) == [0, 1]
    with pytest.raises(BudgetError, match="cheapest"):
        discretise([0.5, 0.2], [3, 4], 2, allow_all=True)


def test_concrete_sample_keeps_the_gradient_of_deeply_rejected_gates():
    """dz/dα = z(1-z)/(τβ) for p = sigmoid(α/β): it shrinks with z but is not zero below p = 1e-7
    (a clamp there zeroed it: 5.5e-6, then 0, 0, 0 for the logits below)."""
    alpha = torch.tensor([-13.1, -17.1, -21.1, -28.1], dtype=torch.float32, requires_grad=True)
    z = concrete_sample(torch.sigmoid(alpha), step_generator(0, 0))
    (grad,) = torch.autograd.grad(z.sum(), alpha)
    expected = (z * (1 - z)).detach()
    assert (grad > 0).all()
    assert torch.allclose(grad, expected, rtol=1e-3)


def test_the_shift_never_puts_the_expected_size_over_the_budget_at_any_logit_scale():
    """When the bracket collapsed to float64 resolution the solver returned its iterate, which could
    sit on the over side: logits spread by ~1e9 gave sum(n p) above B (1 of 200 cases, 2e-7)."""
    torch.manual_seed(0)
    n = torch.tensor([1, 8, 64, 512, 4096, 10**5, 10**6, 10**7] * 50, dtype=torch.float64)
    total = float(n.sum())
    for scale in (1e8, 1e9, 1e10):
        for _ in range(100):
            logits = torch.randn(len(n), dtype=torch.float64) * scale
            budget = float(torch.rand(1)) * total * 0.999 + 1
            p, _ = probabilities(logits, n, budget)
            assert expected_params(p, n) <= budget, (scale, budget)
