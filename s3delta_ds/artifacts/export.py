"""``s3delta export RUN``: a retrained structure in the formats users already load.

* ``--merge``: every mergeable delta folded into the backbone (``merge.py``), saved as a plain HF
  model (config + sharded safetensors + index) that loads with ``from_pretrained`` and no
  s3delta_ds installed. Deltas that cannot be folded are refused, or with ``--keep-unmergeable``
  written beside it (``unmerged/structure.json`` + ``unmerged/deltas.safetensors``, to attach with
  s3delta_ds on top of the merged model).
* ``--peft``: every type with a PEFT counterpart (``Delta.peft_adapter``) as one adapter of that
  type: LoRA in ``OUT`` itself (per-module ranks in ``rank_pattern``), LNFit as LN tuning in
  ``ln_tuning/``, IA3 in ``ia3/``, each loadable with ``PeftModel.from_pretrained``. PEFT cannot
  hold two types in one model: load ``ln_tuning`` and ``merge_and_unload()``, then the LoRA adapter
  (and ``merge_and_unload()``), then ``ia3`` last (on a shared site IA3 scales LoRA's update too).
  The trained head (BERT) travels in the first adapter that can hold it (LoRA, else IA3). Types
  PEFT has no method for (added bias, LRA, Adapter-at-sites, PaFi, HiWi) are listed and refused
  (``--partial`` exports the expressible part anyway).

Weights are gathered one parameter at a time (ZeRO-3: ``GatheredParameters`` per tensor), so the
whole model never sits on one rank.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file

from ..backbones.pooling import pooling_of
from ..config import ModelConfig, load_run_config
from ..deltas import DELTAS, delta_class
from ..engine import zero
from ..engine.backbone import load_backbone, resolve_source
from ..errors import CheckpointError, StructureError
from ..method.supernet import SLOT_ATTR, attach, slots
from ..run.checkpoint import load_deltas, save_deltas
from ..structure import Budget, ModuleChoice, Structure
from ..structure.builders import Backbone
from ..util import atomic_write_text
from .merge import merge, plan_merge

DEFAULT_SHARD_BYTES = 5 * 1024**3
_TASK_TYPES = {"t5": "SEQ_2_SEQ_LM", "llama": "CAUSAL_LM", "bert": "SEQ_CLS"}


def load_run(run: Path, *, ds_config: dict | None = None, full_precision_base: bool = False):
    """(model with the run's trained deltas attached, backbone, structure) from a retrain directory.

    ``full_precision_base``: load the run's checkpoint without its bitsandbytes quantization (the
    QLoRA convention for merging: deltas trained on the 4-bit base go into the original weights).
    """
    for name in ("config.yaml", "structure.json", "deltas.safetensors"):
        if not (run / name).is_file():
            raise CheckpointError(f"{run} is not a finished retrain run: {name} is missing")
    cfg = load_run_config(run / "config.yaml")
    if cfg.model.quantize and full_precision_base:
        import dataclasses

        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, quantize=None))
    structure = Structure.load(run / "structure.json")
    ds_config = ds_config or {}
    model = load_backbone(
        cfg.model,
        source=resolve_source(cfg.model),
        dtype="fp32",
        ds_config=ds_config,
        num_labels=_num_labels(cfg),
        seed=cfg.seed,
    )
    backbone = Backbone.from_model(model, cfg.model.name_or_path)
    structure.check_backbone(backbone.site_map)
    attach(model, backbone.site_map, structure.specs(), gather=zero.gathered)
    load_deltas(model, run / "deltas.safetensors", head_prefixes=backbone.family.head_modules)
    model.eval()
    return model, backbone, structure


def _check_pooling(model: nn.Module) -> None:
    """A saved HF classifier always pools the CLS token: a run trained on mean pooling would load
    and silently predict something else."""
    if pooling_of(model) == "mean":
        raise StructureError(
            f"the run's classifier pools the token states by their mean (model.pooling), which a saved "
            f"{type(model).__name__} cannot express: loaded with transformers it would pool the CLS token and "
            "predict differently. Use the run's deltas with s3delta_ds, or retrain with model.pooling=cls to export"
        )


def _family(cfg):
    from ..backbones import family_for
    from ..backbones.loading import load_config

    return family_for(load_config(resolve_source(cfg.model)))


def _num_labels(cfg) -> int | None:
    from ..data import OBJECTIVES, resolve_task

    return len(resolve_task(cfg.data).label_words) if OBJECTIVES[_family(cfg).name] == "classify" else None


def save_hf(model: nn.Module, out: Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> list[Path]:
    """Save a plain HF checkpoint, gathering one tensor at a time. Collective; rank 0 writes."""
    out.mkdir(parents=True, exist_ok=True)
    names = [(n, p) for n, p in model.named_parameters() if f".{SLOT_ATTR}." not in f".{n}"]
    persistent = set(model.state_dict().keys())
    names += [(n, b) for n, b in model.named_buffers() if n in persistent and f".{SLOT_ATTR}." not in f".{n}"]
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in names:
        with zero.gathered([t] if isinstance(t, nn.Parameter) else []):
            value = t.detach().to("cpu").clone().contiguous() if zero.rank() == 0 else None
        if value is None:
            continue
        nbytes = value.numel() * value.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = value
        size += nbytes
    files = []
    if zero.rank() == 0:
        for old in list(out.glob("model*.safetensors")) + list(out.glob("model.safetensors.index.json")):
            old.unlink()
        if len(shards) == 1:
            files = [out / "model.safetensors"]
            save_file(shards[0], str(files[0]), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards, start=1):
                path = out / f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(path), metadata={"format": "pt"})
                files.append(path)
                weight_map |= {k: path.name for k in shard}
            total = sum(v.numel() * v.element_size() for s in shards for v in s.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            atomic_write_text(out / "model.safetensors.index.json", json.dumps(index, indent=2) + "\n")
        config = model.config
        config.save_pretrained(out)
        if getattr(model, "generation_config", None) is not None and model.can_generate():
            model.generation_config.save_pretrained(out)
    zero.barrier()
    return files


def _copy_tokenizer(run: Path, out: Path) -> None:
    from ..data import load_tokenizer

    cfg = load_run_config(run / "config.yaml")
    try:
        load_tokenizer(
            _family(cfg).name, cfg.model.name_or_path, cfg.model.tokenizer, cfg.model.gguf_file
        ).save_pretrained(out)
    except Exception as e:  # noqa: BLE001 - a missing tokenizer must not lose the exported weights
        print(f"warning: tokenizer not copied ({e})")


def export_merged(
    run: Path,
    out: Path,
    *,
    keep_unmergeable: bool = False,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    ds_config: dict | None = None,
    full_precision_base: bool = False,
) -> dict:
    """Merge a retrain run into its backbone and save it. Returns a report. Collective when the
    backbone is partitioned (``ds_config`` with ZeRO stage 3)."""
    quantize = load_run_config(run / "config.yaml").model.quantize if (run / "config.yaml").is_file() else None
    if quantize and not full_precision_base:
        raise StructureError(
            f"the run's backbone is quantized ({quantize}): its packed weights cannot take merged deltas. Pass "
            "--full-precision-base to merge into the unquantized weights of the same checkpoint (the QLoRA "
            "convention; outputs then differ from the quantized run by the quantization error), or export --peft"
        )
    model, backbone, structure = load_run(run, ds_config=ds_config, full_precision_base=full_precision_base)
    _check_pooling(model)
    plan = plan_merge(model, backbone.site_map)
    if plan.kept and not keep_unmergeable:
        lines = "\n".join(f"  {site} {t}: {why}" for site, t, why in plan.kept[:20])
        more = f"\n  ... and {len(plan.kept) - 20} more" if len(plan.kept) > 20 else ""
        raise StructureError(
            f"{len(plan.kept)} of {len(structure.modules)} deltas cannot be folded into the backbone:\n{lines}{more}\n"
            "pass --keep-unmergeable to merge the rest and write these beside the model, or export --peft"
        )
    with _staged(out) as stage:
        result = _write_merged(run, model, backbone, structure, stage, max_shard_bytes)
    result["files"] = [str(out / Path(f).relative_to(stage)) for f in result["files"]]
    result["out"] = str(out)
    return result


def _write_merged(run: Path, model: nn.Module, backbone, structure: Structure, out: Path, max_shard_bytes: int) -> dict:
    report = merge(model, backbone.site_map, gather=zero.gathered)
    files = save_hf(model, out, max_shard_bytes)
    if zero.rank() == 0:
        _copy_tokenizer(run, out)
    kept = sorted({(site, t) for site, t, _ in report.kept})
    if kept:
        remaining = tuple(m for m in structure.modules if (m.site, m.type) in set(kept))
        used = sum(m.params for m in remaining)
        merged_info = Backbone.from_model(model, str(out)).info
        rest = Structure(
            kind=structure.kind,
            backbone=merged_info,
            budget=Budget(None, None, used),
            modules=tuple(ModuleChoice(m.site, m.type, m.kwargs, m.params) for m in remaining),
            space=structure.space,
            search=dict(structure.search),
            provenance={"unmerged_from": structure.digest(), "run": str(run)},
        )
        if zero.rank() == 0:
            rest.save(out / "unmerged" / "structure.json")
        # with the head (BERT), which s3delta_ds.load expects in every delta file; same values as the merged model's
        save_deltas(
            model,
            out / "unmerged" / "deltas.safetensors",
            head_prefixes=backbone.family.head_modules,
            metadata={"structure": rest.digest()},
        )
    result = {"merged": len(report.merged), "kept": [f"{s} {t}" for s, t in kept], "files": [str(f) for f in files]}
    if zero.rank() == 0:
        atomic_write_text(out / "s3delta_export.json", json.dumps(result, indent=2) + "\n")
    return result


@contextlib.contextmanager
def _staged(out: Path) -> Iterator[Path]:
    """Write an export into a hidden sibling of ``out``, renamed into place once complete: a failed
    export (a full disk, a crash) leaves no half-written ``out`` that would load as a plain model
    silently missing some deltas, and the rerun is not refused as "not empty". Collective."""
    if out.exists() and any(out.iterdir()):
        raise StructureError(f"{out} is not empty; choose a new directory")
    stage = out.parent / f".{out.name}.partial"
    if zero.rank() == 0:
        shutil.rmtree(stage, ignore_errors=True)  # a crashed export's leftovers
        stage.mkdir(parents=True)
    zero.barrier()  # every rank checked ``out`` before rank 0 writes
    try:
        yield stage
    except BaseException:
        if zero.rank() == 0:
            shutil.rmtree(stage, ignore_errors=True)
        raise
    zero.barrier()  # every rank's writes (rank 0's) are done
    if zero.rank() == 0:
        if out.exists():
            out.rmdir()  # empty: checked above
        os.replace(stage, out)
    zero.barrier()


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
    model, backbone, structure = load_run(run)
    _check_pooling(model)
    refused = _peft_refusals(model, backbone, structure)
    if refused and not partial:
        listed = "; ".join(f"{t} on {s}: {why}" for s, t, why in refused[:6])
        raise StructureError(
            f"PEFT cannot express {len(refused)} of the modules ({listed}{'; ...' if len(refused) > 6 else ''}). "
            "Use export --merge, or --partial to export the rest"
        )
    with _staged(out) as stage:
        written = _write_peft(run, model, backbone, refused, stage)
    return {
        "adapters": {name: str(out / Path(p).relative_to(stage)) for name, p in written.items()},
        "base": peft_base_name(load_run_config(run / "config.yaml").model),
        "not_exported": [f"{t} on {s}" for s, t, _ in refused],
    }


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
            "task_type": _TASK_TYPES[family.name],
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


def main(argv: list[str] | None = None) -> int:
    """``python -m s3delta_ds.artifacts.export RUN (--merge|--peft) -o OUT [--zero3]``; with ``--zero3`` under a
    launcher (deepspeed/torchrun), the backbone is loaded partitioned across the ranks and every
    tensor is gathered on its own while merging and saving."""
    import argparse
    import sys

    from ..errors import S3DeltaError

    p = argparse.ArgumentParser(prog="python -m s3delta_ds.artifacts.export")
    p.add_argument("run")
    p.add_argument("--merge", action="store_true")
    p.add_argument("--peft", action="store_true")
    p.add_argument("--keep-unmergeable", action="store_true")
    p.add_argument("--partial", action="store_true")
    p.add_argument("--zero3", action="store_true", help="load the backbone partitioned (ZeRO-3) across the ranks")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    try:
        ds_config = None
        if args.zero3:
            zero.init_distributed()
            ds_config = {
                "train_micro_batch_size_per_gpu": 1,
                "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
            }
        if args.merge:
            export_merged(
                Path(args.run), Path(args.output), keep_unmergeable=args.keep_unmergeable, ds_config=ds_config
            )
        else:
            export_peft(Path(args.run), Path(args.output), partial=args.partial)
        return 0
    except S3DeltaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        zero.destroy()


if __name__ == "__main__":
    raise SystemExit(main())
