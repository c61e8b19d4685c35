"""T5 v1.0 (t5-base, ...), v1.1 / flan-T5 (gated FFN: wi_0, wi_1) and mT5: one family.

Parameter sharing differs between them. Every T5 checkpoint has one input embedding (``shared``,
which ``encoder.embed_tokens`` and ``decoder.embed_tokens`` alias); v1.0 also ties ``lm_head`` to
it, while v1.1, flan-T5 and mT5 have their own ``lm_head`` (their config.json says
``tie_word_embeddings: false``). transformers 5 forces ``config.tie_word_embeddings = True`` for
T5 and mT5, so ``from_config`` ties ``lm_head`` for v1.1 too: 24.7M parameters short for
t5-v1_1-base. ``from_pretrained`` only unties it when both weights are in the checkpoint and
differ (under ZeRO-3 it compares two empty partitions, which are equal, and ties them). Setting
``tie_word_embeddings=False`` instead would untie the encoder and decoder embeddings too. So
:meth:`T5Family.model_class` hands out, for untied configs, the transformers class with
``lm_head`` taken out of its tying map: the checkpoint's structure on every path (meta planning,
random init, ``from_pretrained``, ZeRO-3).
"""

from __future__ import annotations

import functools

from .base import Family


def _gated(config) -> bool:
    return bool(getattr(config, "is_gated_act", False)) or str(getattr(config, "feed_forward_proj", "")).startswith(
        "gated-"
    )


def untied_lm_head(config) -> bool:
    """Whether the checkpoint of this config has an ``lm_head`` of its own (v1.1, flan-T5, mT5).

    transformers 5 overwrites ``tie_word_embeddings`` with True but keeps what the json said, for
    T5, as ``scale_decoder_outputs`` (v1.0 scales the decoder output because its head is the
    embedding). mT5 never ties (and never scales), whatever its config says.
    """
    if config.model_type == "mt5":
        return True
    return getattr(config, "scale_decoder_outputs", getattr(config, "tie_word_embeddings", True)) is False


@functools.cache
def untied_head_class(base: type) -> type:
    """``base`` (e.g. ``T5ForConditionalGeneration``) with ``lm_head`` left out of the tied weights.

    The class keeps ``base``'s name, so saved configs list the usual architecture and any
    transformers can load them. A fresh ``lm_head`` gets T5's own init for an untied head
    (normal, std = initializer_factor); a loaded one is left alone.
    """
    from transformers import initialization as init

    tied = {k: v for k, v in (base._tied_weights_keys or {}).items() if k != "lm_head.weight"}

    def _init_weights(self, module):
        base._init_weights(self, module)
        if module is self:
            init.normal_(self.lm_head.weight, mean=0.0, std=self.config.initializer_factor)

    def from_config(cls, config, **kwargs):  # the Auto classes' spelling, so callers need not care
        return cls._from_config(config, **kwargs)

    namespace = {
        "_tied_weights_keys": tied,
        "_init_weights": _init_weights,
        "from_config": classmethod(from_config),
        "__module__": __name__,
        "__doc__": base.__doc__,
    }
    return type(base.__name__, (base,), namespace)


class T5Family(Family):
    name = "t5"
    model_types = ("t5", "mt5")

    def stacks(self, config):
        dec = getattr(config, "num_decoder_layers", None) or config.num_layers
        return {"encoder": ("encoder.block", config.num_layers), "decoder": ("decoder.block", dec)}

    def _ffn(self, layer_index: int, config) -> dict[str, str]:
        ffn = f"layer.{layer_index}.DenseReluDense"
        out = {"mlp": ffn}
        if _gated(config):
            out |= {"mlp.gate": f"{ffn}.wi_0", "mlp.up": f"{ffn}.wi_1"}
        else:
            out |= {"mlp.up": f"{ffn}.wi"}
        out |= {"mlp.down": f"{ffn}.wo", "mlp_norm": f"layer.{layer_index}.layer_norm"}
        return out

    def layer_components(self, stack, config):
        comps = {
            "attn_norm": "layer.0.layer_norm",
            "attn": "layer.0.SelfAttention",
            "attn.q": "layer.0.SelfAttention.q",
            "attn.k": "layer.0.SelfAttention.k",
            "attn.v": "layer.0.SelfAttention.v",
            "attn.o": "layer.0.SelfAttention.o",
        }
        if stack == "decoder":
            comps |= {
                "cross_attn_norm": "layer.1.layer_norm",
                "cross_attn": "layer.1.EncDecAttention",
                "cross_attn.q": "layer.1.EncDecAttention.q",
                "cross_attn.k": "layer.1.EncDecAttention.k",
                "cross_attn.v": "layer.1.EncDecAttention.v",
                "cross_attn.o": "layer.1.EncDecAttention.o",
            }
            return comps | self._ffn(2, config)
        return comps | self._ffn(1, config)

    def stack_components(self, stack, config):
        return {"final_norm": f"{stack}.final_layer_norm"}

    def roles(self, config):
        return {
            "attn.proj": ("attn.q", "attn.k", "attn.v", "attn.o"),
            "cross_attn.proj": ("cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o"),
            "mlp.in": ("mlp.gate", "mlp.up") if _gated(config) else ("mlp.up",),
            "mlp.out": ("mlp.down",),
            "norm": ("attn_norm", "cross_attn_norm", "mlp_norm", "final_norm"),
            "attn.block": ("attn",),
            "mlp.block": ("mlp",),
        }

    def key_shift_invariant(self, config):
        return True  # the relative position bias is added to the scores, not to the keys

    def hidden_size(self, config):
        return config.d_model

    def auto_model_class(self):
        from transformers import AutoModelForSeq2SeqLM

        return AutoModelForSeq2SeqLM

    def model_class(self, config):
        if not untied_lm_head(config):
            return self.auto_model_class()
        from transformers import MT5ForConditionalGeneration, T5ForConditionalGeneration

        base = MT5ForConditionalGeneration if config.model_type == "mt5" else T5ForConditionalGeneration
        return untied_head_class(base)
