"""``s3delta export RUN --peft``: a retrained structure as PEFT adapters.

Every type with a PEFT counterpart (``Delta.peft_adapter``) becomes one adapter of that type: LoRA
in ``OUT`` itself (per-module ranks in ``rank_pattern``), LNFit as LN tuning in ``ln_tuning/``, IA3
in ``ia3/``, each loadable with ``PeftModel.from_pretrained``. PEFT cannot hold two types in one
model: load ``ln_tuning`` and ``merge_and_unload()``, then the LoRA adapter (and, only when ``ia3``
follows, ``merge_and_unload()``), then ``ia3`` last (on a shared site IA3 scales LoRA's update
too). A LoRA adapter carrying BitFit (``lora_bias``) stays unmerged: PEFT refuses to merge it, and
has already folded the LoRA weights when it says so (BitFit beside IA3 is refused here). The
trained head (BERT) travels in the first adapter that can hold it (LoRA, else LN tuning, else
IA3), as ``modules_to_save``; only that adapter is ``SEQ_CLS``, since PEFT expects the
head inside every adapter of that task type. Types PEFT has no method for (added bias, LRA,
Adapter-at-sites, PaFi, HiWi) are listed and refused (``--partial`` exports the expressible part).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file

from ..config import ModelConfig, load_run_config
from ..deltas import DELTAS, delta_class
from ..engine import zero
from ..engine.backbone import resolve_source
from ..errors import ConfigError, StructureError
from ..method.supernet import slots
from ..structure import Structure
from ..util import atomic_write_text
from .export import _check_pooling, _staged, load_run

_TASK_TYPES = {"t5": "SEQ_2_SEQ_LM", "llama": "CAUSAL_LM", "bert": "SEQ_CLS"}


def peft_base_name(model_cfg: ModelConfig) -> str:
    """The adapters' ``base_model_name_or_path``: what ``AutoPeftModel.from_pretrained`` loads.

    A hub id (``google-t5/t5-base``) is kept as it is: resolved as a path it would name a directory
    under the working directory that does not exist. Only an existing local directory (including
    the embedded tiny models, materialised in the cache) becomes absolute, so that the adapter
    loads from any working directory.

    Args:
        model_cfg: the run's ``model`` section (from its ``config.yaml``).
    Returns:
        An absolute directory path, or the hub id verbatim.
    """
    source = resolve_source(model_cfg)
    local = Path(source).expanduser()
    return str(local.resolve()) if local.is_dir() else source


def _peft_refusals(model: nn.Module, backbone, structure: Structure) -> list[tuple[str, str, str]]:
    """(site, type, why) of every module PEFT cannot hold. Besides types without a counterpart:
    BitFit off a Linear, and BitFit beside IA3 (IA3 must be loaded after LoRA is merged, and a LoRA
    carrying a bias cannot be merged into a bias-less layer)."""
    types = {m.type for m in structure.modules}
    out = []
    for m in structure.modules:
        cls = delta_class(m.type)
        why = cls.peft_refusal(model.get_submodule(backbone.site_map.path(m.site)))
        if why is None and m.type == "bitfit" and "ia3" in types:
            why = "BitFit (LoRA's lora_bias) and IA3 cannot be stacked in PEFT's loading order"
        if why is not None:
            out.append((m.site, m.type, why))
    return out


def export_peft(run: Path, out: Path, *, partial: bool = False) -> dict:
    """Every delta with a PEFT counterpart as a PEFT adapter: LoRA (with BitFit on Linears as
    ``lora_bias``) in ``out``, LNFit (LN tuning) in ``out/ln_tuning``, IA3 in ``out/ia3`` (see the
    module docstring for the loading order). One adapter per PEFT method: a method's first type in
    registry order writes its layers (``peft_site_state``) and its config (``peft_config``)."""
    model_cfg = load_run_config(run / "config.yaml").model if (run / "config.yaml").is_file() else None
    if model_cfg is not None and model_cfg.random_init:  # (no config.yaml: load_run says what is missing)
        raise ConfigError(
            f"{run} trained on a randomly initialised backbone (model.random_init=true), and a PEFT adapter "
            f"names a checkpoint to load as its base ({model_cfg.name_or_path}), whose weights are not those: "
            "use export --merge, which writes the backbone the run trained on"
        )
    model, backbone, structure = load_run(run)
    _check_pooling(model)
    refused = _peft_refusals(model, backbone, structure)
    if refused and not partial:
        listed = "; ".join(f"{t} on {s}: {why}" for s, t, why in refused[:6])
        raise StructureError(
            f"PEFT cannot express {len(refused)} of the modules ({listed}{'; ...' if len(refused) > 6 else ''}). "
            "Use --partial to export the rest, export --merge (with --keep-unmergeable where some cannot be "
            "folded), or search a space PEFT can hold (e.g. search.space=lora; search.space=mergeable also offers "
            "PaFi and HiWi, which merge but have no PEFT method)"
        )
    base = peft_base_name(load_run_config(run / "config.yaml").model)
    num_labels = getattr(model.config, "num_labels", None) if backbone.family.head_modules else None
    with _staged(out) as stage:
        written = _write_peft(run, model, backbone, refused, stage)
        adapters = {name: str(out / Path(p).relative_to(stage)) for name, p in written.items()}
        # absolute: the code runs from wherever the user loads the model, not the export's directory
        code = loading_code(
            {k: str(Path(p).resolve()) for k, p in adapters.items()}, base, backbone.family.name, num_labels
        )
        if zero.rank() == 0:
            atomic_write_text(
                stage / "README.md",
                "# PEFT adapters exported by s3delta_ds\n\nAll of them together are the trained model; load them "
                "in this order (PEFT holds one method at a time):\n\n```python\n" + code + "```\n",
            )
    return {
        "adapters": adapters,
        "base": base,
        "load": code,
        "not_exported": [f"{t} on {s}" for s, t, _ in refused],
    }


#: The model class each family's adapters go on (what the run trained: its task class).
_AUTO_CLASSES = {
    "t5": "AutoModelForSeq2SeqLM",
    "llama": "AutoModelForCausalLM",
    "bert": "AutoModelForSequenceClassification",
}
#: PEFT's loading order: LN tuning first (merged), then LoRA, then IA3 (it scales LoRA's update on a shared site).
LOAD_ORDER = ("ln_tuning", "lora", "ia3")


def loading_code(adapters: dict[str, str], base: str, family: str, num_labels: int | None = None) -> str:
    """Python that rebuilds the trained model from ``adapters`` (name -> folder): every adapter, in
    PEFT's order, each merged before the next (PEFT holds one method at a time). One alone is not the
    trained model: loading only the LoRA folder of a LoRA + LN tuning + IA3 export left most of the
    trained change out, with no warning."""
    cls = _AUTO_CLASSES[family]
    labels = f", num_labels={num_labels}" if num_labels is not None else ""
    steps = [name for name in LOAD_ORDER if name in adapters]
    lines = ["from peft import PeftModel", f"from transformers import {cls}", ""]
    lines.append(f"model = {cls}.from_pretrained({base!r}{labels})")
    for i, name in enumerate(steps):
        merge = ".merge_and_unload()" if i < len(steps) - 1 else ""
        lines.append(f"model = PeftModel.from_pretrained(model, {adapters[name]!r}){merge}")
    return "\n".join(lines) + "\n"


def _write_peft(run: Path, model: nn.Module, backbone, refused: list, out: Path) -> dict[str, str]:
    family = backbone.family
    skip = {(site, t) for site, t, _ in refused}
    source = peft_base_name(load_run_config(run / "config.yaml").model)
    head = list(family.head_modules)
    head_left = True  # the head goes into the first adapter that can hold it
    groups: dict[str, list[str]] = {}  # adapter name -> its types, in registry order
    for type_name, cls in DELTAS.items():
        if cls.peft_adapter is not None:
            groups.setdefault(cls.peft_adapter.name, []).append(type_name)
    written = {}
    for names in groups.values():
        primary = DELTAS[names[0]]
        adapter = primary.peft_adapter
        sites = {
            site: {t: slot.deltas[t] for t in names if t in slot.deltas and (site, t) not in skip}
            for site, slot in slots(model).items()
        }
        sites = {site: ds for site, ds in sites.items() if ds}
        if not sites:
            continue
        types = frozenset(t for ds in sites.values() for t in ds)
        members = [(backbone.site_map.path(site), d) for site, ds in sites.items() for d in ds.values()]
        state = {}
        for site, ds in sites.items():
            path = backbone.site_map.path(site)
            host = model.get_submodule(path)
            # one module at a time under ZeRO-3: the host (LN tuning stores g + Δg) and its deltas
            with zero.gathered([*host.parameters(recurse=False), *(p for d in ds.values() for p in d.parameters())]):
                site_state = primary.peft_site_state(host, ds, types)
            state |= {f"base_model.model.{path}.{k}": v for k, v in site_state.items()}
        carries = adapter.carries_head and head_left
        if carries:
            head_left = False
            for name in head:
                for pname, p in model.get_submodule(name).named_parameters():
                    state[f"base_model.model.{name}.{pname}"] = p.detach().cpu().clone()
        config = {
            "peft_type": adapter.peft_type,
            # an encoder classifier's task type makes PEFT expect the head inside the adapter: only the
            # adapter that carries it may say SEQ_CLS, or loading the others fails on classifier.*
            "task_type": None if head and not carries else _TASK_TYPES[family.name],
            "base_model_name_or_path": source,
            **primary.peft_config(members, head if carries else None),
            "inference_mode": True,
        }
        _write_adapter(out / adapter.folder, config, state)
        written[adapter.name] = str(out / adapter.folder)
    if not written:
        expressible = "/".join(t for t, cls in DELTAS.items() if cls.peft_adapter is not None)
        raise StructureError(f"the structure has no {expressible} module PEFT can hold: nothing to export")
    return written


def _write_adapter(out: Path, config: dict, state: dict[str, torch.Tensor]) -> None:
    if zero.rank() != 0:
        return
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".adapter_model.safetensors.tmp"
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
    tmp.replace(out / "adapter_model.safetensors")
    atomic_write_text(out / "adapter_config.json", json.dumps(config, indent=2) + "\n")
