"""What every delta type shares: how it binds to its site, the site kinds it fits, a frozen config
with validated kwargs, an exact parameter count computable without building it, and (PEFT's layer
pattern) its own fold into the frozen host and its own PEFT export.

A delta's ``forward`` returns only its *contribution*; the :class:`~s3delta_ds.method.supernet.DeltaSlot`
scales it by the candidate's gate and adds it. Where it adds is the delta's :class:`Slot`:

* ``input`` — to the module input, computed from that input (x' = x + z·D(x), e.g. IA3 on the
  FFN activations); the module and every parallel delta then see x'.
* ``parallel`` — to the module output, computed from the module input.
* ``sequential`` — to the parallel-updated output, computed from that output.

Adding a type: one file here with a ``Delta`` subclass, one line in ``DELTAS``, one row in
``tests/test_delta_table.py`` (see docs/design.md, "Adding a delta type").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from enum import Enum
from typing import Any, ClassVar

import torch
import torch.nn as nn

from ..backbones.base import SiteDims
from ..errors import FoldError, SearchSpaceError


class Slot(str, Enum):
    """How a delta binds to its site (see the module docstring)."""

    INPUT = "input"
    PARALLEL = "parallel"
    SEQUENTIAL = "sequential"


#: The order in which one site's deltas are folded: the order the slot computes them in. Parallel
#: updates read the host's original weights (HiWi reads W), input scalings then scale the columns
#: of the parallel-updated W, and sequential deltas see the whole updated output.
FOLD_ORDER = (Slot.PARALLEL, Slot.INPUT, Slot.SEQUENTIAL)

#: Why the non-mergeable types (LRA, Adapter) refuse to fold.
NOT_LINEAR = "a non-linear function of the output: cannot be folded"


@dataclasses.dataclass(frozen=True, slots=True)
class Host:
    """The frozen module a delta would fold into, and what its family allows there."""

    module: nn.Module
    where: str = ""
    """For messages, e.g. ``"llama attn.q"``."""
    can_add_bias: bool = False
    """The family can give this bias-less Linear a bias (LLaMA's ``attention_bias`` / ``mlp_bias``)."""


def host_of(model: nn.Module, site_map, site: str) -> Host:
    """A site's module, with whether its family can give it a bias (``Family.bias_flag``)."""
    s = site_map.site(site)
    flag = site_map.family.bias_flag(s.component, site_map.config)
    # the model type, not the family: a Qwen2 o_proj is refused as "qwen2 attn.o", not "llama attn.o"
    kind = getattr(site_map.config, "model_type", None) or site_map.family.name
    return Host(model.get_submodule(s.path), f"{kind} {s.component}", can_add_bias=flag is not None)


@dataclasses.dataclass(frozen=True, slots=True)
class PeftAdapter:
    """Where a delta type goes in a PEFT export."""

    name: str
    """What the export reports, e.g. ``"lora"``, ``"ln_tuning"``."""
    folder: str
    """Sub-folder of the export directory ("" for the directory itself)."""
    peft_type: str
    """PEFT's ``peft_type``, e.g. ``"LORA"``."""
    carries_head: bool
    """It can hold a trained head (``modules_to_save``); the first such adapter exported gets it."""


class Delta(nn.Module):
    """Base class of delta modules. Subclasses set the class attributes and implement the rest."""

    type_name: ClassVar[str]
    slot: ClassVar[Slot]
    site_kinds: ClassVar[frozenset[str]]
    Config: ClassVar[type]
    #: Can it be folded into the backbone's weights for zero added latency (see ``fold``)?
    mergeable: ClassVar[bool] = False
    #: Its fold adds to the host's bias, which ``merge`` creates where the family allows (LLaMA).
    needs_host_bias: ClassVar[bool] = False
    #: Its PEFT counterpart; None: PEFT has no such method (export --peft refuses it).
    peft_adapter: ClassVar[PeftAdapter | None] = None

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

    @classmethod
    def inert_at(cls, site, site_map) -> str | None:
        """Why a delta of this type at ``site`` provably cannot change the model's output (None: it
        can). Search spaces leave such candidates out: the search would only spend budget on them."""
        return None

    # -- folding (export --merge) --------------------------------------------------------------

    @classmethod
    def fold_refusal(cls, host: Host) -> str | None:
        """Why a delta of this type cannot be folded into ``host`` (None: it can). A class method:
        the ``mergeable`` search space asks it before any delta exists."""
        return None if cls.mergeable else NOT_LINEAR

    def fold_updates(self, module: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(tensor of ``module`` to change, what to add to it) at gate 1, computed from the module's
        current tensors (so all updates of one binding can be computed before any is applied)."""
        raise FoldError(f"{self.type_name}: {NOT_LINEAR}")

    def fold(self, module: nn.Module, gate: float = 1.0) -> None:
        """Fold this delta, at gate ``gate``, into ``module`` in place (PEFT's ``merge``).

        Raises:
            FoldError: the type cannot be folded, or not into this module (e.g. no bias).
        """
        why = self.fold_refusal(Host(module, type(module).__name__))
        if why is not None:
            raise FoldError(f"cannot fold {self.type_name} into this {type(module).__name__}: {why}")
        fold_all(module, [self], gate)

    # -- PEFT export -------------------------------------------------------------------------------

    @classmethod
    def peft_refusal(cls, module: nn.Module) -> str | None:
        """Why PEFT cannot hold this type on ``module`` (None: it can)."""
        return None if cls.peft_adapter is not None else f"PEFT has no counterpart of {cls.type_name}"

    @classmethod
    def peft_site_state(
        cls, module: nn.Module, deltas: Mapping[str, Delta], types: frozenset[str]
    ) -> dict[str, torch.Tensor]:
        """The adapter's tensors for one host ``module`` from the ``deltas`` (type → delta) on it that
        share this adapter; ``types``: every type present in the adapter. Called on the adapter's
        first type in registry order, which knows how its PEFT layer holds the others."""
        return {k: v for d in deltas.values() for k, v in d.peft_state(module).items()}

    def peft_state(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """This delta's tensors in PEFT's layout, keyed relative to the host module's path
        (``lora_A.weight``); ``module`` is the host, gathered. Only for types with a ``peft_adapter``."""
        raise NotImplementedError(f"PEFT has no counterpart of {self.type_name}")

    @classmethod
    def peft_config(cls, members: Sequence[tuple[str, Delta]], head: list[str] | None) -> dict[str, Any]:
        """The type's own keys of ``adapter_config.json`` for ``members`` ((module path, delta) in
        export order); ``head``: the trained head's modules if this adapter carries it, else None."""
        raise NotImplementedError(f"PEFT has no counterpart of {cls.type_name}")


@torch.no_grad()
def fold_all(module: nn.Module, deltas: Sequence[Delta], gate: float = 1.0) -> None:
    """Fold ``deltas`` (all on one site, all foldable) into ``module``, in :data:`FOLD_ORDER`."""
    for slot in FOLD_ORDER:
        # every update of one binding first, then apply them all: HiWi reads the W that LoRA or
        # PaFi on the same site would otherwise already have changed
        updates = [u for d in deltas if d.slot is slot for u in d.fold_updates(module)]
        for target, update in updates:
            target.add_((update if gate == 1.0 else update * gate).to(target.dtype))


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


#: Field metadata of a setting added after structures were written: left out of structure files
#: while it holds its default, so an older file (and the digest its trained deltas record) keeps
#: its bytes and its meaning.
ADDED_LATER = {"added_later": True}


def config_kwargs(cfg) -> dict[str, Any]:
    """The full kwargs of a config (defaults filled in, but :data:`ADDED_LATER` ones at their
    default), as written to structure files."""
    out = dataclasses.asdict(cfg)
    for f in dataclasses.fields(cfg):
        if f.metadata.get("added_later") and out[f.name] == f.default:
            del out[f.name]
    return out
