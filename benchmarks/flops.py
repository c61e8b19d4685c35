"""Model FLOPs of one training step, for MFU: what the step must compute, counted by where each
parameter sits, never the machine's recomputation (activation checkpointing's extra forward is not
model FLOPs).

An encoder-decoder's encoder weights see the source tokens and its decoder weights (with the LM
head) the target tokens; a decoder's weights see every token. A Linear with a frozen weight costs
2 FLOPs per weight per token forward and the same again backward (the activation gradient only:
no weight gradient); the attention products (QKᵀ, AV) cost 4·s_q·s_k·inner forward and twice that
backward (both operands are activations). Embedding lookups and norms are not matmuls.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn as nn

#: Forward + backward passes through the backbone per optimizer step, by step.py variant: a retrain
#: step is one; a first-order search step two (gate step, delta step); a second-order one five
#: (∇w on the weights half, the gate gradient at w', the two ε-shifted passes, the delta step).
PASSES = {"a": 1, "b": 1, "c": 1, "c2": 1, "d": 2, "d2": 2, "e": 5}


@dataclass(frozen=True)
class MatmulParams:
    encoder: int  # Linear weights applied to source tokens
    decoder: int  # Linear weights applied to target tokens (decoder-only: to every token), LM head included


def matmul_params(model: nn.Module) -> MatmulParams:
    """Linear weight counts by the tokens they see (works on the meta device)."""
    enc = dec = 0
    encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            n = module.in_features * module.out_features
            if encoder_decoder and (name.startswith("encoder.") or ".encoder." in name):
                enc += n
            else:
                dec += n
    return MatmulParams(enc, dec)


def _attention_forward(config, batch: int, src: int, tgt: int) -> float:
    """QKᵀ and AV of every attention layer, forward."""
    if getattr(config, "is_encoder_decoder", False):  # T5
        inner = config.num_heads * config.d_kv
        dec_layers = getattr(config, "num_decoder_layers", None) or config.num_layers
        return 4 * batch * inner * (config.num_layers * src * src + dec_layers * (tgt * tgt + tgt * src))
    inner = config.num_attention_heads * getattr(config, "head_dim", config.hidden_size // config.num_attention_heads)
    return 4 * batch * inner * config.num_hidden_layers * src * src


def pass_flops(model: nn.Module, batch: int, src: int, tgt: int) -> float:
    """FLOPs of one forward + backward pass of a frozen backbone on one rank's batch."""
    mp = matmul_params(model)
    tgt_tokens = tgt if getattr(model.config, "is_encoder_decoder", False) else src
    linear_fwd = 2 * (mp.encoder * batch * src + mp.decoder * batch * tgt_tokens)
    return 2 * linear_fwd + 3 * _attention_forward(model.config, batch, src, tgt)


def matmul_peak(device: torch.device, dtype: torch.dtype, sync=lambda: None) -> float:
    """FLOP/s of the best square matmul, measured with the run's dtype and threads: the MFU
    denominator. Several sizes and repeats, best of all: a peak measured too low would put MFU
    above 100%."""
    sizes = (1024, 2048, 4096, 8192) if device.type != "cpu" else (512, 1024, 2048)
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        a @ b
        sync()
        reps = max(1, int(2e10 // (2 * n**3))) if device.type == "cpu" else 20
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(reps):
                a @ b
            sync()
            best = max(best, 2 * n**3 * reps / (time.perf_counter() - t0))
    return best
