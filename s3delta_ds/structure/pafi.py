"""The backbone-wide PaFi mask: the ``density`` fraction of eligible pre-trained entries with the
smallest |θ|, computed once per backbone (data-free), saved with the backbone's config hash, and
reused by every task.

``ranking="global"`` ranks all eligible entries together (a streaming top-k: per tensor take its
k smallest, merge with the running k smallest; memory O(k) plus one tensor at a time);
``"per-matrix"`` takes the fraction of every tensor. Eligible tensors are chosen by site kind:
``linear`` (weights of every Linear site) and ``norm`` (layer-norm scales). Under ZeRO-3 each
tensor is gathered alone (``gather``), so peak memory is the largest single tensor, never the model.
``s3delta pafi-mask`` itself loads the model once on the CPU, in the dtype its checkpoint stores
(T5-XXL: 44 GB in fp32; LLaMA-2-70B: 140 GB in bf16).
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..backbones import SiteMap
from ..deltas.pafi import smallest_magnitude
from ..errors import ConfigError, StructureError
from ..util import atomic_path
from . import Budget, ModuleChoice, Structure
from .builders import Backbone

MASK_FORMAT = "s3delta-pafi-mask"
ELIGIBLE = ("linear", "norm")
PROBE_ENTRIES = 16  # masked values kept of the mask's first and last tensors (``weights_probe``)


def _eligible_sites(site_map: SiteMap, eligible: tuple[str, ...]):
    if not eligible:
        raise ConfigError(f"PaFi needs at least one eligible kind of tensor: {', '.join(ELIGIBLE)}")
    bad = sorted(set(eligible) - set(ELIGIBLE))
    if bad:
        raise ConfigError(f"PaFi eligible kinds {bad} are not supported; choose from {', '.join(ELIGIBLE)}")
    # whole attention/FFN blocks are not tensors; cross-attention is excluded like every other space
    return [s for s in site_map.sites.values() if s.dims.kind in eligible and not s.component.startswith("cross_attn")]


def compute_mask(
    model: torch.nn.Module,
    site_map: SiteMap,
    density: float,
    ranking: str = "global",
    eligible: tuple[str, ...] = ("linear",),
    gather=None,
) -> dict[str, torch.Tensor]:
    """Site → sorted flat indices of its trainable entries."""
    if not 0 < density < 1:
        raise ConfigError(f"PaFi density must be in (0, 1), got {density}")
    gather = gather or (lambda params: contextlib.nullcontext())
    sites = _eligible_sites(site_map, eligible)

    def weight(site):
        return model.get_submodule(site.path).weight

    if ranking == "per-matrix":
        out = {}
        for s in sites:
            w = weight(s)
            with gather([w]):
                out[s.name] = smallest_magnitude(w, math.ceil(density * w.numel()))
        return out
    if ranking != "global":
        raise ConfigError(f"PaFi ranking must be global or per-matrix, got {ranking!r}")
    total = sum(s.dims.in_dim * s.dims.out_dim if s.dims.kind == "linear" else s.dims.out_dim for s in sites)
    k = max(1, math.ceil(density * total))
    best = torch.empty(0)
    for s in sites:  # pass 1: the k-th smallest magnitude over all eligible entries
        w = weight(s)
        with gather([w]):
            mags = w.detach().reshape(-1).float().abs()
            cand = torch.topk(mags, min(k, mags.numel()), largest=False).values
        best = torch.topk(torch.cat([best, cand]), min(k, best.numel() + cand.numel()), largest=False).values
    threshold = float(best.max())
    below = 0
    out = {}
    for s in sites:  # pass 2: everything strictly below the threshold, then ties in site order
        w = weight(s)
        with gather([w]):
            mags = w.detach().reshape(-1).float().abs()
            strict = torch.nonzero(mags < threshold).flatten()
            ties = torch.nonzero(mags == threshold).flatten()
        below += strict.numel()
        out[s.name] = (strict, ties)
    room = k - below
    result = {}
    for name, (strict, ties) in out.items():
        take = ties[: max(0, room)]
        room -= take.numel()
        idx = torch.sort(torch.cat([strict, take])).values
        if idx.numel():
            result[name] = idx
    return result


def _probe_sites(site_map: SiteMap, mask: dict[str, torch.Tensor]) -> list[str]:
    order = [name for name in site_map.sites if name in mask]
    return list(dict.fromkeys([order[0], order[-1]])) if order else []


def weights_probe(model: torch.nn.Module, site_map: SiteMap, mask: dict[str, torch.Tensor], gather=None) -> dict:
    """Site → the pre-trained values at ``PROBE_ENTRIES`` evenly spread masked positions of the
    mask's first and last tensors.

    A config hash tells backbones apart by shape only: a checkpoint and its fine-tunes share it,
    and a mask ranked on one trains arbitrary positions of another. The masked entries are the
    smallest, where a fine-tune's changes are largest against the value, so a few of them tell the
    weights the mask was ranked on from any others (``check_weights``)."""
    gather = gather or (lambda params: contextlib.nullcontext())
    probe = {}
    for name in _probe_sites(site_map, mask):
        idx = mask[name]
        pick = idx[torch.linspace(0, idx.numel() - 1, min(PROBE_ENTRIES, idx.numel())).round().long()]
        w = model.get_submodule(site_map.site(name).path).weight
        with gather([w]):
            if not w.is_floating_point():  # a quantized tensor: no values to compare
                return {}
            probe[name] = {"index": pick.tolist(), "value": w.detach().reshape(-1)[pick].float().tolist()}
    return probe


def check_weights(
    meta: dict[str, str], model: torch.nn.Module, site_map: SiteMap, path: str | Path, gather=None
) -> None:
    """The backbone's weights are those the mask was ranked on, to the rounding of another dtype
    (bf16, or fp16's subnormals). A mask written before the probe existed is not checked.

    Raises:
        StructureError: a masked value differs, with the command that makes this backbone's mask.
    """
    if "weights_probe" not in meta:
        return
    gather = gather or (lambda params: contextlib.nullcontext())
    for name, rec in json.loads(meta["weights_probe"]).items():
        w = model.get_submodule(site_map.site(name).path).weight
        with gather([w]):
            if not w.is_floating_point():
                return
            got = w.detach().reshape(-1)[torch.tensor(rec["index"], dtype=torch.long)].float().cpu()
        want = torch.tensor(rec["value"], dtype=torch.float32)
        bad = ~torch.isclose(got, want, rtol=2**-7, atol=6e-8)
        if bad.any():
            i = int(torch.nonzero(bad)[0])
            raise StructureError(
                f"{path} was ranked on other weights than this backbone's, though its config is the same "
                f"({meta['backbone']} vs a checkpoint where {name}[{rec['index'][i]}] is {float(got[i]):.6g}, "
                f"not {want[i].item():.6g}): a fine-tune's smallest entries are not its base's. "
                "Compute this checkpoint's mask: `s3delta pafi-mask MODEL --density D -o MASK --structure OUT.json`"
            )


def save_mask(
    mask: dict[str, torch.Tensor],
    path: str | Path,
    *,
    backbone: Backbone,
    density: float,
    ranking: str,
    eligible: tuple[str, ...],
    probe: dict | None = None,
) -> Path:
    """``probe``: ``weights_probe`` of the model the mask was ranked on (checked at retrain)."""
    path = Path(path)
    meta = {
        "format": MASK_FORMAT,
        "config_hash": backbone.info.config_hash,
        "backbone": backbone.info.name_or_path,
        "density": repr(density),
        "ranking": ranking,
        "eligible": ",".join(eligible),
    }
    if probe:
        meta["weights_probe"] = json.dumps(probe)
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in mask.items()}, str(tmp), metadata=meta)
    return path


def load_mask(path: str | Path, backbone: Backbone | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The mask and its metadata; with ``backbone``, refuse a mask made for another backbone."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            mask = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - safetensors has its own error types
        raise StructureError(f"{path}: not a readable PaFi mask ({e})") from e
    if meta.get("format") != MASK_FORMAT:
        raise StructureError(f"{path}: not a PaFi mask file (format {meta.get('format')!r})")
    if backbone is not None and meta["config_hash"] != backbone.info.config_hash:
        raise StructureError(
            f"{path} was computed for {meta['backbone']} ({meta['config_hash'][:19]}...), not for "
            f"{backbone.info.name_or_path} ({backbone.info.config_hash[:19]}...): compute a mask for this backbone"
        )
    return mask, meta


def check_mask(path: str | Path, structure: Structure, backbone: Backbone) -> None:
    """Before a retrain writes anything: the mask is this backbone's, and it has, for every
    globally ranked PaFi module of ``structure``, exactly the positions the module counts.
    Reads shapes only (no tensor data).

    Raises:
        StructureError: an unreadable mask, another backbone's, or counts that disagree.
    """
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            sizes = {k: math.prod(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - safetensors has its own error types
        raise StructureError(f"{path}: not a readable PaFi mask ({e})") from e
    if meta.get("format") != MASK_FORMAT:
        raise StructureError(f"{path}: not a PaFi mask file (format {meta.get('format')!r})")
    if meta["config_hash"] != backbone.info.config_hash:
        raise StructureError(
            f"{path} was computed for {meta['backbone']}, not for {backbone.info.name_or_path}: "
            "compute a mask for this backbone"
        )
    wrong = [
        (m.site, m.kwargs.get("count"), sizes.get(m.site, 0))
        for m in structure.modules
        if m.type == "pafi" and m.kwargs.get("ranking") == "global" and sizes.get(m.site, 0) != m.kwargs.get("count")
    ]
    if wrong:
        site, want, got = wrong[0]
        raise StructureError(
            f"{path} does not match the structure's global PaFi modules: {len(wrong)} site(s) differ, e.g. "
            f"{site} counts {want} positions and the mask has {got}; make both with one "
            "`s3delta pafi-mask MODEL --density D -o MASK --structure OUT.json`"
        )


def mask_structure(backbone: Backbone, mask: dict[str, torch.Tensor], meta: dict[str, str]) -> Structure:
    """The PaFi baseline as a structure: one ``pafi`` module per site with its share of the mask."""
    density = float(meta["density"])
    modules = tuple(
        ModuleChoice(
            site, "pafi", {"density": density, "ranking": meta["ranking"], "count": int(idx.numel())}, int(idx.numel())
        )
        for site, idx in sorted(mask.items(), key=lambda kv: list(backbone.site_map.sites).index(kv[0]))
    )
    used = sum(m.params for m in modules)
    return Structure(
        kind="manual",
        backbone=backbone.info,
        budget=Budget(used / backbone.info.num_params, None, used),
        modules=modules,
        space=None,
        search={"method": "pafi", "density": density, "ranking": meta["ranking"], "eligible": meta["eligible"]},
    )


def positions_in_deltas(structure: Structure) -> dict[str, torch.Tensor] | None:
    """For loading a *trained* run without its mask file: placeholder positions for the structure's
    globally ranked PaFi modules, which the delta file's stored ``indices`` buffers then overwrite
    (``load_deltas`` refuses a file that lacks any of them). None when there are no such modules.

    Never use these to train: every placeholder position is 0 until the delta file is loaded.
    """
    sites = {m.site: m.params for m in structure.modules if m.type == "pafi" and m.kwargs.get("ranking") == "global"}
    return {site: torch.zeros(n, dtype=torch.long) for site, n in sites.items()} or None
