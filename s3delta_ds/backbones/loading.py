"""Resolve MODEL_OR_CONFIG to a HF config, and build the backbone: on the meta device (for
planning: candidate counts of an 11B model without its weights), randomly initialised (tests),
or from pretrained weights (optionally sharded by ZeRO-3 from the start, see ``engine.zero``)."""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import BackboneError
from . import Family, family_for

# Keys that do not change a model's shapes or numerics; left out of the config hash so that a
# config re-saved by another transformers version (or under another name) hashes the same. And how
# it was loaded: a QLoRA run's backbone, quantized by from_pretrained, is still the model its deltas
# load into unquantized (a PaFi mask or a delta file recorded one hash, the other side another).
_VOLATILE_KEYS = {
    "quantization_config",
    "transformers_version",
    "architectures",
    "torch_dtype",
    "dtype",
    "use_cache",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "id2label",
    "label2id",
    "task_specific_params",
    "finetuning_task",
    "problem_type",
    "tokenizer_class",
    "prefix",
    "gradient_checkpointing",
    "n_positions",
}


#: The embedded tiny models: built from their shipped configs with fixed random weights
#: (``engine.backbone.materialise_embedded``); a run that names none trains tiny-t5.
EMBEDDED = ("tiny-t5", "tiny-t5-v1_1", "tiny-llama", "tiny-bert")


def builtin_shapes() -> dict[str, Path]:
    """Shipped config-only shapes (``t5-large``, ``t5-v1_1-xxl``, ``llama-2-70b``, ``tiny-t5`` ...)
    keyed by name and by their hub ids, so structures for big models can be planned offline."""
    root = resources.files("s3delta_ds") / "shapes"
    out = {p.name[: -len(".json")]: Path(str(p)) for p in root.iterdir() if p.name.endswith(".json")}
    out.pop("aliases")
    aliases = json.loads((root / "aliases.json").read_text())
    for name, names in aliases.items():
        for alias in names:
            out[alias] = out[name]
    return out


def hub_id(spec: str) -> str:
    """The hub id a shipped shape's short name stands for (``t5-large`` → ``google-t5/t5-large``,
    ``flan-t5-xl`` → ``google/flan-t5-xl``), so a structure planned on a shape name records a name
    ``from_pretrained`` can load; anything else (paths, hub ids, ``tiny-*``) unchanged."""
    if "/" in spec or Path(spec).exists():
        return spec
    aliases = json.loads((resources.files("s3delta_ds") / "shapes" / "aliases.json").read_text())
    for name, names in aliases.items():
        if spec == name or spec in names:
            ids = [n for n in names if "/" in n]
            same = [n for n in ids if n.split("/", 1)[1].lower() == spec.lower()]
            return (same or ids or [spec])[0]
    return spec


def _field_errors() -> tuple[type[Exception], ...]:
    """What a config field of the wrong type ("d_model": "x") raises: transformers 5's strict
    dataclass configs raise huggingface_hub's validation error, which is no ValueError."""
    try:
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:
        return (ValueError, TypeError)
    return (ValueError, TypeError, StrictDataclassError)


_CONFIG_FIELD_ERRORS = _field_errors()


def _config_from_dict(d: dict, source: str):
    from transformers import AutoConfig

    d = dict(d)
    model_type = d.pop("model_type", None)
    if not model_type:
        raise BackboneError(f"{source}: config has no 'model_type' field, so its architecture is unknown")
    try:
        return AutoConfig.for_model(model_type, **d)
    except _CONFIG_FIELD_ERRORS as e:
        raise BackboneError(f"{source}: {e}") from e


def _is_local_path(spec: str) -> bool:
    """Can ``spec`` only be a filesystem path? (Hub ids have at most one ``/`` and never start with
    ``/``, ``.`` or ``~``.)"""
    return spec.startswith(("/", ".", "~")) or spec.count("/") > 1 or os.sep != "/" and os.sep in spec


def _asset_hint(path: Path) -> str:
    """The fix when a missing model lies where ``s3delta fetch-assets`` puts its weights."""
    from ..data.assets import MODEL_DIRS, cache_root

    for name, folder in MODEL_DIRS.items():
        if path.expanduser().resolve() == (cache_root() / "models" / folder).resolve():
            return f" (its weights come from `s3delta fetch-assets {name}`)"
    return ""


def load_config(model_or_config: str | os.PathLike, gguf_file: str | None = None):
    """A HF config from a model directory, a ``config.json`` file, a shipped shape name, or a hub id;
    with ``gguf_file``, from that GGUF file's metadata (a directory holding it, or a hub id).

    Raises:
        BackboneError: nothing readable was found (the message says what was tried).
    """
    from transformers import AutoConfig

    spec = str(model_or_config)
    path = Path(spec)
    if gguf_file is not None:
        if path.is_dir() and not (path / gguf_file).is_file():
            raise BackboneError(f"{spec}: no GGUF file {gguf_file!r} there (model.gguf_file)")
        try:
            config = AutoConfig.from_pretrained(spec, gguf_file=gguf_file)
        except (OSError, ValueError, KeyError) as e:
            raise BackboneError(f"{spec}/{gguf_file}: cannot read the GGUF file's metadata ({e})") from e
    elif path.is_file():
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            from ..config import run_config_hint

            raise BackboneError(f"{spec}: not a readable JSON config ({e}){run_config_hint(path, 'model')}") from e
        if not isinstance(d, dict):
            raise BackboneError(f"{spec}: a config file must hold a JSON object")
        config = _config_from_dict(d, spec)
    elif path.is_dir():
        if not (path / "config.json").is_file():
            ggufs = sorted(p.name for p in path.glob("*.gguf"))
            hint = f"; it holds {', '.join(ggufs)}: set model.gguf_file={ggufs[0]}" if ggufs else ""
            raise BackboneError(f"{spec}: directory has no config.json{hint}")
        try:
            config = AutoConfig.from_pretrained(spec)
        except (OSError, *_CONFIG_FIELD_ERRORS) as e:
            raise BackboneError(f"{spec}: cannot read its config.json ({e})") from e
    elif spec in builtin_shapes():
        config = _config_from_dict(json.loads(builtin_shapes()[spec].read_text()), spec)
    else:
        shipped = sorted(k for k in builtin_shapes() if "/" not in k)
        close = difflib.get_close_matches(spec, shipped, n=1, cutoff=0.8)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        tried = (
            f"cannot find a model or config called {spec!r}{hint}: not a file, not a directory, not a shipped "
            f"shape ({', '.join(shipped)})"
        )
        if _is_local_path(spec):  # a hub id is "name" or "owner/name": asking the hub would only blur the error
            raise BackboneError(f"{tried}; no such path{_asset_hint(path)}")
        try:
            config = AutoConfig.from_pretrained(spec)
        except (OSError, ValueError) as e:
            raise BackboneError(f"{tried}, and the hub lookup failed: {e}") from e
    config._name_or_path = spec
    return config


def config_hash(config, *, legacy: bool = False) -> str:
    """sha256 over the shape-relevant fields of a config (stable across transformers versions).
    ``legacy``: as files written before 2026-12-04 hashed it, ``quantization_config`` included."""
    volatile = _VOLATILE_KEYS - {"quantization_config"} if legacy else _VOLATILE_KEYS
    d = {k: v for k, v in config.to_dict().items() if not k.startswith("_") and k not in volatile}
    blob = json.dumps(d, sort_keys=True, default=str).encode()
    return "sha256:" + hashlib.sha256(blob).hexdigest()


def build_model(config, *, device: str | torch.device = "cpu", family: Family | None = None) -> nn.Module:
    """A randomly initialised training model of the config's family (``device="meta"``: no memory).

    The model class is the family's task class (seq2seq LM for T5, causal LM for LLaMA, sequence
    classification for BERT), sharing parameters as the config's checkpoints do (``model_class``).
    """
    family = family or family_for(config)
    cls = family.model_class(config)
    with torch.device(device), without_hf_zero3():
        model = cls.from_config(config)
    return model


@contextlib.contextmanager
def without_hf_zero3():
    """A plain construction even while a ZeRO-3 run's ``HfDeepSpeedConfig`` is alive in this process
    (a retrain planned after a search, a compat cell after another, a notebook): transformers would
    otherwise run its ZeRO-3 weight init, which fails on the meta device and partitions on the CPU.
    transformers keeps the live config only as a module-level weakref; it is put back afterwards,
    also when the load raises. Process-wide, so not for loads running in parallel threads (a
    ZeRO-3 load in another thread would see no config while this one runs)."""
    from transformers.integrations import deepspeed as hf_deepspeed

    ref = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = ref


QUANTIZED_PARAM_TYPES = ("Params4bit", "Int8Params")
"""bitsandbytes' packed weight classes (matched by name: bitsandbytes is imported only when used)."""


def is_quantized(p: torch.Tensor | None) -> bool:
    return type(p).__name__ in QUANTIZED_PARAM_TYPES


def stored_quantization(config) -> str | None:
    """How a checkpoint stores its own weights, from its config's ``quantization_config``: "4bit" or
    "8bit" (bitsandbytes), the method's name for others ("gptq", "awq", ...), None in full precision.

    Such a checkpoint loads quantized whatever the caller asks (transformers applies the
    checkpoint's own quantization_config), so a run must know: it holds no full-precision
    weights to merge deltas into, and PaFi/HiWi cannot read its weights."""
    q = getattr(config, "quantization_config", None)
    if q is None:
        return None
    q = q if isinstance(q, dict) else q.to_dict()
    method = str(q.get("quant_method", "unknown")).lower()
    if method == "bitsandbytes":
        if q.get("load_in_4bit"):
            return "4bit"
        if q.get("load_in_8bit"):
            return "8bit"
    return method


def check_stored_quantization(config, quantize: str | None, source: str) -> None:
    """Refuse a checkpoint stored quantized unless ``model.quantize`` says the same.

    Raises:
        BackboneError: the checkpoint is quantized another way than ``model.quantize`` says (or at
            all, when it is unset), or by a method other than bitsandbytes.
    """
    stored = stored_quantization(config)
    if stored is None or stored == quantize:
        return
    if stored not in ("4bit", "8bit"):
        raise BackboneError(
            f"{source} stores its weights quantized with {stored}: s3delta_ds trains on full-precision "
            "checkpoints, optionally quantized while loading (model.quantize=4bit|8bit, bitsandbytes)"
        )
    raise BackboneError(
        f"{source} stores its weights already quantized by bitsandbytes ({stored}), so it loads {stored} whatever "
        f"model.quantize says ({quantize or 'unset'}): set model.quantize={stored}, or point model.name_or_path at "
        "the full-precision checkpoint (only that one can take merged deltas, PaFi or HiWi)"
    )


def logical_numel(p: torch.Tensor) -> int:
    """Entries a parameter stands for: its full size under ZeRO-3 (``ds_numel``), and the unpacked
    size of a bitsandbytes 4-bit weight (two 4-bit values per byte, stored in a float dtype)."""
    quant_state = getattr(p, "quant_state", None)
    if quant_state is not None and getattr(quant_state, "shape", None) is not None:
        return int(torch.Size(quant_state.shape).numel())
    return int(getattr(p, "ds_numel", p.numel()))


def count_params(model: nn.Module, exclude_prefixes: tuple[str, ...] = ()) -> int:
    """All parameters (shared ones once; ZeRO-3-partitioned and 4-bit ones at full size) outside ``exclude``."""
    total = 0
    for name, p in model.named_parameters():
        if any(name == e or name.startswith(e + ".") for e in exclude_prefixes):
            continue
        total += logical_numel(p)
    return total


@dataclass(frozen=True)
class BackboneInfo:
    """What a structure file records about the backbone it was made for."""

    family: str
    name_or_path: str
    model_type: str
    config_hash: str
    num_params: int
    depths: dict[str, int]
    hidden_size: int

    def to_dict(self) -> dict:
        return {
            "family": self.family,
            "name_or_path": self.name_or_path,
            "model_type": self.model_type,
            "config_hash": self.config_hash,
            "num_params": self.num_params,
            "depths": dict(self.depths),
            "hidden_size": self.hidden_size,
        }
