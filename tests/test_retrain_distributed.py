"""Search → structure.json → retrain on 2 ZeRO-3 ranks, the saved delta file, and retrain resume."""

from __future__ import annotations

import json

import pytest
import torch

from s3delta_ds.backbones import SiteMap, family_for
from s3delta_ds.config import load_run_config
from s3delta_ds.data import Collator, Encoder, get_task, load_rows, load_tokenizer
from s3delta_ds.engine.backbone import load_backbone, materialise_embedded
from s3delta_ds.errors import CheckpointError
from s3delta_ds.method.objective import DeltaModel
from s3delta_ds.method.supernet import attach, named_delta_parameters
from s3delta_ds.run.checkpoint import load_deltas, verify_delta_file
from s3delta_ds.run.evaluate import evaluate
from s3delta_ds.structure import Structure

from .launching import TINY, deltas, max_diff, run

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def searched(zero3_search):
    return zero3_search / "structure.json"  # the session's 2-rank ZeRO-3 search (conftest)


@pytest.fixture(scope="module")
def retrained(searched, tmp_path_factory):
    out = tmp_path_factory.mktemp("retrain")
    run(
        "deepspeed",
        "retrain",
        [*TINY, "retrain.micro_batch_size=2", f"retrain.structure={searched}", f"output_dir={out}"],
    )
    return out


def test_delta_file_is_complete(searched, retrained):
    structure = Structure.load(searched)
    d = deltas(retrained / "deltas.safetensors")
    sites = {k.split("/")[0] + "/" + k.split("/")[1].split(".")[0] for k in d}
    assert sites == {f"{m.site}/{m.type}" for m in structure.modules}
    assert sum(v.numel() for v in d.values()) == structure.budget.used
    assert all(v.numel() > 0 and torch.isfinite(v).all() for v in d.values())
    summary = json.loads((retrained / "summary.json").read_text())
    assert summary["trainable_params"] == structure.budget.used and summary["zero_stage"] == 3


def test_deltas_reload_into_a_fresh_model_with_identical_outputs(searched, retrained):
    """Load the file into a plain (no DeepSpeed) model: the test loss equals the one the 2-rank ZeRO-3
    run measured with the same weights."""
    cfg = load_run_config(None, [*TINY, f"retrain.structure={searched}"])
    model = load_backbone(cfg.model, source=str(materialise_embedded("tiny-t5")), dtype="fp32", ds_config={})
    site_map = SiteMap(model, family_for(model.config))
    structure = Structure.load(searched)
    attach(model, site_map, structure.specs())
    with torch.no_grad():
        for _, p in named_delta_parameters(model):
            p.fill_(123.0)  # prove the load overwrites every tensor
    assert load_deltas(model, retrained / "deltas.safetensors") == len(named_delta_parameters(model))
    task = get_task("tiny-sentiment")
    tok = load_tokenizer("t5", "tiny-t5")
    enc = Encoder(task, tok, "seq2seq", task.max_source_length, 16)
    from s3delta_ds.run.runtime import subsample

    test = [enc.encode(r) for r in subsample(load_rows(task, None)["test"], 24, "random", 0, "test")]
    result = evaluate(
        DeltaModel(model, "seq2seq"),
        test,
        Collator("seq2seq", tok.pad_token_id),
        task,
        batch_size=8,
        device=torch.device("cpu"),
    )
    summary = json.loads((retrained / "summary.json").read_text())
    assert result["loss"] == pytest.approx(summary["test"]["loss"], abs=1e-5)
    assert result["accuracy"] == summary["test"]["accuracy"]


def test_incomplete_delta_file_is_refused(retrained, tmp_path):
    from safetensors.torch import save_file

    d = deltas(retrained / "deltas.safetensors")
    key = sorted(d)[0]
    partial = dict(d)
    partial.pop(key)
    save_file(partial, str(tmp_path / "partial.safetensors"), metadata={"format": "s3delta-deltas"})
    with pytest.raises(CheckpointError, match="missing tensors"):
        verify_delta_file(tmp_path / "partial.safetensors", {k: tuple(v.shape) for k, v in d.items()})


def test_interrupted_retrain_resumes_to_the_same_deltas(searched, retrained, tmp_path):
    args = [*TINY, "retrain.micro_batch_size=2", f"retrain.structure={searched}", f"output_dir={tmp_path}"]
    run("deepspeed", "retrain", [*args, "retrain.stop_after=4"])
    assert not (tmp_path / "summary.json").exists()
    run("deepspeed", "retrain", ["--resume", *args])
    a = json.loads((tmp_path / "summary.json").read_text())
    b = json.loads((retrained / "summary.json").read_text())
    assert a["best_step"] == b["best_step"] and a["test"] == b["test"]
    assert max_diff(deltas(tmp_path / "deltas.safetensors"), deltas(retrained / "deltas.safetensors")) < 1e-7


def test_resume_puts_back_the_best_deltas_its_checkpoint_kept(searched, tmp_path):
    """A launch killed after a new best rewrote deltas.safetensors, but before its next checkpoint,
    leaves a file the resumed state does not describe (its best step is older). A resume that is not
    bit-exact (another number of ranks) may never reach that best again, and test_at=end would then
    score the wrong weights: resume restores the copy the checkpoint kept."""
    from safetensors.torch import save_file

    args = [*TINY, "retrain.eval_every=2", f"retrain.structure={searched}", f"output_dir={tmp_path}"]
    run("python", "retrain", [*args, "retrain.stop_after=2"], 1)  # best at step 2, checkpoint at 2
    kept = (tmp_path / "deltas.safetensors").read_bytes()
    assert (tmp_path / "checkpoints" / "step-00000002" / "deltas.safetensors").read_bytes() == kept
    later = {k: v + 1 for k, v in deltas(tmp_path / "deltas.safetensors").items()}
    save_file(later, str(tmp_path / "deltas.safetensors"), metadata={"format": "s3delta-deltas", "step": "5"})
    run("python", "retrain", ["--resume", *args, "retrain.stop_after=1"], 1)  # step 3: no evaluation
    assert (tmp_path / "deltas.safetensors").read_bytes() == kept


def test_nan_loss_stops_with_a_clear_error_and_no_outputs(searched, tmp_path):
    proc = run(
        "python",
        "retrain",
        [*TINY, f"retrain.structure={searched}", "retrain.lr=1e30", "retrain.clip=0", f"output_dir={tmp_path}"],
        1,
        check=False,
    )
    assert proc.returncode == 2
    assert "non-finite loss" in proc.stderr
    assert not (tmp_path / "summary.json").exists() and not (tmp_path / "deltas.safetensors").exists()


def test_global_pafi_retrains_under_zero3_only_on_the_weights_its_mask_was_ranked_on(tmp_path):
    """`s3delta pafi-mask` on the embedded tiny-t5, then 2-rank ZeRO-3 retrains with its mask: the
    weights probe is read through gathered partitions and matches, and the run trains the mask's
    count; a mask whose probe names other weights (same config) stops the retrain before a step."""
    import json as json_

    from safetensors import safe_open
    from safetensors.torch import save_file

    from s3delta_ds.cli import main

    mask, structure = tmp_path / "mask.safetensors", tmp_path / "pafi.json"
    assert main(["pafi-mask", "tiny-t5", "--density", "0.02", "-o", str(mask), "--structure", str(structure)]) == 0
    common = [*TINY, "retrain.steps=2", "retrain.eval_every=2", f"retrain.structure={structure}"]
    out = tmp_path / "ok"
    run("deepspeed", "retrain", [*common, f"retrain.pafi_mask={mask}", f"output_dir={out}"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["zero_stage"] == 3 and summary["trainable_params"] == Structure.load(structure).budget.used

    with safe_open(str(mask), framework="pt") as f:  # the same mask, ranked "on a fine-tune"
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    probe = json_.loads(meta["weights_probe"])
    site = next(iter(probe))
    probe[site]["value"][3] += 1e-3
    meta["weights_probe"] = json_.dumps(probe)
    other = tmp_path / "other.safetensors"
    save_file(tensors, str(other), metadata=meta)
    proc = run("deepspeed", "retrain", [*common, f"retrain.pafi_mask={other}", f"output_dir={tmp_path / 'no'}"],
               check=False)  # fmt: skip
    assert proc.returncode != 0
    assert "ranked on other weights" in proc.stdout + proc.stderr and f"{site}[" in proc.stdout + proc.stderr
    assert not (tmp_path / "no" / "deltas.safetensors").exists()
