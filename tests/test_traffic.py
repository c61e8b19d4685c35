"""benchmarks/traffic.py: the projected multi-node traffic (docs/performance.md), checked against
hand-computed values."""

from __future__ import annotations

import json

import pytest

from benchmarks.traffic import LLAMA_2_70B, Cluster, Workload, llama_params, main, traffic


def test_llama_2_70b_parameter_count():
    # 80 x (2 x 8192^2 + 2 x 8192 x 1024 + 3 x 8192 x 28672 + 2 x 8192) + 2 x 32000 x 8192 + 8192,
    # the count of the meta-device planner (Backbone.plan("llama-2-70b"))
    layer = 2 * 8192**2 + 2 * 8192 * 1024 + 3 * 8192 * 28672 + 2 * 8192
    assert 80 * layer + 2 * 32000 * 8192 + 8192 == 68_976_648_192
    assert llama_params(**LLAMA_2_70B) == 68_976_648_192


def test_traffic_by_hand():
    # 2 nodes x 2 GPUs, 1000 frozen + 10 trainable bf16 parameters, one forward+backward per step:
    # ZeRO-3 gathers 2 x 2020 bytes, half of which crosses each node's boundary; the 20-byte gradient
    # reduce-scatter too. hpZ keeps the gathers in the node (each GPU receives half of 2 x 2020) and
    # sends only the delta weights across (their primary-partition gather after the step + gradients).
    rows = traffic(
        Workload(frozen_params=1000, trainable_params=10, passes=1),
        Cluster(nodes=2, gpus_per_node=2, inter_node_gbps=8e-9 * 10, nvlink_gBps=1e-9 * 100),
    )
    zero3, hpz, replicated = rows
    assert zero3["inter_node_bytes_per_node"] == pytest.approx(2 * 0.5 * 2020 + 0.5 * 20)  # 2030
    assert zero3["inter_node_s"] == pytest.approx(203.0)  # at 10 B/s
    assert zero3["nvlink_bytes_per_gpu"] == pytest.approx(2 * 3 / 4 * 2020)
    assert zero3["backbone_bytes_per_gpu"] == pytest.approx(2000 / 4)
    assert hpz["inter_node_bytes_per_node"] == pytest.approx(0.5 * 20 + 0.5 * 20)
    assert hpz["inter_node_terms"]["frozen secondary-copy refresh"] == 0
    assert hpz["nvlink_bytes_per_gpu"] == pytest.approx(2 * 0.5 * 2020) and hpz["nvlink_s"] == pytest.approx(20.2)
    assert hpz["backbone_bytes_per_gpu"] == pytest.approx(2000 / 4 + 2000 / 2)
    assert replicated["inter_node_bytes_per_node"] == pytest.approx(20)
    assert replicated["backbone_bytes_per_gpu"] == 2000
    # a search: two passes per step, and the gate logits (fp32) all-reduced once
    search = traffic(Workload(frozen_params=1000, trainable_params=10, candidates=5), Cluster(nodes=2))
    assert search[0]["inter_node_bytes_per_node"] == pytest.approx(4 * 0.5 * 2020 + 0.5 * 20 + 2 * 0.5 * 20)


def test_llama_2_70b_table(tmp_path, capsys):
    out = tmp_path / "traffic.json"
    assert main(["--out", str(out)]) == 0
    rows = {r["strategy"].split(" (")[0]: r for r in json.loads(out.read_text())["rows"]}
    params = 2 * (68_976_648_192 + 26_353_664)
    # stock ZeRO-3: 4 gathers of 138.0 GB per search step, 3/4 of each into every node: 414 GB, 16.6 s at 25 GB/s
    assert rows["ZeRO-3"]["inter_node_bytes_per_node"] == pytest.approx(4 * 0.75 * params + 0.75 * 2 * 26_353_664)
    assert rows["ZeRO-3"]["inter_node_s"] == pytest.approx(16.56, abs=0.01)
    # hpZ: 79 MB across nodes (delta weights and gradients, gate logits), the gathers on NVLink
    assert rows["ZeRO-3 + hpZ 8"]["inter_node_bytes_per_node"] == pytest.approx(1.5 * 2 * 26_353_664 + 1.5 * 4 * 1602)
    assert rows["ZeRO-3 + hpZ 8"]["nvlink_bytes_per_gpu"] == pytest.approx(4 * 7 / 8 * params)
    assert "| ZeRO-3 (zero3) | 414.06 GB | 16.56 s |" in capsys.readouterr().out
