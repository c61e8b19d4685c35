"""The module DeepSpeed trains: the backbone (deltas attached) plus the task's loss, returned as
per-example *sums* and item counts so the engine can normalise by the item count of the whole
accumulated global batch. That makes k micro-batches × b equal one batch of k·b exactly, even when
micro-batches hold different numbers of target tokens.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

from .supernet import SLOT_ATTR, GateContext


def per_example_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ token NLL per example and the number of scored tokens (labels == -100 are ignored)."""
    nll = F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=-100, reduction="none")
    mask = labels != -100
    return (nll * mask).sum(-1), mask.sum(-1)


class DeltaModel(nn.Module):
    """forward(batch) → (loss sum per example (B,), scored items per example (B,)).

    The gate context is a plain attribute (never a parameter), set by the engine before each
    forward: ``gate_ctx.z`` (num_candidates,) or None for an ungated structure.
    """

    def __init__(self, backbone: nn.Module, objective: str, gate_ctx: GateContext | None = None):
        super().__init__()
        if objective not in ("seq2seq", "causal", "classify"):
            raise ValueError(f"unknown objective {objective!r}")
        self.backbone = backbone
        self.objective = objective
        self.gate_ctx = gate_ctx if gate_ctx is not None else GateContext()

    def forward(self, batch: dict[str, torch.Tensor], *, class_logits: bool = False):
        if class_logits:  # see class_logits()
            return self.backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        labels = batch["labels"]
        if self.objective == "seq2seq":
            out = self.backbone(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                decoder_input_ids=batch["decoder_input_ids"],
                use_cache=False,
            )
            return per_example_nll(out.logits, labels)
        if self.objective == "causal":
            return self._causal_nll(batch)
        out = self.backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        nll = F.cross_entropy(out.logits.float(), labels, reduction="none")
        return nll, torch.ones_like(labels)

    def _causal_nll(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Next-token NLL of the scored tokens, with the LM head applied to those positions alone.

        The targets (a label word and eos) are a few tokens after a prompt of tens: projecting every
        position onto the vocabulary (49k for SmolLM2, 128k for LLaMA-3) would spend a fifth of the
        FLOPs and B x T x V float logits of memory on positions whose loss is masked anyway. This
        assumes logits = lm_head(hidden), true for every model type of the llama family; a family
        with logit scaling or soft-capping (Gemma, Cohere) must apply it here.
        """
        hidden = self.backbone.get_decoder()(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
        ).last_hidden_state
        targets = batch["labels"][:, 1:]
        scored = targets != -100
        logits = self.backbone.get_output_embeddings()(hidden[:, :-1][scored])
        nll = F.cross_entropy(logits.float(), targets[scored], reduction="none")
        sums = torch.zeros(targets.shape[0], dtype=nll.dtype, device=nll.device)
        return sums.index_add(0, scored.nonzero()[:, 0], nll), scored.sum(-1)

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        """Only what trains (delta weights, a task head) and the deltas' buffers.

        DeepSpeed checkpoints call this: the frozen backbone never belongs in them (resume reloads it
        from its source), and bitsandbytes layers cannot even serialise ZeRO-3-partitioned weights.
        """
        out = OrderedDict() if destination is None else destination
        for name, p in self.named_parameters():
            if p.requires_grad:
                out[prefix + name] = p if keep_vars else p.detach()
        for name, b in self.named_buffers():
            if f".{SLOT_ATTR}." in f".{name}":
                out[prefix + name] = b if keep_vars else b.detach()
        return out

    @torch.no_grad()
    def class_logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Encoder classification: the head's logits (B, num_labels).

        Through ``__call__``, never the backbone directly: this module's hooks must run. Under
        ZeRO-3 its pre-forward hook gathers the persistent parameters whose own hooks were trimmed
        (``zero.trim_zero3_hooks``); skipping it read released, empty weights after a checkpoint
        load (a BERT retrain's final test crashed at ``test_at=end``).
        """
        return self(batch, class_logits=True)


def move(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
