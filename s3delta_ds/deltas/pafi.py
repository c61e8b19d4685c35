"""PaFi (Liao, Meng, Monz 2023): train only the pre-trained weights of smallest magnitude.

A sparse, parallel delta on a Linear (or a norm's scale): ΔW has ``n`` trainable entries at fixed
positions, the n smallest |w| of that matrix (``ranking="per-matrix"``, computable from shapes, so
usable in search spaces) or positions from a backbone-wide mask (``ranking="global"``, see
``s3delta_ds.structure.pafi``; ``count`` then records this matrix's share). Optimizer state exists only for
the n values, never for a dense copy of the weight. Merging adds the values in place.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import Delta, Slot
from .lnfit import normalise

RANKINGS = ("per-matrix", "global")


@dataclass(frozen=True, slots=True)
class PaFiConfig:
    density: float = 0.001
    """Fraction of the matrix's entries that train."""
    ranking: str = "per-matrix"
    """per-matrix: this matrix's smallest |w|; global: positions from a backbone-wide mask file."""
    count: int = 0
    """Trainable entries at this site (0: ceil(density × entries); set by global masks)."""

    def __post_init__(self):
        if not 0 < self.density <= 1:
            raise ValueError(f"density must be in (0, 1], got {self.density}")
        if self.ranking not in RANKINGS:
            raise ValueError(f"ranking must be one of {', '.join(RANKINGS)}, got {self.ranking!r}")
        if self.count < 0:
            raise ValueError(f"count must be >= 0, got {self.count}")


def _entries(dims) -> int:
    return dims.in_dim * dims.out_dim if dims.kind == "linear" else dims.out_dim


def smallest_magnitude(weight: torch.Tensor, n: int) -> torch.Tensor:
    """Flat indices of the n smallest |w| (ties: lower index first), sorted."""
    flat = weight.detach().reshape(-1).float().abs()
    # a stable sort makes ties deterministic: equal magnitudes keep their index order
    order = torch.sort(flat, stable=True).indices[:n]
    return torch.sort(order).values


class PaFi(Delta):
    type_name = "pafi"
    slot = Slot.PARALLEL
    site_kinds = frozenset({"linear", "norm"})
    Config = PaFiConfig
    mergeable = True
    #: attach() hands the site's module to bind() (under a ZeRO-3 gather) to pick the positions.
    binds_to_weight = True

    def __init__(self, dims, cfg: PaFiConfig):
        super().__init__(dims, cfg)
        n = self.num_params(dims, cfg)
        self.values = nn.Parameter(torch.zeros(n))
        self.register_buffer("indices", torch.zeros(n, dtype=torch.long))
        self.bound = False

    @classmethod
    def num_params(cls, dims, cfg):
        entries = _entries(dims)
        per_matrix = math.ceil(cfg.density * entries)
        if cfg.count and cfg.ranking == "per-matrix" and cfg.count != per_matrix:
            # a per-matrix count is derived from the density (a transfer recounts it on the target's
            # matrix); one of its own would silently change size there
            raise ValueError(
                f"a per-matrix count must be ceil(density × entries) = {per_matrix} on this {entries}-entry "
                f"site, got {cfg.count}: set the density instead (only a global mask gives a count of its own)"
            )
        n = cfg.count or per_matrix
        if n > entries:
            raise ValueError(f"count {n} exceeds the {entries} entries of the site")
        return n

    def reset_parameters(self):
        nn.init.zeros_(self.values)

    def bind(self, weight: torch.Tensor, indices: torch.Tensor | None = None) -> None:
        """Fix the trainable positions: given ``indices`` (a global mask) or this weight's smallest."""
        idx = indices if indices is not None else smallest_magnitude(weight, self.values.numel())
        if idx.numel() != self.values.numel():
            raise ValueError(f"mask has {idx.numel()} positions, the delta {self.values.numel()}")
        self.indices.copy_(idx.to(self.indices.device))
        self.bound = True

    def dense(self) -> torch.Tensor:
        """ΔW (out, in) or Δg (d,) with the trained values at their positions, zeros elsewhere."""
        shape = (self.dims.out_dim, self.dims.in_dim) if self.dims.kind == "linear" else (self.dims.out_dim,)
        flat = torch.zeros(math.prod(shape), dtype=self.values.dtype, device=self.values.device)
        return flat.index_add(0, self.indices, self.values).view(shape)

    def forward(self, x):
        if self.dims.kind == "linear":
            return F.linear(x, self.dense().to(x.dtype))
        return self.dense().to(x.dtype) * normalise(x, self.dims.norm, self.dims.eps)

    def fold_updates(self, module):
        return [(module.weight, self.dense())]  # W.flat[positions] += values (or the norm's scale)
