"""LLaMA-layout decoders (LLaMA 1/2/3, Mistral, Qwen2): one ``decoder`` stack, pre-RMSNorm."""

from __future__ import annotations

from .base import Family


class LlamaFamily(Family):
    name = "llama"
    model_types = ("llama", "mistral", "qwen2")

    def stacks(self, config):
        return {"decoder": ("layers", config.num_hidden_layers)}

    def layer_components(self, stack, config):
        return {
            "attn_norm": "input_layernorm",
            "attn": "self_attn",
            "attn.q": "self_attn.q_proj",
            "attn.k": "self_attn.k_proj",
            "attn.v": "self_attn.v_proj",
            "attn.o": "self_attn.o_proj",
            "mlp_norm": "post_attention_layernorm",
            "mlp": "mlp",
            "mlp.gate": "mlp.gate_proj",
            "mlp.up": "mlp.up_proj",
            "mlp.down": "mlp.down_proj",
        }

    def stack_components(self, stack, config):
        return {"final_norm": "norm"}

    def roles(self, config):
        return {
            "attn.proj": ("attn.q", "attn.k", "attn.v", "attn.o"),
            "mlp.in": ("mlp.gate", "mlp.up"),
            "mlp.out": ("mlp.down",),
            "norm": ("attn_norm", "mlp_norm", "final_norm"),
            "attn.block": ("attn",),
            "mlp.block": ("mlp",),
        }

    def bias_flag(self, component, config):
        # LLaMA's modelling reads these flags; Qwen2's and Mistral's ignore them (a config.json may still
        # carry them), so a bias saved there would not reload
        if getattr(config, "model_type", None) != "llama":
            return None
        flag = {"attn": "attention_bias", "mlp": "mlp_bias"}.get(component.split(".")[0])
        return flag if flag is not None and hasattr(config, flag) and "." in component else None

    def hidden_size(self, config):
        return config.hidden_size

    def auto_model_class(self):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM
