"""Deterministic, resumable batching for data-parallel ranks.

Every step takes one *global* batch of ``micro_batch × grad_accum × world`` examples from a seeded
per-epoch permutation; rank r gets the r-th contiguous slice, cut into ``grad_accum`` micro-batches.
So 4 × 2 and 1 × 8 (or 2 ranks × 2 and 1 rank × 4) see exactly the same examples per step: which
examples form global step k depends on the seed and k alone, never on the world size. A run resumed
from ``state_dict()`` continues with the very next batch, on any world size whose geometry keeps the
global batch (``accumulation_for``).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..errors import ConfigError, DataError


def split_halves(examples: Sequence, seed: int) -> tuple[list, list]:
    """The original's 50/50 cut of the training split (weights half, gates half); an odd example is dropped."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    half = len(order) // 2
    return [examples[i] for i in order[:half]], [examples[i] for i in order[half : 2 * half]]


def accumulation_for(global_batch: int, micro_batch: int, world: int, *, written_by: int, section: str) -> int:
    """The gradient accumulation that keeps ``global_batch`` on ``world`` ranks of ``micro_batch``.

    A checkpoint written by ``written_by`` ranks resumes with its global batch (the examples of each
    step, and so the trajectory, stay what they were): global = micro_batch × accumulation × world.

    Raises:
        ConfigError: ``global_batch`` is not a multiple of ``micro_batch × world``; names the numbers and
            the micro-batch sizes that would divide it.
    """
    per_step = micro_batch * world
    if global_batch % per_step == 0:
        return global_batch // per_step
    fits = [m for m in range(1, global_batch // world + 1) if global_batch % (m * world) == 0]
    raise ConfigError(
        f"cannot resume the checkpoint of {written_by} rank(s) on {world}: its global batch {global_batch} is not a "
        f"multiple of {section}.micro_batch_size {micro_batch} × {world} ranks = {per_step}, so no gradient "
        "accumulation keeps it; "
        + (
            f"set {section}.micro_batch_size to one of {fits}"
            if fits
            else f"run on a number of ranks that divides {global_batch}"
        )
    )


class BatchStream:
    """An endless stream of per-rank micro-batch groups over ``examples``."""

    def __init__(
        self,
        examples: Sequence,
        *,
        micro_batch: int,
        grad_accum: int,
        rank: int,
        world: int,
        seed: int,
        collate: Callable,
        name: str = "train",
    ):
        self.examples = examples
        self.micro_batch, self.grad_accum, self.rank, self.world = micro_batch, grad_accum, rank, world
        self.seed, self.collate, self.name = seed, collate, name
        self.global_batch = micro_batch * grad_accum * world
        if len(examples) < self.global_batch:
            raise DataError(
                f"{name}: {len(examples)} examples cannot fill one global batch of {self.global_batch} "
                f"(micro_batch {micro_batch} × grad_accum {grad_accum} × world {world}); use smaller batches"
            )
        self.epoch, self.cursor = 0, 0
        self._perm: list[int] | None = None

    @property
    def steps_per_epoch(self) -> int:
        return len(self.examples) // self.global_batch

    def _permutation(self) -> list[int]:
        if self._perm is None:
            self._perm = list(range(len(self.examples)))
            random.Random(self.seed * 7919 + self.epoch).shuffle(self._perm)
        return self._perm

    def next(self) -> list[dict[str, torch.Tensor]]:
        """The ``grad_accum`` micro-batches of this rank for the next step."""
        if self.cursor + self.global_batch > len(self.examples):
            self.epoch, self.cursor, self._perm = self.epoch + 1, 0, None
        perm = self._permutation()
        per_rank = self.micro_batch * self.grad_accum
        start = self.cursor + self.rank * per_rank
        mine = [self.examples[i] for i in perm[start : start + per_rank]]
        self.cursor += self.global_batch
        return [self.collate(mine[k * self.micro_batch : (k + 1) * self.micro_batch]) for k in range(self.grad_accum)]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "n": len(self.examples), "global_batch": self.global_batch}

    def load_state_dict(self, state: dict) -> None:
        if state["n"] != len(self.examples) or state["global_batch"] != self.global_batch:
            raise DataError(
                f"{self.name}: checkpoint was taken with {state['n']} examples and global batch "
                f"{state['global_batch']}, this run has {len(self.examples)} and {self.global_batch}"
            )
        self.epoch, self.cursor, self._perm = state["epoch"], state["cursor"], None


@dataclass(frozen=True)
class EvalShard:
    """This rank's share of an evaluation split: example indices, padded so that every rank runs the
    same number of batches (ZeRO-3 needs every rank in every forward); padding rows have valid=False."""

    indices: list[int]
    valid: list[bool]

    @classmethod
    def of(cls, n: int, rank: int, world: int, batch_size: int) -> EvalShard:
        per_rank = -(-n // world)
        per_rank = max(batch_size, -(-per_rank // batch_size) * batch_size)
        own = list(range(rank * per_rank, min(n, (rank + 1) * per_rank)))
        pad = per_rank - len(own)
        return cls(own + [0] * pad, [True] * len(own) + [False] * pad)

    def batches(self, batch_size: int):
        for k in range(0, len(self.indices), batch_size):
            yield self.indices[k : k + batch_size], self.valid[k : k + batch_size]
