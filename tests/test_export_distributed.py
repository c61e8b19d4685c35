"""ZeRO-3 paths of the zero-latency deltas: a search over PaFi/HiWi candidates on 2 partitioned ranks
equals the single-process search, and a merge-export with the backbone partitioned across 2 ranks
(one tensor gathered at a time) equals the single-process export."""

from __future__ import annotations

import subprocess

import pytest
import torch
from transformers import AutoModelForSeq2SeqLM

from s3delta_ds.structure import Budget, ModuleChoice, Structure
from s3delta_ds.structure.builders import Backbone

from .helpers import tiny_inputs
from .launching import ROOT, TINY, alphas, command, deltas, env, max_diff, run

pytestmark = pytest.mark.distributed


def test_pafi_hiwi_search_zero3_equals_single_process(tmp_path):
    args = [*TINY, "search.space=mixed+pafi+hiwi", "search.steps=4", "search.eval_every=4"]
    run("python", "search", [*args, "zero_stage=0", "search.micro_batch_size=4", f"output_dir={tmp_path / 'one'}"], 1)
    run("deepspeed", "search", [*args, "zero_stage=3", "search.micro_batch_size=2", f"output_dir={tmp_path / 'z3'}"])
    a1, a3 = alphas(tmp_path / "one"), alphas(tmp_path / "z3")
    structure = Structure.load(tmp_path / "one" / "structure.json")
    idx = [i for i, c in enumerate(structure.candidates) if c.type in ("pafi", "hiwi")]
    assert idx and a1[idx].abs().max() > 1e-4  # PaFi and HiWi gates learned something
    assert (a1 - a3).abs().max() < 1e-5
    d1 = deltas(tmp_path / "one" / "supernet_deltas.safetensors")
    d3 = deltas(tmp_path / "z3" / "supernet_deltas.safetensors")
    assert any(k.endswith("pafi.indices") for k in d1)  # the sparse delta stores its positions
    assert max_diff(d1, d3) < 1e-5


def test_merge_export_with_a_zero3_partitioned_backbone(tmp_path):
    plan = Backbone.plan("tiny-t5")
    cands = [c for c in plan.space("mixed+pafi+hiwi").candidates if c.type in ("lora", "lnfit", "pafi", "hiwi")]
    modules = tuple(ModuleChoice(c.site, c.type, c.kwargs, c.params) for c in cands)
    s = Structure(
        kind="manual", backbone=plan.info, budget=Budget(None, None, sum(m.params for m in modules)), modules=modules
    ).save(tmp_path / "s.json")
    run(
        "python",
        "retrain",
        [
            f"retrain.structure={s}",
            "data.task=tiny-sentiment",
            "retrain.steps=3",
            "retrain.lr=2e-2",
            "data.max_eval_examples=8",
            "zero_stage=0",
            f"output_dir={tmp_path / 'run'}",
        ],
        1,
    )
    run("python", "export", [str(tmp_path / "run"), "--merge", "-o", str(tmp_path / "single")], 1)
    # the deepspeed launcher with --module, as a user would start the export on several ranks
    launcher = command("deepspeed", "search", [])[:-1]
    cmd = [
        *launcher,
        "--module",
        "s3delta_ds.artifacts.export",
        str(tmp_path / "run"),
        "--merge",
        "--zero3",
        "-o",
        str(tmp_path / "z3"),
    ]
    proc = subprocess.run(cmd, env=env(), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    batch = tiny_inputs("tiny-t5")
    with torch.no_grad():
        a = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "single").eval()(**batch).logits
        b = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "z3").eval()(**batch).logits
    assert (a - b).abs().max() < 1e-5
