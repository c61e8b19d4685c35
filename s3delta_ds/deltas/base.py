"""What every delta type shares: a slot (parallel or sequential), the site kinds it fits, a
frozen config with validated kwargs, and an exact parameter count computable without building it.

A delta's ``forward`` returns only its *contribution*; the :class:`~s3delta_ds.supernet.DeltaSlot`
scales it by the candidate's gate and adds it (parallel: to the module output, computed from the
module input; sequential: to the parallel-updated output, computed from that output).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from enum import Enum
from typing import Any, ClassVar

import torch.nn as nn

from ..backbones.base import SiteDims
from ..errors import SearchSpaceError


class Slot(str, Enum):
    PARALLEL = "parallel"
    SEQUENTIAL = "sequential"


class Delta(nn.Module):
    """Base class of delta modules. Subclasses set the class attributes and implement the rest."""

    type_name: ClassVar[str]
    slot: ClassVar[Slot]
    site_kinds: ClassVar[frozenset[str]]
    Config: ClassVar[type]
    #: Can it be folded into the backbone's weights for zero added latency (see ``merge``)?
    mergeable: ClassVar[bool] = False

    def __init__(self, dims: SiteDims, cfg):
        super().__init__()
        self.dims = dims
        self.cfg = cfg

    @classmethod
    def num_params(cls, dims: SiteDims, cfg) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def reset_parameters(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def check_site(cls, dims: SiteDims, site: str) -> None:
        if dims.kind not in cls.site_kinds:
            raise SearchSpaceError(
                f"delta type {cls.type_name!r} cannot go on {site!r}: it fits {'/'.join(sorted(cls.site_kinds))} "
                f"sites, and this one is a {dims.kind}"
            )


def build_config(delta_cls: type[Delta], kwargs: Mapping[str, Any] | None, where: str = ""):
    """Validate ``kwargs`` for ``delta_cls`` and return its frozen config.

    Raises:
        SearchSpaceError: unknown key (the valid keys are listed) or a bad value.
    """
    kwargs = dict(kwargs or {})
    fields = {f.name: f for f in dataclasses.fields(delta_cls.Config)}
    unknown = sorted(set(kwargs) - set(fields))
    prefix = f"{where}: " if where else ""
    if unknown:
        valid = ", ".join(fields) or "none"
        raise SearchSpaceError(
            f"{prefix}unknown kwargs {unknown} for delta type {delta_cls.type_name!r}; valid: {valid}"
        )
    for name, value in kwargs.items():
        expected = fields[name].type
        ok = {
            "int": isinstance(value, int) and not isinstance(value, bool),
            "float": isinstance(value, (int, float)) and not isinstance(value, bool),
            "str": isinstance(value, str),
            "bool": isinstance(value, bool),
        }.get(expected, True)
        if not ok:
            raise SearchSpaceError(f"{prefix}{delta_cls.type_name}.{name} must be {expected}, got {value!r}")
    try:
        return delta_cls.Config(**kwargs)
    except (TypeError, ValueError) as e:
        raise SearchSpaceError(f"{prefix}{delta_cls.type_name}: {e}") from e


def config_kwargs(cfg) -> dict[str, Any]:
    """The full kwargs of a config (defaults filled in), as written to structure files."""
    return dataclasses.asdict(cfg)
