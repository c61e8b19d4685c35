"""Projected communication per optimizer step of a multi-node delta-tuning run: stock ZeRO-3, ZeRO-3
with ZeRO++ hierarchical partitioning (hpZ, ``ds_configs/zero3_multinode.json``) and a replicated
backbone (ZeRO-2). Arithmetic only, nothing is measured; docs/performance.md explains the model.

    python benchmarks/traffic.py                 # LLaMA-2-70B, bf16, 4 nodes x 8 GPUs, mixed-space search
    python benchmarks/traffic.py --nodes 8 --inter-node-gbps 400 --passes 1

Writes benchmarks/results/traffic-llama-2-70b.json and prints a markdown table.

Model (per optimizer step; ``passes`` forward+backward passes per step: a first-order search step is
two, the delta step and the gate step; multiply by gradient accumulation):
* ZeRO-3 re-gathers every partitioned parameter in each forward and again in each backward (the
  frozen weights too: the input gradients need them), so 2 x passes all-gathers of all parameters.
* An all-gather or reduce-scatter of S bytes moves at least (N-1)/N x S into (or out of) each of N
  nodes (a flat ring moves (W-1)/W x S over each node boundary, 1.29x that on 4 x 8); per GPU an
  all-gather over g ranks receives (g-1)/g x S.
* Only the delta weights have gradients: one reduce-scatter of T parameters per step.
* hpZ: the gathers read a secondary copy partitioned over the G GPUs of the node (NVLink). The copy
  of a frozen weight is written once, when the weight is partitioned at load, and never refreshed
  (DeepSpeed drops only the trainable parameters' copies at each step); a delta weight's copy is
  dropped at every step, so its first gather after the step reads the primary partition across
  nodes (and rewrites the copy).
* The gate logits (fp32, one per candidate) are all-reduced once per gate step.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

# LLaMA-2-70B (meta-llama/Llama-2-70b-hf config; s3delta_ds/shapes/llama-2-70b.json).
LLAMA_2_70B = dict(layers=80, hidden=8192, ffn=28672, heads=64, kv_heads=8, vocab=32000)
# Its mixed-space supernet (every candidate of a search trains): Backbone.plan("llama-2-70b").space("mixed").
MIXED_SUPERNET_70B = 26_353_664
MIXED_CANDIDATES_70B = 1602


def llama_params(*, layers: int, hidden: int, ffn: int, heads: int, kv_heads: int, vocab: int) -> int:
    """Parameters of a LLaMA decoder with untied embeddings: per layer q, o (hidden^2 each), k, v
    (hidden x kv_heads x head_dim each), gate/up/down (3 x hidden x ffn) and 2 RMSNorms; then the
    embedding, the LM head and the final norm."""
    kv = kv_heads * (hidden // heads)
    layer = 2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * ffn + 2 * hidden
    return layers * layer + 2 * vocab * hidden + hidden


@dataclass(frozen=True, kw_only=True, slots=True)
class Cluster:
    nodes: int = 4
    gpus_per_node: int = 8
    inter_node_gbps: float = 200.0
    """Inter-node bandwidth per node, Gb/s (one 200 Gb/s NIC per node; a node with one NIC per GPU
    has 8x this)."""
    nvlink_gBps: float = 900.0
    """NVLink bandwidth per GPU, GB/s (H100's quoted aggregate; 450 GB/s per direction)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Workload:
    frozen_params: int
    trainable_params: int
    candidates: int = 0
    """Gate logits, all-reduced once per step (the gate step; 0: not a search)."""
    bytes_per_param: int = 2
    """bf16 weights, gathers and gradients."""
    passes: int = 2
    """Forward+backward passes per optimizer step (first-order search: delta step + gate step)."""


def traffic(w: Workload, c: Cluster) -> list[dict]:
    """One row per strategy: inter-node bytes per node and NVLink bytes per GPU per optimizer step,
    the terms they add up from, the seconds at the cluster's bandwidths, and the backbone bytes each
    GPU holds."""
    n, g = c.nodes, c.gpus_per_node
    world = n * g
    cross = (n - 1) / n  # share of a collective's bytes that must cross each node's boundary
    params = w.bytes_per_param * (w.frozen_params + w.trainable_params)  # what ZeRO-3 gathers
    deltas = w.bytes_per_param * w.trainable_params
    gathers = 2 * w.passes
    grads = {"delta gradient reduce-scatter": cross * deltas}
    # an all-reduce is a reduce-scatter and an all-gather: 2 (N-1)/N of the fp32 logits per node
    gates = {"gate-logit all-reduce": 2 * cross * 4 * w.candidates} if w.candidates else {}
    frozen = w.bytes_per_param * w.frozen_params
    rows = [
        (
            "ZeRO-3 (zero3)",
            {f"{gathers} parameter all-gathers over {world} ranks": gathers * cross * params, **grads, **gates},
            {"parameter all-gathers (all links)": gathers * (world - 1) / world * params},
            frozen / world,
        ),
        (
            f"ZeRO-3 + hpZ {g} (zero3_multinode)",
            {
                "delta weights gathered from the primary partition after the step": cross * deltas,
                **grads,
                **gates,
                "frozen secondary-copy refresh": 0.0,
            },
            {f"{gathers} parameter all-gathers over the node's {g} GPUs": gathers * (g - 1) / g * params},
            frozen / world + frozen / g,
        ),
        (
            "replicated backbone (zero2)",
            {**grads, "updated delta partitions all-gather": cross * deltas, **gates},
            {"delta reduce-scatter + all-gather (all links)": 2 * (world - 1) / world * deltas},
            float(frozen),
        ),
    ]
    out = []
    for name, inter, nvlink, held in rows:
        inter_b, nvlink_b = sum(inter.values()), sum(nvlink.values())
        out.append(
            {
                "strategy": name,
                "inter_node_bytes_per_node": inter_b,
                "inter_node_s": inter_b / (c.inter_node_gbps * 1e9 / 8),
                "inter_node_terms": inter,
                "nvlink_bytes_per_gpu": nvlink_b,
                "nvlink_s": nvlink_b / (c.nvlink_gBps * 1e9),
                "nvlink_terms": nvlink,
                "backbone_bytes_per_gpu": held,
            }
        )
    return out


def table(rows: list[dict]) -> str:
    head = (
        "| strategy | inter-node per node | time | received per GPU | time at NVLink rate | backbone held per GPU |\n"
        "|---|---:|---:|---:|---:|---:|\n"
    )
    return head + "".join(
        f"| {r['strategy']} | {_size(r['inter_node_bytes_per_node'])} | {_secs(r['inter_node_s'])} "
        f"| {_size(r['nvlink_bytes_per_gpu'])} | {_secs(r['nvlink_s'])} | {_size(r['backbone_bytes_per_gpu'])} |\n"
        for r in rows
    )


def _size(b: float) -> str:
    return f"{b / 1e9:.2f} GB" if b >= 1e9 else f"{b / 1e6:.1f} MB" if b >= 1e5 else f"{b / 1e3:.1f} kB"


def _secs(s: float) -> str:
    return f"{s:.2f} s" if s >= 0.1 else f"{s * 1e3:.2f} ms"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--inter-node-gbps", type=float, default=200.0)
    ap.add_argument("--nvlink-gBps", type=float, default=900.0)
    ap.add_argument("--passes", type=int, default=2, help="forward+backward passes per optimizer step")
    ap.add_argument("--trainable", type=int, default=MIXED_SUPERNET_70B, help="trainable parameters")
    ap.add_argument("--out", type=Path, default=RESULTS / "traffic-llama-2-70b.json")
    args = ap.parse_args(argv)
    cluster = Cluster(
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        inter_node_gbps=args.inter_node_gbps,
        nvlink_gBps=args.nvlink_gBps,
    )
    frozen = llama_params(**LLAMA_2_70B)
    work = Workload(
        frozen_params=frozen, trainable_params=args.trainable, candidates=MIXED_CANDIDATES_70B, passes=args.passes
    )
    rows = traffic(work, cluster)
    print(
        f"LLaMA-2-70B: {frozen:,} parameters ({_size(2 * frozen)} bf16), {args.trainable:,} trainable; "
        f"{cluster.nodes} nodes x {cluster.gpus_per_node} GPUs, {cluster.inter_node_gbps:g} Gb/s per node, "
        f"{cluster.nvlink_gBps:g} GB/s NVLink per GPU; {args.passes} forward+backward passes per step\n"
    )
    print(table(rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {"model": "llama-2-70b", **LLAMA_2_70B, "cluster": asdict(cluster), "workload": asdict(work), "rows": rows},
            indent=2,
        )
        + "\n"  # fmt: skip
    )
    print(f"-> {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
