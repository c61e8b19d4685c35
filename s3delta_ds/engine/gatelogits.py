"""The gate logits of a search: one fp32 tensor replicated on every rank, kept outside the module
tree (ZeRO must never see or partition it), with its own AdamW, linear decay and clipping.

Ranks keep bit-identical logits because they start equal (zeros), apply the same all-reduced
gradient and run the same deterministic optimizer step.
"""

from __future__ import annotations

import torch

from ..errors import TrainingError
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


class GateLossScale:
    """fp16 loss scaling for the gate pass, with DeepSpeed's rules and its ``fp16`` config keys.

    DeepSpeed scales the delta pass's loss itself, but the gate pass takes its gradients with
    ``torch.autograd.grad`` outside the engine. Unscaled, a loss normalised by a large global
    batch back-propagates through fp16 activations as gradients below fp16's smallest subnormal
    (6e-8): they flush to zero and the gates stop moving, silently. So the gate loss is
    multiplied by ``scale``, the gradient divided back in fp32, and a non-finite gradient (the
    same on every rank: it is all-reduced) skips that gate step. Dynamic (``fp16.loss_scale: 0``,
    DeepSpeed's default): an overflow halves the scale once ``hysteresis`` overflows have been
    seen, ``loss_scale_window`` clean steps double it. The gate pass keeps its own scale: its
    gradients are not the delta pass's. fp32/bf16: scale 1, never skips; a non-finite gradient
    there is an error.
    """

    def __init__(
        self,
        scale: float = 1.0,
        *,
        dynamic: bool = False,
        window: int = 1000,
        min_scale: float = 1.0,
        hysteresis: int = 2,
        consecutive_hysteresis: bool = False,
    ):
        self.scale, self.dynamic, self.window, self.min_scale = float(scale), dynamic, window, float(min_scale)
        self.hysteresis, self.consecutive_hysteresis = hysteresis, consecutive_hysteresis
        self.cur_hysteresis, self.iter, self.last_overflow, self.skipped = hysteresis, 0, -1, 0

    @classmethod
    def from_ds_config(cls, ds_config: dict) -> GateLossScale:
        """The resolved DeepSpeed config's ``fp16`` section, read by DeepSpeed's own parser (its
        defaults and validation): initial_scale_power, loss_scale, loss_scale_window, hysteresis,
        consecutive_hysteresis, min_loss_scale."""
        fp16 = zero.fp16_settings(ds_config)
        if fp16 is None:
            return cls()
        if fp16["loss_scale"] > 0:
            return cls(fp16["loss_scale"])
        return cls(
            fp16["initial_scale"],
            dynamic=True,
            window=fp16["loss_scale_window"],
            min_scale=fp16["min_loss_scale"],
            hysteresis=fp16["hysteresis"],
            consecutive_hysteresis=fp16["consecutive_hysteresis"],
        )

    @property
    def enabled(self) -> bool:
        return self.dynamic or self.scale != 1.0

    def update(self, finite: bool) -> bool:
        """Record one gate step's outcome; returns whether its gradient may be applied.

        Raises:
            TrainingError: the gradient overflows fp16 at the smallest allowed scale, or is not
                finite at all without fp16 scaling (nothing to back off: the gates would freeze).
        """
        if not finite and not self.enabled:
            raise TrainingError(
                "non-finite gate gradient with a finite loss: lower search.gate_lr or search.lr, or check the data"
            )
        if not finite:
            self.skipped += 1
            if self.dynamic:
                if self.hysteresis == 1 or self.cur_hysteresis == 1:
                    if self.scale <= self.min_scale:
                        raise TrainingError(
                            f"the gate gradient overflows fp16 even at the minimum loss scale {self.min_scale:g}: "
                            "lower search.gate_lr or search.lr, or run the backbone in bf16 or fp32 (model.dtype)"
                        )
                    self.scale = max(self.scale / 2, self.min_scale)
                else:
                    self.cur_hysteresis -= 1
                self.last_overflow = self.iter
        elif self.dynamic:
            if self.consecutive_hysteresis:
                self.cur_hysteresis = self.hysteresis
            stable = self.iter - self.last_overflow - 1
            if stable > 0 and stable % self.window == 0:
                if not self.consecutive_hysteresis:
                    self.cur_hysteresis = self.hysteresis
                self.scale *= 2
        self.iter += 1
        return finite

    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("scale", "cur_hysteresis", "iter", "last_overflow", "skipped")}

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)


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
        loss_scale: GateLossScale | None = None,
    ):
        self.n = torch.tensor(params, dtype=torch.float64)
        self.exact_shift = shift_gradient == "exact"
        self.budget, self.beta, self.temperature, self.seed, self.clip = budget, beta, temperature, seed, clip
        self.logits = torch.zeros(len(params), dtype=torch.float32, device=device, requires_grad=True)
        self.optimizer = gate_optimizer(optimizer, self.logits, lr)
        self.scheduler = zero.linear_decay(self.optimizer, total_steps)
        self.last_grad_norm: float | None = None
        """The last gate step's gradient norm; None before one, and after a step fp16 skipped."""
        self.loss_scale = loss_scale or GateLossScale()

    def __len__(self) -> int:
        return self.logits.numel()

    def probs(self) -> torch.Tensor:
        """p (num_candidates,), differentiable in the logits; Σ n_i p_i = budget (to float32 rounding)."""
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
            "loss_scale": self.loss_scale.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            self.logits.copy_(state["logits"].to(self.logits.device))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if "loss_scale" in state:  # checkpoints before fp16 gate scaling: scale as configured
            self.loss_scale.load_state_dict(state["loss_scale"])
