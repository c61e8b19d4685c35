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
