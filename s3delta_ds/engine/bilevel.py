"""The bi-level step on one DeepSpeed engine.

* ``delta_step`` — DeepSpeed owns it: forward with detached gates, ``engine.backward`` per
  micro-batch, ``engine.step`` (which only updates at the accumulation boundary).
* ``gate_step`` — ours: forward through ``engine.module`` (not ``engine``), take gradients with
  ``torch.autograd.grad`` w.r.t. the gate sample only, sum them over the micro-batches, all-reduce,
  then chain into the logits and step their own optimizer. DeepSpeed's gradient buffers and
  accumulation counter are never touched; this is the pattern verified identical under ZeRO 0-3.
* ``second_order_gate_step`` — DARTS' finite-difference correction with the original's AdamW
  virtual step (docs/second-order.md). Its passes run in fp32 whatever the backbone dtype, on
  weights handed to the forward with ``torch.func.functional_call``: the engine's parameters are
  never written. It needs the full weights on every rank, so ZeRO stage 3 is refused at start-up
  rather than computed wrongly.

Losses are per-item sums divided by the item count of the whole global batch (all ranks, all
micro-batches), so gradient accumulation is exactly a larger batch.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn as nn

from ..errors import ConfigError, DistributedSetupError, TrainingError
from ..method.objective import DeltaModel, move
from . import zero
from .gatelogits import GateLogits

DELTA_PHASE, GATE_PHASE = 0, 1
VIRTUAL_STEPS = ("adamw", "sgd")


def global_items(micro_batches, device: torch.device) -> float:
    """Items scored in this step on all ranks (the loss normaliser). One tiny all-reduce."""
    local = sum(float((mb["labels"] != -100).sum()) for mb in micro_batches)
    return float(zero.all_reduce_sum_(torch.tensor([local], dtype=torch.float64, device=device)).item())


def check_finite(loss: float, where: str) -> None:
    """Called on a value already reduced over ranks, so every rank raises together: one rank
    raising alone would leave the others blocked in their next collective until the timeout."""
    if not math.isfinite(loss):
        raise TrainingError(f"non-finite loss in the {where}: lower the learning rate or check the data")


def delta_update(engine, model: DeltaModel, micro_batches, device: torch.device) -> float:
    """One optimizer step of the DeepSpeed-owned weights over ``micro_batches``; returns the mean loss.

    DeepSpeed divides each backward by grad_accum and averages over ranks, so scaling the summed
    loss by grad_accum · world / (global items) gives exactly the mean over the global batch.

    Raises:
        TrainingError: the mean loss is not finite, on every rank alike (it is all-reduced). The
            step has been taken by then: the engine's weights are not finite, and the run stops
            with its last checkpoint intact.
    """
    items = global_items(micro_batches, device)
    scale = engine.gradient_accumulation_steps() * zero.world() / items
    total = torch.zeros(1, dtype=torch.float64, device=device)  # on the device: no sync per micro-batch
    for mb in micro_batches:
        loss_sum, _ = engine(move(mb, device))
        loss = loss_sum.sum()
        engine.backward(loss * scale)
        engine.step()
        total += loss.detach().double()
    mean = float(zero.all_reduce_sum_(total).item()) / items
    check_finite(mean, "delta phase")  # on every rank alike: the sum is all-reduced
    return mean


def check_mode(mode: str, stage: int) -> None:
    if mode == "second-order" and stage >= 3:
        raise DistributedSetupError(
            "second-order search runs its passes on full fp32 copies of the weights: use ZeRO stage 0-2 "
            "(deepspeed=zero2) or search.mode=first-order with ZeRO-3"
        )


def adamw_virtual_step(
    weights: list[torch.Tensor], grads: list[torch.Tensor], state: zero.AdamWState, lr: float
) -> list[torch.Tensor]:
    """The weights torch AdamW's next step would make of ``weights`` with gradient ``grads``.

    Same operations in the same order as ``torch.optim.AdamW`` (single-tensor path), with the
    optimizer's moments and step count (``state``), as new fp32 tensors: nothing is written. Before
    the first delta step the moments are zero, and this is AdamW's first step: after bias
    correction u = g / (|g| + eps) (+ weight decay), a sign-like step of size ``lr`` per entry.
    """
    b1, b2 = state.betas
    t = float(state.step + 1)
    bias_correction1, bias_correction2_sqrt = 1 - b1**t, (1 - b2**t) ** 0.5
    out = []
    for w, g, m, v in zip(weights, grads, state.exp_avg, state.exp_avg_sq, strict=True):
        g = g.float()
        m = m.to(g.device).lerp(g, 1 - b1)
        v = v.to(g.device).mul(b2).addcmul_(g, g, value=1 - b2)
        denom = (v.sqrt() / bias_correction2_sqrt).add_(state.eps)
        out.append(w.float().mul(1 - lr * state.weight_decay).addcdiv_(m, denom, value=-lr / bias_correction1))
    return out


class _Call(nn.Module):
    """``fn(model, *args)`` as a module's forward, so that ``torch.func.functional_call`` swaps
    ``model``'s tensors (named ``model.<name>``) for the whole of ``fn``: forward and backward."""

    def __init__(self, model: nn.Module, fn):
        super().__init__()
        self.model, self.fn = model, fn

    def forward(self, *args):
        return self.fn(self.model, *args)


class BiLevel:
    def __init__(self, engine, gates: GateLogits, *, mode: str, device: torch.device, virtual_step: str = "adamw"):
        """``virtual_step`` (second order only): "adamw", the original's w − ξ·(one AdamW update with
        the delta optimizer's moments), or "sgd", DARTS' w − ξ·g.

        Raises:
            ConfigError: an unknown ``virtual_step``, or second order on a quantized 16-bit backbone
                (its second-order passes cannot run in fp32).
        """
        if virtual_step not in VIRTUAL_STEPS:
            raise ConfigError(f"search.virtual_step must be one of {', '.join(VIRTUAL_STEPS)}, got {virtual_step!r}")
        self.engine, self.gates, self.mode, self.device = engine, gates, mode, device
        self.virtual_step = virtual_step
        self.model: DeltaModel = engine.module
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        self.delta_names = [n for n, _ in named]
        self.delta_params = [p for _, p in named]
        params = list(self.model.parameters())
        low_precision = any(p.is_floating_point() and p.dtype != torch.float32 for p in params)
        if mode == "second-order" and low_precision and any(not p.is_floating_point() for p in params):
            raise ConfigError(
                "search.mode=second-order runs its passes in fp32, which a quantized bf16/fp16 backbone cannot do: "
                "set model.dtype=fp32, drop model.quantize, or use search.mode=first-order"
            )

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

    def _z_grad(
        self, micro_batches, z_leaf: torch.Tensor, items: float, weights=None, want_w=False, frozen=None, scale=1.0
    ):
        """Σ over micro-batches of ∂(loss / items)/∂z (and ∂/∂w), summed over ranks.

        ``weights``: tensors to use in place of the delta parameters (same order), or None for the
        parameters themselves; ∂/∂w is taken w.r.t. whichever is used. ``frozen``: name → tensor
        to use in place of other parameters and buffers (the fp32 backbone of the second order).
        ``scale``: the fp16 loss scale; the backward runs on loss · scale, the sums are returned
        unscaled (in fp32), non-finite where the scaled backward overflowed.
        """
        ws = self.delta_params if weights is None else [w.detach().requires_grad_(want_w) for w in weights]
        inputs = [z_leaf] + (list(ws) if want_w else [])

        def loss_and_grads(model: DeltaModel, batch) -> tuple[torch.Tensor, tuple]:
            loss_sum, _ = model(batch)
            loss = loss_sum.sum()
            return loss.detach(), torch.autograd.grad(loss * (scale / items), inputs, allow_unused=True)

        if weights is None:
            run = functools.partial(loss_and_grads, self.model)
        else:
            # The backward runs inside the functional_call too: with activation checkpointing it
            # recomputes blocks, and the recomputation must read the swapped weights, not the
            # module's own (it would silently use those, or fail checkpoint's shape check).
            swapped = _Call(self.model, loss_and_grads)
            swap = {**(frozen or {}), **dict(zip(self.delta_names, ws, strict=True))}
            swap = {f"model.{n}": t for n, t in swap.items()}

            def run(batch):
                return torch.func.functional_call(swapped, swap, (batch,), strict=False)

        gz = torch.zeros_like(z_leaf)
        gw = [torch.zeros_like(w) for w in ws] if want_w else None
        total = torch.zeros((), dtype=torch.float64, device=gz.device)  # on the device: no sync per micro-batch
        self.model.gate_ctx.z = z_leaf
        for mb in micro_batches:
            loss, grads = run(move(mb, self.device))
            gz += grads[0]
            if want_w:
                for acc, g in zip(gw, grads[1:], strict=True):
                    if g is not None:
                        acc += g
            total += loss.detach().double()
        # the loss's finiteness rides on the gradient's all-reduce, so every rank decides alike
        bad_here = (~torch.isfinite(total)).to(gz.dtype).reshape(1)
        reduced = zero.all_reduce_sum_(torch.cat([gz, bad_here]))
        gz, bad = reduced[:-1], float(reduced[-1])
        total = float(total)
        if bad:
            raise TrainingError("non-finite loss in the gate phase: lower the learning rate or check the data")
        if want_w:
            zero.all_reduce_sum_many_(gw)
        if scale != 1.0:
            gz /= scale
            for g in gw or ():
                g /= scale
        return gz, gw, total

    def gate_step(self, micro_batches, step: int) -> float:
        """First-order gate update on ``micro_batches`` (the gates half). Returns the mean loss.

        With an fp16 backbone the backward runs on a scaled loss (``GateLossScale``), and a step
        whose gradient overflowed is skipped (the logits keep their values) on every rank alike.
        """
        items = self._global_items(micro_batches)
        z = self.gates.sample(step, GATE_PHASE)
        z_leaf = z.detach().requires_grad_(True)
        scaler = self.gates.loss_scale
        self.gates.last_grad_norm = None  # stays None when the step is skipped
        gz, _, total = self._z_grad(micro_batches, z_leaf, items, scale=scaler.scale)
        if scaler.update(bool(torch.isfinite(gz).all())):
            (g_logits,) = torch.autograd.grad(z, self.gates.logits, grad_outputs=gz.to(z.dtype))
            self.gates.apply(g_logits)
        return self._mean(total, items)

    @torch.no_grad()
    def virtual_weights(self, weights: list[torch.Tensor], grads: list[torch.Tensor], xi: float) -> list[torch.Tensor]:
        """w' = w − ξ·u: u = one AdamW update with the delta optimizer's state ("adamw"), or g ("sgd").
        Collective under ZeRO-1/2 (the moments are gathered)."""
        if self.virtual_step == "sgd":
            return [torch.add(w, g, alpha=-xi) for w, g in zip(weights, grads, strict=True)]
        return adamw_virtual_step(weights, grads, zero.adamw_state(self.engine, self.delta_params), xi)

    def _fp32_frozen(self) -> dict[str, torch.Tensor]:
        """fp32 copies of the 16-bit frozen parameters and buffers (empty for an fp32 backbone)."""
        delta = set(self.delta_names)
        named = [*self.model.named_parameters(), *self.model.named_buffers()]
        return {
            n: t.detach().float()
            for n, t in named
            if n not in delta and t.is_floating_point() and t.dtype != torch.float32
        }

    def second_order_gate_grad(self, weight_batches, gate_batches, z_leaf: torch.Tensor) -> tuple[torch.Tensor, float]:
        """DARTS: ∇z L_val(w', z) − ξ·∇²z,w L_trn(w, z)·∇w' L_val(w', z), the Hessian term by
        central differences, with w' the virtual step and ξ = the current delta lr.

        Every pass runs in fp32 whatever the backbone dtype (docs/second-order.md): a 16-bit model
        is read through fp32 copies of its weights (``torch.func.functional_call``), because the
        ε-perturbation is far below bf16's resolution, in the weights and in the activations alike.
        The engine's parameters are never written. Returns (gz (num_candidates,): the gradient
        w.r.t. the gate sample ``z_leaf``, the mean validation loss).
        """
        xi = float(self.engine.get_lr()[0])
        n_trn, n_val = self._global_items(weight_batches), self._global_items(gate_batches)
        frozen = self._fp32_frozen()
        w = [p.detach().float() for p in self.delta_params]  # an alias in fp32: never written
        _, g_w, _ = self._z_grad(weight_batches, z_leaf, n_trn, w, want_w=True, frozen=frozen)  # ∇w L_trn(w, z)
        w_virtual = self.virtual_weights(w, g_w, xi)
        del g_w
        dz, dw, total = self._z_grad(gate_batches, z_leaf, n_val, w_virtual, want_w=True, frozen=frozen)  # at w'
        del w_virtual
        eps = 0.01 / (math.sqrt(sum(float((d.double() ** 2).sum()) for d in dw)) + 1e-6)
        # w± = w ± ε·dw. Both passes draw the same dropout masks: with independent masks the
        # difference of the two gradients would be dropout noise divided by 2ε.
        rng = zero.rng_state()
        hz = []
        for sign in (1.0, -1.0):
            zero.set_rng_state(rng)
            with torch.no_grad():
                w_shifted = [torch.add(a, d, alpha=sign * eps) for a, d in zip(w, dw, strict=True)]
            hz.append(self._z_grad(weight_batches, z_leaf, n_trn, w_shifted, frozen=frozen)[0])
            del w_shifted
        return dz - xi * (hz[0] - hz[1]) / (2 * eps), self._mean(total, n_val)

    def second_order_gate_step(self, weight_batches, gate_batches, step: int) -> float:
        """The second-order gate update (one gate sample shared by the four losses). Returns the
        mean validation loss."""
        z = self.gates.sample(step, GATE_PHASE)
        z_leaf = z.detach().requires_grad_(True)
        gz, loss = self.second_order_gate_grad(weight_batches, gate_batches, z_leaf)
        (g_logits,) = torch.autograd.grad(z, self.gates.logits, grad_outputs=gz.to(z.dtype))
        self.gates.apply(g_logits)
        return loss

    def gate_update(self, weight_batches, gate_batches, step: int) -> float:
        """The gate half of a search step, first or second order (``mode``). Returns the mean loss
        on ``gate_batches``."""
        if self.mode == "second-order":
            return self.second_order_gate_step(weight_batches, gate_batches, step)
        return self.gate_step(gate_batches, step)

    def step(self, weight_batches, gate_batches, step: int) -> dict[str, float]:
        """One search step: the gate update, then the delta update (the original's order)."""
        gate_loss = self.gate_update(weight_batches, gate_batches, step)
        delta_loss = self.delta_step(weight_batches, step)
        return {"delta_loss": delta_loss, "gate_loss": gate_loss, "gate_grad_norm": self.gates.last_grad_norm}
