"""What the search and retrain entry points share: distributed setup, the resolved DeepSpeed
config, the task's encoded data, the frozen backbone, and the output directory rules."""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .backbones import Family, SiteMap, family_for
from .backbones.pooling import pooling_of
from .builders import Backbone
from .config import RunConfig, TrainConfig, dump_yaml
from .data import OBJECTIVES, Collator, Encoder, Task, get_task, load_rows, load_tokenizer
from .engine import zero
from .engine.backbone import load_backbone, resolve_source
from .errors import ConfigError, DataError
from .structure import atomic_write_text


@dataclass
class Runtime:
    cfg: RunConfig
    out: Path
    rank: int
    world: int
    device: torch.device
    ds_config: dict
    ds_source: str
    dtype: str
    family: Family
    objective: str
    task: Task
    tokenizer: object
    collate: Collator
    data: dict[str, list[dict]]
    model: torch.nn.Module
    backbone: Backbone

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def site_map(self) -> SiteMap:
        return self.backbone.site_map

    def log(self, msg: str) -> None:
        if self.is_main:
            print(msg, flush=True)


def prepare_output_dir(out: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse to mix runs: an existing non-empty directory needs --resume or overwrite=true. Rank 0 only."""
    if resume:
        if not out.is_dir():
            raise ConfigError(f"--resume: output directory {out} does not exist")
        return
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ConfigError(
                f"output directory {out} is not empty; pass --resume to continue it, or overwrite=true to replace it"
            )
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def _encode(encoder: Encoder, rows: list[dict], limit: int | None, where: str) -> list[dict]:
    rows = rows[:limit] if limit else rows
    if not rows:
        raise DataError(f"{where}: no examples")
    return [encoder.encode(r) for r in rows]


def load_data(cfg: RunConfig, task: Task, encoder: Encoder) -> dict[str, list[dict]]:
    """The encoded train/validation/test splits. The splits a task's protocol draws (validation →
    validation/test, the train carve-out) depend on ``data.split_seed`` alone, never on the run seed:
    a structure searched with one seed and retrained with another is tested on the same rows."""
    rows = load_rows(task, cfg.data.data_dir, split_seed=cfg.data.split_seed)
    return {
        "train": _encode(encoder, rows["train"], cfg.data.max_train_examples, "train"),
        "validation": _encode(encoder, rows["validation"], cfg.data.max_eval_examples, "validation"),
        "test": _encode(encoder, rows["test"], cfg.data.max_test_examples or cfg.data.max_eval_examples, "test"),
    }


def prepare(cfg: RunConfig, train: TrainConfig, *, resume: bool, kind: str) -> Runtime:
    """Everything up to (not including) attaching deltas. Collective: call on every rank.

    ``cfg`` must have been through ``preflight`` (model and task resolved, names checked)."""
    if cfg.model.name_or_path is None or cfg.data.task is None:
        raise ConfigError("model.name_or_path and data.task must be resolved first (s3delta_ds.preflight)")
    rank, world = zero.init_distributed()
    out = Path(cfg.output_dir)
    err = None
    if rank == 0:
        try:
            prepare_output_dir(out, resume=resume, overwrite=cfg.overwrite)
        except ConfigError as e:
            err = str(e)
    err = zero.broadcast_object(err)
    if err:
        raise ConfigError(err)

    source = resolve_source(cfg.model) if rank == 0 else None  # rank 0 materialises the embedded default
    zero.barrier()
    source = resolve_source(cfg.model) if rank != 0 else source

    from .backbones.loading import load_config

    config = load_config(source)
    family = family_for(config)
    ds_name, strategy = cfg.deepspeed, None
    if ds_name == "auto":
        ds_name, strategy = auto_strategy(cfg, source)
    template, ds_source = zero.read_ds_config(ds_name)
    dtype = zero.resolve_dtype(cfg.model.dtype, template)
    ds_config = zero.resolve_ds_config(
        template,
        micro_batch=train.micro_batch_size,
        grad_accum=train.grad_accum,
        world=world,
        clip=train.clip,
        dtype=dtype,
        hidden_size=family.hidden_size(config),
        zero_stage=cfg.zero_stage,
    )

    task = get_task(cfg.data.task)
    objective = OBJECTIVES[family.name]
    tokenizer = load_tokenizer(family.name, cfg.model.name_or_path, cfg.model.tokenizer, cfg.model.gguf_file)
    encoder = Encoder(
        task, tokenizer, objective, cfg.data.max_source_length or task.max_source_length, cfg.data.max_target_length
    )
    data = load_data(cfg, task, encoder)
    collate = Collator(objective, tokenizer.pad_token_id, getattr(config, "decoder_start_token_id", 0) or 0)

    t0 = time.time()
    num_labels = len(task.label_words) if objective == "classify" else None
    model = load_backbone(
        cfg.model, source=source, dtype=dtype, ds_config=ds_config, num_labels=num_labels, seed=cfg.seed
    )
    if family.name == "bert" and cfg.model.pooling == "auto":  # record what auto chose: export, resume
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, pooling=pooling_of(model)))
    backbone = Backbone.from_model(model, cfg.model.name_or_path)
    rt = Runtime(
        cfg,
        out,
        rank,
        world,
        zero.device(),
        ds_config,
        ds_source,
        dtype,
        family,
        objective,
        task,
        tokenizer,
        collate,
        data,
        model,
        backbone,
    )
    if strategy:
        rt.log(f"[s3delta {kind}] deepspeed=auto: {strategy} -> {ds_name}")
    pooling = f", {cfg.model.pooling} pooling" if family.name == "bert" else ""
    rt.log(
        f"[s3delta {kind}] {world} rank(s) on {zero.device_type()}, ZeRO stage {zero.zero_stage(ds_config)}, "
        f"{dtype}; backbone {cfg.model.name_or_path} ({backbone.info.num_params:,} parameters, family "
        f"{family.name}{pooling}) loaded in {time.time() - t0:.1f}s; task {task.name}: "
        f"{len(data['train'])}/{len(data['validation'])}/{len(data['test'])} train/validation/test examples"
    )
    if rank == 0:
        atomic_write_text(out / "config.yaml", dump_yaml(cfg))
        atomic_write_text(out / "ds_config.json", json.dumps(ds_config, indent=2) + "\n")
        rt.log(
            "resolved config:\n"
            + dump_yaml(cfg)
            + f"resolved DeepSpeed config ({ds_source}):\n"
            + json.dumps(ds_config, indent=2)
        )
    return rt


def script_main(run, argv: list[str] | None, prog: str) -> int:
    """Shared argument handling of search.py / retrain.py (every launcher passes --local_rank)."""
    import argparse

    from .config import load_run_config
    from .errors import S3DeltaError

    p = argparse.ArgumentParser(prog=prog, description="Keys of the YAML config can be overridden as section.key=value")
    p.add_argument("--config", help="YAML run config (see examples/)")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = p.parse_args(argv)
    try:
        cfg = load_run_config(args.config, args.overrides)
        run(cfg, resume=args.resume)
        return 0
    except S3DeltaError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        zero.destroy()


def is_better(result: dict, state: dict, metric: str, select: str = "metric") -> bool:
    """Model selection on validation: the metric (ties → lower loss), the loss, or always the latest."""
    if select == "last":
        return True
    if select == "loss":
        return result["loss"] <= state["best_loss"]
    if result[metric] != state["best_score"]:
        return result[metric] > state["best_score"]
    return result["loss"] <= state["best_loss"]


def new_state(**extra) -> dict:
    """Loop state that goes into every checkpoint."""
    return {
        "step": 0,
        "best_score": float("-inf"),
        "best_loss": float("inf"),
        "best_step": -1,
        "step_times": [],
        **extra,
    }


def train_loop(
    rt: Runtime, tc: TrainConfig, state: dict, *, desc: str, step_fn, eval_fn, checkpoint_fn, metrics
) -> bool:
    """The loop both entry points share: step, log, validate, checkpoint, honour ``stop_after``.

    ``step_fn(step) -> dict`` runs one optimizer step and returns numbers to log; ``eval_fn()`` runs
    validation (and updates the best); ``checkpoint_fn()`` saves. Returns False when the launch
    stopped early (``stop_after``), True when all steps are done.
    """
    from tqdm import tqdm

    start = state["step"]
    bar = tqdm(total=tc.steps, initial=start, disable=not rt.is_main, desc=desc, dynamic_ncols=True, mininterval=2)
    try:
        while state["step"] < tc.steps:
            t0 = time.perf_counter()
            stats = step_fn(state["step"])
            state["step_times"].append(time.perf_counter() - t0)
            state["step"] += 1
            step = state["step"]
            bar.update(1)
            if step % tc.log_every == 0:
                metrics.log(step, desc, stats)
                bar.set_postfix({k: f"{v:.3f}" for k, v in stats.items() if k.endswith("loss")})
            saved = False
            if step % tc.eval_every == 0 or step == tc.steps:
                eval_fn()
                if tc.checkpoint_every == 0:
                    checkpoint_fn()
                    saved = True
            if tc.checkpoint_every and step % tc.checkpoint_every == 0 and not saved:
                checkpoint_fn()
                saved = True
            if tc.stop_after and step - start >= tc.stop_after and step < tc.steps:
                if not saved:
                    checkpoint_fn()
                rt.log(f"stopping after {tc.stop_after} steps (stop_after) at step {step}; continue with --resume")
                return False
        return True
    finally:
        bar.close()


def frozen_bytes(model: torch.nn.Module) -> int:
    """Bytes of frozen weights this rank holds (its ZeRO-3 partitions, or everything)."""
    return sum(zero.local_numel(p) * p.element_size() for p in model.parameters() if not p.requires_grad)


def auto_strategy(cfg: RunConfig, source: str) -> tuple[str, str]:
    """``deepspeed=auto``: estimate the frozen backbone's bytes from its config (meta device) and
    pick replication or ZeRO-3 (see ``engine.zero.choose_strategy``)."""
    plan = Backbone.plan(source)
    per_param = {"4bit": 0.5, "8bit": 1.0}.get(
        cfg.model.quantize or "", 2.0 if cfg.model.dtype in ("bf16", "fp16") else 4.0
    )
    if cfg.model.dtype == "auto" and zero.device_type() != "cpu" and not cfg.model.quantize:
        per_param = 2.0
    trainable = plan.space(cfg.search.space).total_params  # the search supernet: every candidate trains
    return zero.choose_strategy(int(plan.info.num_params * per_param), trainable, zero.device_memory_bytes())
