"""Real multi-process DeepSpeed runs on the CPU (gloo), launched the way users launch them.

The tiny default in fp32 gives exactly comparable numbers: the same search under a single process
and 2 ranks with ZeRO stages 0, 2 and 3 must end with the same gates and delta weights (1e-5), and
gradient accumulation must equal the larger batch. Resuming an interrupted search is tested in
test_faults.py (killed, resumed on the same ranks: bit-exact) and test_elastic.py (stopped with
stop_after, resumed on another number of ranks).
"""

from __future__ import annotations

import json

import pytest

from .launching import TINY, alphas, deltas, max_diff, run

pytestmark = pytest.mark.distributed

TOL = 1e-5


@pytest.fixture(scope="module")
def t5_runs(tmp_path_factory, zero3_search):
    """The same search under four launch shapes (module-scoped: several tests read them); the
    ZeRO-3 one is the session's shared run (conftest.zero3_search: deepspeed, 2 ranks, micro-batch 2)."""
    root = tmp_path_factory.mktemp("t5")
    shapes = {
        "single": ("python", 1, ["zero_stage=0", "search.micro_batch_size=4"]),
        "ds_stage0": ("deepspeed", 2, ["zero_stage=0", "search.micro_batch_size=2"]),
        "torchrun_stage2": ("torchrun", 2, ["zero_stage=2", "search.micro_batch_size=2"]),
    }
    out = {}
    for name, (launcher, nproc, args) in shapes.items():
        out[name] = root / name
        run(launcher, "search", [*TINY, *args, f"output_dir={out[name]}"], nproc)
    return {**out, "ds_stage3": zero3_search}


def test_search_trajectories_equal_across_zero_stages_and_launchers(t5_runs):
    ref_a, ref_d = alphas(t5_runs["single"]), deltas(t5_runs["single"] / "supernet_deltas.safetensors")
    assert ref_a.abs().max() > 1e-3  # the gates really moved
    for name in ("ds_stage0", "torchrun_stage2", "ds_stage3"):
        a = alphas(t5_runs[name])
        d = deltas(t5_runs[name] / "supernet_deltas.safetensors")
        assert (a - ref_a).abs().max() < TOL, name
        assert max_diff(d, ref_d) < TOL, name
    summaries = {k: json.loads((v / "summary.json").read_text()) for k, v in t5_runs.items()}
    assert [summaries[k]["zero_stage"] for k in t5_runs] == [0, 0, 2, 3]
    assert [summaries[k]["world_size"] for k in t5_runs] == [1, 2, 2, 2]


def test_searched_deltas_moved_from_their_init(t5_runs):
    # LoRA B starts at exactly 0: after the search every B has moved
    d = deltas(t5_runs["ds_stage3"] / "supernet_deltas.safetensors")
    lora_b = [v for k, v in d.items() if k.endswith("lora_B")]
    assert lora_b and all(v.abs().max() > 0 for v in lora_b)


def test_gradient_accumulation_equals_the_larger_batch(t5_runs, tmp_path):
    # 2 ranks × micro 1 × accumulation 2 == 2 ranks × micro 2 (both phases: gates and deltas)
    out = tmp_path / "ga"
    run(
        "deepspeed",
        "search",
        [*TINY, "zero_stage=3", "search.micro_batch_size=1", "search.grad_accum=2", f"output_dir={out}"],
    )
    assert (alphas(out) - alphas(t5_runs["ds_stage3"])).abs().max() < TOL
    assert (
        max_diff(
            deltas(out / "supernet_deltas.safetensors"), deltas(t5_runs["ds_stage3"] / "supernet_deltas.safetensors")
        )
        < TOL
    )


def test_zero3_partitions_the_frozen_backbone_and_keeps_it_and_the_gates_exact(tmp_path):
    from pathlib import Path

    probe = Path(__file__).with_name("distributed") / "probe.py"
    run("deepspeed", str(probe), [str(tmp_path), "tiny-t5"])
    check_probe(json.loads((tmp_path / "probe.json").read_text()))


def test_zero3_random_init_llama_is_sharded_from_construction(tmp_path):
    from pathlib import Path

    probe = Path(__file__).with_name("distributed") / "probe.py"
    run("deepspeed", str(probe), [str(tmp_path), "tiny-llama", "random_init"])
    check_probe(json.loads((tmp_path / "probe.json").read_text()))


def check_probe(r: dict) -> None:
    assert r["world"] == 2
    assert r["all_partitioned"] and r["trainable_partitioned"]
    assert r["frozen_numel_now"] == 0  # nothing of the backbone is materialised between forwards
    # each rank holds half of the frozen backbone (partitions are padded to a multiple of the world size)
    assert r["frozen_full"] / 2 <= r["frozen_local"] <= r["frozen_full"] / 2 + 2 * r["frozen_tensors"]
    assert r["trainable_full"] == r["space_params"]
    assert r["frozen_unchanged"] is True
    assert r["trainable_changed"] == r["trainable_tensors"]
    assert r["gates_identical"] is True and r["gates_moved"] > 0
    # the gate phase never moves DeepSpeed's counters: 2 micro-steps and 1 optimizer step per search step
    assert r["counters"] == [[1, 2], [2, 4], [3, 6], [4, 8]]


def test_llama_search_single_process_equals_zero3(tmp_path):
    llama = [*TINY, "model.name_or_path=tiny-llama"]
    run("python", "search", [*llama, "zero_stage=0", "search.micro_batch_size=4", f"output_dir={tmp_path / 'one'}"], 1)
    run("deepspeed", "search", [*llama, "zero_stage=3", "search.micro_batch_size=2", f"output_dir={tmp_path / 'z3'}"])
    assert alphas(tmp_path / "one").abs().max() > 1e-3
    assert (alphas(tmp_path / "one") - alphas(tmp_path / "z3")).abs().max() < TOL
    assert (
        max_diff(
            deltas(tmp_path / "one" / "supernet_deltas.safetensors"),
            deltas(tmp_path / "z3" / "supernet_deltas.safetensors"),
        )
        < TOL
    )


def test_second_order_equal_single_process_and_zero2_and_refused_under_zero3(tmp_path):
    so = [*TINY, "search.mode=second-order", "search.steps=3", "search.eval_every=3"]
    run("python", "search", [*so, "zero_stage=0", "search.micro_batch_size=4", f"output_dir={tmp_path / 'one'}"], 1)
    run("deepspeed", "search", [*so, "zero_stage=2", "search.micro_batch_size=2", f"output_dir={tmp_path / 'z2'}"])
    a1, a2 = alphas(tmp_path / "one"), alphas(tmp_path / "z2")
    assert a1.abs().max() > 1e-3 and (a1 - a2).abs().max() < TOL
    first = tmp_path / "first"
    run(
        "python",
        "search",
        [
            *TINY,
            "search.steps=3",
            "search.eval_every=3",
            "zero_stage=0",
            "search.micro_batch_size=4",
            f"output_dir={first}",
        ],
        1,
    )
    assert (alphas(first) - a1).abs().max() > 1e-6  # the Hessian term changes the gate update
    refused = run("python", "search", [*so, "zero_stage=3", f"output_dir={tmp_path / 'z3'}"], 1, check=False)
    assert refused.returncode == 2
    assert "second-order search" in refused.stderr and "ZeRO stage 0-2" in refused.stderr
    assert not (tmp_path / "z3" / "structure.json").exists()
