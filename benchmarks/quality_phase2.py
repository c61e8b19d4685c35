"""Quality, phase 2 (issue 15): searched vs random vs the best budget-matched manual method, on test.

    python benchmarks/quality.py --phase 2 --work DIR       # resumable; start one worker per free core
    python benchmarks/quality.py --phase 2 --report         # rewrite benchmarks/results/quality.md only
    python benchmarks/quality.py --phase 2 --tasks mine.yaml [--budgets 1e-3] --out DIR   # another task

MiniLM-L6 × {Rotten Tomatoes, Reuters R8} × budgets {1e-3, 3e-4}. Per (task, budget) cell: the
searched and the random structure with the same 5 seeds (paired: a seed fixes the data order and the
delta initialisation of both), every budget-matched manual method (a preset at its own size that
fits, or a scalable one resized to the budget) screened with seed 0, and the two best of them **on
validation** with seeds 1 and 2 as well. Per task: full fine-tuning and LoRA r=8 at its own size,
3 seeds. The search runs with the package's defaults (frozen from phase 1) and only this protocol's
lengths, batch and learning rate. ``--tasks`` runs the same protocol on other tasks (registered
names, or run-config YAML files with your own data, ``task_from_file``), into their own records and
report (``use_tasks``): the check that the defaults carry to a task the project never saw.

How the test sets stay out of every choice: the search selects its gates on validation, every
retrain selects its step on validation, the manual methods are ranked on their validation score,
"best manual" for the interval is the one of the two with the higher mean validation score, and the
protocol (lengths, rates, defaults) was fixed before any phase-2 run. Test scores are only read by
``report()``.

The queue is a list of units in priority order. A unit's record is one JSON file; a worker claims a
unit with an exclusive lock file (a dead worker's lock is taken over), so ``nohup`` several workers,
one per core, and rerun any time: finished units are skipped, and a unit whose worker was killed
continues from its last evaluation (every run checkpoints after each one; ``--resume`` reproduces
the uninterrupted run; benchmarks/quality_launch.py), so a stop costs at most ``P2_EVAL_EVERY`` steps
of one run per worker.
"""

from __future__ import annotations

import fcntl
import functools
import json
import math
import os
import shutil
import socket
import statistics
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from benchmarks.quality import RESULTS, SETUPS, _composition, _modules_key
from benchmarks.quality_launch import run_resumable
from benchmarks.quality_stats import Interval, mean_std, paired_t_interval, welch_interval
from s3delta_ds.config import load_run_config
from s3delta_ds.structure import Structure, builders
from s3delta_ds.util import atomic_path, atomic_write_text

P2_OUT = _PROJECT_OUT = RESULTS / "quality-phase2"
P2_MD = RESULTS / "quality.md"  # its figures go next to it
P2_NOTES: Path | None = RESULTS / "quality-notes.md"  # the hand-written analysis the report appends
P2_BACKBONE = "minilm"
P2_TASKS = ("rt-sentiment", "reuters-r8")
#: Task label -> its ``data.*`` overrides, for tasks that are not a registered name (``use_tasks``:
#: your own data, from a run-config YAML). A registered task is just ``data.task=<label>``.
P2_TASK_DATA: dict[str, tuple[str, ...]] = {}
P2_ARGS = ""  # what the command line adds to `--phase 2` for another study (the report quotes it)
P2_BUDGETS = (1e-3, 3e-4)
P2_PAIRED = (0, 1, 2, 3, 4)  # searched and random
P2_SEEDS = (0, 1, 2)  # manual, full fine-tuning, LoRA
# 800, not phase 1's 400: the 400-step protocol's own convergence check failed on RT (seed 0, best
# validation: full fine-tuning 81.6 in 400 steps against 85.0 in 800, LoRA r=8 81.0 against 82.8;
# records in results/quality-phase2-400/). The check now runs 1,600 steps against the table's 800.
P2_STEPS = 800
P2_SEARCH_MULT = 1  # search steps = P2_SEARCH_MULT × retrain steps (phase 1's choice)
P2_CURVE_STEPS = 2 * P2_STEPS  # the convergence check: seed-0 runs twice as long as the table's
P2_LENGTH_MARGIN = 0.020  # the check's margin: one standard error of (one 500-row score − a mean of 3)
P2_CURVES = ("full", "lora", "random")  # random: at the smallest budget (the slowest to converge)
P2_EVAL_EVERY = 100  # 8 validations per table run, as the 400-step protocol had
P2_VAL = 500  # validation rows, as in phase 1 (one standard error ~2 points)
P2_TEST = 100_000  # every test row: 1,000 (RT), 2,189 (R8)
P2_BATCH, P2_LR, P2_FULL_LR = 16, 2e-3, 1e-4
# Tokens read per example. RT snippets fit; R8 is cut to its headline and lead (128 tokens cost it
# 2.8x an RT step on this CPU: 14 core-hours for its two cells instead of ~6).
P2_SOURCE_LENGTH = 64
P2_TOP = 2  # manual methods carried to 3 seeds
#: Search keys this protocol sets itself (``_overrides`` and the budget). A search record holds every
#: other search setting, and a search made under other package defaults is not done: it reruns (and
#: so do the retrains of its structure), so a default changed after phase 1 cannot mix in.
P2_SEARCH_PROTOCOL_KEYS = frozenset(
    {"steps", "micro_batch_size", "eval_every", "lr", "eval_batch_size", "log_every", "checkpoint_every", "budget"}
)


def search_settings(search) -> dict:
    """What a search record stores of ``search`` (a SearchConfig): every key but the protocol's."""
    from dataclasses import fields

    keys = [f.name for f in fields(search) if f.name not in P2_SEARCH_PROTOCOL_KEYS]
    return json.loads(json.dumps({k: getattr(search, k) for k in keys}))


def search_defaults() -> dict:
    """The package's search defaults, as a search record stores them."""
    from s3delta_ds.config import SearchConfig

    return search_settings(SearchConfig())


def _fmt_budget(b: float) -> str:
    return f"{b:g}"


# -- another study: the same protocol on other tasks or budgets (e.g. your own data) ---------------

#: Data keys the protocol fixes for every task: the same validation cap, all test rows and the same
#: splits, whatever a task file says. ``max_source_length`` is the protocol's unless the file sets it.
_PROTOCOL_DATA_KEYS = frozenset({"task", "max_eval_examples", "max_test_examples", "split_seed"})
_PATH_KEYS = ("train_file", "validation_file", "test_file", "data_dir", "hub_dataset")
#: Labels a task cannot take: they name the records folder's own subfolders.
_RESERVED_LABELS = frozenset({"structures"})


def _override_value(value) -> str:
    """``value`` as the text of a ``data.key=...`` override that reads back as ``value``: strings
    double-quoted with YAML's escapes (a template may hold ``: {``, look like a number or a
    boolean, or carry characters outside the BMP that JSON would split into surrogates)."""
    import math

    import yaml

    if isinstance(value, str | list):
        return yaml.safe_dump(value, default_flow_style=True, default_style='"', width=math.inf).strip()
    return json.dumps(value)


def _check_label(label: str, where: str) -> None:
    from s3delta_ds.errors import ConfigError

    if not label or label.startswith(".") or label in _RESERVED_LABELS or any(c in label for c in "/@ "):
        raise ConfigError(
            f"{where}: {label!r} cannot label a task of the study (it names its records): use a name without "
            f"'/', '@' or spaces that does not start with '.' and is not {', '.join(sorted(_RESERVED_LABELS))}"
        )


def task_from_file(path: Path) -> tuple[str, tuple[str, ...]]:
    """A task for the study from a run-config YAML (its ``data:`` section, e.g. the file that
    ``s3delta config custom ...`` writes; other sections are ignored): its label (the file's stem)
    and the ``data.*`` overrides that select it. Relative data paths are resolved against the
    current directory, as ``s3delta search --config`` does, and made absolute so that workers
    started elsewhere read the same files. The rows are read once here, so a wrong path, column or
    split fails before any unit trains.

    Raises:
        ConfigError: the file is unreadable, has unknown keys, names no task, or its task is
            inconsistent (``data.task=custom`` without a template, ...); the message names the file.
        DataError: its data cannot be read.
    """
    import dataclasses

    from s3delta_ds.config import DataConfig
    from s3delta_ds.data.tasks import load_rows, resolve_task
    from s3delta_ds.errors import ConfigError, DataError

    label = path.stem
    _check_label(label, str(path))
    try:
        data = load_run_config(path).data
        if data.task is None:
            raise ConfigError("its data section names no task (data.task: custom, or a registered task)")
        # a hub_dataset is a local path only when it exists (else it is a datasets name)
        resolved = {
            k: str(Path(v).resolve())
            for k in _PATH_KEYS
            if (v := getattr(data, k)) and (k != "hub_dataset" or Path(v).exists())
        }
        data = dataclasses.replace(data, **resolved)
        load_rows(resolve_task(data), data.data_dir, 0)
    except (ConfigError, DataError) as e:
        raise type(e)(f"task file {path}: {e}") from e
    default = DataConfig()
    keys = [f.name for f in dataclasses.fields(data) if f.name not in _PROTOCOL_DATA_KEYS]
    keys = [k for k in keys if getattr(data, k) != getattr(default, k)]
    overrides = [f"data.task={data.task}", *(f"data.{k}={_override_value(getattr(data, k))}" for k in keys)]
    return label, tuple(overrides)


def use_tasks(tasks: list[str], budgets: list[float] | None, out: Path) -> None:
    """Point the study at other tasks and budgets, with the protocol unchanged (lengths, seeds,
    learning rates, the search's defaults): what checks that the defaults carry to a task the
    project never saw. ``tasks``: registered task names or run-config YAML files
    (``task_from_file``). Records go to ``out``, the report to ``out``.md with its figures beside
    it; the hand-written notes of the project's own study are not appended.

    Raises:
        ConfigError: an unknown task name, a bad task file, two tasks with the same label, a budget
            outside (0, 1), or an ``out`` that holds or is held by the project's own records.
        DataError: a task whose rows cannot be read (they are read here, before anything trains).
    """
    global P2_TASKS, P2_BUDGETS, P2_OUT, P2_MD, P2_NOTES, P2_TASK_DATA, P2_ARGS
    from s3delta_ds.data.tasks import get_task, load_rows
    from s3delta_ds.errors import ConfigError, DataError

    own = _PROJECT_OUT.resolve()
    if out.resolve() == own or own.is_relative_to(out.resolve()) or out.resolve().is_relative_to(own):
        raise ConfigError(f"--out {out}: another study cannot write into, or around, the project's records ({own})")
    bad = [b for b in budgets or () if not 0 < b < 1]
    if bad:
        raise ConfigError(f"budgets are fractions of the backbone in (0, 1), got {bad}")
    labels, data = [], {}
    for spec in tasks:
        if spec.endswith((".yaml", ".yml")):
            label, overrides = task_from_file(Path(spec))
            data[label] = overrides
        else:
            task = get_task(spec)
            label = task.name
            _check_label(label, "--tasks")
            try:
                load_rows(task, None, 0)
            except DataError as e:
                raise DataError(f"task {label!r}: {e}") from e
        if label in labels:
            raise ConfigError(f"two tasks of the study are both labelled {label!r}")
        labels.append(label)
    P2_TASKS, P2_TASK_DATA = tuple(labels), data
    P2_BUDGETS = tuple(budgets) if budgets else P2_BUDGETS
    P2_OUT, P2_MD, P2_NOTES = out, out.with_suffix(".md"), None
    P2_ARGS = f" --tasks {','.join(tasks)}" + (f" --budgets {','.join(map(_fmt_budget, budgets))}" if budgets else "")
    P2_ARGS += f" --out {out}"


def _task_data(task: str) -> list[str] | None:
    """The data overrides a task file gave ``task`` (as its records store them); None for a
    registered task."""
    return list(P2_TASK_DATA[task]) if task in P2_TASK_DATA else None


def _own_lengths() -> str:
    """The tasks whose files set their own token length (the report's protocol line names them)."""
    own = [f"{t}: {o.split('=', 1)[1]}" for t in P2_TASKS for o in P2_TASK_DATA.get(t, ()) if "max_source_length=" in o]
    return f" ({', '.join(own)})" if own else ""


def _overrides(
    task: str, seed: int, out: Path, section: str, steps: int, lr: float, eval_every: int | None = None
) -> list[str]:
    eval_every = P2_EVAL_EVERY if eval_every is None else eval_every  # read at call time: tests shorten it
    return [
        f"model.name_or_path={SETUPS[P2_BACKBONE].model}",
        f"data.max_eval_examples={P2_VAL}",
        f"data.max_test_examples={P2_TEST}",
        f"data.max_source_length={P2_SOURCE_LENGTH}",
        "data.split_seed=0",
        # the fetched tasks' files are shuffled once, by fetch-assets: their first 500 validation rows
        # are the ones every record of the study chose on; a task file gets the seeded sample
        *(() if task in P2_TASK_DATA else ("data.subsample=head",)),
        *P2_TASK_DATA.get(task, (f"data.task={task}",)),  # after the protocol's: a task may set its length
        f"seed={seed}",
        f"output_dir={out}",
        "overwrite=true",
        "zero_stage=0",
        "model.dtype=fp32",
        f"{section}.steps={steps}",
        f"{section}.micro_batch_size={P2_BATCH}",
        f"{section}.eval_every={eval_every}",
        f"{section}.lr={lr}",
        f"{section}.eval_batch_size=64",
        f"{section}.log_every={P2_EVAL_EVERY}",
        f"{section}.checkpoint_every=0",  # after every evaluation: a killed unit continues from there
    ]


def _curve(run_dir: Path, metric: str) -> list[list[float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [[r["step"], r[metric], r["loss"]] for r in rows if r.get("phase") == "validation"]


# -- the plan ---------------------------------------------------------------------------------------


@functools.cache
def _plan():
    return builders.Backbone.plan(SETUPS[P2_BACKBONE].model)


def manual_candidates(plan, budget: float) -> dict[str, Structure]:
    """Every manual method that fits ``budget``: scalable presets at the largest size that fits,
    the others at their own size when it fits."""
    absolute = builders.absolute_budget(budget, plan.info.num_params)
    out: dict[str, Structure] = {}
    for preset in builders.MANUAL_PRESETS:
        if preset in builders.SCALABLE:
            s = builders.scaled_manual(plan, preset, budget)
        else:
            s = builders.manual(plan, preset)
            s = s if s.budget.used <= absolute else None
        if s is not None:
            out[preset] = s
    return out


@dataclass(frozen=True)
class Unit:
    """One run. ``kind``: curve | full | lora | search | searched | random | manual; ``preset``: the
    manual method (``top0``/``top1`` until the screen has ranked the candidates) or the curve's method."""

    task: str
    kind: str
    seed: int
    budget: float | None = None
    preset: str | None = None

    @property
    def cell(self) -> str:
        return self.task if self.budget is None else f"{self.task}@{_fmt_budget(self.budget)}"

    @property
    def key(self) -> str:
        name = self.kind if self.preset is None else f"{self.kind}-{self.preset}"
        return f"{self.cell}/{name}-s{self.seed}"

    @property
    def path(self) -> Path:
        return P2_OUT / f"{self.key}.json"

    @property
    def steps(self) -> int:
        if self.kind == "curve":
            return P2_CURVE_STEPS
        return P2_SEARCH_MULT * P2_STEPS if self.kind == "search" else P2_STEPS

    def done(self) -> bool:
        """A readable record made with today's lengths (a changed P2_STEPS reruns the unit); for a
        search, with today's search defaults; for a retrain of a searched structure, of the structure
        its search holds now."""
        rec = _read(self.path)
        if rec is None or rec.get("steps") != self.steps or rec.get("task_data") != _task_data(self.task):
            return False  # other lengths, or a task file that changed since (another template, files, ...)
        if self.kind == "search":
            return rec.get("settings") == search_defaults()
        if self.kind == "searched":
            search_unit = Unit(self.task, "search", self.seed, self.budget)
            search = _read(search_unit.path)
            # the search itself must still count: a change of defaults redoes it, and its old
            # retrain must leave the verdicts with it, not linger until the new search differs
            return search_unit.done() and rec.get("modules_key") == search.get("modules_key")
        return True


def _read(path: Path) -> dict | None:
    """A record, or None when it is missing or unreadable (a crash mid-write is rerun, not fatal)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def ranked_manual(task: str, budget: float, plan=None) -> list[str] | None:
    """The budget-matched manual presets by their seed-0 VALIDATION score (None until all are screened)."""
    cands = manual_candidates(plan or _plan(), budget)
    scores = {}
    for preset in cands:
        u = Unit(task, "manual", 0, budget, preset)
        if not u.done():
            return None
        scores[preset] = _read(u.path)["validation"]
    return sorted(scores, key=lambda k: -scores[k])


def units() -> list[Unit]:
    """Every unit, in priority order; a cell's paired seeds go together so that cells complete in turn."""
    plan = _plan()
    out: list[Unit] = []
    for task in P2_TASKS:
        low = min(P2_BUDGETS)
        out += [Unit(task, "curve", 0, low if m == "random" else None, m) for m in P2_CURVES]
        # every seed of the references next: with the curves they decide whether P2_STEPS converges,
        # which every later comparison rests on
        out += [Unit(task, m, s) for m in ("full", "lora") for s in P2_SEEDS]
        for budget in P2_BUDGETS:
            for seed in P2_PAIRED:
                out += [Unit(task, "search", seed, budget), Unit(task, "searched", seed, budget)]
                out.append(Unit(task, "random", seed, budget))
            cands = manual_candidates(plan, budget)
            out += [Unit(task, "manual", 0, budget, p) for p in cands]
            ranked = ranked_manual(task, budget, plan)
            for k in range(min(P2_TOP, len(cands))):
                preset = ranked[k] if ranked else f"top{k}"
                out += [Unit(task, "manual", s, budget, preset) for s in P2_SEEDS if s != 0]
    return out


def ready(u: Unit) -> bool:
    if u.kind == "searched":
        return Unit(u.task, "search", u.seed, u.budget).done()
    if u.kind == "manual" and u.preset and u.preset.startswith("top"):
        return False  # resolved once the screen is complete
    return True


# -- running one unit ------------------------------------------------------------------------------


def _structures() -> Path:
    return P2_OUT / "structures"


def _retrain(u: Unit, work: Path, structure: Path | None) -> dict:
    from s3delta_ds.retrain import run_retrain

    lr = P2_FULL_LR if structure is None else P2_LR
    extra = ["retrain.full_finetune=true"] if structure is None else [f"retrain.structure={structure}"]
    overrides = [*_overrides(u.task, u.seed, work / "run", "retrain", u.steps, lr), *extra]
    launch, s = run_resumable(run_retrain, work, overrides, structure)
    rec = {
        "task": u.task,
        "method": u.kind,
        "budget": u.budget,
        "seed": u.seed,
        "preset": u.preset,
        "metric": s["metric"],
        "validation": s["validation_score"],
        "test": s["test_score"],
        "test_all": s["test"],
        "best_step": s["best_step"],
        "steps": s["steps"],
        "trainable_params": s["trainable_params"],
        "curve": _curve(launch.run_dir, s["metric"]),
        "median_step_s": round(s["median_step_s"], 3),
        **launch.timing(),
    }
    if structure is not None:
        st = Structure.load(structure)
        rec.update(
            params_used=st.budget.used,
            modules=len(st.modules),
            composition=_composition(st),
            modules_key=_modules_key(st),
            scaled=st.search.get("scaled"),
            structure=str(structure.relative_to(P2_OUT)) if structure.is_relative_to(P2_OUT) else None,
        )
    return rec


def _save_structure(s: Structure, u: Unit) -> Path:
    path = _structures() / f"{u.cell}-{u.kind if u.preset is None else u.preset}-s{u.seed}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    s.save(path)
    return path


def run_unit(u: Unit, work: Path) -> dict:
    plan = _plan()
    if u.kind == "curve":
        kind = Unit(u.task, u.preset, u.seed, u.budget)
        if u.preset == "full":
            return _retrain(u, work, None)
        if u.preset == "lora":
            return _retrain(u, work, _save_structure(builders.manual(plan, "lora"), kind))
        s = builders.random_baseline(plan.space("mixed"), plan.info, u.budget, u.seed)
        return _retrain(u, work, _save_structure(s, kind))
    if u.kind == "full":
        return _retrain(u, work, None)
    if u.kind == "lora":
        return _retrain(u, work, _save_structure(builders.manual(plan, "lora"), u))
    if u.kind == "random":
        s = builders.random_baseline(plan.space("mixed"), plan.info, u.budget, u.seed)
        return _retrain(u, work, _save_structure(s, u))
    if u.kind == "manual":
        return _retrain(u, work, _save_structure(manual_candidates(plan, u.budget)[u.preset], u))
    if u.kind == "searched":
        return _retrain(u, work, _structures() / f"{u.cell}-search-s{u.seed}.json")
    from s3delta_ds.search import run_search  # kind == "search"

    steps, every = u.steps, P2_EVAL_EVERY * P2_SEARCH_MULT
    overrides = [*_overrides(u.task, u.seed, work / "run", "search", steps, P2_LR, every), f"search.budget={u.budget}"]
    launch, summary = run_resumable(run_search, work, overrides)
    cfg = load_run_config(None, overrides)
    st = Structure.load(launch.run_dir / "structure.json")
    path = _save_structure(st, u)
    return {
        "task": u.task,
        "method": "search",
        "budget": u.budget,
        "seed": u.seed,
        "settings": search_settings(cfg.search),
        "steps": steps,
        "selected_step": st.search.get("selected_step"),
        "supernet_curve": _curve(launch.run_dir, st.search.get("metric", "accuracy")),
        "params_used": st.budget.used,
        "modules": len(st.modules),
        "composition": _composition(st),
        "modules_key": _modules_key(st),
        "structure": str(path.relative_to(P2_OUT)),
        "median_step_s": round(summary["median_step_s"], 3),
        **launch.timing(),
    }


# -- the queue: one lock file per unit, held with flock while the unit runs ---------------------------
#
# The kernel drops a process's flock when the process dies, so a killed worker frees its unit with no
# liveness guessing. flock is per machine (run the workers of one queue on one machine).

_HELD: dict[str, int] = {}  # unit key -> fd of the lock this process holds


def _lock_path(u: Unit) -> Path:
    return P2_OUT / ".locks" / (u.key.replace("/", "__") + ".lock")


def claim(u: Unit) -> bool:
    """Take ``u`` for this process (False: another live worker holds it)."""
    lock = _lock_path(u)
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_CREAT | os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return False
    try:
        same = os.fstat(fd).st_ino == os.stat(lock).st_ino
    except FileNotFoundError:
        same = False
    if not same:  # its holder released (unlinked) it while we waited: the unit is done or free again
        os.close(fd)
        return False
    os.ftruncate(fd, 0)
    os.write(fd, f"{socket.gethostname()} {os.getpid()}\n".encode())  # for people reading .locks
    _HELD[u.key] = fd
    return True


def release(u: Unit) -> None:
    fd = _HELD.pop(u.key, None)
    if fd is not None:
        _lock_path(u).unlink(missing_ok=True)  # before the unlock: a waiting worker then sees the record
        os.close(fd)


def _held_elsewhere(lock: Path) -> bool:
    """Does a live process hold this lock?"""
    try:
        fd = os.open(lock, os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also drops the probe's lock
    return False


def run_phase2(work_root: Path, poll_s: float = 30.0, kinds: tuple[str, ...] | None = None) -> int:
    """Run units until none is left that this worker can take. Returns the number it ran.

    ``kinds``: only these unit kinds (e.g. the baselines, which do not depend on the search's
    defaults, while phase 1 is still choosing them)."""
    failed: set[str] = set()
    done = 0
    while True:
        pending = [u for u in units() if not u.done() and u.key not in failed and (not kinds or u.kind in kinds)]
        if not pending:
            break
        taken = False
        for u in pending:
            if not ready(u) or not claim(u):
                continue
            if u.done():  # another worker finished it between the scan and the claim
                release(u)
                continue
            taken = True
            t0 = time.time()
            try:
                work = work_root / u.key.replace("/", "__")
                rec = run_unit(u, work)
                if _task_data(u.task) is not None:
                    rec["task_data"] = _task_data(u.task)
                atomic_write_text(u.path, json.dumps(rec, indent=1) + "\n")
                shutil.rmtree(work, ignore_errors=True)
                if not u.done():  # a record that does not count would rerun forever
                    raise RuntimeError(f"{u.path}: the record written does not count as done")
                done += 1
                print(
                    f"[phase2] {u.key}: validation {rec.get('validation', '-')} ({time.time() - t0:.0f}s)", flush=True
                )
            except Exception as e:  # noqa: BLE001 - one failed unit must not stop the queue; it reruns next start
                traceback.print_exc()
                failed.add(u.key)
                print(f"[phase2] {u.key}: FAILED ({type(e).__name__}: {e}); continuing", flush=True)
            finally:
                release(u)
            try:
                report()
            except Exception:  # noqa: BLE001 - a report bug must not stop the runs
                traceback.print_exc()
            break  # rescan from the top: priorities and resolved manual presets may have changed
        if not taken:
            # any live worker (also one running a unit this worker's --only leaves out, e.g. the
            # searches a retrain waits for) may still unblock what is left
            if not any(_held_elsewhere(p) for p in (P2_OUT / ".locks").glob("*.lock")):
                break  # what is left waits for units that failed here or for nobody
            time.sleep(poll_s)
    return done


# -- the report --------------------------------------------------------------------------------------


def _load(failed: list[str] | None = None) -> list[dict]:
    """Every record of a unit of today's plan that is done today (``Unit.done``: today's lengths
    and task files, a search with today's defaults, a searched retrain of the structure its search
    holds now). A record its unit would redo is left out until it is redone: a search rerun after a
    change of defaults must not leave its old retrain in the verdicts. So is a record outside the
    plan (a seed beyond P2_PAIRED/P2_SEEDS, a preset that no longer fits), which would change a
    mean's n but not the paired interval's, and a record with a non-finite score, whose key goes
    to ``failed`` (the report names it; its cell stays pending)."""
    planned = {u.key for u in units()}
    recs = []
    for p in sorted(P2_OUT.rglob("*.json")):
        if p.relative_to(P2_OUT).parts[0] == "structures":
            continue
        r = _read(p)
        if r is None:
            continue
        unit = Unit(r["task"], r["method"], r["seed"], r.get("budget"), r.get("preset"))
        if unit.path != p or unit.key not in planned or not unit.done():
            continue
        scores = [] if r["method"] == "search" else [r.get("validation"), r.get("test")]  # a search scores none
        if not all(isinstance(x, (int, float)) and math.isfinite(x) for x in scores):
            if failed is not None:
                failed.append(unit.key)
            continue
        recs.append(r)
    return recs


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _sd(sd: float, n: int) -> str:
    """ " ± sd" in points; nothing for one run, whose spread is unknown (not 0)."""
    return f" ± {_pct(sd)}" if n > 1 else ""


def best_manual(rows: list[dict], task: str, budget: float) -> tuple[str | None, list[dict]]:
    """Of the P2_TOP presets the screen ranked highest (on validation), the one with the higher mean
    VALIDATION score over P2_SEEDS; none until all of them have every seed."""
    ranked = ranked_manual(task, budget)
    if not ranked:
        return None, []
    by: dict[str, list[dict]] = {}
    for r in rows:
        if r["method"] == "manual" and r["task"] == task and r["budget"] == budget:
            by.setdefault(r["preset"], []).append(r)
    full = {p: by.get(p, []) for p in ranked[:P2_TOP]}
    if any(sorted(r["seed"] for r in rs) != sorted(P2_SEEDS) for rs in full.values()):
        return None, []
    best = max(full, key=lambda p: statistics.mean(r["validation"] for r in full[p]))
    return best, sorted(full[best], key=lambda r: r["seed"])


def cell_verdicts(rows: list[dict], task: str, budget: float, conf: float = 0.95) -> dict:
    """Searched − random (paired by seed) and searched − best manual (Welch), on test, as ``conf``
    intervals."""
    pick = lambda m: {r["seed"]: r for r in rows if r["method"] == m and r["task"] == task and r["budget"] == budget}  # noqa: E731
    searched, random_ = pick("searched"), pick("random")
    seeds = sorted(set(searched) & set(random_))
    # a verdict only once every seed is in: an interval of the first seeds reads as final otherwise
    out: dict = {"seeds": seeds, "complete": seeds == sorted(P2_PAIRED)}
    if len(seeds) >= 2:
        out["vs_random"] = paired_t_interval(
            [searched[s]["test"] for s in seeds], [random_[s]["test"] for s in seeds], conf
        )
    name, manual = best_manual(rows, task, budget)
    out["best_manual"] = name
    out["searched_complete"] = sorted(searched) == sorted(P2_PAIRED)
    if name and len(searched) >= 2:
        out["vs_manual"] = welch_interval([r["test"] for r in searched.values()], [r["test"] for r in manual], conf)
    return out


def _said(interval: Interval | None, complete: bool, n: int) -> str:
    """An interval and its verdict; "pending" with how many seeds of an incomplete cell."""
    if interval is None:
        return "—"
    if not complete:
        return f"{interval.fmt()} pending ({n} of {len(P2_PAIRED)} seeds)"
    return f"{interval.fmt()} **{interval.verdict()}**"


def _multiplicity(rows: list[dict]) -> list[str]:
    """Each verdict is its own 95% interval; across the study's comparisons some would read "win" or
    "loss" by chance alone. Which complete ones hold at a family-wise 95% (Bonferroni)?"""
    m = 2 * len(P2_TASKS) * len(P2_BUDGETS)
    conf = 1 - 0.05 / m
    held, decided = [], 0
    for task in P2_TASKS:
        for budget in P2_BUDGETS:
            v = cell_verdicts(rows, task, budget, conf)
            for name, iv, complete in (
                ("random", v.get("vs_random"), v["complete"]),
                (v["best_manual"], v.get("vs_manual"), v["searched_complete"]),
            ):
                if iv is None or not complete:
                    continue
                decided += 1
                if iv.win or iv.loss:
                    held.append(f"{task} @ {_fmt_budget(budget)} vs {name}: {iv.fmt()} {iv.verdict()}")
    if not decided:
        return []
    p_any = 1 - 0.95**m
    return [
        f"Each interval above is a 95% interval on its own. The study makes {m} such comparisons: if no "
        f"method differed, at least one would read win or loss by chance: {100 * p_any:.0f}% of the time if "
        f"the comparisons were independent. At a family-wise 95% (Bonferroni: "
        f"{100 * conf:.2f}% intervals), of the {decided} complete comparisons "
        + (f"these hold: {'; '.join(held)}." if held else "none is a win or a loss."),
        "",
    ]


def _plot_heatmap(structs: list[Structure], png: Path, title: str) -> bool:
    """Share of the seeds' searched structures holding each (layer, site, delta type)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    counts: dict[tuple[int, str], int] = {}
    for s in structs:
        for m in s.modules:
            parts = m.site.split(".")
            layer = next((int(p) for p in parts if p.isdigit()), -1)
            where = ".".join(p for p in parts if not p.isdigit() and p not in ("encoder", "decoder"))
            counts[(layer, f"{where} · {m.type}")] = counts.get((layer, f"{where} · {m.type}"), 0) + 1
    if not counts:
        return False
    layers = sorted({k[0] for k in counts})
    cols = sorted({k[1] for k in counts})
    grid = [[counts.get((layer, c), 0) / len(structs) for c in cols] for layer in layers]
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(cols) + 2), 0.45 * len(layers) + 2.2))
    im = ax.imshow(grid, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=70, ha="right", fontsize=7)
    ax.set_yticks(range(len(layers)), [str(x) for x in layers])
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label=f"share of {len(structs)} seeds")
    fig.tight_layout()
    with atomic_path(png, suffix=".tmp.png") as tmp:  # workers report concurrently
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return True


def _plot_curves(rows: list[dict], task: str, png: Path) -> bool:
    """Mean validation curve per method (own size and each budget)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    groups: dict[str, list[list]] = {}
    for r in rows:
        if r["task"] != task or r["method"] == "search" or not r.get("curve"):
            continue
        label = (
            r["method"]
            if r["budget"] is None
            else f"{r['method']}{'-' + r['preset'] if r['preset'] else ''} @{r['budget']:g}"
        )
        groups.setdefault(label, []).append(r["curve"])
    if not groups:
        return False
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for label, curves in sorted(groups.items()):
        steps = [c[0] for c in curves[0]]
        mean = [100 * statistics.mean(c[i][1] for c in curves if len(c) > i) for i in range(len(steps))]
        ax.plot(steps, mean, marker=".", label=f"{label} (n={len(curves)})")
    ax.set_xlabel(f"step (batch {P2_BATCH})")
    ax.set_ylabel(f"validation ({P2_VAL} rows), %")
    ax.set_title(f"{P2_BACKBONE} · {task}: mean validation curves")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    with atomic_path(png, suffix=".tmp.png") as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return True


def _seeds(seeds: tuple[int, ...]) -> str:
    return f"{min(seeds)}-{max(seeds)}" if list(seeds) == list(range(min(seeds), max(seeds) + 1)) else str(list(seeds))


def _length_section(curves: list[dict], rows: list[dict]) -> list[str]:
    """Is P2_STEPS long enough? Seed-0 runs of twice the length against the table's runs, and how
    often a table run selected its last evaluation (still improving when it stopped)."""
    if not curves and not rows:
        return []
    out = [
        "## Training length",
        "",
        f"Seed-0 runs of {P2_CURVE_STEPS} steps (validation every {P2_EVAL_EVERY}) against the table's "
        f"{P2_STEPS}-step runs of seeds {_seeds(P2_SEEDS)}: {P2_STEPS} steps count as converged for a method "
        f"unless the long run's best validation exceeds their mean best validation by more than "
        f"{100 * P2_LENGTH_MARGIN:.1f} points{' (the rule and its margin: quality-notes.md)' if P2_NOTES else ''}. "
        "`last` = table runs "
        "whose selected step is their last evaluation.",
        "",
        f"| task | method | best validation, {P2_CURVE_STEPS} steps (at step) | mean best validation, "
        f"{P2_STEPS} steps | difference | within the margin | last |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in sorted(curves, key=lambda r: (r["task"], r["preset"])):
        method = c["preset"]
        same = [
            r
            for r in rows
            if r["task"] == c["task"]
            and r["method"] == method
            and r["seed"] in P2_SEEDS
            and (method != "random" or r["budget"] == c["budget"])
        ]
        name = method if method != "random" else f"random @{c['budget']:g}"
        short, diff, verdict = "—", "—", "—"
        if same:
            mean = statistics.mean(r["validation"] for r in same)
            short, diff = f"{_pct(mean)} (n={len(same)})", f"{100 * (c['validation'] - mean):+.1f}"
            verdict = "yes" if c["validation"] - mean <= P2_LENGTH_MARGIN else "**no**"
            verdict += "" if len(same) == len(P2_SEEDS) else " (so far)"
        last = sum(r["best_step"] == r["steps"] for r in same)
        out.append(
            f"| {c['task']} | {name} | {_pct(c['validation'])} ({c['best_step']}) | {short} | {diff} | {verdict} "
            f"| {last}/{len(same)} |"
        )
    stuck = [r for r in rows if r["best_step"] == r["steps"]]
    out += ["", f"All table runs that selected their last evaluation: {len(stuck)} of {len(rows)}.", ""]
    return out


def report() -> str:
    failed: list[str] = []
    loaded = _load(failed)
    rows = [r for r in loaded if r["method"] not in ("search", "curve")]
    searches = [r for r in loaded if r["method"] == "search"]
    curves = [r for r in loaded if r["method"] == "curve"]
    todo = [u for u in units() if not u.done()]
    lines = [
        "# Quality, phase 2: searched vs random vs the best budget-matched manual method (issue 15)",
        "",
        f"`python benchmarks/quality.py --phase 2{P2_ARGS}` (resumable, several workers may share the queue; "
        f"`--report` rewrites this file). Tasks: {', '.join(P2_TASKS)}; budgets: "
        f"{', '.join(map(_fmt_budget, P2_BUDGETS))}. "
        f"{P2_BACKBONE} (all-MiniLM-L6-v2), fp32, one CPU thread per run; retrain "
        f"{P2_STEPS} steps × batch {P2_BATCH}, {P2_SOURCE_LENGTH} tokens per example{_own_lengths()}, validation every "
        f"{P2_EVAL_EVERY} on {P2_VAL} rows, delta lr "
        f"{P2_LR:g}, full fine-tuning lr {P2_FULL_LR:g}; search {P2_SEARCH_MULT}× the retrain's steps with the "
        "package's defaults. Scores are on the **full test split** at the step selected on validation "
        "(×100). Every choice (gates, steps, the best manual method) was made on validation.",
        "",
        f"Progress: {len(units()) - len(todo)} of {len(units())} units done.",
        "",
    ]
    summary = [
        "## Verdicts (95% intervals, test)",
        "",
        "| cell | searched | random | best manual (validation) | searched − random (paired t) | "
        "searched − best manual (Welch) | searched / full FT |",
        "|---|---|---|---|---|---|---|",
    ]
    tables: list[str] = []
    for task in P2_TASKS:
        trs = [r for r in rows if r["task"] == task]
        if not trs and not any(s["task"] == task for s in searches):
            continue
        full = [r["test"] for r in trs if r["method"] == "full"]
        full_mean = statistics.mean(full) if full else None
        tables += [
            f"## {task}",
            "",
            "| budget | method | params | validation | test | % full FT | n |",
            "|---|---|---|---|---|---|---|",
        ]
        groups: dict[tuple, list[dict]] = {}
        for r in trs:
            groups.setdefault((r["budget"] or 0.0, r["method"], r.get("preset")), []).append(r)
        order = {"full": 0, "lora": 1, "searched": 2, "random": 3, "manual": 4}
        for (budget, method, preset), rs in sorted(
            groups.items(), key=lambda kv: (-kv[0][0] if kv[0][0] else -1, order[kv[0][1]], kv[0][2] or "")
        ):
            vm, vs = mean_std([r["validation"] for r in rs])
            tm, ts = mean_std([r["test"] for r in rs])
            pct = f"{100 * tm / full_mean:.1f}%" if full_mean else "—"
            name = method if not preset else f"{preset} {rs[0].get('scaled') or '(own size)'}"
            params = statistics.mean(r.get("params_used", r["trainable_params"]) for r in rs)
            tables.append(
                f"| {'own size' if not budget else _fmt_budget(budget)} | {name} | {params:,.0f} | "
                f"{_pct(vm)}{_sd(vs, len(rs))} | {_pct(tm)}{_sd(ts, len(rs))} | {pct} | {len(rs)} |"
            )
        tables.append("")
        png = P2_MD.parent / f"{P2_MD.stem}-curves-{task}.png"
        if _plot_curves(trs, task, png):
            tables += [f"![validation curves, {task}]({png.name})", ""]
        for budget in P2_BUDGETS:
            v = cell_verdicts(rows, task, budget)
            s = [r["test"] for r in trs if r["method"] == "searched" and r["budget"] == budget]
            rn = [r["test"] for r in trs if r["method"] == "random" and r["budget"] == budget]
            fmt = lambda xs: f"{_pct(statistics.mean(xs))} (n={len(xs)})" if xs else "—"  # noqa: E731
            vr: Interval | None = v.get("vs_random")
            vmn: Interval | None = v.get("vs_manual")
            ft = f"{100 * statistics.mean(s) / full_mean:.1f}%" if s and full_mean else "—"
            ft += f" (n={len(s)})" if s and full_mean and len(s) < len(P2_PAIRED) else ""
            summary.append(
                f"| {task} @ {_fmt_budget(budget)} | {fmt(s)} | {fmt(rn)} | {v['best_manual'] or '—'} | "
                + _said(vr, v["complete"], len(v["seeds"]))
                + " | "
                + _said(vmn, v["searched_complete"], len(s))
                + f" | {ft} |"
            )
            structs = [
                Structure.load(P2_OUT / r["structure"])
                for r in searches
                if r["task"] == task and r["budget"] == budget and (P2_OUT / r["structure"]).exists()
            ]
            png = P2_MD.parent / f"{P2_MD.stem}-heatmap-{task}-{_fmt_budget(budget)}.png"
            if structs and _plot_heatmap(structs, png, f"searched structures, {task} @ {_fmt_budget(budget)}"):
                tables += [f"![searched structures, {task} @ {_fmt_budget(budget)}]({png.name})", ""]
    lines += [*summary, ""]
    if failed:
        lines += [f"Records with a non-finite score, left out (their cells stay pending): {', '.join(failed)}.", ""]
    lines += [*_multiplicity(rows), *_length_section(curves, rows), *tables]
    if P2_NOTES is not None and P2_NOTES.exists():  # the analysis of these numbers, written by whoever ran them
        lines += ["", P2_NOTES.read_text().strip()]
    text = "\n".join(lines) + "\n"
    atomic_write_text(P2_MD, text)  # workers report concurrently: never a torn file
    return text
