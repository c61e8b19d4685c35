"""What the search and retrain entry points share: distributed setup, the resolved DeepSpeed
config, the task's encoded data, the frozen backbone, and the output directory rules."""

from __future__ import annotations

import array
import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ..backbones import Family, SiteMap, family_for
from ..backbones.checkpointing import checkpointed_blocks
from ..backbones.pooling import pooling_of
from ..config import RunConfig, TrainConfig, dump_yaml, load_run_config
from ..data import OBJECTIVES, Collator, Encoder, Task, load_rows, load_tokenizer, resolve_task
from ..data.encode import encode_all
from ..engine import zero
from ..engine.backbone import load_backbone, resolve_source
from ..errors import BackboneError, BudgetError, ConfigError, DataError, SearchSpaceError, StructureError
from ..structure.builders import Backbone
from ..util import RUN_MARKER, atomic_write_text, claim_run_dir, read_run_claim
from .plan import RunPlan


@dataclass
class Runtime:
    cfg: RunConfig
    plan: RunPlan
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

    @functools.cached_property
    def resume_facts(self) -> dict:
        """What a checkpoint records so that a resumed launch can check it continues the same run
        (``check_resume_facts``): a fingerprint of the encoded train and validation rows, for a
        randomly initialised backbone whether ZeRO-3 drew its weights (partitioned, they come out
        other than whole), a retrain's modules by digest (its path is a config key; an alpha or
        a dropout edited in the file since changes no tensor shape the checkpoint would catch), and
        the resolved dtype (``model.dtype=auto`` follows the DeepSpeed config and the accelerator:
        bf16 on an A100, fp16 or fp32 after a requeue onto older nodes)."""
        digest = {split: rows_digest(self.data[split]) for split in ("train", "validation")}
        stage3 = zero.zero_stage(self.ds_config) == 3
        pooling = self.cfg.model.pooling if self.family.name == "bert" else None  # resolved: auto reads the model
        structure = self.plan.structure.modules_digest() if self.plan.structure is not None else None
        return {
            "rows": digest,
            "zero3_init": stage3,
            "deepspeed": self.plan.deepspeed,
            "pooling": pooling,
            "structure": structure,
            "dtype": self.dtype,
        }

    def write_resolved_configs(self) -> None:
        """``config.yaml`` and ``ds_config.json`` of this launch (rank 0). A resumed launch writes
        them once the checkpoint has accepted it: a refused resume must leave the run's own."""
        if self.is_main:
            atomic_write_text(self.out / "config.yaml", dump_yaml(self.cfg))
            atomic_write_text(self.out / "ds_config.json", json.dumps(self.ds_config, indent=2) + "\n")


def rows_digest(rows: list[dict]) -> str:
    """``count:sha256`` of encoded rows: their token ids and labels, in order (``choices`` follow from
    them and the label words, which ``RESUME_FIXED`` holds). ~1 µs a row: MNLI's 393k in well under a
    second, on every rank."""
    h = hashlib.sha256()
    for row in rows:
        for key in sorted(row):
            value = row[key]
            if key == "choices":
                continue
            if isinstance(value, torch.Tensor):
                value = value.tolist()
            if isinstance(value, (list, tuple)):
                h.update(key.encode() + array.array("q", value).tobytes())
            else:
                h.update(f"{key}={value!r};".encode())
    return f"{len(rows)}:{h.hexdigest()[:16]}"


def check_resume_facts(rt: Runtime, saved: dict | None) -> None:
    """Refuse to resume a run on other rows, or on a random backbone drawn another way.

    Config keys cannot see everything: a test file added since re-cuts validation from the same
    files (the protocol halves validation when there is no test split), and ``deepspeed=auto`` may
    pick another ZeRO stage on another number of nodes.

    Raises:
        DataError: the train or validation rows differ from the checkpoint's.
        ConfigError: a ``model.random_init`` backbone drawn under ZeRO-3 and now not (or the reverse).
    """
    if saved is None:  # a checkpoint written before these facts were recorded
        _check_unrecorded_dtype(rt)
        return
    now = rt.resume_facts
    changed = [s for s, d in now["rows"].items() if saved["rows"].get(s) != d]
    if changed:
        said = "; ".join(f"{s}: {saved['rows'].get(s)} -> {now['rows'][s]} (rows:sha256)" for s in changed)
        raise DataError(
            f"--resume: the {' and '.join(changed)} rows are not the checkpoint's ({said}). A data file, the "
            "tokenizer, or a test split changed since (with no test split, validation is halved into validation "
            "and test). Put them back, or start a new run in another output_dir"
        )
    if saved.get("structure") is not None and saved["structure"] != now["structure"]:
        raise ConfigError(
            f"--resume: {rt.cfg.retrain.structure} is not the structure this run trained (digest "
            f"{saved['structure'][:19]}... then, {str(now['structure'])[:19]}... now): it was edited or replaced "
            "since. Put back the file the run started with, or start a new run in another output_dir"
        )
    if saved.get("dtype") is not None and saved["dtype"] != now["dtype"]:
        raise ConfigError(
            f"--resume: the checkpoint's run trained in {saved['dtype']} and this launch resolves "
            f"model.dtype={rt.cfg.model.dtype} to {now['dtype']} (auto follows the DeepSpeed config's bf16/fp16 "
            f"and whether the accelerator has bf16): resume with model.dtype={saved['dtype']}, on nodes that "
            f"support {saved['dtype']}"
        )
    if saved.get("dtype") is None:
        _check_unrecorded_dtype(rt)
    if saved.get("pooling") is not None and saved["pooling"] != now["pooling"]:
        raise ConfigError(
            f"--resume: the checkpoint's classifier head was trained on {saved['pooling']} pooling and this launch "
            f"pools by {now['pooling']}: resume with model.pooling={saved['pooling']}"
        )
    if rt.cfg.model.random_init and saved["zero3_init"] != now["zero3_init"]:
        was, is_ = ("ZeRO-3", "another stage") if saved["zero3_init"] else ("another stage", "ZeRO-3")
        fix = f"deepspeed={saved['deepspeed']}" if saved.get("deepspeed") else "the checkpoint run's deepspeed config"
        raise ConfigError(
            f"--resume: model.random_init=true draws the frozen backbone's weights differently under ZeRO-3 "
            f"(partitioned) than whole, and the checkpoint's were drawn under {was}, this launch's under {is_}: "
            f"resume with {fix} (zero_stage= to match, if you set it)"
        )


def _check_unrecorded_dtype(rt: Runtime) -> None:
    """A checkpoint written before the resolved dtype was recorded: ``check_resume_config`` lets a
    ``model.dtype`` change to or from auto through (the fact decides), so here the setting itself
    must be the run's (its config.yaml, not yet rewritten by this launch)."""
    try:
        before = load_run_config(rt.out / "config.yaml").model.dtype
    except (ConfigError, OSError):
        return
    if before != rt.cfg.model.dtype:
        raise ConfigError(
            f"--resume: the run used model.dtype={before} and this launch model.dtype={rt.cfg.model.dtype}, and "
            f"its checkpoint does not record the dtype that resolved to: resume with model.dtype={before}"
        )


def claim_info() -> dict:
    """Who claims a directory: read back by ``live_owner``."""
    return {"slurm_job_id": os.environ.get("SLURM_JOB_ID"), "host": socket.gethostname(), "pid": os.getpid()}


def prepare_output_dir(out: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse to mix runs: an existing non-empty directory needs --resume or overwrite=true. Rank 0 only.

    The run claims the directory (``util.claim_run_dir``, atomic): two jobs started on one
    output_dir at once cannot both write there, and a requeued Slurm job knows its own directory
    (``run.slurm.run_args``) by the job id the claim records.
    """
    check_output_dir(out, resume=resume, overwrite=overwrite)
    if resume:
        claim_run_dir(out, claim_info(), replace=True)  # this job continues it now
        return
    made = not out.exists()
    if out.exists() and any(out.iterdir()):
        shutil.rmtree(out)  # an earlier run's, and overwrite=true (check_output_dir)
        made = True
    out.mkdir(parents=True, exist_ok=True)
    # made_dir: release_unstarted gives back a directory this run made, never one the user made
    if not claim_run_dir(out, {**claim_info(), "made_dir": made}):
        raise ConfigError(f"output directory {out} was claimed by another run a moment ago: use another output_dir")


#: squeue states of a job that is, or will again be, running (and writing to its directory).
_LIVE_SLURM_STATES = {
    "PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING",
    "SUSPENDED", "RESIZING", "SIGNALING", "STAGE_OUT",
}  # fmt: skip


def slurm_job_state(job: str) -> str | None:
    """The job's state as ``squeue`` says it; "" when squeue answers and does not list it (ended,
    or purged: "Invalid job id"); None when squeue cannot be asked (absent, timed out, or another
    error, such as an unreachable controller)."""
    try:
        proc = subprocess.run(["squeue", "-h", "-j", str(job), "-o", "%T"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        return "" if "invalid job id" in proc.stderr.lower() else None
    lines = proc.stdout.strip().splitlines()
    return lines[0].strip() if lines else ""


def is_live(state: str | None) -> bool:
    return state in _LIVE_SLURM_STATES


def live_owner(claim: dict) -> str | None:
    """Who still runs on a claimed directory, or None: another Slurm job that ``squeue`` lists as
    active (a requeued one resumes the directory by itself), or an s3delta process on this host.
    Unknown (no squeue, a claim from elsewhere) counts as not running."""
    job, here = claim.get("slurm_job_id"), os.environ.get("SLURM_JOB_ID")
    if job:
        if job == here:
            return None  # this job (requeued): its own directory
        state = slurm_job_state(job)
        return f"Slurm job {job} ({state})" if is_live(state) else None
    pid = claim.get("pid")
    if claim.get("host") != socket.gethostname() or not isinstance(pid, int) or pid == os.getpid():
        return None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return f"process {pid} on this host" if b"s3delta" in cmdline else None


def _refuse_a_live_owner(out: Path, action: str) -> None:
    claim = read_run_claim(out)
    owner = live_owner(claim) if claim else None
    if owner:
        raise ConfigError(
            f"{action}: {out} belongs to {owner}, which is still running (or queued to resume it): two runs "
            "would write one directory. Wait for it, cancel it (scancel), or use another output_dir"
        )


def check_output_dir(out: Path, *, resume: bool, overwrite: bool) -> None:
    """``prepare_output_dir``'s refusals, touching nothing: also run by ``s3delta search --nproc N``
    before it starts the ranks.

    Raises:
        ConfigError: --resume of a missing directory; a non-empty one without --resume or
            overwrite=true; overwrite=true of a directory that is not a run's, or holds the cwd.
    """
    if resume:
        if not out.is_dir():
            raise ConfigError(f"--resume: output directory {out} does not exist")
        _refuse_a_live_owner(out, "--resume")
        return
    if out.exists() and any(out.iterdir()):
        if overwrite:
            _refuse_a_live_owner(out, "overwrite=true")
        if not overwrite:
            raise ConfigError(
                f"output directory {out} is not empty; pass --resume to continue it, or overwrite=true to replace it"
            )
        # overwrite=true deletes the whole directory: only ever an earlier run's (output_dir=runs or
        # output_dir=. must not take every other run, or the checkout, with it)
        is_run = (out / "config.yaml").is_file() and (out / "ds_config.json").is_file()
        if not (is_run or read_run_claim(out) is not None):
            raise ConfigError(
                f"output directory {out} is not empty and is not an s3delta_ds run (no config.yaml and "
                "ds_config.json): overwrite=true only replaces a run's directory; pick another output_dir"
            )
        if Path.cwd().resolve().is_relative_to(out.resolve()):
            raise ConfigError(f"overwrite=true would delete {out}, which holds the current directory")


def subsample(rows: list[dict], limit: int | None, how: str, seed: int, split: str) -> list[dict]:
    """At most ``limit`` rows: the first ones (head), or a sample drawn with the split seed, kept in
    file order (random; the first rows of a file sorted by label would be one class)."""
    if not limit or len(rows) <= limit:
        return rows
    if how == "head":
        return rows[:limit]
    keep = sorted(random.Random(f"{seed}:{split}").sample(range(len(rows)), limit))
    return [rows[i] for i in keep]


def _encode(encoder: Encoder, rows: list[dict], cfg: RunConfig, limit: int | None, split: str) -> list[dict]:
    rows = subsample(rows, limit, cfg.data.subsample, cfg.data.split_seed, split)
    if not rows:
        raise DataError(f"{split}: no examples")
    stats: dict = {}
    encoded = encode_all(encoder, rows, stats=stats)
    if stats["truncated"]:
        n = stats["truncated"]
        print(
            f"note: {split}: {n} of {len(rows)} rows ({100 * n / len(rows):.0f}%) fill "
            f"data.max_source_length={encoder.max_source_length} tokens; longer ones lost their end (a "
            "second text field, the template's closing words)",
            flush=True,
        )
    return encoded


def load_data(cfg: RunConfig, task: Task, encoder: Encoder) -> dict[str, list[dict]]:
    """The encoded train/validation/test splits, read and tokenised once, on rank 0, and sent to the
    other ranks (one broadcast instead of every rank re-reading and re-tokenising, and the data
    messages printed once). The splits a task's protocol draws (validation → validation/test, the
    train carve-out) depend on ``data.split_seed`` alone, never on the run seed: a structure searched
    with one seed and retrained with another is tested on the same rows. Collective.

    Raises:
        DataError: (on every rank) what rank 0 found wrong with the data.
    """
    data, err = None, None
    if zero.rank() == 0:
        try:
            rows = load_rows(task, cfg.data.data_dir, split_seed=cfg.data.split_seed)
            data = {
                "train": _encode(encoder, rows["train"], cfg, cfg.data.max_train_examples, "train"),
                "validation": _encode(encoder, rows["validation"], cfg, cfg.data.max_eval_examples, "validation"),
                "test": _encode(
                    encoder, rows["test"], cfg, cfg.data.max_test_examples or cfg.data.max_eval_examples, "test"
                ),
            }
        except DataError as e:
            err = str(e)
    data, err = zero.broadcast_object((data, err))
    if err is not None:
        raise DataError(err)
    return data


def model_source(cfg: RunConfig) -> str:
    """Where the weights come from. Collective: rank 0 materialises an embedded default first."""
    source = resolve_source(cfg.model) if zero.rank() == 0 else None
    zero.barrier()
    return resolve_source(cfg.model) if zero.rank() != 0 else source


def prepare(cfg: RunConfig, train: TrainConfig, *, resume: bool, kind: str, plan: RunPlan | None = None) -> Runtime:
    """Everything up to (not including) attaching deltas. Collective: call on every rank.

    ``cfg`` must have been through ``preflight`` (model and task resolved, names checked). ``plan``:
    the run's plan (``RunPlan``), resolved here for a bare setup when not given."""
    if cfg.model.name_or_path is None or cfg.data.task is None:
        raise ConfigError("model.name_or_path and data.task must be resolved first (s3delta_ds.run.preflight)")
    rank, world = zero.init_distributed()
    plan = plan or RunPlan.for_setup(cfg, model_source(cfg))

    from ..backbones.loading import load_config

    config = load_config(plan.source, cfg.model.gguf_file)
    family = family_for(config)
    template, ds_source = zero.read_ds_config(plan.deepspeed)
    dtype = zero.resolve_dtype(cfg.model.dtype, template)
    zero.check_dtype_supported(dtype, cfg.model.dtype, template)
    ds_config = zero.resolve_ds_config(
        template,
        micro_batch=train.micro_batch_size,
        grad_accum=train.grad_accum,
        world=world,
        clip=train.clip,
        dtype=dtype,
        hidden_size=family.hidden_size(config),
        zero_stage=cfg.zero_stage,
        local_world=zero.local_world_size(),
    )
    zero.check_hpz_placement(ds_config)
    # the data first: a missing column or a bad label is the commonest first-run error, and found
    # before the output directory is claimed it leaves nothing behind that the fixed rerun would refuse
    task, objective, tokenizer, collate, data = _task_data(cfg, family, config)
    out = Path(cfg.output_dir)
    _output_dir(out, rank, resume=resume, overwrite=cfg.overwrite, cfg=cfg, kind=kind)

    t0 = time.time()
    num_labels = len(task.label_words) if objective == "classify" else None
    try:
        model = load_backbone(
            cfg.model, source=plan.source, dtype=dtype, ds_config=ds_config, num_labels=num_labels, seed=cfg.seed
        )
    except BaseException:
        if rank == 0 and not resume:
            release_unstarted(out)
        raise
    if family.name == "bert" and cfg.model.pooling == "auto":  # record what auto chose: export, resume
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, pooling=pooling_of(model)))
    backbone = Backbone.from_model(model, cfg.model.name_or_path)
    rt = Runtime(
        cfg, plan, Path(cfg.output_dir), rank, world, zero.device(), ds_config, ds_source, dtype, family,
        objective, task, tokenizer, collate, data, model, backbone,
    )  # fmt: skip
    _announce(rt, kind, time.time() - t0, write=not resume)
    return rt


# What a resumed run must share with the run it continues: the data it sees and how it splits
# them, how labels read and score (a reversed label_words would retrain against the other class),
# the validation set and metric its best step was chosen on, what it trains, and its optimisation.
# The rest (micro-batch and accumulation on another number of ranks, the ZeRO stage, evaluation and
# checkpoint cadence, stop_after, the test set scored at the end) may change; what the keys cannot
# show (the rows themselves, a random backbone's draw) the checkpoint checks (``check_resume_facts``).
RESUME_FIXED = {
    "common": (
        "seed", "model.name_or_path", "model.dtype", "model.random_init", "model.quantize", "model.gguf_file",
        "data.task", "data.data_dir", "data.train_file", "data.validation_file", "data.hub_dataset",
        "data.hub_config", "data.train_split", "data.validation_split",
        "data.template", "data.columns", "data.label_column", "data.label_words", "data.metric", "model.tokenizer",
        "data.label_scoring", "data.max_source_length", "data.max_target_length",
        "data.split_seed", "data.subsample", "data.max_train_examples", "data.max_eval_examples",
    ),
    "search": (
        "search.space", "search.budget", "search.mode", "search.steps", "search.lr", "search.weight_decay",
        "search.gate_lr", "search.gate_optimizer", "search.gate_warmup", "search.beta", "search.temperature",
        "search.shift_gradient", "search.clip", "search.gate_clip", "search.virtual_step", "search.select",
    ),
    "retrain": (
        "retrain.structure", "retrain.full_finetune", "retrain.pafi_mask", "retrain.steps", "retrain.lr",
        "retrain.weight_decay", "retrain.clip", "retrain.test_at",
    ),
}  # fmt: skip


_RESUME_PATHS = {"data.data_dir", "data.train_file", "data.validation_file", "retrain.structure", "retrain.pafi_mask"}


def check_resume_config(out: Path, cfg: RunConfig, kind: str) -> None:
    """Refuse to resume with settings the checkpoint's run did not use (its ``config.yaml``).

    A restored scheduler keeps the old learning rate while the new one is written to the run's
    records; another seed re-cuts the data halves mid-run; another budget re-shifts the gates.

    Raises:
        ConfigError: the differing keys, with both values.
    """
    previous = out / "config.yaml"
    if not previous.is_file():
        return
    try:
        old = load_run_config(previous)
    except ConfigError:  # written by another version of s3delta_ds: nothing to compare it with
        return

    def value(c: RunConfig, dotted: str):
        for part in dotted.split("."):
            c = getattr(c, part)
        return c

    keys = RESUME_FIXED["common"] + RESUME_FIXED.get(kind, ())

    def same(k: str) -> bool:
        a, b = value(old, k), value(cfg, k)
        if k == "model.dtype" and "auto" in (a, b):  # the dtype it resolves to is a checkpoint fact
            return True
        if k in _RESUME_PATHS and a is not None and b is not None:  # ./s.json and /abs/s.json are one file
            return Path(a).resolve() == Path(b).resolve()
        return a == b

    diffs = [(k, value(old, k), value(cfg, k)) for k in keys if not same(k)]
    if diffs:
        said = "; ".join(f"{k} {a!r} -> {b!r}" for k, a, b in diffs)
        raise ConfigError(
            f"--resume with settings the run in {out} did not use ({said}): a resumed run continues that run. "
            "Set them back, or start a new run in another output_dir"
        )


def _output_dir(out: Path, rank: int, *, resume: bool, overwrite: bool, cfg=None, kind: str = "") -> None:
    """``prepare_output_dir`` (and, resuming, ``check_resume_config``) on rank 0; every rank raises
    its error."""
    err = None
    if rank == 0:
        try:
            prepare_output_dir(out, resume=resume, overwrite=overwrite)
            if resume and cfg is not None:
                check_resume_config(out, cfg, kind)
        except ConfigError as e:
            err = str(e)
        except OSError as e:  # on rank 0 alone: the other ranks would wait in the broadcast
            err = f"cannot set up output directory {out}: {e.strerror or e}" + (
                f" ({e.filename})" if e.filename and str(e.filename) != str(out) else ""
            )
    err = zero.broadcast_object(err)
    if err:
        raise ConfigError(err)


#: What a run writes before its first step: the claim and its resolved configs (``_announce``).
UNSTARTED = frozenset({RUN_MARKER, "config.yaml", "ds_config.json"})


def release_unstarted(out: Path) -> None:
    """Give back a directory a run claimed and set up but never started training in (a failed
    model load, a DeepSpeed config DeepSpeed refuses, a batch the data cannot fill): the rerun
    after the fix must not find it "not empty". A directory holding anything more is left alone."""
    names = {p.name for p in out.iterdir()} if out.is_dir() else set()
    if RUN_MARKER in names and names <= UNSTARTED:
        made = (read_run_claim(out) or {}).get("made_dir") is True
        for name in names:
            (out / name).unlink()
        if made and out.resolve() != Path.cwd().resolve():
            with contextlib.suppress(OSError):  # the directory too, unless something else came in
                out.rmdir()


@contextlib.contextmanager
def released_on_failure(rt: Runtime, resume: bool) -> Iterator[None]:
    """Around the rest of a recipe's setup: any failure there gives back the unstarted directory."""
    try:
        yield
    except BaseException:
        if rt.is_main and not resume:
            release_unstarted(rt.out)
        raise


def _task_data(cfg: RunConfig, family: Family, config) -> tuple[Task, str, object, Collator, dict[str, list[dict]]]:
    """The task, its objective for this family, the tokenizer, the collator and the encoded splits."""
    task = resolve_task(cfg.data)
    objective = OBJECTIVES[family.name]
    tokenizer = load_tokenizer(family.name, cfg.model.name_or_path, cfg.model.tokenizer, cfg.model.gguf_file)
    encoder = Encoder(
        task, tokenizer, objective, cfg.data.max_source_length or task.max_source_length, cfg.data.max_target_length
    )
    data = load_data(cfg, task, encoder)
    collate = Collator(objective, tokenizer.pad_token_id, getattr(config, "decoder_start_token_id", 0) or 0)
    return task, objective, tokenizer, collate, data


def _announce(rt: Runtime, kind: str, load_s: float, *, write: bool) -> None:
    """Say what was set up, and (``write``) write the resolved configs (rank 0)."""
    cfg, plan, family, data = rt.cfg, rt.plan, rt.family, rt.data
    if plan.strategy:
        rt.log(f"[s3delta {kind}] deepspeed=auto: {plan.strategy} -> {plan.deepspeed}")
    pooling = f", {cfg.model.pooling} pooling" if family.name == "bert" else ""
    if cfg.model.gradient_checkpointing:
        pooling += f", activation checkpointing on {checkpointed_blocks(rt.model)} blocks"
    rt.log(
        f"[s3delta {kind}] {rt.world} rank(s) on {zero.device_type()}, ZeRO stage {zero.zero_stage(rt.ds_config)}, "
        f"{rt.dtype}; backbone {cfg.model.name_or_path} ({rt.backbone.info.num_params:,} parameters, family "
        f"{family.name}{pooling}) loaded in {load_s:.1f}s; task {rt.task.name}: "
        f"{len(data['train'])}/{len(data['validation'])}/{len(data['test'])} train/validation/test examples"
    )
    if write:
        rt.write_resolved_configs()
    if rt.is_main:
        rt.log(
            "resolved config:\n"
            + dump_yaml(cfg)
            + f"resolved DeepSpeed config ({rt.ds_source}):\n"
            + json.dumps(rt.ds_config, indent=2)
        )


INPUT_ERRORS = (ConfigError, DataError, StructureError, BackboneError, SearchSpaceError, BudgetError)


def script_main(run, argv: list[str] | None, prog: str) -> int:
    """Shared argument handling of search.py / retrain.py (every launcher passes --local_rank)."""
    import argparse

    from ..errors import RunStopped, S3DeltaError, TrainingError
    from .signals import EXIT_STOPPED

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
    except RunStopped:  # said on rank 0 already; not 0, or an afterok job would start on an unfinished run
        return EXIT_STOPPED
    except S3DeltaError as e:
        # Mistakes in the input (config, names, structure, data) are found alike on every rank:
        # say them once. Failures of the run itself may be one rank's: every rank says its own.
        rank = int(os.environ.get("RANK", "0"))
        said = str(e)
        if isinstance(e, TrainingError) and not args.resume and (Path(cfg.output_dir) / RUN_MARKER).is_file():
            # the fix (a lower learning rate) is another run: the directory of this one would refuse it
            said += f" (this run's files stay in {cfg.output_dir}: start the fixed run there with overwrite=true)"
        if rank == 0:
            print(f"error: {said}", file=sys.stderr, flush=True)
        elif not isinstance(e, INPUT_ERRORS):
            print(f"[rank {rank}] error: {said}", file=sys.stderr, flush=True)
        return 2
    finally:
        zero.destroy()
