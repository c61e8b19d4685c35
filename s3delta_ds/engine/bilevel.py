"""The bi-level step on one DeepSpeed engine.

* ``delta_step`` — DeepSpeed owns it: forward with detached gates, ``engine.backward`` per
  micro-batch, ``engine.step`` (which only updates at the accumulation boundary).
* ``gate_step`` — ours: forward through ``engine.module`` (not ``engine``), take gradients with
  ``torch.autograd.grad`` w.r.t. the gate sample only, sum them over the micro-batches, all-reduce,
  then chain into the logits and step their own optimizer. DeepSpeed's gradient buffers and
  accumulation counter are never touched; this is the pattern verified identical under ZeRO 0-3.
* ``second_order_gate_step`` — DARTS' finite-difference correction, done in place on the delta
  weights (no second model copy). It needs the weights replicated, so ZeRO stage 3 is refused at
  start-up rather than computed wrongly.

Losses are per-item sums divided by the item count of the whole global batch (all ranks, all
micro-batches), so gradient accumulation is exactly a larger batch.
"""

from __future__ import annotations

import math

import torch

from ..errors import DistributedSetupError, TrainingError
from ..objective import DeltaModel, move
from . import zero
from .gatelogits import GateLogits

DELTA_PHASE, GATE_PHASE = 0, 1


def global_items(micro_batches, device: torch.device) -> float:
    """Items scored in this step on all ranks (the loss normaliser). One tiny all-reduce."""
    local = sum(float((mb["labels"] != -100).sum()) for mb in micro_batches)
    return float(zero.all_reduce_sum_(torch.tensor([local], dtype=torch.float64, device=device)).item())


def check_finite(loss: torch.Tensor, where: str) -> None:
    if not torch.isfinite(loss).all():
        raise TrainingError(f"non-finite loss in the {where}: lower the learning rate or check the data")


def delta_update(engine, model: DeltaModel, micro_batches, device: torch.device) -> float:
    """One optimizer step of the DeepSpeed-owned weights over ``micro_batches``; returns the mean loss.

    DeepSpeed divides each backward by grad_accum and averages over ranks, so scaling the summed
    loss by grad_accum · world / (global items) gives exactly the mean over the global batch.
    """
    items = global_items(micro_batches, device)
    scale = engine.gradient_accumulation_steps() * zero.world() / items
    total = 0.0
    for mb in micro_batches:
        loss_sum, _ = engine(move(mb, device))
        loss = loss_sum.sum()
        check_finite(loss, "delta phase")
        engine.backward(loss * scale)
        engine.step()
        total += float(loss.detach())
    return float(zero.all_reduce_sum_(torch.tensor([total], dtype=torch.float64, device=device)).item()) / items


def check_mode(mode: str, stage: int) -> None:
    if mode == "second-order" and stage >= 3:
        raise DistributedSetupError(
            "second-order search perturbs the delta weights in place and needs them replicated: use ZeRO stage 0-2 "
            "(deepspeed=zero2) or search.mode=first-order with ZeRO-3"
        )


class BiLevel:
    def __init__(self, engine, gates: GateLogits, *, mode: str, device: torch.device):
        self.engine, self.gates, self.mode, self.device = engine, gates, mode, device
        self.model: DeltaModel = engine.module
        self.delta_params = [p for p in self.model.parameters() if p.requires_grad]

    # -- helpers -------------------------------------------------------------------------------
    def _global_items(self, micro_batches) -> float:
        return global_items(micro_batches, self.device)

    def _mean(self, total: float, items: float) -> float:
        t = zero.all_reduce_sum_(torch.tensor([total], dtype=torch.float64, device=self.device))
        return float(t.item()) / items

    # -- phases --------------------------------------------------------------------------------
    def delta_step(self, micro_batches, step: int, z: torch.Tensor | None = None) -> float:
        """One delta-weight update on ``micro_batches`` (one per accumulation step). Returns the mean loss.

        ``z``: gate values to use (default: a fresh concrete sample, as the original does).
        """
        self.model.gate_ctx.z = (self.gates.sample(step, DELTA_PHASE) if z is None else z).detach()
        return delta_update(self.engine, self.model, micro_batches, self.device)

    def _z_grad(self, micro_batches, z_leaf: torch.Tensor, items: float, want_w: bool = False):
        """Σ over micro-batches of ∂(loss / items)/∂z (and ∂/∂w), summed over ranks."""
        gz = torch.zeros_like(z_leaf)
        gw = [torch.zeros_like(p) for p in self.delta_params] if want_w else None
        total = 0.0
        self.model.gate_ctx.z = z_leaf
        for mb in micro_batches:
            loss_sum, _ = self.model(move(mb, self.device))
            loss = loss_sum.sum()
            check_finite(loss, "gate phase")
            inputs = [z_leaf] + (self.delta_params if want_w else [])
            grads = torch.autograd.grad(loss / items, inputs, allow_unused=True)
            gz += grads[0]
            if want_w:
                for acc, g in zip(gw, grads[1:], strict=True):
                    if g is not None:
                        acc += g
            total += float(loss.detach())
        zero.all_reduce_sum_(gz)
        if want_w:
            for g in gw:
                zero.all_reduce_sum_(g)
        return gz, gw, total

    def gate_step(self, micro_batches, step: int) -> float:
        """First-order gate update on ``micro_batches`` (the gates half). Returns the mean loss."""
        items = self._global_items(micro_batches)
        z = self.gates.sample(step, GATE_PHASE)
        z_leaf = z.detach().requires_grad_(True)
        gz, _, total = self._z_grad(micro_batches, z_leaf, items)
        (g_logits,) = torch.autograd.grad(z, self.gates.logits, grad_outputs=gz.to(z.dtype))
        self.gates.apply(g_logits)
        return self._mean(total, items)

    @torch.no_grad()
    def _shift_weights(self, direction: list[torch.Tensor], alpha: float) -> None:
        for p, d in zip(self.delta_params, direction, strict=True):
            p.add_(d.to(p.dtype), alpha=alpha)

    def second_order_gate_step(self, weight_batches, gate_batches, step: int) -> float:
        """DARTS: ∇α L_val(w − ξ∇w L_trn(w, α), α) with the Hessian term by central differences.

        The virtual step is a plain gradient step of size ξ = the current delta lr (DARTS' form;
        the original used a virtual AdamW step). One gate sample is shared by the four losses.
        """
        xi = float(self.engine.get_lr()[0])
        z = self.gates.sample(step, GATE_PHASE)
        z_leaf = z.detach().requires_grad_(True)
        n_trn, n_val = self._global_items(weight_batches), self._global_items(gate_batches)
        backup = [p.detach().clone() for p in self.delta_params]
        try:
            _, g_w, _ = self._z_grad(weight_batches, z_leaf, n_trn, want_w=True)  # ∇w L_trn(w, α)
            self._shift_weights(g_w, -xi)  # w' = w − ξ g
            dz, dw, total = self._z_grad(gate_batches, z_leaf, n_val, want_w=True)  # at w'
            self._restore(backup)
            eps = 0.01 / (math.sqrt(sum(float((d.double() ** 2).sum()) for d in dw)) + 1e-6)
            self._shift_weights(dw, eps)  # w+
            hz_plus, _, _ = self._z_grad(weight_batches, z_leaf, n_trn)
            self._restore(backup)
            self._shift_weights(dw, -eps)  # w−
            hz_minus, _, _ = self._z_grad(weight_batches, z_leaf, n_trn)
        finally:
            self._restore(backup)
        gz = dz - xi * (hz_plus - hz_minus) / (2 * eps)
        (g_logits,) = torch.autograd.grad(z, self.gates.logits, grad_outputs=gz.to(z.dtype))
        self.gates.apply(g_logits)
        return self._mean(total, n_val)

    @torch.no_grad()
    def _restore(self, backup: list[torch.Tensor]) -> None:
        for p, b in zip(self.delta_params, backup, strict=True):
            p.copy_(b)

    def step(self, weight_batches, gate_batches, step: int) -> dict[str, float]:
        """One search step: the gate update, then the delta update (the original's order)."""
        if self.mode == "second-order":
            gate_loss = self.second_order_gate_step(weight_batches, gate_batches, step)
        else:
            gate_loss = self.gate_step(gate_batches, step)
        delta_loss = self.delta_step(weight_batches, step)
        return {"delta_loss": delta_loss, "gate_loss": gate_loss, "gate_grad_norm": self.gates.last_grad_norm}
