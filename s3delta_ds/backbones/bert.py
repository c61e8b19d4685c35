"""BERT-layout encoders (BERT, RoBERTa) for classification: post-LayerNorm, one ``encoder`` stack.

BERT has no module that is "the whole attention sublayer before the residual": its output
projection (``attention.output.dense``) is exactly that, so sequential deltas on attention /
FFN blocks sit on ``attn.o`` / ``mlp.down``. The norms are post-norms (after the residual add).
"""

from __future__ import annotations

from .base import Family


class BertFamily(Family):
    name = "bert"
    model_types = ("bert", "roberta")
    head_modules = ("classifier",)

    def stacks(self, config):
        return {"encoder": ("encoder.layer", config.num_hidden_layers)}

    def layer_components(self, stack, config):
        return {
            "attn.q": "attention.self.query",
            "attn.k": "attention.self.key",
            "attn.v": "attention.self.value",
            "attn.o": "attention.output.dense",
            "attn_norm": "attention.output.LayerNorm",
            "mlp.up": "intermediate.dense",
            "mlp.down": "output.dense",
            "mlp_norm": "output.LayerNorm",
        }

    def stack_components(self, stack, config):
        return {}

    def roles(self, config):
        return {
            "attn.proj": ("attn.q", "attn.k", "attn.v", "attn.o"),
            "mlp.in": ("mlp.up",),
            "mlp.out": ("mlp.down",),
            "norm": ("attn_norm", "mlp_norm"),
            "attn.block": ("attn.o",),
            "mlp.block": ("mlp.down",),
        }

    def key_shift_invariant(self, config):
        # absolute embeddings act before the projections; relative_key adds q·r_ij (no key term);
        # relative_key_query adds k·r_ij, which a key bias changes
        return getattr(config, "position_embedding_type", "absolute") in (None, "absolute", "relative_key")

    def hidden_size(self, config):
        return config.hidden_size

    def auto_model_class(self):
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification
