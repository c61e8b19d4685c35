"""The delta types. ``DELTAS`` is the one registry: a structure or search space names a type by
its key here."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..backbones.base import SiteDims
from ..errors import SearchSpaceError
from .adapters import Adapter, LowRankAdapter
from .base import Delta, FoldError, Host, Slot, build_config, config_kwargs, fold_all, host_of
from .bitfit import BitFit
from .hiwi import HiWi
from .ia3 import IA3
from .lnfit import LNFit
from .lora import LoRA
from .pafi import PaFi

DELTAS: dict[str, type[Delta]] = {
    "lora": LoRA,
    "bitfit": BitFit,
    "lnfit": LNFit,
    "lra": LowRankAdapter,
    "adapter": Adapter,
    "pafi": PaFi,
    "hiwi": HiWi,
    "ia3": IA3,
}


def delta_class(type_name: str) -> type[Delta]:
    try:
        return DELTAS[type_name]
    except KeyError:
        raise SearchSpaceError(f"unknown delta type {type_name!r}; known types: {', '.join(DELTAS)}") from None


def resolve(type_name: str, kwargs: Mapping[str, Any] | None, dims: SiteDims, site: str):
    """Check that ``type_name(**kwargs)`` fits the site; return (class, config, exact param count)."""
    cls = delta_class(type_name)
    cls.check_site(dims, site)
    cfg = build_config(cls, kwargs, where=site)
    try:
        n = cls.num_params(dims, cfg)
    except ValueError as e:
        raise SearchSpaceError(f"{site}: {type_name}: {e}") from e
    return cls, cfg, n


__all__ = [
    "DELTAS",
    "Delta",
    "FoldError",
    "Host",
    "host_of",
    "Slot",
    "build_config",
    "config_kwargs",
    "delta_class",
    "fold_all",
    "resolve",
]
