"""Small builders shared by the tests: tiny random backbones and their inputs."""

from __future__ import annotations

import torch

from s3delta_ds.backbones.loading import build_model, load_config


def tiny_model(name: str, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(load_config(name))
    model.eval()
    return model


def tiny_inputs(name: str, batch: int = 2, seq: int = 9, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 200, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0
    if "t5" in name:
        labels = torch.randint(3, 200, (batch, 5), generator=g)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if "llama" in name:
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.clone()}
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1])[:batch]}


def logits_of(model, batch) -> torch.Tensor:
    return model(**batch).logits


def write_tiny_gguf(directory, seed: int = 0):
    """tiny-llama (untied) written as an F32 GGUF file the way llama.cpp's converter writes one
    (its tensor names, q/k rows permuted for its RoPE layout); returns (the HF model, the file name).
    transformers' GGUF loader undoes the permutation, so the file loads to the same weights."""
    import gguf

    config = load_config("tiny-llama")
    config.tie_word_embeddings = False
    torch.manual_seed(seed)
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(config).eval()
    name = "tiny-llama.f32.gguf"
    w = gguf.GGUFWriter(str(directory / name), "llama")
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(config.num_hidden_layers)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_rope_freq_base(config.rope_parameters["rope_theta"])
    w.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    w.add_vocab_size(config.vocab_size)
    w.add_tokenizer_model("llama")
    w.add_token_list([f"<t{i}>".encode() for i in range(config.vocab_size)])
    w.add_token_scores([0.0] * config.vocab_size)
    w.add_token_types([1] * config.vocab_size)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)

    def permute(x, heads):
        return x.reshape(heads, 2, x.shape[0] // heads // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)

    for key, value in model.state_dict().items():
        array = value.float().numpy()
        if key.endswith("q_proj.weight"):
            array = permute(array, config.num_attention_heads)
        elif key.endswith("k_proj.weight"):
            array = permute(array, config.num_key_value_heads)
        w.add_tensor(names.get_name(key.removesuffix(".weight")) + ".weight", array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model, name
