"""``s3delta export RUN``: a retrained structure in the formats users already load.

* ``--merge``: every mergeable delta folded into the backbone (``merge.py``), saved as a plain HF
  model (config + sharded safetensors + index) that loads with ``from_pretrained`` and no
  s3delta_ds installed. Deltas that cannot be folded are refused, or with ``--keep-unmergeable``
  written beside it (``unmerged/structure.json`` + ``unmerged/deltas.safetensors``, to attach with
  s3delta_ds on top of the merged model).
* ``--peft``: PEFT adapters, see ``peft_export.py``.

Weights are gathered one parameter at a time (ZeRO-3: ``GatheredParameters`` per tensor) and
written a shard at a time, so the whole model never sits on one rank.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import socket
import traceback
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file

from ..backbones.loading import is_quantized, load_config, stored_quantization
from ..backbones.pooling import pooling_of
from ..config import load_run_config
from ..engine import zero
from ..engine.backbone import load_backbone, resolve_source
from ..errors import CheckpointError, ConfigError, S3DeltaError, StructureError
from ..method.supernet import SLOT_ATTR, attach
from ..run.checkpoint import load_deltas, save_deltas
from ..run.runtime import claim_info, is_live, live_owner, slurm_job_state
from ..structure import Budget, ModuleChoice, Structure
from ..structure.builders import Backbone
from ..structure.pafi import positions_in_deltas
from ..util import atomic_write_text
from .merge import kept_in_fp32, merge, plan_merge

DEFAULT_SHARD_BYTES = 5 * 1024**3
_STAGE_MARKER = ".s3delta-export-stage"
SAVE_DTYPES = ("auto", "fp32", "bf16", "fp16")


def load_run(run: Path, *, ds_config: dict | None = None, full_precision_base: bool = False):
    """(model with the run's trained deltas attached, backbone, structure) from a retrain directory.

    ``full_precision_base``: load the run's checkpoint without its bitsandbytes quantization (the
    QLoRA convention for merging: deltas trained on the 4-bit base go into the original weights).
    """
    if not run.is_dir():
        raise CheckpointError(f"{run} {'is not a directory' if run.exists() else 'does not exist'}: pass a retrain run")
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
    # globally ranked PaFi: the trained positions are in the delta file (load_deltas overwrites these)
    masks = positions_in_deltas(structure)
    attach(model, backbone.site_map, structure.specs(), gather=zero.gathered, masks=masks)
    head = backbone.family.head_modules
    load_deltas(model, run / "deltas.safetensors", head_prefixes=head, structure_digest=structure.digest())
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

    return family_for(load_config(resolve_source(cfg.model), cfg.model.gguf_file))


def _num_labels(cfg) -> int | None:
    from ..data import OBJECTIVES, resolve_task

    return len(resolve_task(cfg.data).label_words) if OBJECTIVES[_family(cfg).name] == "classify" else None


def save_hf(
    model: nn.Module, out: Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES, dtype: torch.dtype | None = None
) -> list[Path]:
    """Save a plain HF checkpoint, gathering one tensor at a time. Collective; rank 0 writes.

    Each shard is written as soon as it is full and then dropped, so rank 0 holds at most one
    shard (``max_shard_bytes``) of the model, never all of it: a 70B export fits a node's memory.
    ``dtype``: floating tensors are saved in it (the merge itself ran in fp32).
    """
    out.mkdir(parents=True, exist_ok=True)
    names = [(n, p) for n, p in model.named_parameters() if f".{SLOT_ATTR}." not in f".{n}"]
    persistent = set(model.state_dict().keys())
    names += [(n, b) for n, b in model.named_buffers() if n in persistent and f".{SLOT_ATTR}." not in f".{n}"]
    main = zero.rank() == 0
    keep_fp32 = kept_in_fp32(model, dtype)
    if main:
        for old in list(out.glob("model*.safetensors")) + list(out.glob("model.safetensors.index.json")):
            old.unlink()
    written: list[tuple[Path, list[str]]] = []  # numbered as they fill; renamed -of-N at the end
    shard: dict[str, torch.Tensor] = {}
    size = total = 0

    def flush() -> None:
        path = out / f".model-{len(written) + 1:05d}.safetensors.tmp"
        save_file(shard, str(path), metadata={"format": "pt"})
        written.append((path, list(shard)))
        shard.clear()

    for name, t in names:
        with zero.gathered([t] if isinstance(t, nn.Parameter) else []):
            value = t.detach().to("cpu").clone().contiguous() if main else None
        if value is None:
            continue
        if dtype is not None and value.is_floating_point() and not (keep_fp32 & set(name.split("."))):
            value = value.to(dtype)
        nbytes = value.numel() * value.element_size()
        if shard and size + nbytes > max_shard_bytes:
            flush()
            size = 0
        shard[name] = value
        size += nbytes
        total += nbytes
    files = []
    if main:
        if shard or not written:
            flush()
        if len(written) == 1:
            files = [out / "model.safetensors"]
            written[0][0].replace(files[0])
        else:
            weight_map = {}
            for i, (tmp, keys) in enumerate(written, start=1):
                path = out / f"model-{i:05d}-of-{len(written):05d}.safetensors"
                tmp.replace(path)
                files.append(path)
                weight_map |= {k: path.name for k in keys}
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            atomic_write_text(out / "model.safetensors.index.json", json.dumps(index, indent=2) + "\n")
        config = model.config
        _untie_if_separate(model, config)
        if dtype is not None:
            config.dtype = dtype  # what from_pretrained(dtype="auto") gives back
        config.save_pretrained(out)
        if getattr(model, "generation_config", None) is not None and model.can_generate():
            model.generation_config.save_pretrained(out)
    zero.barrier()
    return files


def _untie_if_separate(model: nn.Module, config) -> None:
    """A config that says the head is tied while the model holds a separate one (T5 v1.1: transformers
    5 writes ``tie_word_embeddings: true`` beside ``scale_decoder_outputs: false``) loads, under another
    transformers version or a ZeRO-3 init, with the head tied to the embedding: silently other
    logits. Say what the saved file holds."""
    get_in, get_out = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    out_emb = get_out() if get_out is not None else None
    if out_emb is None or get_in is None or not getattr(config, "tie_word_embeddings", False):
        return
    if out_emb.weight is not get_in().weight:
        config.tie_word_embeddings = False


def _copy_tokenizer(run: Path, out: Path) -> None:
    from ..data import load_tokenizer

    cfg = load_run_config(run / "config.yaml")
    try:
        load_tokenizer(
            _family(cfg).name, cfg.model.name_or_path, cfg.model.tokenizer, cfg.model.gguf_file
        ).save_pretrained(out)
    except Exception as e:  # noqa: BLE001 - a missing tokenizer must not lose the exported weights
        print(f"warning: tokenizer not copied ({e})")


def _stored_quantization(model_cfg) -> str | None:
    """How the run's checkpoint stores its weights (None for random-init and GGUF runs)."""
    if model_cfg.random_init or model_cfg.gguf_file is not None:
        return None
    return stored_quantization(load_config(model_cfg.name_or_path))


def export_merged(
    run: Path,
    out: Path,
    *,
    keep_unmergeable: bool = False,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    ds_config: dict | None = None,
    full_precision_base: bool = False,
    dtype: str = "auto",
) -> dict:
    """Merge a retrain run into its backbone and save it. Returns a report. Collective when the
    backbone is partitioned (``ds_config`` with ZeRO stage 3).

    The merge runs in fp32; ``dtype`` is what the weights are saved in: ``auto`` keeps the dtype
    the backbone checkpoint was stored in (a bf16 70B model exports as bf16, not twice its size).
    """
    if dtype not in SAVE_DTYPES:
        raise StructureError(f"export dtype must be one of {', '.join(SAVE_DTYPES)}, got {dtype!r}")
    if isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int) or max_shard_bytes < 1:
        raise ConfigError(f"max_shard_bytes must be a positive number of bytes, got {max_shard_bytes!r}")
    quantize = None
    if (run / "config.yaml").is_file():
        model_cfg = load_run_config(run / "config.yaml").model
        stored = _stored_quantization(model_cfg)
        if stored:  # --full-precision-base cannot help: there are none
            raise StructureError(
                f"the run's backbone {model_cfg.name_or_path} stores its weights quantized ({stored}), so it has no "
                "full-precision weights to merge deltas into. export --peft, and apply the adapters to the "
                "full-precision checkpoint the quantized one was made from"
            )
        quantize = model_cfg.quantize
    if quantize and not full_precision_base:
        raise StructureError(
            f"the run's backbone is quantized ({quantize}): its packed weights cannot take merged deltas. Pass "
            "--full-precision-base to merge into the unquantized weights of the same checkpoint (the QLoRA "
            "convention; outputs then differ from the quantized run by the quantization error), or export --peft"
        )
    model, backbone, structure = load_run(run, ds_config=ds_config, full_precision_base=full_precision_base)
    packed = next((name for name, p in model.named_parameters() if is_quantized(p)), None)
    if packed is not None:  # whatever the config said: adding to packed weights corrupts them
        raise StructureError(f"the backbone loaded quantized ({packed}): its packed weights cannot take merged deltas")
    _check_pooling(model)
    plan = plan_merge(model, backbone.site_map)
    if plan.kept and not keep_unmergeable:
        lines = "\n".join(f"  {site} {t}: {why}" for site, t, why in plan.kept[:20])
        more = f"\n  ... and {len(plan.kept) - 20} more" if len(plan.kept) > 20 else ""
        raise StructureError(
            f"{len(plan.kept)} of {len(structure.modules)} deltas cannot be folded into the backbone:\n{lines}{more}\n"
            "pass --keep-unmergeable to merge the rest and write these beside the model, export --peft (with "
            "--partial where PEFT cannot express some of them), or search with search.space=mergeable"
        )
    save_dtype = _save_dtype(load_run_config(run / "config.yaml"), dtype)
    with _staged(out) as stage:
        result = _write_merged(run, model, backbone, structure, stage, max_shard_bytes, save_dtype, final=out)
    result["files"] = [str(out / f) for f in result["files"]]
    result["out"] = str(out)
    return result


def _save_dtype(cfg, choice: str) -> torch.dtype:
    """The dtype merged weights are saved in: ``choice``, or for ``auto`` the checkpoint's own."""
    from ..backbones.loading import load_config
    from ..engine.backbone import DTYPES

    if choice != "auto":
        return DTYPES[choice]
    try:
        stored = getattr(load_config(resolve_source(cfg.model)), "dtype", None)
    except S3DeltaError:  # no readable config.json (a GGUF file): the merge's own precision
        stored = None
    if isinstance(stored, str):
        stored = getattr(torch, stored, None)
    return stored if stored in (torch.float32, torch.bfloat16, torch.float16) else torch.float32


def _write_merged(
    run: Path,
    model: nn.Module,
    backbone,
    structure: Structure,
    out: Path,
    max_shard_bytes: int,
    dtype: torch.dtype,
    *,
    final: Path,
) -> dict:
    """Merge and save into ``out`` (the staging folder); ``final`` is where it will live, which
    the kept deltas' structure names as their backbone."""
    narrower = dtype if dtype.itemsize < torch.float32.itemsize else None
    report = merge(model, backbone.site_map, gather=zero.gathered, saved_in=narrower)
    files = save_hf(model, out, max_shard_bytes, dtype)
    if zero.rank() == 0:
        _copy_tokenizer(run, out)
    kept = sorted({(site, t) for site, t, _ in report.kept})
    if kept:
        remaining = tuple(m for m in structure.modules if (m.site, m.type) in set(kept))
        used = sum(m.params for m in remaining)
        merged_info = Backbone.from_model(model, str(final.resolve())).info
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
    result = {
        "merged": len(report.merged),
        "kept": [f"{s} {t}" for s, t in kept],
        "files": [str(Path(f).relative_to(out)) for f in files],  # in the export folder (out is its staging name)
        "dtype": str(dtype).removeprefix("torch."),
        "update_lost_to_rounding": report.update_lost,
    }
    if zero.rank() == 0:
        atomic_write_text(out / "s3delta_export.json", json.dumps(result, indent=2) + "\n")
    return result


@contextlib.contextmanager
def _staged(out: Path) -> Iterator[Path]:
    """Write an export into a hidden sibling of ``out``, renamed into place once complete: a failed
    export (a full disk, a crash) leaves no half-written ``out`` that would load as a plain model
    silently missing some deltas, and the rerun is not refused as "not empty". Collective."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise StructureError(f"{out} is not an empty directory; choose a new one")
    stage = out.parent / f".{out.name}.partial"
    refused = _on_rank_0(_open_stage, stage, out)  # every rank raises rank 0's refusal, none waits for it
    if refused:
        raise StructureError(refused)
    try:
        yield stage
    except BaseException:
        if zero.rank() == 0:
            shutil.rmtree(stage, ignore_errors=True)
        raise
    zero.barrier()  # every rank's writes (rank 0's) are done
    refused = _on_rank_0(_close_stage, stage, out)
    if refused:
        raise StructureError(refused)


def _on_rank_0(step, stage: Path, out: Path) -> str | None:
    """``step`` on rank 0 (the one that writes); its refusal, or its error (a permission, a full
    disk), reaches every rank, so none waits in the next collective for a rank that raised."""
    said = None
    if zero.rank() == 0:
        try:
            said = step(stage, out)
        except Exception as e:  # any: a rank that raised alone would leave the others in the broadcast
            if not isinstance(e, OSError):  # not the disk's: a bug, whose traceback must not be lost
                traceback.print_exc()
            said = f"{out}: {type(e).__name__}: {e}"
    return zero.broadcast_object(said)


def _open_stage(stage: Path, out: Path) -> str | None:
    """Rank 0: create ``stage``, claimed by this process (its marker holds ``claim_info``). Returns
    why it cannot (None: created). A crashed export's leftovers are removed; a stage another live
    export writes is not: removing it mixed two exports' shards in one folder. A stage claimed on
    another host is removed only when squeue answers that its job has ended: nothing else here can
    tell whether a process there still writes it."""
    if stage.exists():
        try:
            text = (stage / _STAGE_MARKER).read_bytes().decode(errors="replace")
        except OSError:
            return (
                f"{stage} exists without an export's marker: another export may be starting, or it is not an "
                "unfinished export of s3delta_ds; move it away if no export is running"
            )
        try:
            claim = json.loads(text)
        except ValueError:
            claim = {}  # an older version's marker: a crash's
        claim = claim if isinstance(claim, dict) else {}
        refused = _stage_owner(claim, stage, out)
        if refused:
            return refused
        shutil.rmtree(stage)
    try:
        stage.mkdir(parents=True)
    except FileExistsError:
        return f"another export started writing {out} (through {stage}) a moment ago: choose another directory"
    try:
        atomic_write_text(stage / _STAGE_MARKER, json.dumps(claim_info()) + "\n")
    except BaseException:  # a stage without its marker would be refused as someone else's on the rerun
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return None


def _stage_owner(claim: dict, stage: Path, out: Path) -> str | None:
    """Why a stage with this marker's claim must stay (another export may write it), or None when
    it is a crash's leftovers."""
    host, job = claim.get("host"), claim.get("slurm_job_id")
    if host is None or host == socket.gethostname():  # an older marker, or this host: the process decides
        owner = live_owner({**claim, "slurm_job_id": None})  # two exports in one Slurm job share its id
    else:
        state = slurm_job_state(job) if job and job != os.environ.get("SLURM_JOB_ID") else None
        if state is None:  # this job on another node, no Slurm, or squeue cannot answer
            where = (
                "in this Slurm job"
                if job == os.environ.get("SLURM_JOB_ID")
                else f"Slurm job {job}"
                if job
                else "outside Slurm"
            )
            return (
                f"{stage} belongs to an export on {host} ({where}, pid {claim.get('pid')}), which this host cannot "
                f"check: if it has ended, remove {stage}; if not, wait for it or choose another directory than {out}"
            )
        owner = f"Slurm job {job} ({state})" if is_live(state) else None
    return (
        f"another export ({owner}) is writing {out} (through {stage}): wait for it, or choose another one"
        if owner
        else None
    )


def _close_stage(stage: Path, out: Path) -> str | None:
    """Rank 0: rename the finished ``stage`` to ``out``. Returns why it cannot (None: done)."""
    if out.exists():
        try:
            out.rmdir()  # empty when checked before the export
        except OSError:
            shutil.rmtree(stage, ignore_errors=True)
            return f"{out} was filled by something else while this export ran; choose a new directory"
    os.replace(stage, out)
    # the marker goes last: a rename that fails leaves a stage the rerun may still clear
    (out / _STAGE_MARKER).unlink()
    return None


LOST_WARNING = 0.1
"""Warn when the saved dtype's rounding takes more than this share of the merged update (bf16 on a
LoRA with ‖ΔW‖/‖W‖ = 1e-2 loses ~17%, at 1e-3 ~78%)."""


def rounding_warning(result: dict) -> str | None:
    """The warning for an ``export_merged`` result whose saved dtype lost much of the update."""
    lost = result.get("update_lost_to_rounding")
    if lost is None or lost <= LOST_WARNING:
        return None
    return (
        f"warning: saved in {result['dtype']}, the merged weights differ from W + ΔW by {100 * lost:.0f}% of the "
        f"trained update ΔW ({result['dtype']} rounding of W + ΔW, norms over the merged tensors): the merged model "
        "is not quite the one you trained. --dtype fp32 keeps it (twice the size); s3delta_ds.load on the run, or "
        "export --peft, keeps the deltas apart"
    )


def check_mode_flags(args) -> None:
    """Refuse a flag of the other mode (``--partial`` with ``--merge``, ``--dtype`` with ``--peft``
    ...): accepted and ignored, it would look as if it had worked.

    Raises:
        ConfigError: the flag and the mode it does not apply to.
    """
    for flag, on, mode in (
        ("--partial", args.partial, "merge"),
        ("--keep-unmergeable", args.keep_unmergeable, "peft"),
        ("--full-precision-base", args.full_precision_base, "peft"),
        ("--dtype", args.dtype != "auto", "peft"),
        ("--max-shard-gb", args.max_shard_gb is not None, "peft"),
    ):
        if on and getattr(args, mode):
            raise ConfigError(f"{flag} does not apply to --{mode} (see s3delta export --help)")
    shard_bytes(args.max_shard_gb)


def shard_bytes(gb: float | None) -> int:
    """``--max-shard-gb`` in bytes (None: the default 5 GiB).

    Raises:
        ConfigError: not a positive finite size (0 or -1 wrote one file per tensor)."""
    if gb is None:
        return DEFAULT_SHARD_BYTES
    if not math.isfinite(gb) or gb <= 0 or int(gb * 1024**3) < 1:
        raise ConfigError(f"--max-shard-gb must be a positive size in GiB, e.g. 5 or 0.5, got {gb:g}")
    return int(gb * 1024**3)


def main(argv: list[str] | None = None) -> int:
    """``python -m s3delta_ds.artifacts.export RUN (--merge|--peft) -o OUT [--zero3]``; with ``--zero3`` under a
    launcher (deepspeed/torchrun), the backbone is loaded partitioned across the ranks and every
    tensor is gathered on its own while merging and saving."""
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="python -m s3delta_ds.artifacts.export")
    p.add_argument("run")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--merge", action="store_true")
    mode.add_argument("--peft", action="store_true")
    p.add_argument("--keep-unmergeable", action="store_true")
    p.add_argument("--partial", action="store_true")
    p.add_argument("--zero3", action="store_true", help="load the backbone partitioned (ZeRO-3) across the ranks")
    p.add_argument("--full-precision-base", action="store_true")
    p.add_argument("--max-shard-gb", type=float, default=None)
    p.add_argument("--dtype", choices=SAVE_DTYPES, default="auto")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    try:
        check_mode_flags(args)
        if args.zero3 and args.peft:
            raise ConfigError("--zero3 applies to --merge (a PEFT export loads no partitioned backbone)")
        ds_config = None
        if args.zero3:
            zero.init_distributed()
            ds_config = {
                "train_micro_batch_size_per_gpu": 1,
                "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
            }
        if args.merge:
            result = export_merged(
                Path(args.run),
                Path(args.output),
                keep_unmergeable=args.keep_unmergeable,
                ds_config=ds_config,
                full_precision_base=args.full_precision_base,
                max_shard_bytes=shard_bytes(args.max_shard_gb),
                dtype=args.dtype,
            )
            warning = rounding_warning(result)
            if warning and zero.rank() == 0:
                print(warning, file=sys.stderr)
        else:
            from .peft_export import export_peft

            export_peft(Path(args.run), Path(args.output), partial=args.partial)
        return 0
    except S3DeltaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        zero.destroy()


if __name__ == "__main__":
    raise SystemExit(main())
