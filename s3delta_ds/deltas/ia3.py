"""(IA)³ (Liu et al. 2022): a learned per-channel scale on a Linear, h ← h ⊙ (1 + z·Δ), Δ = 0 at init.

* ``position="output"`` — scales the Linear's output (the paper's attention keys and values): a
  sequential delta whose contribution is Δ ⊙ y1. Folds into the rows: W ← (1+Δ) ⊙ W, b ← (1+Δ) ⊙ b.
* ``position="input"`` — scales the Linear's input (the paper's FFN inner activations, the input of
  the down projection): an input delta, x' = x + z·(Δ ⊙ x). Folds into the columns: W ← W diag(1+Δ).

Parametrised as 1 + Δ rather than the paper's l (init 1) so that zero-init and gate 0 are the
identity like every other type, and the gate scales the change. PEFT stores l = 1 + Δ (``ia3_l``,
shape (out, 1), or (1, in) for its ``feedforward_modules``); the export converts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from .base import Delta, PeftAdapter, Slot

POSITIONS = ("output", "input")


@dataclass(frozen=True, slots=True)
class IA3Config:
    position: str = "output"
    """output: scale the Linear's output (keys, values); input: scale its input (FFN activations)."""

    def __post_init__(self):
        if self.position not in POSITIONS:
            raise ValueError(f"position must be one of {', '.join(POSITIONS)}, got {self.position!r}")


class IA3(Delta):
    type_name = "ia3"
    site_kinds = frozenset({"linear"})
    Config = IA3Config
    mergeable = True
    # PEFT cannot hold IA3 and LoRA in one model, and on a shared site IA3 scales LoRA's update
    # too: its own folder, loaded last (after the LoRA adapter is merged)
    peft_adapter = PeftAdapter("ia3", "ia3", "IA3", carries_head=True)

    def __init__(self, dims, cfg: IA3Config):
        super().__init__(dims, cfg)
        self.delta = nn.Parameter(torch.empty(self.num_params(dims, cfg)))
        self.reset_parameters()

    @property
    def slot(self) -> Slot:  # the one type whose binding depends on its config
        return Slot.INPUT if self.cfg.position == "input" else Slot.SEQUENTIAL

    @classmethod
    def num_params(cls, dims, cfg):
        return dims.in_dim if cfg.position == "input" else dims.out_dim

    def reset_parameters(self):
        nn.init.zeros_(self.delta)

    def forward(self, h):
        return h * self.delta.to(h.dtype)

    def fold_updates(self, module):
        d = self.delta.detach()
        if self.cfg.position == "input":
            return [(module.weight, module.weight.detach() * d[None, :])]
        updates = [(module.weight, module.weight.detach() * d[:, None])]
        if getattr(module, "bias", None) is not None:
            updates.append((module.bias, module.bias.detach() * d))
        return updates

    def peft_state(self, module):
        l = (1 + self.delta.detach().float()).cpu()  # noqa: E741 - PEFT's name
        return {"ia3_l": l[None, :] if self.cfg.position == "input" else l[:, None]}

    @classmethod
    def peft_config(cls, members, head):
        return {
            "target_modules": sorted(path for path, _ in members),
            "feedforward_modules": sorted(path for path, d in members if d.cfg.position == "input"),
            "modules_to_save": head or None,
            "fan_in_fan_out": False,
            "init_ia3_weights": True,
        }
