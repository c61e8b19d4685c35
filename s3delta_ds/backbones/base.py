"""Family-neutral *sites*: where a delta can go, named independently of a backbone's module paths.

A site name is ``{stack}.{layer}.{component}`` (``encoder.3.attn.q``, ``decoder.11.mlp.up``) or
``{stack}.{component}`` for per-stack modules (``encoder.final_norm``). Each family maps its
components to module paths; :class:`SiteMap` applies that mapping to one concrete model (real,
meta-device or ZeRO-3-partitioned) and maps both ways. Transfer across sizes is then a function
on (stack, relative depth, component), with no module paths involved.
"""

from __future__ import annotations

import difflib
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch.nn as nn

from ..errors import BackboneError, SearchSpaceError

_SITE_RE = re.compile(r"^(?P<stack>[a-z_]+)\.(?:(?P<layer>\d+)\.)?(?P<component>[a-z_]+(?:\.[a-z_]+)*)$")


@dataclass(frozen=True, slots=True)
class SiteDims:
    """What a delta needs to know about the module it modifies.

    ``kind`` is ``"linear"`` (an ``nn.Linear``: in → out), ``"norm"`` (a layer norm or RMSNorm of
    width ``out_dim``) or ``"block"`` (a whole attention / FFN sublayer whose output is ``out_dim``
    wide; only sequential deltas fit there).
    """

    kind: str
    in_dim: int
    out_dim: int
    norm: str | None = None  # "rms" | "layer" for kind == "norm"
    eps: float | None = None


@dataclass(frozen=True, slots=True)
class Site:
    """One place in one backbone where deltas can be attached."""

    name: str
    path: str
    stack: str
    layer: int | None
    component: str
    dims: SiteDims


def parse_site(name: str) -> tuple[str, int | None, str]:
    """Split ``"decoder.5.attn.q"`` into ``("decoder", 5, "attn.q")``.

    Raises:
        SearchSpaceError: the name is not of the form ``stack[.layer].component``.
    """
    m = _SITE_RE.match(name) if isinstance(name, str) else None
    if m is None:
        raise SearchSpaceError(
            f"malformed site name {name!r}: expected 'stack.layer.component' (e.g. 'encoder.3.attn.q') "
            "or 'stack.component' (e.g. 'encoder.final_norm')"
        )
    layer = m.group("layer")
    return m.group("stack"), None if layer is None else int(layer), m.group("component")


def format_site(stack: str, layer: int | None, component: str) -> str:
    return f"{stack}.{component}" if layer is None else f"{stack}.{layer}.{component}"


class Family(ABC):
    """How one architecture family lays out its stacks, layers and delta sites.

    Paths returned here are relative to the *base model* (``T5ForConditionalGeneration`` is its own
    base; ``LlamaForCausalLM`` keeps it under ``model.``): :class:`SiteMap` finds the prefix.
    """

    name: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]
    #: Role → components. Search spaces are written in roles so one space fits every family.
    #: Roles: attn.proj, cross_attn.proj, mlp.in, mlp.out, norm, attn.block, mlp.block.
    role_names: ClassVar[tuple[str, ...]] = (
        "attn.proj",
        "cross_attn.proj",
        "mlp.in",
        "mlp.out",
        "norm",
        "attn.block",
        "mlp.block",
    )

    @abstractmethod
    def stacks(self, config) -> dict[str, tuple[str, int]]:
        """Stack name → (path of its layer list, number of layers)."""

    @abstractmethod
    def layer_components(self, stack: str, config) -> dict[str, str]:
        """Component → path relative to one layer, in canonical order."""

    @abstractmethod
    def stack_components(self, stack: str, config) -> dict[str, str]:
        """Per-stack component (e.g. ``final_norm``) → path relative to the base model."""

    @abstractmethod
    def roles(self, config) -> dict[str, tuple[str, ...]]:
        """Role → the components that play it in this family (see ``role_names``)."""

    @abstractmethod
    def hidden_size(self, config) -> int:
        """Width of the residual stream (the output width of whole attention/FFN blocks)."""

    @abstractmethod
    def auto_model_class(self):
        """The ``transformers`` Auto class that builds the training model of this family."""

    def bias_flag(self, component: str, config) -> str | None:
        """The config flag that gives this bias-less Linear component a bias that ``from_pretrained``
        reloads (LLaMA's ``attention_bias`` / ``mlp_bias``), or None: where BitFit can fold."""
        return None

    def key_shift_invariant(self, config) -> bool:
        """Does attention ignore a constant added to every key? q·(k + b) = q·k + q·b shifts all of a
        query's scores by the same amount, which softmax cancels, unless positions act on keys after
        the projection (rotary embeddings, key-side relative terms). False unless a family knows."""
        return False

    def model_class(self, config):
        """The class that builds ``config``'s training model with the parameter sharing of its
        checkpoints (``from_config`` and ``from_pretrained`` alike); the Auto class unless the
        family knows better (T5 v1.1: see ``backbones.t5``)."""
        return self.auto_model_class()

    #: Module paths (relative to the *top* model) that are trained whatever the structure, e.g. a
    #: freshly initialised classification head. Not counted in the delta budget.
    head_modules: ClassVar[tuple[str, ...]] = ()

    def describe(self) -> str:
        return f"{self.name} (model_type {', '.join(self.model_types)})"


def _norm_dims(module: nn.Module) -> SiteDims:
    weight = getattr(module, "weight", None)
    if weight is None:
        raise BackboneError(f"norm module {type(module).__name__} has no weight")
    shape = tuple(getattr(weight, "ds_shape", weight.shape))  # ZeRO-3 keeps the real shape in ds_shape
    if isinstance(module, nn.LayerNorm):
        return SiteDims("norm", shape[-1], shape[-1], norm="layer", eps=float(module.eps))
    eps = getattr(module, "variance_epsilon", None)
    if eps is None:
        eps = getattr(module, "eps", None)
    if eps is None:  # nn.RMSNorm(eps=None) uses the dtype's machine epsilon; 1e-6 is what HF norms use
        eps = 1e-6
    return SiteDims("norm", shape[-1], shape[-1], norm="rms", eps=float(eps))


def module_dims(module: nn.Module, component: str, hidden_size: int) -> SiteDims:
    """Read a site's dimensions from the module itself (never from a partitioned ``weight.shape``)."""
    if isinstance(module, nn.Linear):
        return SiteDims("linear", module.in_features, module.out_features)
    if component.endswith("norm"):
        return _norm_dims(module)
    return SiteDims("block", hidden_size, hidden_size)


def base_prefix(model: nn.Module, family: Family, config) -> str:
    """Where the family's base-model paths start inside ``model`` ("" or e.g. "model.")."""
    first_stack = next(iter(family.stacks(config).values()))[0]
    candidates = [""]
    prefix_attr = getattr(model, "base_model_prefix", "")
    if prefix_attr:
        candidates.append(prefix_attr + ".")
    for prefix in candidates:
        try:
            model.get_submodule(prefix + first_stack)
            return prefix
        except AttributeError:
            continue
    raise BackboneError(
        f"{type(model).__name__} does not look like a {family.name} model: no module at "
        f"{' or '.join(repr(c + first_stack) for c in candidates)}"
    )


class SiteMap:
    """All sites of one concrete model, with the mapping site name ↔ module path.

    Build it from any instance: a real model, one on the meta device, or one whose weights ZeRO-3
    has partitioned (dimensions come from ``in_features`` / ``ds_shape``, never from empty tensors).
    """

    def __init__(self, model: nn.Module, family: Family, config=None):
        self.family = family
        self.config = config if config is not None else model.config
        self.prefix = base_prefix(model, family, self.config)
        hidden = family.hidden_size(self.config)
        self.sites: dict[str, Site] = {}
        self.depths: dict[str, int] = {}
        for stack, (layers_path, depth) in family.stacks(self.config).items():
            try:
                model.get_submodule(self.prefix + layers_path)
            except AttributeError:
                continue  # e.g. T5EncoderModel has no decoder stack
            self.depths[stack] = depth
            components = family.layer_components(stack, self.config)
            for layer in range(depth):
                for component, rel in components.items():
                    self._add(model, stack, layer, component, f"{self.prefix}{layers_path}.{layer}.{rel}", hidden)
            for component, rel in family.stack_components(stack, self.config).items():
                self._add(model, stack, None, component, self.prefix + rel, hidden)
        self._by_path = {s.path: s.name for s in self.sites.values()}
        self._roles = family.roles(self.config)

    def _add(self, model, stack, layer, component, path, hidden):
        try:
            module = model.get_submodule(path)
        except AttributeError as e:
            raise BackboneError(
                f"{self.family.name} family expects a module at {path!r} for site "
                f"{format_site(stack, layer, component)!r}, but {type(model).__name__} has none"
            ) from e
        name = format_site(stack, layer, component)
        self.sites[name] = Site(name, path, stack, layer, component, module_dims(module, component, hidden))

    def __len__(self) -> int:
        return len(self.sites)

    def __contains__(self, name: str) -> bool:
        return name in self.sites

    def site(self, name: str) -> Site:
        """The site called ``name``.

        Raises:
            SearchSpaceError: no such site on this backbone (the message suggests close names).
        """
        try:
            return self.sites[name]
        except KeyError:
            parse_site(name)  # a malformed name gets the format message instead
            close = difflib.get_close_matches(name, self.sites, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            depths = ", ".join(f"{s}: {d} layers" for s, d in self.depths.items())
            raise SearchSpaceError(
                f"unknown site {name!r} on this {self.family.name} backbone ({depths}){hint}"
            ) from None

    def path(self, name: str) -> str:
        return self.site(name).path

    def name_of(self, path: str) -> str:
        """The site name of a module path (inverse of :meth:`path`)."""
        try:
            return self._by_path[path]
        except KeyError:
            raise SearchSpaceError(f"module {path!r} is not a delta site of this {self.family.name} backbone") from None

    def components_for(self, role: str) -> tuple[str, ...]:
        if role not in self.family.role_names:
            raise SearchSpaceError(f"unknown role {role!r}; roles are {', '.join(self.family.role_names)}")
        return self._roles.get(role, ())
