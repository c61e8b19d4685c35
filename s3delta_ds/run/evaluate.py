"""Evaluation by rank classification: score every label word (or read the head's logits), predict
the best, and compute the task metric over the whole split, sharded across ranks.

Every rank runs the same number of forward passes (padded shards), as ZeRO-3 requires.
"""

from __future__ import annotations

import torch

from ..data import Collator, EvalShard, Task
from ..engine import zero
from ..method.objective import DeltaModel, move
from .metrics import compute


@torch.no_grad()
def evaluate(
    model: DeltaModel,
    examples: list[dict],
    collate: Collator,
    task: Task,
    *,
    batch_size: int,
    device: torch.device,
    label_scoring: str = "sum",
) -> dict[str, float]:
    """Metric(s) and mean gold-label loss per item on ``examples``; identical on every rank.

    ``label_scoring`` (rank classification only): the prediction is the label word of lowest summed
    token NLL (``sum``, what greedy decoding of single-token words does) or lowest mean NLL per token
    (``length-normalised``, which does not favour short label words). The loss is per token either way.
    """
    was_training = model.training
    model.eval()
    shard = EvalShard.of(len(examples), zero.rank(), zero.world(), batch_size)
    preds: list[tuple[int, int]] = []
    loss = torch.zeros(2, dtype=torch.float64)
    for idx, valid in shard.batches(batch_size):
        exs = [examples[i] for i in idx]
        gold = torch.tensor([e["label"] for e in exs])
        if model.objective == "classify":
            batch = move(collate(exs), device)
            logits = model.class_logits(batch).cpu()
            pred = logits.argmax(-1)
            nll = torch.nn.functional.cross_entropy(logits, gold, reduction="none")
            count = torch.ones_like(nll)
        else:
            sums, counts = [], []
            for k in range(len(task.label_words)):
                s, c = model(move(collate(exs, choice=k), device))
                sums.append(s.float().cpu())
                counts.append(c.cpu())
            scores = torch.stack(sums, -1)  # (B, labels): sequence NLL of each label word
            lengths = torch.stack(counts, -1)  # (B, labels): its scored tokens
            pred = (scores / lengths if label_scoring == "length-normalised" else scores).argmin(-1)
            nll = scores.gather(1, gold[:, None])[:, 0]
            count = lengths.gather(1, gold[:, None])[:, 0]
        keep = torch.tensor(valid)
        loss += torch.stack([nll[keep].double().sum(), count[keep].double().sum()])
        preds += [(i, int(p)) for i, v, p in zip(idx, valid, pred.tolist(), strict=True) if v]
    merged = dict(p for part in zero.all_gather_object(preds) for p in part)
    loss = zero.all_reduce_sum_(loss.to(device)).cpu()
    order = sorted(merged)
    scores = compute(task.metric, [merged[i] for i in order], [examples[i]["label"] for i in order], task.label_words)
    if was_training:
        model.train()
    return {**scores, "loss": float(loss[0] / loss[1]), "n": len(order)}
