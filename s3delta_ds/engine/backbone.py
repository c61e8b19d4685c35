"""Load the frozen backbone for training: sharded by ZeRO-3 from the start when the DeepSpeed
config says stage 3 (a live ``HfDeepSpeedConfig`` makes ``from_pretrained`` partition weights as
it reads them), frozen, with deltas attached afterwards from ``ds_shape``.

``tiny-t5`` / ``tiny-t5-v1_1`` / ``tiny-llama`` / ``tiny-bert`` are the embedded defaults: a
seeded random model, saved once into a cache directory and then loaded like any checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

import torch
import torch.nn as nn

from ..backbones import family_for
from ..backbones.checkpointing import enable_activation_checkpointing
from ..backbones.loading import (
    EMBEDDED,
    build_model,
    check_stored_quantization,
    config_hash,
    load_config,
    stored_quantization,
    without_hf_zero3,
)
from ..backbones.pooling import resolve_pooling, use_mean_pooling
from ..config import ModelConfig
from ..errors import BackboneError
from . import zero

#: Part of the embedded models' cache names: bump it when ``build_model`` builds a different model
#: from the same config, so no stale copy is loaded (2: T5 v1.1 got its own lm_head).
EMBEDDED_REVISION = 2
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def cache_dir() -> Path:
    return Path(os.environ.get("S3DELTA_CACHE", Path.home() / ".cache" / "s3delta_ds"))


def materialise_embedded(name: str, seed: int = 1234) -> Path:
    """The embedded tiny default as a model directory (created once, atomically, by whoever comes first)."""
    config = load_config(name)
    target = cache_dir() / "models" / f"{name}-{config_hash(config)[7:19]}-s{seed}-r{EMBEDDED_REVISION}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        torch.manual_seed(seed)
        model = build_model(config)
        with _no_progress_bars():  # one tiny shard: its bar only stood before the run's own lines (or an error)
            model.save_pretrained(tmp, safe_serialization=True)
        try:
            os.rename(tmp, target)
        except OSError:  # another process won the race: use its copy
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


@contextlib.contextmanager
def _no_progress_bars():
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def resolve_source(cfg: ModelConfig) -> str:
    """Where the weights come from (a directory or hub id). Rank 0 materialises embedded defaults;
    call it on rank 0 first, then on the others after a barrier."""
    if cfg.name_or_path in EMBEDDED and not cfg.random_init:
        return str(materialise_embedded(cfg.name_or_path))
    return cfg.name_or_path


def load_backbone(
    cfg: ModelConfig, *, source: str, dtype: str, ds_config: dict, num_labels: int | None = None, seed: int = 0
) -> nn.Module:
    """The frozen backbone: every parameter has requires_grad=False.

    Under ZeRO-3 the weights are partitioned while loading (never a full copy per rank), except
    for quantized models, which transformers loads whole on each rank first. ``num_labels`` sizes
    a classification head (a new head, or a resized one, is initialised from ``seed``).
    """
    torch_dtype = DTYPES[dtype]
    torch.manual_seed(seed)  # a freshly initialised head is the same on every rank and every run
    head = {} if num_labels is None else {"num_labels": num_labels}
    keep_alive = zero.hf_deepspeed_config(ds_config) if zero.zero_stage(ds_config) == 3 else None
    # Below ZeRO-3, hide the config an earlier ZeRO-3 model in this process keeps alive (the Python
    # API, a notebook, one compat launch running several precisions): transformers would partition
    # these weights into ZeRO-3 placeholders that nothing gathers.
    with contextlib.nullcontext() if keep_alive is not None else without_hf_zero3():
        model, missing = _load_weights(cfg, source, torch_dtype, head)
    model.requires_grad_(False)
    if cfg.gradient_checkpointing:
        enable_activation_checkpointing(model)
    mean_pooled = _apply_pooling(model, cfg, source)
    _check_missing(model, missing, source, mean_pooled)
    model.config._name_or_path = cfg.name_or_path
    # transformers holds the DeepSpeed config by weakref and consults it again later (generate,
    # resizing): keep it alive as long as the model.
    model._s3delta_hf_ds_config = keep_alive
    return model


def _check_missing(model: nn.Module, missing: set[str], source: str, mean_pooled: bool) -> None:
    """Refuse a checkpoint that lacks frozen weights the model computes with.

    transformers initialises them randomly and only prints a table: a T5EncoderModel folder loaded
    as T5ForConditionalGeneration trained on a random frozen decoder and lm_head, a LlamaModel on a
    random lm_head, with results that looked real. A task head is new by design, and a BERT pooler
    is unused under mean pooling.
    """
    heads = family_for(model.config).head_modules
    lacking = sorted(
        k
        for k in missing
        if not any(k == h or k.startswith(f"{h}.") for h in heads) and not (mean_pooled and ".pooler." in f".{k}")
    )
    if lacking and all(".pooler." in f".{k}" for k in lacking):
        raise BackboneError(
            f"{source} has no pooler ({', '.join(lacking)} missing; saved as "
            f"{', '.join(getattr(model.config, 'architectures', None) or []) or 'unknown'}), and CLS pooling reads "
            "it: it would be random and frozen. Use model.pooling=mean"
        )
    if lacking:
        shown = ", ".join(lacking[:4]) + (f" and {len(lacking) - 4} more" if len(lacking) > 4 else "")
        saved_as = ", ".join(getattr(model.config, "architectures", None) or []) or "unknown"
        raise BackboneError(
            f"{source} lacks {len(lacking)} weight tensor(s) that {type(model).__name__} computes with ({shown}): "
            f"they would be random and frozen. The checkpoint was saved as {saved_as}; point model.name_or_path "
            "at the whole model (for T5, an encoder-decoder checkpoint, not a T5EncoderModel folder; for a "
            "decoder, one with its lm_head)"
        )


def _load_weights(cfg: ModelConfig, source: str, torch_dtype: torch.dtype, head: dict) -> tuple[nn.Module, set[str]]:
    """The model and the weight names its checkpoint lacked (none for a random init)."""
    missing: set[str] = set()
    try:
        if cfg.random_init:
            if cfg.quantize:
                raise BackboneError("model.quantize needs pretrained weights to quantize: unset model.random_init")
            config = load_config(source)
            for key, value in head.items():
                setattr(config, key, value)
            cls = family_for(config).model_class(config)
            model = cls.from_config(config, dtype=torch_dtype)
        else:
            config = load_config(source, cfg.gguf_file)
            cls = family_for(config).model_class(config)
            kwargs = {"dtype": torch_dtype, **head}
            if cfg.gguf_file is None:  # a GGUF file's blocks are dequantised by transformers
                check_stored_quantization(config, cfg.quantize, cfg.name_or_path)
            if cfg.quantize and (cfg.gguf_file is not None or stored_quantization(config) is None):
                # (a checkpoint stored quantized brings its own quantization_config)
                kwargs["quantization_config"] = quantization_config(cfg.quantize, torch_dtype)
            if head:
                kwargs["ignore_mismatched_sizes"] = True  # a head for another label count is re-initialised
            if cfg.gguf_file:
                kwargs["gguf_file"] = cfg.gguf_file
            model, info = cls.from_pretrained(source, output_loading_info=True, **kwargs)
            missing = set(info.get("missing_keys") or ())
    except (OSError, ValueError) as e:
        raise BackboneError(f"cannot load backbone weights from {source!r}: {e}") from e
    return model, missing


def _apply_pooling(model: nn.Module, cfg: ModelConfig, source: str) -> bool:
    """Hook mean pooling where it applies; returns whether it did."""
    family = family_for(model.config)
    if family.name != "bert":
        if cfg.pooling != "auto":
            raise BackboneError(f"model.pooling applies to encoder classifiers (bert family), not {family.name}")
        return False
    if resolve_pooling(cfg.pooling, source, pretrained=not cfg.random_init and not cfg.gguf_file) == "mean":
        use_mean_pooling(model)
        return True
    return False


def quantization_config(kind: str, storage_dtype: torch.dtype):
    """bitsandbytes settings for a frozen backbone: NF4 with double quantization (4bit), or LLM.int8
    (8bit). The 4-bit storage dtype is the model's float dtype so that ZeRO-3 can partition the
    packed weights like any other parameter, and the matmuls compute in it too: model.dtype=fp16 on
    a GPU without bf16 must not compute in bf16, and fp32 asks for fp32."""
    from transformers import BitsAndBytesConfig

    if kind == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=storage_dtype,
            bnb_4bit_quant_storage=storage_dtype,
        )
    return BitsAndBytesConfig(load_in_8bit=True)
