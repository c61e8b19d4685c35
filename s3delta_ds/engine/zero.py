"""The one module that imports DeepSpeed: config resolution ("auto" filled in from our settings),
distributed setup, the engine that owns the delta weights, ZeRO-3 gathers, and rank helpers.

Everything else in s3delta_ds sees ``nn.Module``s and tensors.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import dataclasses
import datetime
import json
import os
import socket
from collections.abc import Iterable, Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import deepspeed
import deepspeed.comm as dist
import torch
import torch.nn as nn
from deepspeed.accelerator import get_accelerator
from deepspeed.comm import comm as ds_comm
from deepspeed.utils import groups as ds_groups
from deepspeed.utils import (
    safe_get_full_fp32_param,
    safe_get_full_optimizer_state,
    safe_set_full_fp32_param,
    safe_set_full_optimizer_state,
)

from ..errors import ConfigError, DistributedSetupError
from ..util import free_port, slurm_count

# Sections s3delta_ds owns: the delta optimizer (AdamW) and its schedule (linear decay) come from the
# run config, and a second definition in the DeepSpeed json would silently disagree with it.
_OWNED_SECTIONS = ("optimizer", "scheduler")


def shipped_ds_configs() -> dict[str, Path]:
    root = resources.files("s3delta_ds") / "ds_configs"
    return {p.name[:-5]: Path(str(p)) for p in root.iterdir() if p.name.endswith(".json")}


def read_ds_config(name_or_path: str) -> tuple[dict, str]:
    """A DeepSpeed json by path, or by name (``zero2``, ``zero3``, ``zero3_multinode``, ``zero3_offload``,
    ``zero3_cpu``)."""
    path = Path(name_or_path)
    if not path.is_file():
        shipped = shipped_ds_configs()
        key = path.name[:-5] if path.name.endswith(".json") else path.name
        if key not in shipped:
            raise ConfigError(
                f"DeepSpeed config {name_or_path!r} is not a file nor a shipped config ({', '.join(sorted(shipped))})"
            )
        path = shipped[key]
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"cannot read DeepSpeed config {path}: {e.strerror or e}") from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"DeepSpeed config {path} is not valid JSON: {e}") from e
    if not isinstance(cfg, dict):
        raise ConfigError(f"DeepSpeed config {path} must be a JSON object")
    return cfg, str(path)


def _resolve_value(cfg: dict, key: str, value: Any, where: str) -> None:
    current = cfg.get(key, "auto")
    if current == "auto":
        cfg[key] = value
    elif current != value:
        raise ConfigError(
            f'DeepSpeed config sets {where}{key}={current!r} but the run uses {value!r}; set it to "auto" '
            "(s3delta_ds fills it in) or change the run config to match"
        )


def _find_auto(obj: Any, path: str = "") -> list[str]:
    if obj == "auto":
        return [path]
    if isinstance(obj, dict):
        return [p for k, v in obj.items() for p in _find_auto(v, f"{path}.{k}" if path else k)]
    if isinstance(obj, list):
        return [p for i, v in enumerate(obj) for p in _find_auto(v, f"{path}[{i}]")]
    return []


def resolve_ds_config(
    template: dict,
    *,
    micro_batch: int,
    grad_accum: int,
    world: int,
    clip: float,
    dtype: str,
    hidden_size: int,
    zero_stage: int | None = None,
    local_world: int | None = None,
) -> dict:
    """Fill every "auto" of a DeepSpeed config from the run's settings and check the rest agree.

    ``dtype`` is the resolved backbone dtype (fp32 | bf16 | fp16). ``local_world``: ranks per node
    (:func:`local_world_size`), what ZeRO++'s ``zero_hpz_partition_size: "auto"`` becomes. Raises
    :class:`ConfigError` on a disagreement, on an optimizer/scheduler section, or on an "auto" this
    function cannot fill.
    """
    cfg = copy.deepcopy(template)
    owned = [s for s in _OWNED_SECTIONS if s in cfg]
    if owned:
        raise ConfigError(
            f"remove the {' and '.join(owned)} section(s) from the DeepSpeed config: s3delta_ds runs AdamW with a "
            "linear decay for the deltas and its own optimizer for the gates (set lr, weight_decay in the run config)"
        )
    _resolve_value(cfg, "train_micro_batch_size_per_gpu", micro_batch, "")
    _resolve_value(cfg, "gradient_accumulation_steps", grad_accum, "")
    _resolve_value(cfg, "train_batch_size", micro_batch * grad_accum * world, "")
    _resolve_value(cfg, "gradient_clipping", float(clip), "")
    for key, want in (("bf16", dtype == "bf16"), ("fp16", dtype == "fp16")):
        # A section the config leaves out follows model.dtype (the shipped configs name only bf16:
        # model.dtype=fp16 must work with them); one it states must agree.
        section = cfg.setdefault(key, {"enabled": "auto"})
        if section.get("enabled", False) == "auto":
            section["enabled"] = want
        elif bool(section.get("enabled", False)) != want:
            raise ConfigError(f"DeepSpeed config has {key}.enabled={section.get('enabled')} but model.dtype is {dtype}")
    if dtype in ("bf16", "fp16"):
        # DeepSpeed reduces gradients in the model's dtype by default: a bf16 ring all-reduce rounds
        # the delta gradients at every hop (the gate gradient is reduced in fp32). The trainable
        # set is small, so fp32 costs next to nothing; a config that says otherwise is kept.
        cfg.setdefault("communication_data_type", "fp32")
    zero = cfg.setdefault("zero_optimization", {"stage": 0})
    if zero_stage is not None:
        zero["stage"] = zero_stage
    h = int(hidden_size)
    for key, value in (
        ("reduce_bucket_size", h * h),
        ("stage3_prefetch_bucket_size", int(0.9 * h * h)),
        ("stage3_param_persistence_threshold", 10 * h),
    ):
        if zero.get(key) == "auto":
            zero[key] = value
    if "zero_hpz_partition_size" in zero:
        _resolve_hpz(zero, world, local_world)
    left = _find_auto(cfg)
    if left:
        raise ConfigError(f'cannot resolve "auto" for {", ".join(left)} in the DeepSpeed config; set explicit values')
    _check_zero_section(zero)
    cfg.setdefault("steps_per_print", 10**6)
    return cfg


def _check_zero_section(zero: dict) -> None:
    """DeepSpeed's own validation of ``zero_optimization``, now: ``deepspeed.initialize`` would
    find a misspelt key (``stagee``) only after the backbone loaded, in a pydantic traceback."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    try:
        DeepSpeedZeroConfig(**zero)
    except ValueError as e:  # pydantic's ValidationError
        errors = getattr(e, "errors", lambda: [])()
        said = "; ".join(
            f"{'.'.join(str(x) for x in err.get('loc', ()))}: {err.get('msg')}" for err in errors[:3]
        ) or str(e)
        raise ConfigError(f"DeepSpeed config zero_optimization: {said}") from None


def _resolve_hpz(zero: dict, world: int, local_world: int | None) -> None:
    """ZeRO++ hierarchical partitioning: a secondary copy of the parameters partitioned over
    ``zero_hpz_partition_size`` consecutive ranks, which the forward/backward all-gathers read. It
    must be the ranks per node, so that those gathers stay on NVLink (DeepSpeed groups ranks
    [0, h), [h, 2h), ...: the launchers number ranks node by node, Slurm's default block placement too)."""
    if zero["zero_hpz_partition_size"] == "auto":
        if local_world is None:
            raise ConfigError(
                'zero_optimization.zero_hpz_partition_size is "auto" but the ranks per node are unknown: none of '
                f"{', '.join(LOCAL_WORLD_VARS)} is set. Launch with deepspeed/torchrun/srun, or set "
                "zero_hpz_partition_size to the GPUs per node in the DeepSpeed config"
            )
        # One node: the secondary copy would be the primary partition again (memory for nothing).
        zero["zero_hpz_partition_size"] = local_world if world > local_world else 1
    hpz = zero["zero_hpz_partition_size"]
    if not isinstance(hpz, int) or hpz < 1 or world % hpz:
        raise ConfigError(
            f"zero_optimization.zero_hpz_partition_size={hpz!r} must be a positive integer dividing the world "
            f'size {world} (the ranks per node); set it to "auto"'
        )


# Ranks per node, in the order read: torchrun, the deepspeed launcher (and our Slurm mapping), then
# Slurm itself for one task per rank (torchrun inside a one-task-per-node step sets LOCAL_WORLD_SIZE,
# so SLURM_NTASKS_PER_NODE=1 there is never read).
LOCAL_WORLD_VARS = ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "SLURM_NTASKS_PER_NODE", "SLURM_GPUS_ON_NODE")


def local_world_size(environ: dict[str, str] | None = None) -> int | None:
    """Ranks on this node from the launcher's environment (:data:`LOCAL_WORLD_VARS`), None if unknown.

    Slurm writes ``SLURM_NTASKS_PER_NODE`` as ``4`` or ``4(x2)``; ``SLURM_GPUS_ON_NODE`` may be
    ``8`` or ``a100:8``."""
    environ = os.environ if environ is None else environ
    for var in LOCAL_WORLD_VARS:
        count = slurm_count(environ.get(var))
        if count is not None:
            return count
    return None


def hpz_placement_error(hosts: list[str], hpz: int) -> str | None:
    """Why the hpZ groups (ranks [0, hpz), [hpz, 2 hpz), ...) are not each on one node, or None.

    ``hosts``: each rank's host name, by rank. Pure (:func:`check_hpz_placement` gathers the names)."""
    for start in range(0, len(hosts), hpz):
        group = hosts[start : start + hpz]
        if len(set(group)) > 1:
            return (
                f"zero_hpz_partition_size={hpz} groups ranks {start}..{start + hpz - 1}, but they run on "
                f"{', '.join(sorted(set(group)))}: the secondary partition's all-gathers would cross nodes. "
                "Number ranks node by node (the deepspeed launcher and torchrun do; with srun use "
                "--distribution=block) or set zero_hpz_partition_size to the ranks per node"
            )
    return None


def check_hpz_placement(ds_config: dict) -> None:
    """Collective: refuse hpZ groups that span nodes (see :func:`hpz_placement_error`)."""
    hpz = int(ds_config.get("zero_optimization", {}).get("zero_hpz_partition_size", 1))
    if hpz > 1:
        err = hpz_placement_error(all_gather_object(socket.gethostname()), hpz)
        if err:
            raise DistributedSetupError(err)


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def resolve_dtype(model_dtype: str, template: dict) -> str:
    """``model.dtype=auto``: follow the DeepSpeed config when it says bf16/fp16 explicitly; with
    "auto" there, bf16 on accelerators that support it and fp32 on the CPU."""
    if model_dtype != "auto":
        return model_dtype
    for key in ("bf16", "fp16"):
        enabled = template.get(key, {}).get("enabled", False)
        if enabled is True:
            return key
    if template.get("bf16", {}).get("enabled") == "auto":
        return "bf16" if accelerator_has_bf16() else "fp32"
    return "fp32"


def check_dtype_supported(dtype: str, model_dtype: str, template: dict) -> None:
    """Refuse fp16 where DeepSpeed cannot train in it (the CPU): its own refusal is a traceback from
    every rank, raised after the output directory was claimed."""
    if dtype == "fp16" and not get_accelerator().is_fp16_supported():
        said = "model.dtype=fp16" if model_dtype == "fp16" else "the DeepSpeed config's fp16 (model.dtype=auto)"
        # a config that pins fp16.enabled=true would refuse model.dtype=fp32 next (resolve_ds_config)
        pinned = template.get("fp16", {}).get("enabled") is True
        also = ', and fp16.enabled to "auto" in the DeepSpeed config' if pinned else ""
        raise ConfigError(
            f"{said}: DeepSpeed has no fp16 training on the {device_type()} accelerator; "
            f"set model.dtype=fp32 (or bf16){also}"
        )


# -- distributed setup -------------------------------------------------------------------------


def device_type() -> str:
    return get_accelerator().device_name()


def device() -> torch.device:
    return torch.device(get_accelerator().current_device_name())


def _env_from_slurm() -> None:
    """One Slurm task per rank (``srun --ntasks-per-node=G``): map SLURM_* to the torch variables."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ or "SLURM_NTASKS" not in os.environ:
        return
    if "SLURM_STEP_ID" not in os.environ:
        return  # the batch or salloc shell of a multi-task job is no srun step: a process there is one run
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    os.environ["LOCAL_RANK"] = str(_local_device_index(int(os.environ.get("SLURM_LOCALID", "0"))))
    local = local_world_size()  # SLURM_NTASKS_PER_NODE or SLURM_GPUS_ON_NODE; unknown stays unset, not 1
    if local is not None:
        os.environ.setdefault("LOCAL_SIZE", str(local))
    if "MASTER_ADDR" not in os.environ:
        raise DistributedSetupError("running one Slurm task per rank but MASTER_ADDR is not set (see slurm/*.sh)")


def _local_device_index(local_id: int) -> int:
    """The device a task's rank uses. With per-task GPU binding (``--gpus-per-task=1``,
    ``--gpu-bind=single:1``) every task sees its own GPUs numbered from 0, and DeepSpeed's process
    group binds ``cuda:LOCAL_RANK``: task 3's ``cuda:3`` would not exist."""
    if device_type() == "cpu":
        return local_id
    count = get_accelerator().device_count()
    return local_id % count if 0 < count <= local_id else local_id


def init_distributed(timeout_s: int = 600) -> tuple[int, int]:
    """Join (or create, for a plain ``python`` run) the process group. Returns (rank, world).

    Works under the ``deepspeed`` launcher, ``torchrun``, ``srun`` (one task per rank) and a bare
    single process. CPU uses gloo. ``timeout_s`` bounds how long a rank waits for a dead peer.
    """
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    _env_from_slurm()
    if "RANK" not in os.environ:  # a single plain process: be a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    backend = "gloo" if device_type() == "cpu" else None
    if device_type() == "cpu":
        # DeepSpeed's CPU backend maps a shared-memory all-reduce buffer named after MASTER_ADDR/PORT
        # and the rank, and never unlinks it. A stale buffer of a dead run on the same port makes
        # the new run hang on its flags, and every run leaks ~70 MB of /dev/shm per rank. Remove
        # ours before joining (all ranks pass here before any rank maps a peer's buffer: the
        # process-group rendezvous waits for everyone) and again at exit.
        _remove_shm_buffer()
        atexit.register(_remove_shm_buffer)
    try:
        deepspeed.init_distributed(
            dist_backend=backend, timeout=datetime.timedelta(seconds=timeout_s), verbose=False, auto_mpi_discovery=False
        )
    except (RuntimeError, ValueError) as e:
        raise DistributedSetupError(f"cannot initialise the process group ({backend or 'default'} backend): {e}") from e
    if device_type() != "cpu":
        get_accelerator().set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return dist.get_rank(), dist.get_world_size()


def _shm_buffer_path() -> Path:
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{os.environ.get('RANK', '0')}"


def _remove_shm_buffer() -> None:
    with contextlib.suppress(OSError):
        _shm_buffer_path().unlink()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier() -> None:
    if world() > 1:
        dist.barrier()


def all_reduce_sum_(t: torch.Tensor) -> torch.Tensor:
    if world() > 1:
        dist.all_reduce(t)
    return t


def all_reduce_sum_many_(tensors: list[torch.Tensor]) -> None:
    """Sum each tensor over ranks in place, one collective per dtype and device (not one per
    tensor: a second-order pass reduces ~1,000 delta gradients, each a launch on NCCL)."""
    if world() == 1:
        return
    groups: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    for group in groups.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        dist.all_reduce(flat)
        offset = 0
        for t in group:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()


def all_gather_object(obj: Any) -> list[Any]:
    if world() == 1:
        return [obj]
    out: list[Any] = [None] * world()
    torch.distributed.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if world() == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


# DeepSpeed caches process groups in module globals (data-parallel, ZeRO, world groups) and its
# communication backend in ``deepspeed.comm.comm.cdb``; they outlive ``destroy_process_group`` and
# point a second run in the same process at groups that no longer exist ("Group ... is not
# registered"). Their import-time values are restored on ``destroy``.
_DS_GROUP_DEFAULTS = {
    k: copy.copy(v)
    for k, v in vars(ds_groups).items()
    if (k.startswith("_") and k[1:2].isupper() or k in ("mpu", "expert_tensor_parallel_world_size"))
    and (v is None or isinstance(v, (dict, int)))
}


def destroy() -> None:
    """Leave the process group and reset DeepSpeed's cached groups, so that another run can start
    in this process (``s3delta_ds.search`` twice in a notebook)."""
    if dist.is_initialized():
        torch.distributed.destroy_process_group()
    for k, v in _DS_GROUP_DEFAULTS.items():
        setattr(ds_groups, k, copy.copy(v))
    ds_comm.cdb = None
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()  # the run's ZeRO-3 loading context ends with it
    restore_functional_linear()


def restore_functional_linear() -> None:
    """Undo ZeRO-3's process-wide swap of ``torch.nn.functional.linear``.

    ``zero.Init`` (every ZeRO-3 engine) replaces it with its "memory-efficient" linear, a Python
    ``autograd.Function``, and never puts it back. Every later model in the process, ZeRO-2 or
    plain PyTorch, then runs its linears through it: 1.2-1.3x slower on small shapes (a search
    after a ZeRO-3 run in a notebook; every baseline that step.py timed after a ZeRO-3 variant).
    The next ``zero.Init`` swaps it in again."""
    from deepspeed.runtime.zero.partition_parameters import InsertPostInitMethodToModuleSubClasses

    original = getattr(InsertPostInitMethodToModuleSubClasses, "linear_bk", None)
    if original is not None:
        torch.nn.functional.linear = original


# -- engine and ZeRO helpers -------------------------------------------------------------------


def linear_decay(optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear decay to 0 over ``total_steps``, no warm-up (the original's schedule)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, 1.0 - s / max(1, total_steps)))


def build_engine(
    module: nn.Module, params: list[nn.Parameter], *, lr: float, weight_decay: float, total_steps: int, ds_config: dict
):
    """One DeepSpeed engine owning ``params`` (the delta weights) with AdamW + linear decay."""
    if not params:
        raise ConfigError("nothing to train: the structure has no delta parameters")
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)
    scheduler = linear_decay(optimizer, total_steps)
    engine, _, _, _ = deepspeed.initialize(
        model=module, optimizer=optimizer, model_parameters=params, lr_scheduler=scheduler, config=ds_config
    )
    trim_zero3_hooks(engine)
    return engine


def fp16_settings(ds_config: dict) -> dict | None:
    """The ``fp16`` section of a resolved DeepSpeed config as DeepSpeed reads it (its defaults and
    validation): loss_scale (0: dynamic), initial_scale, loss_scale_window, hysteresis,
    consecutive_hysteresis, min_loss_scale. None when fp16 is off."""
    from deepspeed.runtime.precision_config import DeepSpeedFP16Config

    fp16 = DeepSpeedFP16Config(**ds_config.get("fp16", {}))
    if not fp16.enabled:
        return None
    return {
        "loss_scale": fp16.loss_scale,
        "initial_scale": fp16.initial_dynamic_scale(),
        "loss_scale_window": fp16.loss_scale_window,
        "hysteresis": fp16.hysteresis,
        "consecutive_hysteresis": fp16.consecutive_hysteresis,
        "min_loss_scale": fp16.min_loss_scale,
    }


def trim_zero3_hooks(engine) -> int:
    """Remove ZeRO-3's module hooks where they have nothing to do; returns how many modules lost them.

    ZeRO-3 hooks every module four times (pre/post forward, pre/post backward), and on a frozen
    backbone most of its per-step cost is these Python calls, not the gathers
    (benchmarks/zero3_profile.py). A module whose own parameters are all persistent (none: containers,
    dropout, activations, the delta slots; or small ones under ``stage3_param_persistence_threshold``:
    norms, most deltas) has nothing to fetch or release, so its hooks only record it in the prefetch
    trace and in the stack that adopts dangling parameters (which then falls to the nearest hooked
    ancestor). Gradients are reduced from hooks on the parameters, which stay. DeepSpeed releases
    persistent parameters around an optimizer step and a checkpoint load, so a pre-forward hook on
    the root gathers the trimmed modules' parameters back whenever one is missing."""
    offload = getattr(getattr(engine, "optimizer", None), "parameter_offload", None)
    if offload is None:  # not ZeRO-3
        return 0
    root = engine.module

    def idle(m: nn.Module) -> bool:
        return m is not root and all(getattr(p, "ds_persist", False) for p in m._parameters.values() if p is not None)

    bare = {}
    for m in root.modules():
        if idle(m):
            bare[id(m._forward_pre_hooks)] = bare[id(m._forward_hooks)] = m
    trimmed: dict[int, nn.Module] = {}
    for hooks in (offload.forward_hooks, offload.backward_hooks):
        keep = []
        for handle in hooks:
            owner = handle.hooks_dict_ref()
            module = bare.get(id(owner)) if owner is not None else None
            if module is None:
                keep.append(handle)
            else:
                handle.remove()
                trimmed[id(module)] = module
        hooks[:] = keep
    # once each: a tied weight (T5's shared/embed_tokens/lm_head) belongs to several trimmed modules,
    # and a world of one refuses the same parameter twice in one gather (INFLIGHT)
    persistent = list({id(p): p for m in trimmed.values() for p in m._parameters.values() if p is not None}.values())

    @torch.no_grad()
    def gather_persistent(_module, _args):
        missing = [p for p in persistent if p.ds_status.name != "AVAILABLE"]
        if missing:
            missing[0].all_gather(missing)

    if persistent:
        root.register_forward_pre_hook(gather_persistent, prepend=True)
    coordinator = offload.get_param_coordinator()
    if not coordinator.is_invalid_trace():  # re-recorded on the next forward, without the trimmed modules
        coordinator._invalidate_trace()
    return len(trimmed)


def is_partitioned(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_id")


@contextlib.contextmanager
def gathered(params: Iterable[nn.Parameter], modifier_rank: int | None = None) -> Iterator[None]:
    """Full parameters inside the block (ZeRO-3), a no-op otherwise. With ``modifier_rank`` set,
    that rank's in-place edits are re-partitioned to every rank on exit."""
    params = [p for p in params if is_partitioned(p)]
    if not params:
        yield
        return
    with deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank):
        yield


def register_external(module: nn.Module, param: torch.Tensor) -> None:
    """Tell ZeRO-3 that ``module``'s forward reads ``param`` (owned by another module), so it is
    gathered for that forward and its backward (HiWi reads the frozen weight it modifies)."""
    if is_partitioned(param):
        deepspeed.zero.register_external_parameter(module, param)


def device_memory_bytes() -> int:
    """Memory one rank may use: the accelerator's total, or on the CPU the machine's RAM divided by
    the ranks on this node. $S3DELTA_DEVICE_MEMORY (bytes) overrides it. The smallest over the
    ranks when the process group is up: every rank must choose the same strategy (a partition mixing
    40 and 80 GB GPUs chose ZeRO-2 on some nodes and ZeRO-3 on others, and hung)."""
    if os.environ.get("S3DELTA_DEVICE_MEMORY"):
        own = int(float(os.environ["S3DELTA_DEVICE_MEMORY"]))
    elif device_type() != "cpu":
        own = int(get_accelerator().total_memory())
    else:
        ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        own = int(ram // (local_world_size() or 1))
    return min_over_ranks(own)


def min_over_ranks(value: int) -> int:
    """``value``'s minimum over all ranks (itself without a process group of several)."""
    return _reduce_int(value, dist.ReduceOp.MIN)


def max_over_ranks(value: int) -> int:
    """``value``'s maximum over all ranks (itself without a process group of several)."""
    return _reduce_int(value, dist.ReduceOp.MAX)


def _reduce_int(value: int, op) -> int:
    if world() <= 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device())
    dist.all_reduce(t, op=op)
    return int(t.item())


def accelerator_has_bf16() -> bool:
    """What ``model.dtype=auto`` resolves to bf16 on (else fp32)."""
    return device_type() != "cpu" and bool(get_accelerator().is_bf16_supported())


def choose_strategy(
    frozen_bytes: int,
    trainable_params: int,
    memory: int,
    fraction: float = 0.5,
    *,
    world: int = 1,
    local_world: int | None = None,
    cpu: bool | None = None,
    stage: int | None = None,
) -> tuple[str, str]:
    """``deepspeed=auto``: replicate the frozen backbone (ZeRO-2: no parameter gathering at all,
    trainable state still sharded) when it fits in ``fraction`` of a device next to the trainable
    state (16 bytes per trainable parameter for weights, gradients and Adam); ZeRO-3 otherwise.

    ZeRO-3 across nodes (``world`` > ``local_world``) takes ZeRO++'s hierarchical partitioning
    (``zero3_multinode``) when its secondary copy fits: every rank then holds the backbone's
    primary partition (1/world) plus a secondary one (1/local_world) that the per-layer all-gathers
    read from within the node, so they never cross the slow inter-node link. Pure: sizes in, no
    processes (``cpu`` None means this machine's accelerator decides).

    Args:
        frozen_bytes: the frozen backbone's bytes in its storage dtype.
        trainable_params: parameters the optimizer owns.
        memory: bytes one rank may use (:func:`device_memory_bytes`).
        world: ranks in the job; local_world: ranks per node (None: all on one node).
        stage: a ZeRO stage the user set (``zero_stage``): 3 takes a ZeRO-3 template whatever the
            sizes (the zero2 template has none of stage 3's settings), 0-2 the replicated one.

    Returns:
        (shipped config name, the reason to print).
    """
    need = frozen_bytes + 16 * trainable_params
    cpu = device_type() == "cpu" if cpu is None else cpu
    local_world = world if local_world is None else local_world
    gb = lambda b: f"{b / 2**30:.2f} GiB"  # noqa: E731
    if stage is not None and stage < 3:
        return "zero2", f"zero_stage={stage} set: the replicated template (zero2) at stage {stage}"
    if stage is None and need <= fraction * memory:
        return "zero2", (
            f"frozen backbone {gb(frozen_bytes)} + trainable state {gb(16 * trainable_params)} fits in "
            f"{fraction:.0%} of {gb(memory)} per rank: replicate it (ZeRO-2, no parameter gathering)"
        )
    why = (
        f"frozen backbone {gb(frozen_bytes)} + trainable state {gb(16 * trainable_params)} exceeds {fraction:.0%} "
        f"of {gb(memory)} per rank: shard it (ZeRO-3)"
        if stage is None
        else "zero_stage=3 set: shard the backbone with a ZeRO-3 template"
    )
    single = "zero3_cpu" if cpu else "zero3"
    if world <= local_world:
        return single, why
    nodes = f"the job spans {world // local_world} nodes ({world} ranks, {local_world} per node)"
    hpz_need = frozen_bytes // local_world + frozen_bytes // world + 16 * trainable_params // world
    if hpz_need > fraction * memory:
        return single, (
            f"{why}; {nodes}, but hpZ's secondary copy (1/{local_world} of the backbone per rank, "
            f"{gb(hpz_need)} in all) exceeds {fraction:.0%} of {gb(memory)}: every all-gather crosses nodes"
        )
    return "zero3_multinode", (
        f"{why}; {nodes}: ZeRO++ hpZ keeps a secondary copy partitioned within each node "
        f"({gb(frozen_bytes // local_world)} per rank, {gb(hpz_need)} in all) so the per-layer all-gathers "
        "stay intra-node"
    )


def hf_deepspeed_config(ds_config: dict):
    """Keep the returned object alive while loading: transformers holds it by weakref, and while
    it lives ``from_pretrained`` shards weights under ZeRO-3 as it reads them."""
    from transformers.integrations import HfDeepSpeedConfig

    return HfDeepSpeedConfig(ds_config)


def local_numel(p: torch.Tensor) -> int:
    """Elements this rank holds (its ZeRO-3 partition, or the whole tensor)."""
    return int(p.ds_tensor.numel()) if is_partitioned(p) and hasattr(p, "ds_tensor") else int(p.numel())


def full_numel(p: torch.Tensor) -> int:
    return int(getattr(p, "ds_numel", p.numel()))


# -- the delta optimizer's AdamW state (second-order search's virtual step) --------------------


@dataclasses.dataclass(frozen=True, slots=True)
class AdamWState:
    """What torch AdamW's next step of the delta weights depends on, besides the gradient.

    ``exp_avg``/``exp_avg_sq``: one fp32 tensor per parameter, in its full shape (zeros before the
    first step); ``step``: optimizer steps taken so far (the next one is ``step + 1``).
    """

    step: int
    betas: tuple[float, float]
    eps: float
    weight_decay: float
    exp_avg: list[torch.Tensor]
    exp_avg_sq: list[torch.Tensor]


def adamw_state(engine, params: list[nn.Parameter]) -> AdamWState:
    """The AdamW moments of ``params`` (the engine's trainable parameters) as full fp32 tensors.

    Collective under ZeRO-1/2: each rank holds the moments of its partition only, and
    ``safe_get_full_optimizer_state`` assembles a parameter's moments with an all-reduce over the
    data-parallel group, so every rank must call this with the same ``params`` in the same order.
    Stage 0 reads the optimizer's state directly: keyed by the parameters themselves (fp32), or by
    their fp32 master copies (bf16/fp16 without ZeRO). ZeRO-3 is never asked here
    (second-order search refuses it at start-up) except by ``trainable_state`` (checkpoints), where
    ``safe_get_full_optimizer_state`` all-gathers a partitioned parameter's moments.

    Raises:
        ConfigError: the delta optimizer is not a plain torch AdamW with one betas/eps/weight decay.
    """
    basic = engine.basic_optimizer
    if not isinstance(basic, torch.optim.AdamW):
        raise ConfigError(
            f"search.virtual_step=adamw needs the delta optimizer to be torch AdamW, got {type(basic).__name__}; "
            "set search.virtual_step=sgd"
        )
    hyper = {(tuple(g["betas"]), g["eps"], g["weight_decay"], g["amsgrad"], g["maximize"]) for g in basic.param_groups}
    if len(hyper) != 1 or next(iter(hyper))[3:] != (False, False):
        raise ConfigError(
            "search.virtual_step=adamw needs one betas/eps/weight_decay for every delta parameter and no "
            f"amsgrad/maximize, got {sorted(hyper)}; set search.virtual_step=sgd"
        )
    betas, eps, weight_decay, _, _ = next(iter(hyper))
    # Every group and every partition steps together, so any state entry gives the step count; an
    # empty state means no step has been taken (torch AdamW creates its state lazily).
    step = max((int(s["step"]) for s in basic.state.values() if "step" in s), default=0)
    if step == 0:
        moments = [[torch.zeros(_full_shape(p), dtype=torch.float32) for p in params] for _ in range(2)]
    elif all(_zero_owned(p) for p in params):  # ZeRO-1/2/3 (and DeepSpeed's BF16_Optimizer)
        moments = [[safe_get_full_optimizer_state(p, key).float() for p in params] for key in ("exp_avg", "exp_avg_sq")]
    elif hasattr(engine.optimizer, "fp32_groups"):  # stage 0 bf16/fp16: an fp32 master per parameter
        moments = [_master_state(engine.optimizer, basic, params, key) for key in ("exp_avg", "exp_avg_sq")]
    else:  # stage 0 fp32: the torch optimizer holds the parameters themselves
        moments = [[basic.state[p][key].detach().float() for p in params] for key in ("exp_avg", "exp_avg_sq")]
    return AdamWState(step, (float(betas[0]), float(betas[1])), float(eps), float(weight_decay), *moments)


def _master_state(wrapper, basic: torch.optim.Optimizer, params: list[nn.Parameter], key: str) -> list[torch.Tensor]:
    """``key`` state of each parameter's fp32 master copy (DeepSpeed's FP16_UnfusedOptimizer, what
    16-bit without ZeRO runs with a torch optimizer: ``fp32_groups[i][j]`` masters ``fp16_groups[i][j]``)."""
    master = {
        id(p): m
        for lp, hp in zip(wrapper.fp16_groups, wrapper.fp32_groups, strict=True)
        for p, m in zip(lp, hp, strict=True)
    }
    return [basic.state[master[id(p)]][key].detach().float() for p in params]


def _full_shape(p: torch.Tensor) -> tuple[int, ...]:
    return tuple(getattr(p, "ds_shape", p.shape))


def _zero_owned(p: torch.Tensor) -> bool:
    """A parameter whose fp32 master and optimizer state ZeRO keeps (partitioned, or mapped to
    fragments of flat groups) and which DeepSpeed's ``safe_*_full_*`` helpers read and write."""
    return is_partitioned(p) or hasattr(p, "_hp_mapping")


# -- the trainable state in full (checkpoints any world size can resume) -----------------------


def trainable_state(engine, params: list[nn.Parameter]) -> dict:
    """The trainable weights and their AdamW state as full fp32 CPU tensors, and the delta schedule:
    everything of the engine a checkpoint needs, with no world size or ZeRO partitioning in it.

    Collective: ZeRO assembles each parameter's fp32 master and moments from its partitions (an
    all-reduce or all-gather per tensor), so every rank calls this with the same ``params`` in the
    same order, and every rank gets the full tensors.

    Returns:
        ``{"weights", "exp_avg", "exp_avg_sq"}``: one tensor per parameter, full shape; ``"step"``:
        AdamW steps taken; ``"scheduler"``: the delta LR scheduler's state dict.
    """
    moments = adamw_state(engine, params)
    masters = _stage0_masters(engine, params)
    weights = [
        (safe_get_full_fp32_param(p) if _zero_owned(p) else m).detach().to("cpu", torch.float32).clone()
        for p, m in zip(params, masters, strict=True)
    ]
    cpu = lambda ts: [t.detach().to("cpu", torch.float32).clone() for t in ts]  # noqa: E731
    return {
        "weights": weights,
        "exp_avg": cpu(moments.exp_avg),
        "exp_avg_sq": cpu(moments.exp_avg_sq),
        "step": moments.step,
        "scheduler": engine.lr_scheduler.state_dict(),
        "loss_scaler": loss_scaler_state(engine),
    }


_LOSS_SCALER_FIELDS = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")


def loss_scaler_state(engine) -> dict | None:
    """DeepSpeed's fp16 loss scale and its counters (None outside fp16). Without them a resumed run
    restarts at 2^initial_scale_power and skips steps (and their LR-schedule steps) while the scale
    comes down again, so it would not end where the uninterrupted run does."""
    scaler = getattr(engine.optimizer, "loss_scaler", None) if engine.fp16_enabled() else None
    if scaler is None:
        return None
    return {f: getattr(scaler, f) for f in _LOSS_SCALER_FIELDS if hasattr(scaler, f)}


def load_loss_scaler_state(engine, state: dict | None) -> None:
    scaler = getattr(engine.optimizer, "loss_scaler", None) if engine.fp16_enabled() else None
    if scaler is not None and state:  # checkpoints before this field, or of a bf16/fp32 run: as configured
        for field, value in state.items():
            setattr(scaler, field, value)


def load_trainable_state(engine, params: list[nn.Parameter], state: dict) -> None:
    """Write a ``trainable_state`` (taken on any world size, any ZeRO stage) into ``engine``: the
    fp32 masters, the weights the forward reads, the AdamW moments and step, and the schedule.
    Collective: every rank calls it with the same ``params`` and ``state``."""
    wrapper, basic, step = engine.optimizer, engine.basic_optimizer, int(state["step"])
    if step:
        # torch AdamW creates its state at its first step. Create it now (zeros, the checkpoint's step
        # count) for every tensor the optimizer steps (ZeRO's flat fp32 partitions; ZeRO-3 hands them to
        # the optimizer only during a step), so that there is state to write the moments into.
        flat = getattr(wrapper, "fp32_partitioned_groups_flat", None)
        for t in flat if flat is not None else [t for g in basic.param_groups for t in g["params"]]:
            basic.state[t] = {
                "step": torch.tensor(float(step)),
                "exp_avg": torch.zeros_like(t),
                "exp_avg_sq": torch.zeros_like(t),
            }
        if hasattr(wrapper, "_hp_optimizer_states_linked"):  # ZeRO-1/2, BF16_Optimizer: map fragments to it
            wrapper._hp_optimizer_states_linked = False
            wrapper._lazy_init_hp_params_optimizer_state()
    masters = _stage0_masters(engine, params)
    with torch.no_grad():
        tensors = zip(params, masters, state["weights"], state["exp_avg"], state["exp_avg_sq"], strict=True)
        for p, hp, w, m, v in tensors:
            if _zero_owned(p):  # each rank writes its own partition of the full tensors
                safe_set_full_fp32_param(p, w.to(device()))
                if step:
                    safe_set_full_optimizer_state(p, m.to(device()), "exp_avg")
                    safe_set_full_optimizer_state(p, v.to(device()), "exp_avg_sq")
            else:
                hp.copy_(w.view(hp.shape))
                if step:
                    basic.state[hp]["exp_avg"].copy_(m.view(hp.shape))
                    basic.state[hp]["exp_avg_sq"].copy_(v.view(hp.shape))
        # The weights the forward reads (ZeRO keeps them apart from its fp32 masters). Under ZeRO-3 each
        # rank holds a partition: gather, write, and let rank 0's values be partitioned again on exit.
        with gathered(params, modifier_rank=0):
            for p, w in zip(params, state["weights"], strict=True):
                p.copy_(w.view(p.shape).to(p.dtype))
    engine.lr_scheduler.load_state_dict(state["scheduler"])
    load_loss_scaler_state(engine, state.get("loss_scaler"))
    # a scheduler sets the learning rate when it steps; the restored one has not stepped yet
    for group, lr in zip(engine.lr_scheduler.optimizer.param_groups, engine.lr_scheduler.get_last_lr(), strict=True):
        group["lr"] = lr


def _stage0_masters(engine, params: list[nn.Parameter]) -> list[torch.Tensor]:
    """The tensor the torch optimizer steps for each parameter outside ZeRO: the fp32 master of a
    16-bit stage-0 run, else the parameter itself (ZeRO-owned parameters map to themselves, unused)."""
    wrapper = engine.optimizer
    if not hasattr(wrapper, "fp32_groups") or not hasattr(wrapper, "fp16_groups"):
        return list(params)
    master = {
        id(p): m
        for lp, hp in zip(wrapper.fp16_groups, wrapper.fp32_groups, strict=True)
        for p, m in zip(lp, hp, strict=True)
    }
    return [master.get(id(p), p) for p in params]


def rng_state() -> tuple[torch.Tensor, Any]:
    """The CPU and accelerator RNG states (what dropout draws from), to replay a forward's masks."""
    return torch.get_rng_state(), (get_accelerator().get_rng_state() if device_type() != "cpu" else None)


def set_rng_state(state: tuple[torch.Tensor, Any]) -> None:
    cpu, accelerator = state
    torch.set_rng_state(cpu)
    # a GPU run's checkpoint resumed on the CPU: there is no accelerator generator to restore (the CPU
    # "accelerator" would take the CUDA state as the CPU generator's)
    if accelerator is not None and device_type() != "cpu":
        get_accelerator().set_rng_state(accelerator)
