"""Elastic resume: a checkpoint written on N ranks resumes on M ranks with the same global batch
(the accumulation adjusted) and ends where the uninterrupted run does.

The unit tests pin the two rules it rests on: which examples form global step k depends on the seed
and k only (1 rank × accumulation 2 and 2 ranks × accumulation 1 see the same ones), and the
accumulation that keeps a checkpoint's global batch (or the error naming the numbers). The
distributed tests run the tiny default in fp32: a search under ZeRO-3 and a retrain under ZeRO-2,
each uninterrupted on 2 ranks, resumed from its 2-rank step-2 checkpoint on 1 rank, and stopped on
1 rank then resumed on 2 ranks; every ending equals the uninterrupted one (1e-5).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from s3delta_ds.config import SearchConfig
from s3delta_ds.data.batches import BatchStream, accumulation_for
from s3delta_ds.errors import ConfigError

TOL = 1e-5


# -- unit: the rules ------------------------------------------------------------------------------


def _global_batch(streams: list[BatchStream]) -> list[int]:
    """One step's examples on all ranks, in rank order, micro-batches concatenated."""
    return [x for s in streams for micro in s.next() for x in micro]


def test_global_batches_do_not_depend_on_the_world_size():
    examples = list(range(37))  # 9 global batches of 4 per epoch, one example left over
    make = lambda rank, world, accum: BatchStream(  # noqa: E731
        examples, micro_batch=2, grad_accum=accum, rank=rank, world=world, seed=5, collate=list
    )
    one = [make(0, 1, 2)]
    two = [make(0, 2, 1), make(1, 2, 1)]
    seen = []
    for _ in range(20):  # across two epoch boundaries
        a, b = _global_batch(one), _global_batch(two)
        assert a == b and len(a) == 4
        seen.append(a)
    assert seen[0] != seen[9]  # a fresh permutation each epoch
    # a stream resumed on another world size continues with the very next global batch
    state = one[0].state_dict()
    resumed = [make(0, 2, 1), make(1, 2, 1)]
    for s in resumed:
        s.load_state_dict(state)
    assert _global_batch(resumed) == _global_batch(one)


def test_accumulation_keeps_the_global_batch():
    assert accumulation_for(4, 2, 1, written_by=2, section="search") == 2
    assert accumulation_for(4, 2, 2, written_by=1, section="search") == 1
    assert accumulation_for(32, 4, 8, written_by=2, section="retrain") == 1


def test_accumulation_that_cannot_keep_the_global_batch_names_the_numbers():
    with pytest.raises(ConfigError) as e:
        accumulation_for(12, 4, 2, written_by=3, section="retrain")
    msg = str(e.value)
    assert "checkpoint of 3 rank(s) on 2" in msg and "global batch 12" in msg
    assert "retrain.micro_batch_size 4 × 2 ranks = 8" in msg and "[1, 2, 3, 6]" in msg
    with pytest.raises(ConfigError, match="run on a number of ranks that divides 4"):
        accumulation_for(4, 2, 3, written_by=2, section="search")


def test_resume_reads_the_checkpoint_geometry(tmp_path):
    from s3delta_ds.run.checkpoint import COMPLETE, resume_grad_accum

    sc = SearchConfig(micro_batch_size=2, grad_accum=1)
    assert resume_grad_accum(tmp_path, sc, 1, "search") == (1, None)  # nothing to resume
    (tmp_path / "step-00000002").mkdir()
    info = {"step": 2, "world": 2, "micro_batch": 2, "grad_accum": 1, "global_batch": 4}
    (tmp_path / "step-00000002" / COMPLETE).write_text(json.dumps(info))
    assert resume_grad_accum(tmp_path, sc, 2, "search") == (1, None)  # same world: nothing to say
    acc, note = resume_grad_accum(tmp_path, sc, 1, "search")
    assert acc == 2
    assert "of 2 rank(s) on 1" in note and "search.grad_accum 1 -> 2" in note and "global batch 4" in note


def test_a_torn_newest_checkpoint_is_a_clear_error_naming_the_previous_one(tmp_path):
    """COMPLETE next to an empty state file (a crash between the writes on a file system that
    reorders them): a CheckpointError that says which checkpoint to remove, not a torch traceback."""
    from s3delta_ds.errors import CheckpointError
    from s3delta_ds.run.checkpoint import COMPLETE, STATE_FILE, load_run_checkpoint

    for step in (2, 4):
        (tmp_path / f"step-0000000{step}").mkdir()
        (tmp_path / f"step-0000000{step}" / COMPLETE).write_text(json.dumps({"step": step}))
    (tmp_path / "step-00000002" / STATE_FILE).write_bytes(b"written before")
    (tmp_path / "step-00000004" / STATE_FILE).write_bytes(b"")
    torn = r"step-00000004/state.pt is unreadable.*torn by a crash.*resume from step-00000002"
    with pytest.raises(CheckpointError, match=torn):
        load_run_checkpoint(None, tmp_path)


def test_resume_restores_the_files_a_checkpoint_kept_and_only_those(tmp_path):
    from s3delta_ds.run.checkpoint import COMPLETE, restore_checkpoint_files

    out, ckpt = tmp_path / "run", tmp_path / "run" / "checkpoints" / "step-00000004"
    ckpt.mkdir(parents=True)
    best, later = out / "deltas.safetensors", out / "later.bin"
    (ckpt / "deltas.safetensors").write_text("step 2")
    best.write_text("step 5, written after the checkpoint")
    later.write_text("not written yet at step 4")
    info = {"step": 4, "world": 1, "micro_batch": 2, "grad_accum": 1, "global_batch": 2}
    (ckpt / COMPLETE).write_text(json.dumps({**info, "files": ["deltas.safetensors", "later.bin"]}))
    restore_checkpoint_files(ckpt, (best, later))
    assert best.read_text() == "step 2" and not later.exists()
    # a checkpoint of an older version kept nothing: resume leaves the outputs alone
    (ckpt / COMPLETE).write_text(json.dumps(info))
    best.write_text("newer")
    restore_checkpoint_files(ckpt, (best,))
    assert best.read_text() == "newer"


# -- distributed: search (ZeRO-3) and retrain (ZeRO-2) ---------------------------------------------

STEPS = ["search.steps=4", "search.eval_every=4", "retrain.steps=4", "retrain.eval_every=4"]
SEARCH = ["search.micro_batch_size=2", "search.checkpoint_every=2"]  # zero3_cpu (TINY's)
RETRAIN = ["zero_stage=2", "retrain.micro_batch_size=2", "retrain.checkpoint_every=2"]


def _resume_copy(src: Path, dst: Path, step: int) -> None:
    """``dst``: ``src`` as a launch stopped after ``step`` steps leaves it (only that checkpoint, no outputs)."""
    (dst / "checkpoints").mkdir(parents=True)
    shutil.copytree(src / "checkpoints" / f"step-{step:08d}", dst / "checkpoints" / f"step-{step:08d}")
    shutil.copy(src / "config.yaml", dst / "config.yaml")


def _elastic_runs(script: str, args: list[str], root: Path) -> dict[str, Path]:
    """(a) uninterrupted on 2 ranks (checkpointing at steps 2 and 4); (b) its step-2 checkpoint resumed
    on 1 rank; (c) 1 rank × accumulation 2 stopped after 2 steps, resumed on 2 ranks."""
    from .launching import run

    section = script if script == "retrain" else "search"
    out = {k: root / k for k in ("a", "b", "c")}
    run("torchrun", script, [*args, f"output_dir={out['a']}"], 2)
    _resume_copy(out["a"], out["b"], 2)
    b = run("python", script, ["--resume", *args, f"output_dir={out['b']}"], 1)
    assert f"of 2 rank(s) on 1: {section}.grad_accum 1 -> 2 keeps the global batch 4" in b.stdout
    one = [*args, f"{section}.grad_accum=2", f"output_dir={out['c']}"]
    run("python", script, [*one, f"{section}.stop_after=2"], 1)
    assert json.loads((out["c"] / "checkpoints" / "step-00000002" / "COMPLETE").read_text())["world"] == 1
    c = run("torchrun", script, ["--resume", *one], 2)
    assert f"of 1 rank(s) on 2: {section}.grad_accum 2 -> 1 keeps the global batch 4" in c.stdout
    return out


@pytest.fixture(scope="module")
def searched(tmp_path_factory) -> dict[str, Path]:
    from .launching import TINY

    return _elastic_runs("search", [*TINY, *STEPS, *SEARCH], tmp_path_factory.mktemp("elastic-search"))


@pytest.mark.distributed
def test_search_resumes_on_another_number_of_ranks(searched):
    from .launching import alphas, deltas, max_diff

    ref_a, ref_d = alphas(searched["a"]), deltas(searched["a"] / "supernet_deltas.safetensors")
    assert ref_a.abs().max() > 1e-3  # the gates really moved
    for k in ("b", "c"):
        assert (alphas(searched[k]) - ref_a).abs().max() < TOL, k
        assert max_diff(deltas(searched[k] / "supernet_deltas.safetensors"), ref_d) < TOL, k
        summary = json.loads((searched[k] / "summary.json").read_text())
        assert summary["zero_stage"] == 3 and summary["world_size"] == {"b": 1, "c": 2}[k]


@pytest.mark.distributed
def test_retrain_resumes_on_another_number_of_ranks(searched, tmp_path):
    from .launching import TINY, deltas, max_diff

    structure = searched["a"] / "structure.json"
    runs = _elastic_runs("retrain", [*TINY, *STEPS, *RETRAIN, f"retrain.structure={structure}"], tmp_path)
    ref = json.loads((runs["a"] / "summary.json").read_text())
    ref_d = deltas(runs["a"] / "deltas.safetensors")
    for k in ("b", "c"):
        assert max_diff(deltas(runs[k] / "deltas.safetensors"), ref_d) < TOL, k
        summary = json.loads((runs[k] / "summary.json").read_text())
        assert summary["best_step"] == ref["best_step"] == 4
        assert summary["test"]["loss"] == pytest.approx(ref["test"]["loss"], abs=TOL)
        assert summary["zero_stage"] == 2 and summary["world_size"] == {"b": 1, "c": 2}[k]


def test_a_gpu_checkpoints_rng_state_resumes_on_the_cpu():
    """The accelerator generator of a GPU run is skipped on the CPU, and the CPU one is restored."""
    import torch

    from s3delta_ds.engine import zero

    cpu = torch.get_rng_state()
    expected = torch.rand(3)
    torch.manual_seed(123)
    zero.set_rng_state((cpu, torch.zeros(16, dtype=torch.uint8)))  # a stand-in CUDA generator state
    assert torch.equal(torch.rand(3), expected)


# -- what the keys of config.yaml cannot show: the rows, and a random backbone's draw ----------------


@pytest.mark.slow
def test_resume_refuses_other_rows_or_a_random_backbone_drawn_another_way(tmp_path):
    """With no test split, validation is halved into validation and test: a test file added before
    --resume re-cut validation and moved the selected step (3 -> 6 in the review's run), with every
    config key unchanged. A random_init backbone drawn under ZeRO-2, resumed under ZeRO-3, trained
    on other frozen weights (validation loss 4.34 -> 5.74)."""
    from .launching import ROOT, run

    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "validation"):
        shutil.copy(ROOT / "s3delta_ds" / "assets" / "tiny" / "data" / f"{split}.jsonl", data / f"{split}.jsonl")
    args = [
        "data.task=tiny-sentiment", f"data.data_dir={data}", "model.name_or_path=tiny-t5", "model.random_init=true",
        "deepspeed=zero2", "search.steps=4", "search.eval_every=2", "search.checkpoint_every=2",
        "search.budget=0.02", "data.max_eval_examples=16", f"output_dir={tmp_path / 'run'}",
    ]  # fmt: skip
    run("python", "search", [*args, "search.stop_after=2"], 1)
    shutil.copy(ROOT / "s3delta_ds" / "assets" / "tiny" / "data" / "test.jsonl", data / "test.jsonl")
    added = run("python", "search", ["--resume", *args], 1, check=False)
    assert added.returncode == 2 and "--resume: the validation rows are not the checkpoint's" in added.stderr
    (data / "test.jsonl").unlink()
    restaged = run("python", "search", ["--resume", *args, "deepspeed=zero3_cpu"], 1, check=False)
    assert restaged.returncode == 2, restaged.stderr[-3000:]
    assert "model.random_init=true draws the frozen backbone's weights differently under ZeRO-3" in restaged.stderr
    assert "the checkpoint's were drawn under another stage, this launch's under ZeRO-3" in restaged.stderr
    assert "resume with deepspeed=zero2" in restaged.stderr
    # the refused launch left the run's own resolved configs: the docs resume from its ds_config.json
    assert "deepspeed: zero2" in (tmp_path / "run" / "config.yaml").read_text()
    assert json.loads((tmp_path / "run" / "ds_config.json").read_text())["zero_optimization"]["stage"] == 2
    (data / "train.jsonl").write_text((data / "train.jsonl").read_text().replace("a ", "the ", 1))  # one word
    edited = run("python", "search", ["--resume", *args], 1, check=False)
    assert edited.returncode == 2 and "--resume: the train rows are not the checkpoint's" in edited.stderr
    shutil.copy(ROOT / "s3delta_ds" / "assets" / "tiny" / "data" / "train.jsonl", data / "train.jsonl")
    run("python", "search", ["--resume", *args], 1)  # the same rows and draw: it goes on
    assert (tmp_path / "run" / "structure.json").is_file()


@pytest.mark.slow
def test_a_retrain_resume_refuses_a_structure_file_edited_since(tmp_path):
    """retrain.structure is compared by path: an alpha edited in the file (no tensor shape changes)
    resumed onto the checkpoint and trained on, and the run ended with deltas of another structure
    than its structure.json."""
    from s3delta_ds.structure import builders

    from .launching import run

    path = builders.manual(builders.Backbone.plan("tiny-t5"), "lora").save(tmp_path / "s.json")
    args = [
        "data.task=tiny-sentiment", "model.name_or_path=tiny-t5", "model.random_init=true", "deepspeed=zero2",
        f"retrain.structure={path}",
        "retrain.steps=4", "retrain.eval_every=2", "retrain.checkpoint_every=2", "data.max_eval_examples=16",
        f"output_dir={tmp_path / 'run'}",
    ]  # fmt: skip
    run("python", "retrain", [*args, "retrain.stop_after=2"], 1)
    original = path.read_text()
    path.write_text(original.replace('"alpha": 16.0', '"alpha": 1.0'))
    edited = run("python", "retrain", ["--resume", *args], 1, check=False)
    assert edited.returncode == 2, edited.stderr[-3000:]
    assert f"--resume: {path} is not the structure this run trained" in edited.stderr
    path.write_text(original)
    torn = tmp_path / "run" / "checkpoints" / "step-00000001"  # a save a crash cut before COMPLETE
    torn.mkdir()
    (torn / ".state.pt.x.tmp").write_bytes(b"half")
    run("python", "retrain", ["--resume", *args], 1)  # the same structure: it goes on
    assert (tmp_path / "run" / "deltas.safetensors").is_file()
    assert not torn.exists()  # older than a complete checkpoint: cleared at the next save
