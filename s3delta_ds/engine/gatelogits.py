"""The gate logits of a search: one fp32 tensor replicated on every rank, kept outside the module
tree (ZeRO must never see or partition it), with its own AdamW, linear decay and clipping.

Ranks keep bit-identical logits because they start equal (zeros), apply the same all-reduced
gradient and run the same deterministic optimizer step.
"""

from __future__ import annotations

import torch

from ..method.gates import concrete_sample, probabilities, step_generator
from . import zero


class SharedMomentAdam(torch.optim.Optimizer):
    """Adam whose second moment is one number per parameter tensor, the running mean of g² over its
    entries, instead of one per entry. Per-entry Adam divides each logit's step by its own gradient
    scale, so a logit with a tiny but steady gradient moves as fast as one with a large gradient;
    here steps stay proportional to the (momentum-averaged) gradients."""

    def __init__(self, params, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            (b1, b2), lr, eps = group["betas"], group["lr"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros((), dtype=p.dtype, device=p.device)
                state["step"] += 1
                t, g = state["step"], p.grad
                state["exp_avg"].mul_(b1).add_(g, alpha=1 - b1)
                state["exp_avg_sq"].mul_(b2).add_(g.pow(2).mean(), alpha=1 - b2)
                denom = (state["exp_avg_sq"] / (1 - b2**t)).sqrt() + eps
                p.sub_(state["exp_avg"] / (1 - b1**t) / denom, alpha=lr)


def gate_optimizer(name: str, logits: torch.Tensor, lr: float) -> torch.optim.Optimizer:
    """``search.gate_optimizer``: adamw (per-logit, the original's) or adam-shared."""
    if name == "adamw":
        return torch.optim.AdamW([logits], lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    if name == "adam-shared":
        return SharedMomentAdam([logits], lr=lr)
    raise ValueError(f"unknown gate optimizer {name!r}")


class GateLogits:
    def __init__(
        self,
        params: list[int],
        budget: float,
        *,
        lr: float,
        clip: float,
        total_steps: int,
        beta: float,
        temperature: float,
        seed: int,
        device: torch.device,
        optimizer: str = "adamw",
        shift_gradient: str = "renormalise",
    ):
        self.n = torch.tensor(params, dtype=torch.float64)
        self.exact_shift = shift_gradient == "exact"
        self.budget, self.beta, self.temperature, self.seed, self.clip = budget, beta, temperature, seed, clip
        self.logits = torch.zeros(len(params), dtype=torch.float32, device=device, requires_grad=True)
        self.optimizer = gate_optimizer(optimizer, self.logits, lr)
        self.scheduler = zero.linear_decay(self.optimizer, total_steps)
        self.last_grad_norm = 0.0

    def __len__(self) -> int:
        return self.logits.numel()

    def probs(self) -> torch.Tensor:
        """p (num_candidates,), differentiable in the logits; Σ n_i p_i = budget."""
        p, _ = probabilities(  # budget checked by the plan
            self.logits, self.n, self.budget, self.beta, check=False, exact_shift=self.exact_shift
        )
        return p

    def sample(self, step: int, phase: int) -> torch.Tensor:
        """Concrete gates z for (step, phase), differentiable in the logits, the same on every rank."""
        return concrete_sample(self.probs(), step_generator(self.seed, step, phase), self.temperature)

    @torch.no_grad()
    def eval_p(self) -> torch.Tensor:
        return self.probs().detach()

    def apply(self, grad: torch.Tensor) -> None:
        """One optimizer step with ``grad`` (already averaged over ranks and micro-batches)."""
        self.logits.grad = grad.to(self.logits.dtype)
        norm = torch.nn.utils.clip_grad_norm_([self.logits], self.clip) if self.clip > 0 else grad.norm()
        self.last_grad_norm = float(norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        return {
            "logits": self.logits.detach().cpu().clone(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            self.logits.copy_(state["logits"].to(self.logits.device))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
