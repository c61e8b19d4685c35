"""Delta files and resumable run checkpoints.

* Delta files: only the trained weights, gathered from ZeRO-3 partitions and written as
  safetensors on rank 0 under family-neutral keys (``encoder.3.attn.q/lora.lora_A``), then read
  back and checked tensor by tensor: a file missing a tensor or holding an empty one is an error,
  not a 40-byte surprise.
* Run checkpoints: ``engine.save_checkpoint(exclude_frozen_parameters=True)`` (delta weights,
  their optimizer and scheduler) + our client state (gates, gate optimizer, data positions, best
  so far) + every rank's RNG state. Never the frozen backbone: resume reloads it from its source.
  A checkpoint counts only once its ``COMPLETE`` marker exists (written after all ranks saved).
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

from ..engine import zero
from ..errors import CheckpointError
from ..method.supernet import named_delta_buffers, named_delta_parameters
from ..util import atomic_path

DELTA_FORMAT = "s3delta-deltas"
COMPLETE = "COMPLETE"


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
        meta = {"format": DELTA_FORMAT, "version": "1", **(metadata or {})}
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


def load_deltas(model: nn.Module, path: str | os.PathLike, *, head_prefixes: tuple[str, ...] = ()) -> int:
    """Load a delta file into a model with the same structure attached (ZeRO-3 aware). Returns #tensors."""
    named = trainable_named(model, head_prefixes)
    buffers = named_delta_buffers(model)
    verify_delta_file(path, {k: _full_shape(p) for k, p in [*named, *buffers]})
    meta = read_delta_metadata(path)
    if meta.get("format") != DELTA_FORMAT:
        raise CheckpointError(f"{path}: not an s3delta delta file (format {meta.get('format')!r})")
    with safe_open(str(path), framework="pt") as f:
        values = {k: f.get_tensor(k) for k in f.keys()}
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


def save_run_checkpoint(engine, root: str | os.PathLike, step: int, client_state: dict, keep: int = 2) -> Path:
    """Collective. Writes ``root/step-XXXXXXXX/`` and marks it complete; prunes older ones."""
    root = Path(root)
    tag = _tag(step)
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state, exclude_frozen_parameters=True)
    rng = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    torch.save(rng, root / tag / f"rng-rank{zero.rank()}.pt")
    zero.barrier()
    if zero.rank() == 0:
        (root / tag / COMPLETE).write_text(json.dumps({"step": step, "world": zero.world()}))
        for old in sorted(p for p in root.glob("step-*") if (p / COMPLETE).exists())[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    zero.barrier()
    return root / tag


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    complete = sorted(p for p in Path(root).glob("step-*") if (p / COMPLETE).exists())
    return complete[-1] if complete else None


def load_run_checkpoint(engine, root: str | os.PathLike) -> dict:
    """Restore the newest complete checkpoint into ``engine``; returns its client state.

    Raises:
        CheckpointError: no complete checkpoint, or one written by a different number of ranks.
    """
    ckpt = latest_checkpoint(root)
    if ckpt is None:
        raise CheckpointError(f"no complete checkpoint under {root} to resume from")
    info = json.loads((ckpt / COMPLETE).read_text())
    if info["world"] != zero.world():
        raise CheckpointError(f"{ckpt} was written by {info['world']} ranks; this run has {zero.world()}")
    _, client = engine.load_checkpoint(str(Path(root)), tag=ckpt.name, load_module_strict=False)
    if client is None:
        raise CheckpointError(f"DeepSpeed could not load {ckpt}")
    rng = torch.load(ckpt / f"rng-rank{zero.rank()}.pt", weights_only=False)
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    return client
