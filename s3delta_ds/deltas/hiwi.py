"""HiWi (Liao, Meng, Monz 2023): an adapter applied to the pre-trained *weights* (or bias) of a
feed-forward Linear instead of to hidden states. X' = X + f(X), f(X) = act(X A + a) B + c, with
the rows of X as its tokens; B and c start at zero, so training starts from X' = X. After training
X' is materialised and the adapter thrown away: inference costs exactly the base model.

* ``target="weight"`` — X = W (torch's out × in); storage |W|. Its tokens are W's rows
  (``tokens="rows"``: the adapter has in → bottleneck → in) or its columns (``tokens="columns"``:
  out → bottleneck → out).
* ``target="bias"``   — X = b (one token of width out); the adapter has out → bottleneck → out;
  storage |b|. Needs a Linear with a bias (BERT, RoBERTa); T5 and LLaMA FFNs have none.

Trainable parameters (what budgets count) differ from stored ones (|X|): ``stored_params`` says.
The paper's code was never released: the activation, init std, which FFN matrix and which way W
is read are switches. The paper writes h = x W1 + b1 with W1 ∈ R^{d × d_ff}; read so, its tokens
are W1's rows of width d_ff, the bias's width: ``tokens="columns"`` here. ``"rows"`` (the default,
for the structures made before the switch) reads the transpose.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.activations import ACT2FN

from .base import ADDED_LATER, Delta, Slot

TARGETS = ("weight", "bias")
TOKENS = ("rows", "columns")


@dataclass(frozen=True, slots=True)
class HiWiConfig:
    target: str = "weight"
    bottleneck: int = 8
    activation: str = "relu"
    init_std: float = 0.02
    """Std of the normal init of the down projection A (the up projection B starts at 0)."""
    tokens: str = field(default="rows", metadata=ADDED_LATER)
    """target=weight: W's rows (width in) or columns (width out, the bias's width) are the tokens."""

    def __post_init__(self):
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {', '.join(TARGETS)}, got {self.target!r}")
        if self.tokens not in TOKENS:
            raise ValueError(f"tokens must be one of {', '.join(TOKENS)}, got {self.tokens!r}")
        if self.bottleneck < 1:
            raise ValueError(f"bottleneck must be >= 1, got {self.bottleneck}")
        if self.activation not in ACT2FN:
            raise ValueError(f"unknown activation {self.activation!r}")


class HiWi(Delta):
    type_name = "hiwi"
    slot = Slot.PARALLEL
    site_kinds = frozenset({"linear"})
    Config = HiWiConfig
    mergeable = True
    #: forward reads the frozen weight of the module it sits on (ZeRO-3: registered as external)
    uses_base_weight = True

    def __init__(self, dims, cfg: HiWiConfig):
        super().__init__(dims, cfg)
        width = self.width(dims, cfg)
        self.A = nn.Parameter(torch.empty(width, cfg.bottleneck))
        self.a = nn.Parameter(torch.empty(cfg.bottleneck))
        self.B = nn.Parameter(torch.empty(cfg.bottleneck, width))
        self.c = nn.Parameter(torch.empty(width))
        self.act = ACT2FN[cfg.activation]
        self._base: list[nn.Module] = []  # the Linear whose weight/bias is X (a list: not a submodule)
        self.reset_parameters()

    @staticmethod
    def width(dims, cfg) -> int:
        return dims.in_dim if cfg.target == "weight" and cfg.tokens == "rows" else dims.out_dim

    @classmethod
    def num_params(cls, dims, cfg):
        w = cls.width(dims, cfg)
        return 2 * w * cfg.bottleneck + cfg.bottleneck + w

    @staticmethod
    def stored_params(dims, cfg) -> int:
        """What remains after merging: the modified X."""
        return dims.out_dim * dims.in_dim if cfg.target == "weight" else dims.out_dim

    def reset_parameters(self):
        nn.init.normal_(self.A, std=self.cfg.init_std)
        nn.init.zeros_(self.a)
        nn.init.zeros_(self.B)
        nn.init.zeros_(self.c)

    def bind_base(self, module: nn.Module) -> None:
        if self.cfg.target == "bias" and getattr(module, "bias", None) is None:
            raise ValueError("HiWi target=bias needs a Linear with a bias (BERT/RoBERTa FFNs have one)")
        self._base = [module]

    def base_tensor(self) -> torch.Tensor:
        m = self._base[0]
        return m.weight if self.cfg.target == "weight" else m.bias

    def delta(self, X: torch.Tensor) -> torch.Tensor:
        """f(X) in X's shape."""
        columns = self.cfg.target == "weight" and self.cfg.tokens == "columns"
        tokens = (X.t() if columns else X.reshape(-1, self.A.shape[0])).to(self.A.dtype)
        f = self.act(tokens @ self.A + self.a) @ self.B + self.c
        return f.t() if columns else f.reshape(X.shape)

    def forward(self, x):
        f = self.delta(self.base_tensor().detach())
        if self.cfg.target == "weight":
            return F.linear(x, f.to(x.dtype))
        return f.to(x.dtype)

    def fold_updates(self, module):
        """X += f(X): W, or the bias (bind_base checked that there is one)."""
        target = module.weight if self.cfg.target == "weight" else module.bias
        return [(target, self.delta(target.detach().float()))]
