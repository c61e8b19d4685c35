"""Gate math as pure functions: the shifted global sigmoid, binary-concrete samples, and the
discretisation of gate probabilities into a structure (greedy knapsack) or a random baseline.

No distributed code here: callers pass a ``torch.Generator`` seeded identically on every rank, so
every rank draws the same noise and runs the same modules (ZeRO-3 hangs otherwise).

Notation: ``logits`` α (num_candidates,), ``n`` the candidates' parameter counts n_i, ``budget`` B
(parameters, absolute). p_i = sigmoid((α_i − b)/β) with the global shift b solving Σ n_i p_i = B.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import torch

from ..errors import BudgetError, TrainingError

#: The original solves Σ n_i p_i = B·(1 − 1e-7): a hair under the budget, so the float64 p that
#: discretisation reads never overshoots (training's float32 p may, by float32 rounding).
BUDGET_SLACK = 1e-7
P_EPS = 1e-7


def _count(x: float) -> str:
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.4g}"


def check_budget(n: Sequence[int], budget: float, *, allow_all: bool = False) -> None:
    """Raise :class:`BudgetError` unless some structure, and the gate equation, can meet ``budget``.
    ``allow_all``: a budget that every candidate fits is fine (re-discretising a searched structure
    at a larger budget takes them all; only a search needs something to choose)."""
    if len(n) == 0:
        raise BudgetError("the search space has no candidates")
    total, cheapest = sum(n), min(n)
    if not math.isfinite(budget) or budget <= 0:
        raise BudgetError(f"budget must be a positive number of parameters, got {budget}")
    if budget < cheapest:
        raise BudgetError(
            f"budget {_count(budget)} parameters is smaller than the cheapest candidate ({cheapest:,} parameters): "
            "no structure fits; raise the budget"
        )
    if budget >= total and not allow_all:
        raise BudgetError(
            f"budget {_count(budget)} parameters is not below the total of all candidates ({total:,}): every candidate "
            "fits, so there is nothing to search; lower the budget or use a larger space"
        )


def solve_shift(
    logits: torch.Tensor,
    n: torch.Tensor,
    budget: float,
    beta: float = 1.0,
    tol: float = 1e-10,
    max_iter: int = 200,
    *,
    check: bool = True,
) -> float:
    """The global shift b with Σ n_i sigmoid((α_i − b)/β) = B(1 − 1e-7), exact to ``tol`` relative.

    The left side decreases strictly in b, from Σn (b → −∞) to 0 (b → +∞), so a bracket always
    exists for 0 < B < Σn; Newton steps inside a shrinking bracket (falling back to bisection when a
    step leaves it) converge in a few dozen iterations in float64. Computed on detached values:
    b is a constant for autograd, as in the original. ``check=False``: the caller has checked the
    budget against ``n`` already (a run's plan checks it once, not every step).

    Raises:
        BudgetError: the budget is impossible (see :func:`check_budget`).
    """
    a = logits.detach().double().cpu()
    _check_finite(a, "gate logits")
    w = n.detach().double().cpu()
    if check:
        check_budget(w.tolist(), budget)
    target = budget * (1.0 - BUDGET_SLACK)

    def f(b: float) -> tuple[float, float]:
        s = torch.sigmoid((a - b) / beta)
        return float((w * s).sum()) - target, float(-(w * s * (1 - s)).sum() / beta)

    # Bracket [lo, hi] with f(lo) >= 0 >= f(hi), grown geometrically from the logits' range.
    span = max(1.0, float(a.max() - a.min()))
    lo, hi = float(a.min()) - span, float(a.max()) + span
    while f(lo)[0] < 0:
        if not math.isfinite(lo):  # only an unreachable budget gets here (check=False): say why
            check_budget(w.tolist(), budget)
        lo -= span
        span *= 2
    span = max(1.0, float(a.max() - a.min()))
    while f(hi)[0] > 0:
        if not math.isfinite(hi):
            check_budget(w.tolist(), budget)
        hi += span
        span *= 2
    b = 0.5 * (lo + hi)
    for _ in range(max_iter):
        val, deriv = f(b)
        if abs(val) <= tol * target:
            return b
        if val > 0:
            lo = b
        else:
            hi = b
        step = b - val / deriv if deriv != 0 else math.nan
        b = step if lo < step < hi else 0.5 * (lo + hi)
        if hi - lo <= 1e-15 * max(1.0, abs(b)):
            return hi  # f(hi) <= 0: the side under the budget (b may sit on the other)
    return hi


def _check_finite(values: torch.Tensor, what: str) -> None:
    """A NaN or infinite gate would make every p NaN, and the structure then follows candidate order."""
    bad = (~torch.isfinite(values)).nonzero().flatten().tolist()
    if bad:
        raise TrainingError(
            f"{len(bad)} of {values.numel()} {what} are not finite (first: index {bad[0]}, {values[bad[0]].item()}): "
            "no structure can be read from them; lower search.gate_lr or check the run for NaN losses"
        )


def probabilities(
    logits: torch.Tensor,
    n: torch.Tensor,
    budget: float,
    beta: float = 1.0,
    shift: float | None = None,
    renormalise: bool = True,
    *,
    check: bool = True,
    exact_shift: bool = False,
) -> tuple[torch.Tensor, float]:
    """Gate means p (differentiable in ``logits``) and the shift b used.

    ``renormalise`` applies the original's sum-preserving stop-gradient step p ← p·sg(Σp)/Σp: the
    value is unchanged, and the gradient loses its component that would move all gates together.

    ``exact_shift`` (``search.shift_gradient=exact``; replaces the renormalisation) differentiates
    through the shift as the budget constraint Σ n_i p_i = B defines it: db/dα_j = n_j s_j / Σ n_i s_i
    with s_i = p_i(1 − p_i)/β, so logit j receives s_j (g_j − n_j λ), λ = Σ s_i g_i / Σ n_i s_i. A
    module pays for the budget it takes: with the renormalised gradient, s_j (g_j − ḡ), a cheap module
    that barely acts climbs as fast as an expensive one whenever the gates hurt on average (ḡ > 0).
    """
    b = solve_shift(logits, n, budget, beta, check=check) if shift is None else shift
    if exact_shift:
        with torch.no_grad():
            p0 = torch.sigmoid(torch.clamp((logits - b) / beta, min=-200.0))
            ns = n.to(device=logits.device, dtype=logits.dtype) * p0 * (1 - p0) / beta  # n lives on the CPU
            w = ns / ns.sum().clamp_min(torch.finfo(ns.dtype).tiny)  # all zero when every gate saturated; no sync
        b_t = b + (w * (logits - logits.detach())).sum()  # value b; gradient db/dα
        return torch.sigmoid(torch.clamp((logits - b_t) / beta, min=-200.0)), b
    p = torch.sigmoid(torch.clamp((logits - b) / beta, min=-200.0))
    if renormalise:
        total = p.sum()
        p = p * (total.detach() / total)
    return p, b


def expected_params(p: torch.Tensor, n: torch.Tensor) -> float:
    return float((p.detach().double() * n.double()).sum())


def concrete_sample(p: torch.Tensor, generator: torch.Generator, temperature: float = 1.0) -> torch.Tensor:
    """Binary-concrete (Gumbel-sigmoid) relaxation z = sigmoid((logit p + logit u)/τ), u ~ U(0,1).

    Differentiable in ``p``. The noise comes from ``generator`` on the CPU, so every rank seeded the
    same way draws the same z.
    """
    u = torch.rand(p.shape, generator=generator, dtype=torch.float64).clamp(P_EPS, 1 - P_EPS)
    # Clamped only where logit(p) would be infinite (or its gradient overflow): a clamp at P_EPS cut
    # the gradient of every gate below p = 1e-7 to zero, where dz/dα = z(1-z)/(τβ) does not vanish
    # (the original adds its eps only at p = 0 or 1).
    pc = p.clamp(torch.finfo(p.dtype).tiny, 1 - P_EPS)
    noise = (torch.log(u) - torch.log1p(-u)).to(p.dtype).to(p.device)
    return torch.sigmoid((torch.log(pc) - torch.log1p(-pc) + noise) / temperature)


def step_generator(seed: int, step: int, phase: int = 0) -> torch.Generator:
    """A CPU generator for (seed, step, phase): deterministic, identical on every rank, and needing no
    saved RNG state to resume."""
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + step * 17 + phase) % (2**63 - 1))
    return g


def discretise(
    p: Sequence[float] | torch.Tensor,
    n: Sequence[int],
    budget: float,
    *,
    check: bool = True,
    logits: Sequence[float] | None = None,
    allow_all: bool = False,
) -> list[int]:
    """Greedy knapsack: candidates by p descending; take each that still fits.

    Ties in p go to the higher logit, then the lower index: gates far below the shift all read
    p = sigmoid(-200), and the leftover budget must go to the least rejected of them, not to the
    first in site order (encoder first). ``check=False``: the budget was checked against ``n``
    already; ``allow_all``: a budget every candidate fits takes them all (see ``check_budget``).

    Returns the chosen candidate indices in candidate order.
    """
    pl = p.detach().double().tolist() if isinstance(p, torch.Tensor) else [float(x) for x in p]
    if len(pl) != len(n):
        raise ValueError(f"{len(pl)} probabilities for {len(n)} candidates")
    _check_finite(torch.tensor(pl, dtype=torch.float64), "gate probabilities")
    if check:
        check_budget(n, budget, allow_all=allow_all)
    tie = [0.0] * len(pl) if logits is None else [float(a) if a is not None else 0.0 for a in logits]
    if len(tie) != len(pl):
        raise ValueError(f"{len(tie)} logits for {len(pl)} candidates")
    used, chosen = 0, []
    for i in sorted(range(len(pl)), key=lambda i: (-pl[i], -tie[i], i)):
        if used + n[i] <= budget:
            chosen.append(i)
            used += n[i]
    return sorted(chosen)


def random_structure(n: Sequence[int], budget: float, seed: int) -> list[int]:
    """A random baseline at the budget: candidates in a seeded random order, each taken if it fits.

    Equivalent to repeatedly drawing uniformly among the affordable, unchosen candidates (the
    original's loop), but it always terminates.
    """
    check_budget(n, budget)
    order = list(range(len(n)))
    random.Random(seed).shuffle(order)
    used, chosen = 0, []
    for i in order:
        if used + n[i] <= budget:
            chosen.append(i)
            used += n[i]
    return sorted(chosen)
