"""Delta files and resumable run checkpoints.

* Delta files: only the trained weights, gathered from ZeRO-3 partitions and written as
  safetensors on rank 0 under family-neutral keys (``encoder.3.attn.q/lora.lora_A``), then read
  back and checked tensor by tensor: a file missing a tensor or holding an empty one is an error,
  not a 40-byte surprise.
* Run checkpoints: one file any world size can resume from (``state.pt``, written atomically by
  rank 0): the trainable weights and their AdamW moments and step as full fp32 tensors (gathered
  from ZeRO's partitions), the delta LR schedule, the recipe's client state (gate logits and their
  optimizer, data positions, the loop state), every rank's RNG state, and the writer's batch
  geometry. Never the frozen backbone: resume reloads it from its source. On another number of
  ranks, ``resume_grad_accum`` keeps the global batch (docs/multinode.md). A checkpoint counts only
  once its ``COMPLETE`` marker exists (written after the state file). It also keeps the outputs a
  recipe writes between checkpoints (the retrain's best-step deltas), as they were at its step:
  ``restore_checkpoint_files`` puts them back on resume, so a launch killed after writing a newer
  one cannot leave a file that the resumed run's state does not describe.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from ..backbones.pooling import pooling_of
from ..config import TrainConfig
from ..data.batches import accumulation_for
from ..engine import zero
from ..errors import CheckpointError
from ..method.supernet import named_delta_buffers, named_delta_parameters
from ..util import atomic_path, atomic_write_text, fsync_dir

DELTA_FORMAT = "s3delta-deltas"
COMPLETE = "COMPLETE"
CHECKPOINTS = "checkpoints"  # the folder of a run's output directory that holds its checkpoints
RUN_FORMAT = "s3delta-run-checkpoint"
STATE_FILE = "state.pt"


def trainable_named(model: nn.Module, head_prefixes: tuple[str, ...] = ()) -> list[tuple[str, nn.Parameter]]:
    """Delta weights (family-neutral keys) plus any always-trained head (``head/<module path>``)."""
    out = named_delta_parameters(model)
    for name, p in model.named_parameters():
        if any(name == h or name.startswith(h + ".") for h in head_prefixes):
            out.append((f"head/{name}", p))
    return out


def _full_shape(p: torch.Tensor) -> tuple[int, ...]:
    return tuple(getattr(p, "ds_shape", p.shape))


def save_deltas(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    head_prefixes: tuple[str, ...] = (),
    metadata: dict[str, str] | None = None,
) -> Path | None:
    """Gather the trained weights and write them on rank 0 (atomically). Collective: call on every rank.

    Returns the path on rank 0, None elsewhere.

    Raises:
        CheckpointError: the written file does not hold every expected tensor with its full shape.
    """
    named = trainable_named(model, head_prefixes)
    if not named:
        raise CheckpointError("no trainable weights to save")
    path = Path(path)
    buffers = named_delta_buffers(model)  # never partitioned: the same on every rank
    with zero.gathered([p for _, p in named]):
        state = {k: p.detach().to("cpu", torch.float32).clone() for k, p in named} if zero.rank() == 0 else None
    if state is not None:
        state.update({k: b.detach().cpu().clone() for k, b in buffers})
    if zero.rank() == 0:
        # how the head pools (BERT): loading the deltas into a model that pools otherwise would silently
        # predict something else (s3delta_ds.load reads it back)
        pooling = {"pooling": pooling_of(model)} if head_prefixes else {}
        meta = {"format": DELTA_FORMAT, "version": "1", **pooling, **(metadata or {})}
        with atomic_path(path) as tmp:  # verified before it replaces anything
            save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata=meta)
            verify_delta_file(tmp, {k: _full_shape(p) for k, p in [*named, *buffers]})
    zero.barrier()
    return path if zero.rank() == 0 else None


def verify_delta_file(path: str | os.PathLike, expected: dict[str, tuple[int, ...]]) -> None:
    """Every expected tensor present, with its full shape, non-empty; nothing unexpected."""
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for corrupt files
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
    missing = sorted(set(expected) - keys)
    extra = sorted(keys - set(expected))
    if missing or extra:
        raise CheckpointError(
            f"{path}: missing tensors {missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected {extra[:5]}"
        )
    for k, shape in expected.items():
        if shapes[k] != tuple(shape) or int(np.prod(shapes[k])) == 0:
            raise CheckpointError(f"{path}: tensor {k} has shape {shapes[k]}, expected {tuple(shape)}")


def read_delta_metadata(path: str | os.PathLike) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def load_deltas(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    head_prefixes: tuple[str, ...] = (),
    structure_digest: str | None = None,
) -> int:
    """Load a delta file into a model with the same structure attached (ZeRO-3 aware). Returns #tensors.

    ``structure_digest``: the attached structure's ``Structure.digest()``, checked against the one the
    retrain recorded in the file. Shapes alone pass a structure that differs in a setting that has
    none (LoRA's alpha, a dropout, an activation), and every output would change.

    Raises:
        CheckpointError: another format, shapes, or structure than the model's.
    """
    named = trainable_named(model, head_prefixes)
    buffers = named_delta_buffers(model)
    verify_delta_file(path, {k: _full_shape(p) for k, p in [*named, *buffers]})
    meta = read_delta_metadata(path)
    if meta.get("format") != DELTA_FORMAT:
        raise CheckpointError(f"{path}: not an s3delta delta file (format {meta.get('format')!r})")
    recorded = meta.get("structure")
    if structure_digest is not None and recorded is not None and recorded != structure_digest:
        raise CheckpointError(
            f"{path} was trained with another structure ({recorded[:19]}...) than the one given "
            f"({structure_digest[:19]}...): its shapes match, but a setting without a shape (e.g. LoRA's alpha) "
            "differs. Load it with the structure.json of its own run"
        )
    with safe_open(str(path), framework="pt") as f:
        values = {k: f.get_tensor(k) for k in f.keys()}
    # training refuses a non-finite loss, so NaN here is a damaged file: merged, it would write NaN
    # into every weight the delta touches, and exit 0
    broken = [k for k, v in values.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if broken:
        shown = ", ".join(broken[:3]) + (f" and {len(broken) - 3} more" if len(broken) > 3 else "")
        raise CheckpointError(f"{path}: non-finite values (NaN or inf) in {shown}: the file is damaged")
    params = [p for _, p in named]
    with zero.gathered(params, modifier_rank=0), torch.no_grad():
        for k, p in named:
            p.copy_(values[k].to(p.dtype))
        for k, b in buffers:
            b.copy_(values[k].to(b.dtype))
    return len(named)


# -- run checkpoints -----------------------------------------------------------------------------


def _tag(step: int) -> str:
    return f"step-{step:08d}"


def geometry(tc: TrainConfig, world: int) -> dict[str, int]:
    """The batch geometry a checkpoint records: global batch = micro_batch × grad_accum × world."""
    return {
        "world": world,
        "micro_batch": tc.micro_batch_size,
        "grad_accum": tc.grad_accum,
        "global_batch": tc.micro_batch_size * tc.grad_accum * world,
    }


def _trainable(engine) -> tuple[list[str], list[torch.nn.Parameter]]:
    """The engine's trainable parameters in its own order, with names that no world size changes."""
    named = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
    return [n for n, _ in named], [p for _, p in named]


def _rng_state() -> dict:
    cpu, accelerator = zero.rng_state()
    return {"torch": cpu, "accelerator": accelerator, "python": random.getstate(), "numpy": np.random.get_state()}


def _set_rng_state(rng: dict) -> None:
    zero.set_rng_state((rng["torch"], rng["accelerator"]))
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])


def save_run_checkpoint(
    engine,
    root: str | os.PathLike,
    step: int,
    client_state: dict,
    *,
    batch: dict[str, int],
    keep: int = 2,
    files: tuple[Path, ...] = (),
) -> Path:
    """Write ``root/step-XXXXXXXX/state.pt`` (see the module docstring) and mark it complete; prune
    all but the ``keep`` newest. Collective (the gathers of ZeRO's partitions).

    Args:
        client_state: the recipe's state, the same on every rank (rank 0's is written).
        batch: the writer's :func:`geometry`.
        files: outputs to keep as they are now (those that exist), by name: hard links (the
            writers replace files atomically, so a link keeps this version), copies across devices.
    """
    root, tag = Path(root), _tag(step)
    names, params = _trainable(engine)
    trainable = zero.trainable_state(engine, params)  # full tensors on every rank
    rngs = zero.all_gather_object(_rng_state())
    if zero.rank() == 0:
        state = {
            "format": RUN_FORMAT,
            "version": 1,
            "step": step,
            "batch": batch,
            "names": names,
            "trainable": trainable,
            "client": client_state,
            "rng": rngs,
        }
        # On disk before COMPLETE names it complete: after a node crash, COMPLETE next to a torn
        # state file would make the newest checkpoint unreadable.
        with atomic_path(root / tag / STATE_FILE) as tmp, open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        for f in (Path(f) for f in files):
            _keep_copy(f, root / tag / f.name)
        fsync_dir(root / tag)
        kept = [Path(f).name for f in files]  # also those that did not exist yet: resume removes them
        atomic_write_text(root / tag / COMPLETE, json.dumps({"step": step, **batch, "files": kept}))
        fsync_dir(root / tag)
        fsync_dir(root)  # the new step folder's own entry, before older ones go
        for old in sorted(p for p in root.glob("step-*") if (p / COMPLETE).exists())[:-keep]:
            (old / COMPLETE).unlink()  # first: a crash mid-delete must not leave COMPLETE beside a partial folder
            shutil.rmtree(old, ignore_errors=True)
        # older folders a crash left torn (a save before COMPLETE, a prune mid-delete): never read
        # again, since a newer complete one exists
        for torn in (p for p in root.glob("step-*") if p.name < tag and not (p / COMPLETE).exists()):
            shutil.rmtree(torn, ignore_errors=True)
    zero.barrier()
    return root / tag


def _keep_copy(src: Path, dst: Path) -> None:
    """``dst`` becomes this version of ``src`` (nothing when ``src`` does not exist), atomically."""
    if not src.exists():
        dst.unlink(missing_ok=True)
        return
    with atomic_path(dst) as tmp:
        tmp.unlink()
        try:
            os.link(src, tmp)
        except OSError:  # another file system, or no hard links there
            shutil.copy2(src, tmp)
        # its contents on disk before COMPLETE names the checkpoint complete, as the state file's: the
        # file was written through the page cache, and a node crash could leave it torn
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def restore_checkpoint_files(ckpt: Path, files: tuple[Path, ...]) -> None:
    """Put the outputs ``ckpt`` kept (``save_run_checkpoint(files=...)``) back in place, and remove
    those it was asked to keep but did not have: the run had not written them yet at that step. A
    checkpoint of an older s3delta_ds kept none and leaves every file as it is. Rank 0's job."""
    listed = json.loads((ckpt / COMPLETE).read_text()).get("files")
    for f in (Path(f) for f in files):
        if listed is not None and f.name in listed:
            _keep_copy(ckpt / f.name, f)


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    complete = sorted(p for p in Path(root).glob("step-*") if (p / COMPLETE).exists())
    return complete[-1] if complete else None


def resume_grad_accum(root: str | os.PathLike, tc: TrainConfig, world: int, section: str) -> tuple[int, str | None]:
    """The gradient accumulation that resumes the newest checkpoint under ``root`` on ``world``
    ranks with the global batch it was written with, and the line to print when the world size or
    the accumulation changes (None otherwise, and when there is no checkpoint to resume).

    Raises:
        ConfigError: no accumulation keeps the global batch (see ``accumulation_for``).
    """
    ckpt = latest_checkpoint(root)
    info = json.loads((ckpt / COMPLETE).read_text()) if ckpt else {}
    if "global_batch" not in info:  # nothing to resume, or a checkpoint of an older version
        return tc.grad_accum, None
    g, n = info["global_batch"], info["world"]
    acc = accumulation_for(g, tc.micro_batch_size, world, written_by=n, section=section)
    if n == world and acc == tc.grad_accum:
        return acc, None
    change = f"{section}.grad_accum {tc.grad_accum} -> {acc}" if acc != tc.grad_accum else f"{section}.grad_accum {acc}"
    return acc, (
        f"resuming {ckpt.name} of {n} rank(s) on {world}: {change} keeps the global batch {g} "
        f"(micro_batch {tc.micro_batch_size} x grad_accum {acc} x {world} ranks)"
    )


def load_run_checkpoint(engine, root: str | os.PathLike) -> dict:
    """Restore the newest complete checkpoint into ``engine`` (written on any number of ranks, any
    ZeRO stage); returns its client state. Collective.

    Rank r takes the RNG state of the writer's rank r (of rank r mod N when the writer had N < r + 1
    ranks): the data order and the gate samples depend on the seed and step alone, so only
    randomness inside the forward (dropout) could tell the difference.

    Raises:
        CheckpointError: no complete checkpoint, one of another format, or one whose trainable
            parameters differ from this run's; an older checkpoint without a state file written
            by a different number of ranks.
    """
    ckpt = latest_checkpoint(root)
    if ckpt is None:
        raise CheckpointError(f"no complete checkpoint under {root} to resume from")
    if not (ckpt / STATE_FILE).exists():
        return _load_engine_checkpoint(engine, ckpt)
    try:
        state = torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - torch.load raises EOFError, RuntimeError, UnpicklingError...
        older = sorted(p for p in Path(root).glob("step-*") if (p / COMPLETE).exists())[:-1]
        fallback = f"; remove {ckpt} to resume from {older[-1].name}" if older else ""
        raise CheckpointError(
            f"{ckpt / STATE_FILE} is unreadable ({type(e).__name__}: {e}): torn by a crash while it was "
            f"written, or written by an incompatible version{fallback}"
        ) from e
    if not isinstance(state, dict) or state.get("format") != RUN_FORMAT:
        raise CheckpointError(f"{ckpt / STATE_FILE}: not an s3delta run checkpoint")
    names, params = _trainable(engine)
    if state["names"] != names:
        diff = sorted(set(state["names"]) ^ set(names))[:5]
        raise CheckpointError(
            f"{ckpt} trains other parameters than this run ({len(state['names'])} vs {len(names)}; differing: "
            f"{diff or 'the order'}): resume with the run's own config"
        )
    zero.load_trainable_state(engine, params, state["trainable"])
    _set_rng_state(state["rng"][zero.rank() % len(state["rng"])])
    return state["client"]


def _load_engine_checkpoint(engine, ckpt: Path) -> dict:
    """A checkpoint of an older s3delta_ds (a DeepSpeed engine checkpoint, tied to its world size)."""
    info = json.loads((ckpt / COMPLETE).read_text())
    if info["world"] != zero.world():
        raise CheckpointError(
            f"{ckpt} is a DeepSpeed engine checkpoint of {info['world']} ranks (an older s3delta_ds); "
            f"resume it on {info['world']} ranks, not {zero.world()}"
        )
    _, client = engine.load_checkpoint(str(ckpt.parent), tag=ckpt.name, load_module_strict=False)
    if client is None:
        raise CheckpointError(f"DeepSpeed could not load {ckpt}")
    rng = torch.load(ckpt / f"rng-rank{zero.rank()}.pt", weights_only=False)
    _set_rng_state({**rng, "accelerator": None})
    return client
