"""T5 v1.0 (t5-base, ...), v1.1 / flan-T5 (gated FFN: wi_0, wi_1) and mT5: one family."""

from __future__ import annotations

from .base import Family


def _gated(config) -> bool:
    return bool(getattr(config, "is_gated_act", False)) or str(getattr(config, "feed_forward_proj", "")).startswith(
        "gated-"
    )


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

    def hidden_size(self, config):
        return config.d_model

    def auto_model_class(self):
        from transformers import AutoModelForSeq2SeqLM

        return AutoModelForSeq2SeqLM
