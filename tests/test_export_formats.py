"""Export paths a review found broken: PEFT adapters of encoder classifiers (the head and the task
type), runs of globally ranked PaFi (no mask file needed), shard-at-a-time saving, the saved dtype,
the staging folder, and a config that says what the saved head is.

The runs here are built in-process (structure attached, deltas set to seeded random values, saved
as a retrain saves them), not trained: every check compares an export with the run it came from.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification

import s3delta_ds
from s3delta_ds.artifacts import export as export_mod
from s3delta_ds.artifacts.export import _num_labels, export_merged, load_run, save_hf
from s3delta_ds.artifacts.peft_export import export_peft
from s3delta_ds.backbones.loading import load_config
from s3delta_ds.config import dump_yaml, load_run_config
from s3delta_ds.deltas import resolve
from s3delta_ds.engine.backbone import load_backbone, resolve_source
from s3delta_ds.errors import ConfigError, StructureError
from s3delta_ds.method.supernet import attach, slots
from s3delta_ds.run.checkpoint import load_deltas, save_deltas
from s3delta_ds.structure import Budget, ModuleChoice, Structure
from s3delta_ds.structure.builders import Backbone
from s3delta_ds.structure.pafi import compute_mask, mask_structure, save_mask
from tests.helpers import tiny_inputs

AUTO = {
    "tiny-t5": AutoModelForSeq2SeqLM,
    "tiny-t5-v1_1": AutoModelForSeq2SeqLM,
    "tiny-llama": AutoModelForCausalLM,
    "tiny-bert": AutoModelForSequenceClassification,
}


def _model(name: str, overrides=()):
    cfg = load_run_config(None, [f"model.name_or_path={name}", "data.task=tiny-sentiment", *overrides])
    model = load_backbone(
        cfg.model, source=resolve_source(cfg.model), dtype="fp32", ds_config={}, num_labels=_num_labels(cfg)
    )
    return cfg, model, Backbone.from_model(model, name)


def _run(root: Path, name: str, modules=(), *, overrides=(), structure=None, masks=None, scale=0.05) -> Path:
    """A retrain directory as a retrain leaves it, with seeded random delta values (and head)."""
    root.mkdir(parents=True)
    cfg, model, bb = _model(name, [f"output_dir={root}", *overrides])
    (root / "config.yaml").write_text(dump_yaml(cfg))
    if structure is None:
        mods = []
        for site, t, kw in modules:
            _, _, n = resolve(t, kw, bb.site_map.site(site).dims, site)
            mods.append(ModuleChoice(site, t, kw, n))
        used = sum(m.params for m in mods)
        structure = Structure(kind="manual", backbone=bb.info, budget=Budget(None, None, used), modules=tuple(mods))
    structure.save(root / "structure.json")
    attach(model, bb.site_map, structure.specs(), masks=masks)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for slot in slots(model).values():
            for p in slot.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * scale)
        for name_ in bb.family.head_modules:
            for p in model.get_submodule(name_).parameters():
                p.add_(torch.randn(p.shape, generator=g) * scale)
    save_deltas(model, root / "deltas.safetensors", head_prefixes=bb.family.head_modules)
    return root


def _logits(model, name):
    with torch.no_grad():
        return model(**tiny_inputs(name)).logits


def _reference(run: Path, name: str) -> torch.Tensor:
    return _logits(load_run(run)[0], name)


# -- PEFT adapters of an encoder classifier -------------------------------------------------------

BERT_SITES = {
    "lora": ("encoder.0.attn.q", {"r": 2, "alpha": 4.0, "dropout": 0.0}),
    "lnfit": ("encoder.1.mlp_norm", {}),
    "ia3": ("encoder.1.mlp.down", {"position": "input"}),
}


@pytest.mark.parametrize("types", [("lnfit",), ("lora", "lnfit"), ("lora", "ia3"), ("lora", "lnfit", "ia3")])
def test_every_peft_adapter_of_a_classifier_loads_in_the_documented_order(tmp_path, types):
    from peft import PeftModel

    mods = [(BERT_SITES[t][0], t, BERT_SITES[t][1]) for t in types]
    run = _run(tmp_path / "run", "tiny-bert", mods, overrides=["model.pooling=cls"])
    adapters = export_peft(run, tmp_path / "peft")["adapters"]
    configs = {k: json.loads((Path(p) / "adapter_config.json").read_text()) for k, p in adapters.items()}
    carrying = [k for k, c in configs.items() if c.get("modules_to_save")]
    assert carrying == [next(k for k in ("lora", "ln_tuning", "ia3") if k in adapters)]  # the head, once
    assert [k for k, c in configs.items() if c["task_type"] == "SEQ_CLS"] == carrying
    model = AutoModelForSequenceClassification.from_pretrained(configs[carrying[0]]["base_model_name_or_path"])
    for kind in ("ln_tuning", "lora", "ia3"):  # the module docstring's loading order
        if kind in adapters:
            model = PeftModel.from_pretrained(model, adapters[kind]).merge_and_unload()
    assert (_logits(model.eval(), "tiny-bert") - _reference(run, "tiny-bert")).abs().max() < 1e-5


# -- globally ranked PaFi: the delta file holds the positions --------------------------------------


@pytest.fixture
def global_pafi_run(tmp_path):
    _, model, bb = _model("tiny-llama")
    mask = compute_mask(model, bb.site_map, 0.02, "global")
    mask_path = save_mask(
        mask, tmp_path / "mask.safetensors", backbone=bb, density=0.02, ranking="global", eligible=("linear",)
    )
    structure = mask_structure(bb, mask, {"density": "0.02", "ranking": "global", "eligible": "linear"})
    run = _run(
        tmp_path / "run",
        "tiny-llama",
        structure=structure,
        masks=mask,
        overrides=[f"retrain.pafi_mask={mask_path}"],
    )
    # the reference, with the mask the run trained with, before the mask file goes away
    _, ref, ref_bb = _model("tiny-llama")
    attach(ref, ref_bb.site_map, structure.specs(), masks=mask)
    load_deltas(ref, run / "deltas.safetensors")
    mask_path.unlink()
    return run, _logits(ref.eval(), "tiny-llama")


def test_a_global_pafi_run_merges_without_its_mask_file(global_pafi_run, tmp_path):
    run, reference = global_pafi_run
    assert (_logits(load_run(run)[0], "tiny-llama") - reference).abs().max() < 1e-6
    export_merged(run, tmp_path / "merged")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert (_logits(plain, "tiny-llama") - reference).abs().max() < 1e-5


def test_a_global_pafi_run_loads_through_the_api_without_its_mask_file(global_pafi_run):
    run, reference = global_pafi_run
    model = AutoModelForCausalLM.from_pretrained(resolve_source(load_run_config(run / "config.yaml").model))
    s3delta_ds.load(model, run)
    assert (_logits(model, "tiny-llama") - reference).abs().max() < 1e-6


# -- saving: shard by shard, in the checkpoint's dtype, with a config that says what it holds -------


def test_save_hf_writes_each_shard_before_gathering_the_next(tmp_path, monkeypatch):
    """Rank 0 holds one shard at most: a shard is on disk before the tensors after it are gathered."""
    _, model, _ = _model("tiny-llama")
    events = []
    real_gathered, real_save = export_mod.zero.gathered, export_mod.save_file

    def gathered(params, *a, **k):
        events.append("G")
        return real_gathered(params, *a, **k)

    def save(tensors, path, *a, **k):
        events.append("W")
        return real_save(tensors, path, *a, **k)

    monkeypatch.setattr(export_mod.zero, "gathered", gathered)
    monkeypatch.setattr(export_mod, "save_file", save)
    files = save_hf(model, tmp_path / "out", max_shard_bytes=100_000)
    assert len(files) == events.count("W") >= 3
    assert events.index("W") < len(events) - 1 - events[::-1].index("G")  # a write before the last gather
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {f.name for f in files}
    assert not list((tmp_path / "out").glob(".*tmp"))
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert torch.equal(_logits(plain, "tiny-llama"), _logits(model.eval(), "tiny-llama"))


def test_merged_weights_are_saved_in_the_checkpoints_dtype_or_the_one_asked_for(tmp_path):
    run = _run(tmp_path / "run", "tiny-llama", [("decoder.0.attn.q", "lora", {"r": 2, "alpha": 4.0, "dropout": 0.0})])
    auto = export_merged(run, tmp_path / "auto")
    assert auto["dtype"] == "float32"  # the embedded tiny checkpoints are stored in fp32
    bf16 = export_merged(run, tmp_path / "bf16", dtype="bf16")
    assert bf16["dtype"] == "bfloat16"
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype="auto")
    assert plain.dtype == torch.bfloat16
    reference = _reference(run, "tiny-llama")
    got = _logits(plain.float().eval(), "tiny-llama")
    assert (got - reference).abs().max() < 0.05 * reference.abs().max()  # bf16 rounding, nothing else
    with pytest.raises(StructureError, match="dtype"):
        export_merged(run, tmp_path / "bad", dtype="int8")


def test_a_half_precision_merge_says_how_much_of_the_update_its_rounding_takes(tmp_path, capsys):
    """bf16 keeps ~8 bits of W, and a small trained ΔW sits below them: the saved merge silently
    lost most of it. The export measures it (checked here against the fp32 merge) and warns."""
    from safetensors.torch import load_file

    from s3delta_ds.cli import main
    from s3delta_ds.engine.backbone import materialise_embedded

    lora = ("decoder.0.attn.q", "lora", {"r": 2, "alpha": 4.0, "dropout": 0.0})
    run = _run(tmp_path / "run", "tiny-llama", [lora], scale=3e-3)
    assert export_merged(run, tmp_path / "fp32")["update_lost_to_rounding"] is None  # nothing rounded
    name = "model.layers.0.self_attn.q_proj.weight"
    w0 = load_file(materialise_embedded("tiny-llama") / "model.safetensors")[name]
    w1 = load_file(tmp_path / "fp32" / "model.safetensors")[name]
    want = float((w1.bfloat16().float() - w1).norm() / (w1 - w0).norm())
    assert 0.1 < want < 10  # a case that matters
    assert main(["export", str(run), "--merge", "--dtype", "bf16", "-o", str(tmp_path / "bf16")]) == 0
    report = json.loads((tmp_path / "bf16" / "s3delta_export.json").read_text())
    assert report["update_lost_to_rounding"] == pytest.approx(want, rel=1e-4)
    assert f"differ from W + ΔW by {100 * want:.0f}% of the trained update" in capsys.readouterr().err
    big = _run(tmp_path / "big", "tiny-llama", [lora], scale=0.5)  # a large update: rounding is noise
    assert main(["export", str(big), "--merge", "--dtype", "bf16", "-o", str(tmp_path / "big-bf16")]) == 0
    assert "warning" not in capsys.readouterr().err


def test_a_separate_head_is_saved_as_untied(tmp_path):
    """T5 v1.1 holds its own lm_head: a config claiming a tied head would, read by another transformers
    version or under a ZeRO-3 init, tie it to the embedding and give other logits."""
    run = _run(tmp_path / "run", "tiny-t5-v1_1", [("decoder.0.attn.q", "lora", {"r": 2, "alpha": 4.0, "dropout": 0.0})])
    export_merged(run, tmp_path / "merged")
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    plain = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "merged").eval()
    reference = _reference(run, "tiny-t5-v1_1")  # logits up to ~20: fp32 rounding of the merge
    assert (_logits(plain, "tiny-t5-v1_1") - reference).abs().max() < 1e-6 * reference.abs().max() * 10


def test_a_tied_head_stays_tied(tmp_path):
    run = _run(tmp_path / "run", "tiny-t5", [("decoder.0.attn.q", "lora", {"r": 2, "alpha": 4.0, "dropout": 0.0})])
    export_merged(run, tmp_path / "merged")
    assert json.loads((tmp_path / "merged" / "config.json").read_text()).get("tie_word_embeddings", True) is True


def test_the_staging_folder_of_another_owner_is_never_removed(tmp_path):
    run = _run(tmp_path / "run", "tiny-llama", [("decoder.0.attn.q", "lora", {"r": 2, "alpha": 4.0, "dropout": 0.0})])
    theirs = tmp_path / ".merged.partial"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine")
    with pytest.raises(StructureError, match="not an unfinished export"):
        export_merged(run, tmp_path / "merged")
    assert (theirs / "notes.txt").read_text() == "mine" and not (tmp_path / "merged").exists()
    # an export's own leftovers (a crash) are removed by the rerun
    theirs.rename(tmp_path / "elsewhere")
    leftover = tmp_path / ".merged.partial"
    leftover.mkdir()
    (leftover / export_mod._STAGE_MARKER).write_text("")
    (leftover / "model.safetensors").write_text("half")
    export_merged(run, tmp_path / "merged")
    assert not leftover.exists() and (tmp_path / "merged" / "model.safetensors").stat().st_size > 100
    assert not (tmp_path / "merged" / export_mod._STAGE_MARKER).exists()


def test_an_output_path_that_is_a_file_is_refused_by_name(tmp_path):
    run = _run(tmp_path / "run", "tiny-llama", [("decoder.0.attn.q", "lora", {"r": 2, "alpha": 4.0, "dropout": 0.0})])
    (tmp_path / "out").write_text("x")
    with pytest.raises(StructureError, match="not an empty directory"):
        export_merged(run, tmp_path / "out")


# -- what the export refuses ----------------------------------------------------------------------


def test_a_random_init_run_is_refused_for_peft_and_merges_exactly(tmp_path):
    """A PEFT adapter names a checkpoint as its base; the run trained on ``from_config`` weights
    drawn from its seed, so the adapter on that checkpoint was off by up to 0.84 in the logits."""
    from s3delta_ds.engine.backbone import materialise_embedded

    source = str(materialise_embedded("tiny-llama"))
    lora = ("decoder.0.attn.q", "lora", {"r": 2, "alpha": 4.0, "dropout": 0.0})
    run = _run(tmp_path / "run", source, [lora], overrides=["model.random_init=true", "seed=7"], scale=0.1)
    with pytest.raises(ConfigError, match=r"model.random_init=true.*use export --merge"):
        export_peft(run, tmp_path / "peft")
    assert not (tmp_path / "peft").exists()
    export_merged(run, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert (_logits(merged, "tiny-llama") - _reference(run, "tiny-llama")).abs().max() < 1e-5


@pytest.mark.parametrize(
    "argv, said",
    [
        ([], "one of the arguments --merge --peft is required"),
        (["--merge", "--peft"], "not allowed with argument"),
        (["--peft", "--dtype", "bf16"], "--dtype does not apply to --peft"),
        (["--peft", "--keep-unmergeable"], "--keep-unmergeable does not apply to --peft"),
        (["--merge", "--partial"], "--partial does not apply to --merge"),
        (["--peft", "--zero3"], "--zero3 applies to --merge"),
    ],
)
def test_the_launcher_entry_refuses_what_s3delta_export_refuses(tmp_path, capsys, argv, said):
    """``python -m s3delta_ds.artifacts.export`` ran a PEFT export with no mode flag, only the merge
    with both, and ignored the other mode's flags."""
    from s3delta_ds.artifacts.export import main as export_main

    try:
        rc = export_main([str(tmp_path / "run"), *argv, "-o", str(tmp_path / "out")])
    except SystemExit as e:  # argparse's own refusals
        rc = e.code
    assert rc == 2 and said in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_peft_export_of_a_folder_that_is_no_run_says_what_is_missing(tmp_path, capsys):
    from s3delta_ds.cli import main

    (tmp_path / "notarun").mkdir()
    assert main(["export", str(tmp_path / "notarun"), "--peft", "-o", str(tmp_path / "o")]) == 2
    assert "is not a finished retrain run: config.yaml is missing" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "typo"), "--merge", "-o", str(tmp_path / "o")]) == 2
    assert f"{tmp_path / 'typo'} does not exist: pass a retrain run" in capsys.readouterr().err


def test_the_launcher_entry_warns_of_a_lossy_half_precision_merge(tmp_path, capsys):
    """``python -m s3delta_ds.artifacts.export --merge`` (the ZeRO-3 path for big models) only wrote
    the measurement into s3delta_export.json."""
    from s3delta_ds.artifacts.export import main as export_main

    run = _run(tmp_path / "run", "tiny-llama", [("decoder.0.attn.q", "lora", {"r": 2, "alpha": 4.0})], scale=3e-3)
    assert export_main([str(run), "--merge", "--dtype", "bf16", "-o", str(tmp_path / "out")]) == 0
    assert "of the trained update ΔW (bfloat16 rounding" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--peft", "--max-shard-gb", "0.001"], "--max-shard-gb does not apply to --peft"),
        (["--merge", "--max-shard-gb", "-1"], "--max-shard-gb must be a positive size"),
        (["--merge", "--max-shard-gb", "0"], "--max-shard-gb must be a positive size"),
        (["--merge", "--max-shard-gb", "nan"], "--max-shard-gb must be a positive size"),
    ],
)
def test_a_shard_size_the_export_cannot_use_is_refused_before_anything_is_written(tmp_path, capsys, argv, message):
    """--max-shard-gb -1 wrote one file per tensor, and with --peft any value was accepted and ignored."""
    from s3delta_ds.cli import main

    assert main(["export", str(tmp_path / "run"), *argv, "-o", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_half_precision_t5_export_keeps_what_transformers_keeps_in_fp32(tmp_path):
    """T5's `wo` stays fp32 in a half-precision model (its activations overflow fp16) and in
    transformers' own save; the export rounded it to half."""
    from transformers import T5ForConditionalGeneration

    model = T5ForConditionalGeneration(load_config("tiny-t5")).eval()
    files = save_hf(model, tmp_path / "out", dtype=torch.float16)
    from safetensors import safe_open

    dtypes = {}
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            dtypes |= {k: h.get_slice(k).get_dtype() for k in h.keys()}
    wo = [k for k in dtypes if k.endswith("DenseReluDense.wo.weight")]
    assert wo and {dtypes[k] for k in wo} == {"F32"}
    assert {v for k, v in dtypes.items() if k not in wo} == {"F16"}
    # bf16: transformers rounds wo too (it keeps _keep_in_fp32_modules for fp16 only)
    files_bf16 = save_hf(model, tmp_path / "bf16", dtype=torch.bfloat16)
    with safe_open(str(files_bf16[0]), framework="pt") as h:
        assert {h.get_slice(k).get_dtype() for k in h.keys()} == {"BF16"}
    reloaded = T5ForConditionalGeneration.from_pretrained(tmp_path / "out", dtype=torch.float16)
    assert torch.equal(reloaded.encoder.block[0].layer[1].DenseReluDense.wo.weight.float(),
                       model.encoder.block[0].layer[1].DenseReluDense.wo.weight)  # fmt: skip


@pytest.mark.slow  # starts a process to stand for the other export
def test_a_stage_another_live_export_writes_is_refused_not_removed(tmp_path):
    """Two exports to one directory at once: the second removed the first's stage as a crash's
    leftovers and both wrote shards into the new one. The stage's marker names its process."""
    import socket
    import subprocess
    import sys

    run = _run(tmp_path / "run", "tiny-llama", [("decoder.0.attn.q", "lora", {"r": 2, "alpha": 4.0, "dropout": 0.0})])
    stage = tmp_path / ".merged.partial"
    stage.mkdir()
    (stage / "model-00001.safetensors.tmp").write_text("being written")
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "s3delta", "export"])
    try:
        claim = {"slurm_job_id": "7", "host": socket.gethostname(), "pid": other.pid}  # one Slurm job: its process
        (stage / export_mod._STAGE_MARKER).write_text(json.dumps(claim))
        with pytest.raises(StructureError, match=rf"another export \(process {other.pid} on this host\) is writing"):
            export_merged(run, tmp_path / "merged")
        assert (stage / "model-00001.safetensors.tmp").read_text() == "being written"
    finally:
        other.kill()
        other.wait()
    export_merged(run, tmp_path / "merged")  # its process is gone: a crash's leftovers, removed
    assert not stage.exists() and (tmp_path / "merged" / "model.safetensors").stat().st_size > 100


@pytest.mark.slow  # asks squeue (a stand-in on PATH) about the other jobs
def test_a_stage_claimed_on_another_host_stays_unless_squeue_says_its_job_ended(tmp_path, monkeypatch):
    """A stage from another host (a shared file system) was removed as a crash's leftovers, though
    nothing here can see that host's processes; in the same Slurm job (two exports of one
    allocation on two nodes) the job id said "ours", and a squeue that could not answer "ended"."""
    import os

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "squeue").write_text(
        "#!/bin/sh\n"
        'case "$3" in\n'
        "  5) echo RUNNING ;;\n"
        '  6) echo "slurm_load_jobs error: Invalid job id specified" >&2; exit 1 ;;\n'
        '  *) echo "slurm_load_jobs error: Unable to contact slurm controller" >&2; exit 1 ;;\n'
        "esac\n"
    )
    (bin_dir / "squeue").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    run = _run(tmp_path / "run", "tiny-llama", [("decoder.0.attn.q", "lora", {"r": 2, "alpha": 4.0, "dropout": 0.0})])
    stage = tmp_path / ".merged.partial"
    stage.mkdir()
    (stage / "shard.tmp").write_text("being written")
    for job, said in [
        (None, r"belongs to an export on node-17 \(outside Slurm, pid 4242\).*remove"),
        ("7", r"belongs to an export on node-17 \(in this Slurm job, pid 4242\).*remove"),
        ("8", r"belongs to an export on node-17 \(Slurm job 8, pid 4242\).*cannot check"),  # squeue failed
        ("5", r"another export \(Slurm job 5 \(RUNNING\)\) is writing"),
    ]:
        (stage / export_mod._STAGE_MARKER).write_text(json.dumps({"slurm_job_id": job, "host": "node-17", "pid": 4242}))
        with pytest.raises(StructureError, match=said):
            export_merged(run, tmp_path / "merged")
        assert (stage / "shard.tmp").read_text() == "being written" and not (tmp_path / "merged").exists()
    # a job squeue no longer knows has ended: its leftovers go
    (stage / export_mod._STAGE_MARKER).write_text(json.dumps({"slurm_job_id": "6", "host": "node-17", "pid": 4242}))
    export_merged(run, tmp_path / "merged")
    assert not stage.exists() and (tmp_path / "merged" / "model.safetensors").exists()
    monkeypatch.delenv("SLURM_JOB_ID")


def test_a_stage_whose_marker_cannot_be_written_is_not_left_behind(tmp_path, monkeypatch, capsys):
    """A full disk at the marker left a stage without one, which the rerun then refused as
    "not an unfinished export"; an unreadable (non-UTF-8) marker raised on rank 0 alone, the
    other ranks waiting for it in the broadcast."""
    run = _run(tmp_path / "run", "tiny-llama", [("decoder.0.attn.q", "lora", {"r": 2, "alpha": 4.0, "dropout": 0.0})])

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(export_mod, "atomic_write_text", full)
        with pytest.raises(StructureError, match="No space left on device"):
            export_merged(run, tmp_path / "merged")
    assert not (tmp_path / ".merged.partial").exists()
    assert export_mod._on_rank_0(lambda s, o: bytes([255]).decode(), tmp_path, tmp_path / "o").startswith(
        f"{tmp_path / 'o'}: UnicodeDecodeError"
    )
    assert "Traceback" in capsys.readouterr().err  # not the disk's error: a bug, said whole on rank 0
    stage = tmp_path / ".merged.partial"
    stage.mkdir()
    (stage / export_mod._STAGE_MARKER).write_bytes(b"\xff\xfe{")  # garbage: a crash's, as an unparsable one is
    export_merged(run, tmp_path / "merged")
    assert not stage.exists()


def test_an_output_filled_while_the_export_ran_is_not_replaced(tmp_path):
    stage, out = tmp_path / ".out.partial", tmp_path / "out"
    stage.mkdir()
    (stage / "model.safetensors").write_text("ours")
    out.mkdir()
    (out / "model.safetensors").write_text("theirs")
    assert "was filled by something else" in export_mod._close_stage(stage, out)
    assert (out / "model.safetensors").read_text() == "theirs" and not stage.exists()
