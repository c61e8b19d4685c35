"""Attach deltas to a frozen backbone, gated (the search supernet) or not (a fixed structure).

Each site with deltas gets one :class:`DeltaSlot` child (attribute ``s3delta``) and a forward hook
on the site's module (plus a forward pre-hook when it has input deltas); the backbone's own modules
and parameter names stay untouched, so merging, export and ZeRO-3 (which partitions the backbone
before we attach) all see the original model. With module input x the hooks compute

    x' = x  + Σ_input      z_k · D_k(x)       (pre-hook; the module runs on x')
    y1 = y0 + Σ_parallel   z_i · D_i(x')      (y0: the module's output)
    y  = y1 + Σ_sequential z_j · D_j(y1)      (sequential deltas all see y1; outputs are summed)

When the module returns a tuple (attention), only element 0 is modified. Gate values come from a
:class:`GateContext` shared by all slots: a plain object, never an ``nn.Module`` attribute holding
parameters, so ZeRO never sees or partitions the gates. ``z = None`` means ungated (z = 1).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from ..backbones import SiteMap
from ..backbones.loading import is_quantized
from ..deltas import Delta, Slot, resolve

SLOT_ATTR = "s3delta"


class GateContext:
    """The gate values of the current forward: ``z`` (num_candidates,) or None for ungated."""

    def __init__(self, z: torch.Tensor | None = None):
        self.z = z


@dataclass(frozen=True, slots=True)
class DeltaSpec:
    """One delta to attach: where, what, and (gated) its candidate index."""

    site: str
    type: str
    kwargs: Mapping[str, Any]
    gate_index: int | None = None


class DeltaSlot(nn.Module):
    """All deltas of one site. Holds the deltas as children so ZeRO treats them as modules.

    The site hooks call :meth:`forward` directly, not through ``__call__``: module hooks on a slot
    would do nothing (it owns no parameter; the deltas inside keep theirs, which ZeRO-3 needs to
    gather and reduce them), and under ZeRO-3 they cost four Python calls per slot per pass."""

    def __init__(self, site: str, ctx: GateContext | None):
        super().__init__()
        self.site = site
        self.deltas = nn.ModuleDict()
        self._gate_index: dict[str, int | None] = {}
        self._ctx = ctx
        self._order: dict[Slot, list[str]] = {binding: [] for binding in Slot}
        self._handles: list = []

    def _run(self, key: str, x: torch.Tensor) -> torch.Tensor:
        """One delta on ``x``, gated, computed in the delta's dtype and returned in ``x``'s (a host
        whose input and output dtypes differ: a half model's block that keeps an fp32 module). Read
        from the delta each call, not remembered: DeepSpeed below ZeRO-3 recasts the whole model."""
        delta = self.deltas[key]
        dtype = next(delta.parameters()).dtype
        if x.dtype == dtype or not x.is_floating_point():
            return self._scale(key, delta(x))
        return self._scale(key, delta(x.to(dtype))).to(x.dtype)

    def add(self, key: str, delta: Delta, gate_index: int | None) -> None:
        self.deltas[key] = delta
        self._gate_index[key] = gate_index
        self._order[delta.slot].append(key)

    def remove(self, key: str) -> None:
        """Drop one delta (merged into the backbone); the hooks stay until :meth:`unhook`."""
        self._order[self.deltas[key].slot].remove(key)
        del self.deltas[key]
        del self._gate_index[key]

    def _scale(self, key: str, out: torch.Tensor) -> torch.Tensor:
        ctx = self._ctx
        idx = self._gate_index[key]
        if ctx is None or ctx.z is None or idx is None:
            return out
        return out * ctx.z[idx].to(out.dtype)

    def scale_input(self, x: torch.Tensor) -> torch.Tensor:
        """x' = x + Σ z_k D_k(x) over the input deltas (all see the original x)."""
        out = x
        for key in self._order[Slot.INPUT]:
            out = out + self._run(key, x)
        return out

    def forward(self, x: torch.Tensor, y0: torch.Tensor | None = None) -> torch.Tensor:
        """y0 None: the input deltas' x' (the pre-hook); else the module output with the deltas."""
        if y0 is None:
            return self.scale_input(x)
        y = y0
        for key in self._order[Slot.PARALLEL]:  # in the output's dtype: an fp16 T5 norm reads an fp32 stream
            y = y + self._run(key, x).to(y0.dtype)
        if self._order[Slot.SEQUENTIAL]:
            y1 = y
            for key in self._order[Slot.SEQUENTIAL]:
                y = y + self._run(key, y1)
        return y

    def hook(self, module: nn.Module) -> None:
        """Become ``module.s3delta`` and hook its forward (and its input, if any delta binds there)."""
        setattr(module, SLOT_ATTR, self)
        if self._order[Slot.INPUT]:
            self._handles.append(module.register_forward_pre_hook(_input_hook(self), with_kwargs=True))
        self._handles.append(module.register_forward_hook(_hook(self), with_kwargs=True))

    def unhook(self, module: nn.Module) -> None:
        """Undo :meth:`hook`: the module is the plain backbone module again."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        delattr(module, SLOT_ATTR)


def _input_hook(slot: DeltaSlot):
    def hook(module, args, kwargs):
        if args:
            return (slot.forward(args[0]),) + args[1:], kwargs
        name = "hidden_states" if "hidden_states" in kwargs else "input"
        return args, {**kwargs, name: slot.forward(kwargs[name])}

    return hook


def _hook(slot: DeltaSlot):
    def hook(module, args, kwargs, output):
        # args are what the module ran on: x' when a pre-hook scaled the input
        x = args[0] if args else kwargs.get("hidden_states", kwargs.get("input"))
        if isinstance(output, tuple):
            return (slot.forward(x, output[0]),) + output[1:]
        return slot.forward(x, output)

    return hook


def _no_gather(params):
    return contextlib.nullcontext()


def attach(
    model: nn.Module,
    site_map: SiteMap,
    specs: Iterable[DeltaSpec],
    ctx: GateContext | None = None,
    *,
    gather=_no_gather,
    register_external=None,
    masks: Mapping[str, torch.Tensor] | None = None,
) -> list[str]:
    """Attach ``specs`` to ``model`` (in place). Returns the sites that received a slot.

    Deltas are built on the CPU in fp32 with their exact init; move/cast the model afterwards (or
    let DeepSpeed do it). Attaching twice to one site, or the same (site, type) twice, is an error.

    Deltas that depend on the frozen weights get them here: PaFi picks its positions from the site's
    weight (``gather(params)`` makes ZeRO-3-partitioned weights whole for that; ``masks`` gives
    positions from a backbone-wide PaFi mask instead), and HiWi, which reads the weight in every
    forward, is announced to ZeRO-3 with ``register_external(delta_module, param)``.
    """
    from ..errors import SearchSpaceError

    by_site: dict[str, list[DeltaSpec]] = {}
    for spec in specs:
        by_site.setdefault(spec.site, []).append(spec)
    for site_name, site_specs in by_site.items():
        site = site_map.site(site_name)
        module = model.get_submodule(site.path)
        if hasattr(module, SLOT_ATTR):
            raise SearchSpaceError(f"site {site_name!r} already has deltas attached; detach() first")
        slot = DeltaSlot(site_name, ctx)
        for spec in site_specs:
            cls, cfg, _ = resolve(spec.type, spec.kwargs, site.dims, site_name)
            if spec.type in slot.deltas:
                raise SearchSpaceError(f"delta type {spec.type!r} appears twice on site {site_name!r}")
            delta = cls(site.dims, cfg)
            try:
                _bind(delta, module, site_name, gather, register_external, masks)
            except ValueError as e:
                raise SearchSpaceError(f"{site_name}: {spec.type}: {e}") from e
            slot.add(spec.type, delta, spec.gate_index)
        slot.hook(module)
    return list(by_site)


def _bind(delta, module, site, gather, register_external, masks) -> None:
    # the tensor the delta reads: HiWi target=bias reads only the bias, never quantized
    reads = (
        "bias" if getattr(delta, "uses_base_weight", False) and getattr(delta.cfg, "target", "") == "bias" else "weight"
    )
    needs_weight = getattr(delta, "binds_to_weight", False) or getattr(delta, "uses_base_weight", False)
    if needs_weight and is_quantized(getattr(module, reads, None)):
        raise ValueError(
            "needs the full-precision weights, and this backbone is quantized (model.quantize): unset model.quantize, "
            "or search a space without pafi and hiwi (search.space=mixed) / retrain a structure without them"
        )
    if getattr(delta, "binds_to_weight", False):
        indices = None
        if getattr(delta.cfg, "ranking", "") == "global":
            if masks is None or site not in masks:
                raise ValueError("ranking=global needs the backbone's PaFi mask (s3delta pafi-mask)")
            indices = masks[site]
        with gather([module.weight]):
            delta.bind(module.weight, indices)
    if getattr(delta, "uses_base_weight", False):
        delta.bind_base(module)
        if register_external is not None:
            register_external(delta, delta.base_tensor())


def cast_deltas(model: nn.Module, dtype: torch.dtype) -> None:
    """Give every delta its host's device, and the float dtype its host computes in: the host's weight's, else ``dtype``
    (the backbone's; block sites and quantized hosts). Under ZeRO stages 0-2 DeepSpeed casts the
    whole module itself; under ZeRO-3 the backbone was created in its dtype and DeepSpeed leaves
    parameters added later (our deltas) as they are, so a bf16 run would mix dtypes in a matmul.
    Per host, not one dtype: transformers keeps some modules in fp32 in a half-precision model
    (T5's ``wo``), and a LoRA there must take fp32 inputs. A block site (T5's FFN) holding such a
    module returns fp32 too: its adapters take fp32 (a half one would overflow where the fp32
    ``wo`` was kept to avoid it), and :meth:`DeltaSlot.forward` casts any input left over.

    The device matters under ZeRO-3 and in the Python API: DeepSpeed moves a partitioned model's
    late parameters one by one but never their buffers (PaFi's ``indices``), and a model already on
    a GPU gets no ``.to`` at all. A partitioned host's ``.device`` is its rank's device; a host on
    the meta device (offloaded by accelerate) leaves the deltas where they are."""
    for module in model.modules():
        slot = getattr(module, SLOT_ATTR, None)
        if isinstance(slot, DeltaSlot):
            weight = getattr(module, "weight", None)
            own = [  # the backbone's own: no delta, of this slot or of a child site's (still fp32 here)
                p for name, p in module.named_parameters() if SLOT_ATTR not in name.split(".")
            ]
            if isinstance(weight, torch.Tensor) and weight.is_floating_point():
                chosen = weight.dtype
            else:
                wider = any(p.is_floating_point() and p.dtype.itemsize > dtype.itemsize for p in own)
                chosen = torch.float32 if wider else dtype
            device = own[0].device if own else None
            slot.to(device=None if device is None or device.type == "meta" else device, dtype=chosen)


def slots(model: nn.Module) -> dict[str, DeltaSlot]:
    """Site name → slot, for every attached slot."""
    return {m.site: m for m in model.modules() if isinstance(m, DeltaSlot)}


def detach(model: nn.Module) -> int:
    """Remove every slot and hook; the model is the plain backbone again. Returns how many."""
    count = 0
    for module in list(model.modules()):
        slot = getattr(module, SLOT_ATTR, None)
        if isinstance(slot, DeltaSlot):
            slot.unhook(module)
            count += 1
    return count


def delta_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of every delta weight, in module order."""
    return [(n, p) for n, p in model.named_parameters() if f".{SLOT_ATTR}." in f".{n}"]


def freeze_backbone(model: nn.Module, trainable_prefixes: tuple[str, ...] = ()) -> int:
    """requires_grad only for delta weights (and modules under ``trainable_prefixes``, e.g. a
    classification head). Must run before ``deepspeed.initialize``: ZeRO fixes the trainable set
    there. Returns the number of trainable elements."""
    n = 0
    for name, p in model.named_parameters():
        train = f".{SLOT_ATTR}." in f".{name}" or any(name == t or name.startswith(t + ".") for t in trainable_prefixes)
        p.requires_grad_(train)
        if train:
            n += int(getattr(p, "ds_numel", p.numel()))
    return n


def site_state_key(site: str, param_name: str) -> str:
    """Family-neutral name of a delta weight: ``{site}/{type}.{param}``, e.g.
    ``encoder.3.attn.q/lora.lora_A`` (what delta files store, independent of module paths)."""
    return f"{site}/{param_name}"


def named_delta_buffers(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(family-neutral key, buffer) of delta state that is not trained but saved (PaFi positions)."""
    return [
        (site_state_key(site, name), b)
        for site, slot in slots(model).items()
        for name, b in slot.deltas.named_buffers()
    ]


def named_delta_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(family-neutral key, parameter) of every delta weight, e.g. ``encoder.3.attn.q/lora.lora_A``."""
    return [
        (site_state_key(site, name), p)
        for site, slot in slots(model).items()
        for name, p in slot.deltas.named_parameters()
    ]
