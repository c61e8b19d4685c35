"""How an encoder classifier pools its tokens before the head.

``BertForSequenceClassification`` feeds its head ``tanh(dense(h_CLS))``. That is right for checkpoints
pre-trained with a CLS objective (BERT), wrong for sentence-transformers checkpoints
(all-MiniLM-L6-v2, ...), which were trained on the masked mean of the token states and whose CLS
state carries little: a converged linear probe on frozen all-MiniLM-L6-v2 features reaches 63-64%
validation accuracy on the RT snippets through the CLS pooler and 72-75% on mean-pooled features
(benchmarks/results/quality-round1.md). With the CLS pooler, every delta too small to re-route attention
(BitFit, LNFit, tiny budgets) stays at the majority class.

``model.pooling=auto`` uses the mode the checkpoint's sentence-transformers config declares
(``modules.json`` → its Pooling module's ``config.json``), else the model's own CLS pooler; a run
records the resolved value in its config.yaml, so export and resume never re-guess it. A
sentence-transformers checkpoint that declares CLS pooling gets the model's CLS pooler (BERT:
``tanh(dense(h_CLS))``, whose weights that objective did not train; the head still learns on it).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import BackboneError

POOLINGS = ("auto", "cls", "mean")
_MODES = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls"}


def _read_json(source: str, name: str) -> dict | None:
    """``name`` inside a local model directory, or from the HF cache/hub; None when absent."""
    path = Path(source) / name
    if Path(source).is_dir():
        return json.loads(path.read_text()) if path.is_file() else None
    try:
        from transformers.utils import cached_file

        found = cached_file(
            source,
            name,
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
        )
    except Exception:  # noqa: BLE001 - an unreachable hub or an unknown id: no sentence-transformers config
        return None
    return json.loads(Path(found).read_text()) if found else None


def checkpoint_pooling(source: str) -> str | None:
    """The pooling a sentence-transformers checkpoint was trained with ("mean" or "cls"), None if
    ``source`` is not one. Other modes (max, weighted mean, ...) are refused by name."""
    modules = _read_json(source, "modules.json")
    if not modules:
        return None
    pooling = [m for m in modules if str(m.get("type", "")).endswith("Pooling")]
    if not pooling:
        return None
    config = _read_json(source, f"{pooling[0]['path']}/config.json") or {}
    modes = [mode for key, mode in _MODES.items() if config.get(key)]
    others = sorted(k for k, v in config.items() if k.startswith("pooling_mode_") and v and k not in _MODES)
    if others or len(modes) != 1:
        raise BackboneError(
            f"{source}: sentence-transformers pooling {others or sorted(config)} is not supported "
            "(supported: mean or CLS tokens); set model.pooling=cls or mean explicitly"
        )
    return modes[0]


def resolve_pooling(requested: str, source: str, *, pretrained: bool) -> str:
    """ "cls" or "mean" for ``requested`` in POOLINGS (auto: the checkpoint's own, else cls)."""
    if requested not in POOLINGS:
        raise BackboneError(f"model.pooling must be one of {', '.join(POOLINGS)}, got {requested!r}")
    if requested != "auto":
        return requested
    return (checkpoint_pooling(source) if pretrained else None) or "cls"


def use_mean_pooling(model: nn.Module) -> None:
    """Make the classifier see the attention-masked mean of the token states.

    Hooks, not module surgery: every weight stays where it is (checkpoints, ZeRO-3 partitioning and
    parameter counts are unchanged). BERT: the pooler's output is replaced by the mean. RoBERTa (no
    pooler; its head reads token 0 of the sequence): the head's input becomes the mean at position 0.
    The mask comes from the base model's call. The hooks must be registered before
    ``deepspeed.initialize`` (load time), so that ZeRO-3's own module hooks wrap the replaced output.
    """
    base = getattr(model, "base_model", None)
    pooler = getattr(base, "pooler", None)
    head = getattr(model, "classifier", None)
    if base is None or (pooler is None and head is None):
        raise BackboneError(
            f"model.pooling=mean needs a BERT-style pooler or a RoBERTa-style head; {type(model).__name__} has "
            "neither (use model.pooling=cls)"
        )
    seen: dict[str, torch.Tensor | None] = {}

    def keep_mask(module, args, kwargs):
        seen["mask"] = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)

    def masked_mean(hidden: torch.Tensor) -> torch.Tensor:
        mask = seen.get("mask")
        if mask is None:
            return hidden.float().mean(1).to(hidden.dtype)
        weights = mask[..., None].float()
        return ((hidden.float() * weights).sum(1) / weights.sum(1).clamp_min(1)).to(hidden.dtype)

    base.register_forward_pre_hook(keep_mask, with_kwargs=True)
    if pooler is not None:
        pooler.register_forward_hook(lambda module, args, output: masked_mean(args[0]))
    else:
        head.register_forward_pre_hook(lambda module, args: (masked_mean(args[0])[:, None, :], *args[1:]))
    model._s3delta_pooling = "mean"


def pooling_of(model: nn.Module) -> str:
    return getattr(model, "_s3delta_pooling", "cls")
