"""Run configuration: frozen, kw-only dataclasses validated at construction, loaded from YAML with
``key=value`` CLI overrides. Unknown or misspelt keys are errors that list the valid ones; there is
no ``dict.get(key, default)`` for user settings anywhere.

A YAML file has the sections ``model``, ``data``, ``search``, ``retrain`` and the top-level keys
``output_dir``, ``deepspeed`` (a json in ``ds_configs/`` or any path) and ``seed``.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

MODES = ("first-order", "second-order")
DTYPES = ("auto", "fp32", "bf16", "fp16")
SELECT = ("metric", "loss", "last")
VIRTUAL_STEPS = ("adamw", "sgd")
GATE_OPTIMIZERS = ("adamw", "adam-shared")
SHIFT_GRADIENTS = ("renormalise", "exact")
LABEL_SCORING = ("sum", "length-normalised")


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclass(kw_only=True, slots=True, frozen=True)
class ModelConfig:
    name_or_path: str | None = None
    """Model directory (weights + config.json), hub id, or a shipped shape with ``random_init``.
    ``tiny-t5`` / ``tiny-t5-v1_1`` / ``tiny-llama`` / ``tiny-bert`` name the embedded defaults. Unset: search uses
    ``tiny-t5``; retrain uses the backbone recorded in the structure (and says so)."""
    tokenizer: str | None = None
    """Tokenizer directory; default: the model directory (or the embedded tokenizer)."""
    random_init: bool = False
    """Build from the config with random weights instead of loading weights (tests, planning)."""
    dtype: str = "auto"
    """Backbone dtype: auto (bf16/fp16 when the DeepSpeed config enables it, else fp32), fp32, bf16, fp16."""
    gguf_file: str | None = None
    """GGUF file inside ``name_or_path`` to load (e.g. SmolLM2's), dequantised by transformers."""
    quantize: str | None = None
    """Load the frozen backbone quantized with bitsandbytes: 4bit (NF4) or 8bit."""
    pooling: str = "auto"
    """Encoder classifiers: what the head sees. cls (the model's CLS pooler), mean (masked mean of the
    token states), or auto: the checkpoint's sentence-transformers pooling if it has one, else cls."""
    gradient_checkpointing: bool = False
    """Activation checkpointing: keep only each transformer block's input in the forward and run the
    block again in the backward (non-reentrant). Saved activations shrink from every block's to the
    block inputs plus one block's, for about one more forward per step (docs/performance.md); the
    gradients are unchanged. Search and retrain, ZeRO stages 0-3."""

    def __post_init__(self):
        _check(self.name_or_path is None or bool(self.name_or_path), "model.name_or_path must not be empty")
        _check(self.dtype in DTYPES, f"model.dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        _check(self.quantize in (None, "4bit", "8bit"), f"model.quantize must be 4bit or 8bit, got {self.quantize!r}")
        _check(
            self.pooling in ("auto", "cls", "mean"), f"model.pooling must be auto, cls or mean, got {self.pooling!r}"
        )


@dataclass(kw_only=True, slots=True, frozen=True)
class DataConfig:
    task: str | None = None
    """A registered task (see ``s3delta_ds.data.TASKS``). Unset: search uses the embedded
    ``tiny-sentiment``; retrain uses the task the structure was searched on (and says so)."""
    data_dir: str | None = None
    """Directory with ``train`` / ``validation`` / ``test`` files (.jsonl, .json, .csv, .parquet)."""
    max_source_length: int | None = None
    """Default: the task's own (128 for GLUE, 256 for SuperGLUE/RTE)."""
    max_target_length: int = 16
    """Token cap of a label word (seq2seq/causal); two words it cuts alike are refused."""
    max_train_examples: int | None = None
    """Cap on training examples (a sample, see ``subsample``); unset: all."""
    max_eval_examples: int | None = None
    """Cap on validation examples (and on test examples unless max_test_examples is set)."""
    max_test_examples: int | None = None
    """Cap on test examples; unset: ``max_eval_examples``'s, if any."""
    subsample: str = "random"
    """How the max_*_examples caps pick their rows: random (a sample drawn with ``split_seed``, in
    file order; a file sorted by label still gives every class) or head (the first rows, for files
    already shuffled)."""
    split_seed: int = 0
    """Seed of the data protocol's splits (validation → validation/test for tasks without a test
    split, the train carve-out), fixed apart from the run ``seed`` so that a structure searched with
    one seed and retrained with another is never tested on the rows that chose it. Recorded in the
    structure's search metadata; retrain warns when the two differ."""
    label_scoring: str = "sum"
    """Rank classification (seq2seq/causal): how a label word's token losses are combined. sum (the
    sequence NLL, what greedy decoding of single-token words does) or length-normalised (the mean per
    token, which does not favour short label words)."""

    # -- data.task: custom (your own data; docs/your-data.md) -------------------------------------
    train_file: str | None = None
    """custom: the training rows (.csv, .jsonl/.json or .parquet)."""
    validation_file: str | None = None
    """custom: the validation rows (model selection), same formats as ``train_file``."""
    test_file: str | None = None
    """custom: optional; without it the validation rows are halved into validation and test
    (drawn with ``split_seed``)."""
    hub_dataset: str | None = None
    """custom: a ``datasets`` name or local dataset script/directory instead of files."""
    hub_config: str | None = None
    """custom with hub_dataset: the dataset's configuration name, if it has several."""
    train_split: str = "train"
    """custom with hub_dataset: the split to train on."""
    validation_split: str = "validation"
    """custom with hub_dataset: the split to validate on."""
    test_split: str | None = None
    """custom with hub_dataset: the split names to read."""
    template: str | None = None
    """custom: how a row reads as text, with ``{column}`` placeholders, e.g. "review: {text}"."""
    columns: list[str] | None = None
    """custom: the text columns (default: the template's placeholders)."""
    label_column: str = "label"
    """custom: the column with the class, as an integer id or as one of ``label_words``."""
    label_words: list[str] | None = None
    """custom: one word per class (what text-to-text and decoder models produce); class i ↔ word i."""
    metric: str = "accuracy"
    """custom: the main metric (model selection): accuracy, f1, f1_macro, matthews, pearson, ...
    ``f1`` is binary and scores the second label word (class 1) as the positive class."""

    def __post_init__(self):
        custom = {k: getattr(self, k) for k in CUSTOM_KEYS if getattr(self, k) != CUSTOM_DEFAULTS.get(k)}
        if self.task != "custom" and custom:
            raise ConfigError(
                f"data.{next(iter(custom))} only applies to data.task=custom (got data.task={self.task!r}); "
                "set data.task=custom to read your own data with your own template and label words"
            )
        _check(self.split_seed >= 0, f"data.split_seed must be >= 0, got {self.split_seed}")
        _check(
            self.subsample in SUBSAMPLE, f"data.subsample must be one of {', '.join(SUBSAMPLE)}, got {self.subsample!r}"
        )
        _check(
            self.label_scoring in LABEL_SCORING,
            f"data.label_scoring must be one of {', '.join(LABEL_SCORING)}, got {self.label_scoring!r}",
        )
        for name in ("max_source_length", "max_train_examples", "max_eval_examples", "max_test_examples"):
            v = getattr(self, name)
            _check(v is None or v > 0, f"data.{name} must be > 0, got {v}")
        _check(self.max_target_length > 0, f"data.max_target_length must be > 0, got {self.max_target_length}")


SUBSAMPLE = ("random", "head")
CUSTOM_KEYS = (
    "train_file",
    "validation_file",
    "test_file",
    "hub_dataset",
    "hub_config",
    "train_split",
    "validation_split",
    "test_split",
    "template",
    "columns",
    "label_column",
    "label_words",
    "metric",
)
CUSTOM_DEFAULTS = {
    "train_split": "train",
    "validation_split": "validation",
    "label_column": "label",
    "metric": "accuracy",
}


@dataclass(kw_only=True, slots=True, frozen=True)
class TrainConfig:
    """What search and retrain share: batch geometry, schedule, evaluation, checkpoints."""

    steps: int = 100
    """Optimizer steps (each consumes micro_batch_size × grad_accum × world examples per phase)."""
    micro_batch_size: int = 8
    """Examples per rank per forward."""
    grad_accum: int = 1
    """Micro-batches accumulated per step; the global batch is micro_batch_size × grad_accum × ranks.
    On ``--resume`` the checkpoint's global batch is kept: grad_accum becomes global batch /
    (micro_batch_size × ranks), on any number of ranks, and the run says when that changes it; an
    error names the numbers when no whole accumulation does (docs/multinode.md)."""
    eval_batch_size: int = 32
    """Examples per rank per forward when evaluating (no gradients: can exceed micro_batch_size)."""
    eval_every: int = 50
    """Validate every N steps (and at the end); the best validation score is kept."""
    checkpoint_every: int = 0
    """Save a resumable checkpoint every N steps (0: at every evaluation)."""
    lr: float = 3e-4
    """Delta-weight learning rate (AdamW, linear decay to 0, no warm-up)."""
    weight_decay: float = 0.0
    """AdamW weight decay of the delta weights (the gate logits never decay)."""
    clip: float = 2.0
    """Gradient-norm clipping of the delta weights (DeepSpeed's gradient_clipping)."""
    log_every: int = 10
    """Print the training loss every N steps."""
    stop_after: int = 0
    """Stop this launch after N steps (checkpointing first) and exit; continue with --resume. 0: run
    to the end. (A SIGTERM or SIGUSR1 also checkpoints at the next step and stops: preemption, and
    the Slurm scripts' --signal=USR1@300 before the time limit.)"""

    def _validate(self, section: str):
        for name in ("steps", "micro_batch_size", "grad_accum", "eval_batch_size", "eval_every", "log_every"):
            _check(getattr(self, name) >= 1, f"{section}.{name} must be >= 1, got {getattr(self, name)}")
        _check(self.checkpoint_every >= 0, f"{section}.checkpoint_every must be >= 0, got {self.checkpoint_every}")
        _check(self.stop_after >= 0, f"{section}.stop_after must be >= 0, got {self.stop_after}")
        _check(self.lr > 0, f"{section}.lr must be > 0, got {self.lr}")
        _check(self.weight_decay >= 0, f"{section}.weight_decay must be >= 0, got {self.weight_decay}")
        _check(self.clip >= 0, f"{section}.clip must be >= 0 (0 disables), got {self.clip}")


@dataclass(kw_only=True, slots=True, frozen=True)
class SearchConfig(TrainConfig):
    space: str = "mixed"
    """Candidate delta modules: mixed (LoRA, BitFit, LNFit, low-rank adapter: the original's), lora,
    mixed+adapter, mixed+pafi+hiwi, mixed+ia3, mergeable (only types that fold into the weights:
    zero added latency after export), bias. ``s3delta space MODEL`` lists a space's candidates."""
    budget: float = 1.389e-4
    """Trainable-parameter budget as a fraction of the backbone's parameters."""
    mode: str = "first-order"
    """first-order: alternate a delta step (weights half) and a gate step (gates half);
    second-order: DARTS finite-difference correction of the gate gradient (ZeRO stages 0-2)."""
    virtual_step: str = "adamw"
    """Second order only: the virtual delta step w' = w - ξ·u. adamw (the original: u is the AdamW
    update with the delta optimizer's moments) or sgd (DARTS: u = the gradient)."""
    gate_lr: float = 0.1
    """Learning rate of the gate logits (their own optimizer, ``gate_optimizer``; linear decay to 0
    over the steps after the warm-up)."""
    gate_optimizer: str = "adamw"
    """adamw: per-logit AdamW (the original). adam-shared: Adam with one second moment for all
    logits (the mean of g²), so logits move in proportion to their gradients: per-logit AdamW moves a
    logit with a tiny but steady gradient as fast as one with a large gradient."""
    gate_warmup: float = 0.0
    """Fraction of the steps that train the delta weights only, the gates held at their start (equal
    logits), before the gate steps begin: a gate gradient measured through untrained deltas mostly
    reflects their initialisation. The gate learning rate then decays over the remaining steps, and
    only validations after the first gate step can be selected (before it every structure is the
    same arbitrary one)."""
    shift_gradient: str = "renormalise"
    """How the gate gradient treats the budget's shift b. renormalise: b held constant and the
    original's sum-preserving renormalisation of p. exact: the gradient through b as the budget
    constraint defines it, so a module's logit pays for the parameters it takes (method/gates.py)."""
    gate_clip: float = 2.0
    """Gradient-norm clipping of the gate logits (0 disables)."""
    beta: float = 1.0
    """Sigmoid temperature of the shifted global sigmoid."""
    temperature: float = 1.0
    """Binary-concrete temperature of the gate samples."""
    select: str = "metric"
    """Which gates define the structure: "metric" (best validation score of the soft-gated supernet,
    as the original; ties go to the lower validation loss), "loss" (lowest validation loss) or "last"."""

    def __post_init__(self):
        self._validate("search")
        _check(0 < self.budget < 1, f"search.budget must be a fraction in (0, 1), e.g. 1e-4; got {self.budget}")
        _check(self.mode in MODES, f"search.mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        _check(
            self.virtual_step in VIRTUAL_STEPS,
            f"search.virtual_step must be one of {', '.join(VIRTUAL_STEPS)}, got {self.virtual_step!r}",
        )
        _check(self.gate_lr > 0, f"search.gate_lr must be > 0, got {self.gate_lr}")
        _check(
            self.gate_optimizer in GATE_OPTIMIZERS,
            f"search.gate_optimizer must be one of {', '.join(GATE_OPTIMIZERS)}, got {self.gate_optimizer!r}",
        )
        _check(
            self.shift_gradient in SHIFT_GRADIENTS,
            f"search.shift_gradient must be one of {', '.join(SHIFT_GRADIENTS)}, got {self.shift_gradient!r}",
        )
        _check(0 <= self.gate_warmup < 1, f"search.gate_warmup must be a fraction in [0, 1), got {self.gate_warmup}")
        _check(
            self.gate_warmup_steps < self.steps,
            f"search.gate_warmup={self.gate_warmup} of {self.steps} steps leaves no gate step (the gates would "
            "never move)",
        )
        _check(self.gate_clip >= 0, f"search.gate_clip must be >= 0, got {self.gate_clip}")
        _check(self.beta > 0, f"search.beta must be > 0, got {self.beta}")
        _check(self.temperature > 0, f"search.temperature must be > 0, got {self.temperature}")
        _check(self.select in SELECT, f"search.select must be one of {', '.join(SELECT)}, got {self.select!r}")

    @property
    def gate_warmup_steps(self) -> int:
        """Steps before the first gate step (``gate_warmup`` of ``steps``)."""
        return int(round(self.gate_warmup * self.steps))


@dataclass(kw_only=True, slots=True, frozen=True)
class RetrainConfig(TrainConfig):
    structure: str | None = None
    """Structure JSON to retrain (searched, random, manual or transferred)."""
    full_finetune: bool = False
    """Train every backbone weight instead of a structure (the full fine-tuning baseline). Its
    checkpoints gather every weight and both AdamW moments on every rank (about 12 bytes per
    parameter of host memory per rank, and 8 on the accelerator while gathered): a baseline for
    models up to about a billion parameters, not for T5-XXL."""
    pafi_mask: str | None = None
    """PaFi mask file (``s3delta pafi-mask``) for structures with globally ranked PaFi modules."""
    test_at: str = "end"
    """When the test split is scored: "end" once, after training, on the selected step's deltas
    reloaded from deltas.safetensors (the same scores as "best", which scores test at every new best
    validation step, at a fraction of the cost on a large test set). Full fine-tuning keeps no copy
    of its best weights, so it always scores test at each new best."""

    def __post_init__(self):
        self._validate("retrain")
        _check(self.test_at in ("end", "best"), f"retrain.test_at must be end or best, got {self.test_at!r}")


@dataclass(kw_only=True, slots=True, frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    retrain: RetrainConfig = field(default_factory=RetrainConfig)
    output_dir: str = "runs/default"
    """Where the run writes (config.yaml, structure.json or deltas.safetensors, summary.json,
    checkpoints); an existing non-empty directory needs ``--resume`` or ``overwrite``."""
    deepspeed: str = "auto"
    """DeepSpeed config: a name in ds_configs/ (zero2, zero3, zero3_multinode, zero3_offload, zero3_cpu),
    a json path, or "auto": replicate the frozen backbone (zero2) when it fits on a device, ZeRO-3 when
    not (zero3_multinode, with ZeRO++ hpZ, when the job spans nodes)."""
    zero_stage: int | None = None
    """Override the DeepSpeed config's ZeRO stage (0-3). Under ``deepspeed=auto`` it also picks the
    template: 3 a ZeRO-3 one (zero3, zero3_cpu or zero3_multinode), 0-2 zero2."""
    seed: int = 0
    """Initialisation, data order and gate noise. The data splits use ``data.split_seed`` instead."""
    overwrite: bool = False
    """Replace an earlier run's output directory (it is removed first); a directory that is not a
    run's (no config.yaml and ds_config.json) is never removed."""

    def __post_init__(self):
        _check(self.zero_stage in (None, 0, 1, 2, 3), f"zero_stage must be 0-3, got {self.zero_stage}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_SECTIONS = {"model": ModelConfig, "data": DataConfig, "search": SearchConfig, "retrain": RetrainConfig}


def _type_ok(value: Any, annotation: str) -> tuple[bool, Any]:
    """Check ``value`` against a field annotation string; ints are accepted for floats."""
    hint = eval(annotation, {"Any": Any}, {})  # noqa: S307 - annotations of our own dataclasses
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    for opt in options:
        if opt is type(None) and value is None:
            return True, None
        if opt is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        if opt is float and isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return True, float(value)
            except ValueError:
                pass
        if opt is int and isinstance(value, int) and not isinstance(value, bool):
            return True, value
        if opt in (str, bool) and isinstance(value, opt):
            return True, value
        if typing.get_origin(opt) is list and isinstance(value, (list, tuple)):
            (item,) = typing.get_args(opt)
            if all(isinstance(v, item) and not isinstance(v, bool) for v in value):
                return True, list(value)
    return False, value


def _build(cls, values: dict[str, Any], where: str):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown key {where}{key}{hint}; valid keys: {', '.join(fields)}")
        if key in _SECTIONS and cls is RunConfig:
            if not isinstance(value, dict):
                raise ConfigError(f"{key} must be a mapping, got {value!r}")
            kwargs[key] = _build(_SECTIONS[key], value, f"{key}.")
            continue
        ok, value = _type_ok(value, fields[key].type)
        if not ok:
            hint = ""
            if "list[str]" in fields[key].type and isinstance(value, list):
                hint = (
                    " (YAML reads no/yes/true/false/on/off as booleans and 1, 2 as numbers: quote them, "
                    "e.g. ['no', 'yes'])"
                )
            raise ConfigError(f"{where}{key} must be {fields[key].type}, got {value!r}{hint}")
        kwargs[key] = value
    return cls(**kwargs)


def _set_dotted(d: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    for p in parts[:-1]:
        d = d.setdefault(p, {})
        if not isinstance(d, dict):
            raise ConfigError(f"cannot set {dotted}: {p} is not a section")
    d[parts[-1]] = value


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["search.steps=50", "output_dir=runs/x"]`` → nested dict; values are parsed as YAML."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value (e.g. search.steps=50)")
        key, raw = item.split("=", 1)
        key = key.strip()
        _set_dotted(out, key, _override_value(raw, _annotation(key)))
    return out


def _annotation(dotted: str) -> str | None:
    """The type annotation of a setting (``data.template`` → ``"str | None"``); None if unknown."""
    section, _, name = dotted.rpartition(".")
    cls = _SECTIONS.get(section) if section else RunConfig
    fields = {f.name: f.type for f in dataclasses.fields(cls)} if cls else {}
    return fields.get(name)


_NULLS = ("null", "Null", "NULL", "~")


def _override_value(raw: str, annotation: str | None = None) -> Any:
    """A command-line value as the setting it is for.

    A text setting keeps the text exactly as typed (YAML would cut ``Tweet #{n}: {text}`` at its
    " #" comment and turn ``review: {text}`` into a mapping); surrounding quotes are removed. A
    list of words keeps its items as words (YAML reads ``[no, yes]`` as booleans and ``[1, 2]`` as
    numbers). Anything else is read as YAML (numbers, booleans), never as a mapping: no setting
    takes one.
    """
    if raw == "":
        return None
    if annotation in ("str", "str | None"):
        if annotation == "str | None" and raw in _NULLS:
            return None
        if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\"":
            try:
                return str(yaml.safe_load(raw))
            except yaml.YAMLError:
                return raw
        return raw
    if annotation in ("list[str]", "list[str] | None"):
        if raw in _NULLS:
            return None
        try:
            value = yaml.load(raw, Loader=yaml.BaseLoader)  # noqa: S506 - BaseLoader builds only str/list/dict
        except yaml.YAMLError:
            return raw
        return value if isinstance(value, list) else raw
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
    return raw if isinstance(value, dict) else value


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_run_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config (optional) and apply ``key=value`` overrides; validate everything.

    Raises:
        ConfigError: unreadable YAML, unknown keys, wrong types or out-of-range values.
    """
    return build_run_config(read_yaml_values(path), overrides)


def read_yaml_values(path: str | Path | None) -> dict[str, Any]:
    """A config file's nested mapping as written, not yet validated ({} for None): some settings
    are valid only with the overrides that come with them (``data.train_file`` with ``data.task=custom``).

    Raises:
        ConfigError: an unreadable file, invalid YAML, or not a mapping.
    """
    if path is None:
        return {}
    try:
        loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"config {path} is not UTF-8 text (byte {e.start}: {e.reason})") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"config {path} is not valid YAML: {e}") from e
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"config {path} must be a YAML mapping at the top level")
    return loaded or {}


def run_config_hint(path: str | Path, wanted: str) -> str:
    """What to pass instead when a command that reads a model or a structure is handed a run config
    (``s3delta space run.yaml``): "" unless ``path`` is a YAML mapping. ``wanted``: "model" or
    "structure"."""
    if Path(path).suffix.lower() not in (".yaml", ".yml"):
        return ""
    try:
        values = read_yaml_values(path)
    except ConfigError:
        return ""
    section = values.get("model")
    model = section.get("name_or_path") if isinstance(section, dict) else None
    if wanted == "model":
        name = f"its model, {model}" if model else "its model.name_or_path (unset: the embedded tiny-t5)"
        return f"; {path} looks like a run config: pass {name}"
    out = values.get("output_dir", RunConfig().output_dir)
    return f"; {path} looks like a run config: a search writes its structure to {Path(str(out)) / 'structure.json'}"


def build_run_config(
    values: dict[str, Any], overrides: list[str] | None = None, keys: dict[str, Any] | None = None
) -> RunConfig:
    """A ``RunConfig`` from a nested dict (the YAML's shape), then ``section.key=value`` strings,
    then ``keys`` (``{"search.steps": 50}``, values as they are); everything validated.

    Raises:
        ConfigError: unknown keys, wrong types or out-of-range values.
    """
    values = _merge(values, parse_overrides(overrides or []))
    extra: dict[str, Any] = {}
    for key, value in (keys or {}).items():
        _set_dotted(extra, key, value)
    values = _merge(values, extra)
    try:
        return _build(RunConfig, values, "")
    except TypeError as e:  # a required field of a frozen dataclass left out
        raise ConfigError(str(e)) from e


def dump_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
