"""The ``mergeable`` search space: every candidate folds into the backbone, so a searched structure
exports with ``--merge`` to a plain Hugging Face model (no s3delta_ds to load it)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from s3delta_ds.artifacts.merge import merge
from s3delta_ds.method.supernet import DeltaSpec, attach, delta_parameters, slots
from s3delta_ds.structure.builders import Backbone

from .helpers import logits_of, tiny_inputs, tiny_model
from .launching import env, run


def test_bitfit_only_where_a_reloadable_bias_can_hold_it():
    def bitfit_components(name):
        space = Backbone.plan(name).space("mergeable")
        return {c.site.split(".", 2)[-1] for c in space.candidates if c.type == "bitfit"}

    assert bitfit_components("tiny-t5") == set()  # no biases in T5, RMSNorm has none
    llama = bitfit_components("tiny-llama")
    assert llama and all(c.startswith(("attn.", "mlp.")) for c in llama)  # attention_bias / mlp_bias
    assert "attn_norm" in bitfit_components("tiny-bert")  # LayerNorm and Linear biases
    assert {c.type for c in Backbone.plan("tiny-llama").space("mergeable").candidates} == {
        "lora",
        "bitfit",
        "lnfit",
        "ia3",
        "pafi",
        "hiwi",
    }


@pytest.mark.parametrize("flags", [{}, {"attention_bias": True, "mlp_bias": True}])
def test_qwen2_offers_bitfit_only_on_its_own_biases_and_the_merge_reloads(tmp_path, flags):
    """Qwen2's modelling ignores attention_bias/mlp_bias (q/k/v always have a bias, o and the MLP never),
    but a config.json may carry them: BitFit was offered on o_proj and the MLP, and the merge failed
    there (AttributeError on a None bias), or would have saved biases that never reload."""
    import transformers

    config = transformers.Qwen2Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=500, **flags,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(config).save_pretrained(tmp_path / "qwen2")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "qwen2").eval()
    bb = Backbone.from_model(model, str(tmp_path / "qwen2"))
    bitfit = [c for c in bb.space("mergeable").candidates if c.type == "bitfit"]
    assert {c.site.split(".", 2)[-1] for c in bitfit} == {"attn.q", "attn.k", "attn.v"}
    attach(model, bb.site_map, [DeltaSpec(c.site, "bitfit", {}) for c in bitfit])
    with torch.no_grad():
        for _, p in delta_parameters(model):
            p.normal_(0, 0.5)
    ids = torch.randint(0, 500, (1, 6))
    with torch.no_grad():
        hooked = model(input_ids=ids).logits
        report = merge(model, bb.site_map)
    assert not report.kept
    model.save_pretrained(tmp_path / "merged")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=ids).logits, hooked, atol=1e-5)
    # a BitFit put on o_proj by hand is refused under its own model type's name, not LLaMA's
    from s3delta_ds.deltas import delta_class
    from s3delta_ds.deltas.base import host_of

    assert delta_class("bitfit").fold_refusal(host_of(model, bb.site_map, "decoder.0.attn.o")) == (
        "qwen2 attn.o has no bias to fold an added bias into"
    )


@pytest.mark.parametrize("name", ["tiny-t5", "tiny-llama", "tiny-bert"])
def test_the_whole_space_folds_into_an_equal_model(name):
    """Every candidate at once, perturbed: merge keeps nothing and the outputs do not change."""
    model = tiny_model(name)
    plan = Backbone.from_model(model)
    space = plan.space("mergeable")
    attach(model, plan.site_map, [DeltaSpec(c.site, c.type, c.kwargs) for c in space.candidates])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in delta_parameters(model):
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    batch = tiny_inputs(name)
    with torch.no_grad():
        before = logits_of(model, batch)
    report = merge(model, plan.site_map)
    assert report.kept == [] and len(report.merged) == len(space)
    assert slots(model) == {}
    with torch.no_grad():
        assert (logits_of(model, batch) - before).abs().max() < 1e-5


PLAIN_LOAD = """
import json, sys, torch, transformers
out, family, ids = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
cls = {"t5": transformers.AutoModelForSeq2SeqLM, "llama": transformers.AutoModelForCausalLM}[family]
model = cls.from_pretrained(out).eval()
inputs = {"input_ids": torch.tensor(ids)}
if family == "t5":
    inputs["decoder_input_ids"] = torch.zeros(1, 1, dtype=torch.long)
with torch.no_grad():
    logits = model(**inputs).logits
assert not any(m.startswith("s3delta_ds") for m in sys.modules), "s3delta_ds was imported"
print(json.dumps(logits.flatten().tolist()))
"""


@pytest.mark.distributed
@pytest.mark.parametrize("name, family", [("tiny-t5", "t5"), ("tiny-llama", "llama")])
def test_mergeable_search_exports_a_plain_hf_model(tmp_path, name, family):
    from s3delta_ds.artifacts.export import export_merged, load_run

    common = [
        f"model.name_or_path={name}",
        "data.task=tiny-sentiment",
        "data.max_train_examples=64",
        "data.max_eval_examples=16",
        "zero_stage=0",
    ]
    run(
        "python",
        "search",
        [
            *common,
            "search.space=mergeable",
            "search.budget=0.03",
            "search.steps=4",
            "search.eval_every=4",
            f"output_dir={tmp_path / 'search'}",
        ],
        1,
    )
    structure = tmp_path / "search" / "structure.json"
    run(
        "python",
        "retrain",
        [
            *common,
            f"retrain.structure={structure}",
            "retrain.steps=4",
            "retrain.eval_every=4",
            "retrain.lr=2e-2",
            f"output_dir={tmp_path / 'retrain'}",
        ],
        1,
    )
    report = export_merged(tmp_path / "retrain", tmp_path / "merged")
    assert report["kept"] == [] and report["merged"] == len(json.loads(structure.read_text())["modules"])
    ids = [[5, 9, 17, 23, 4, 2]]
    model, _, _ = load_run(tmp_path / "retrain")
    batch = {"input_ids": torch.tensor(ids)}
    if family == "t5":
        batch["decoder_input_ids"] = torch.zeros(1, 1, dtype=torch.long)
    with torch.no_grad():
        ref = model.eval()(**batch).logits.flatten()
    proc = subprocess.run(
        [sys.executable, "-c", PLAIN_LOAD, str(tmp_path / "merged"), family, json.dumps(ids)],
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    plain = torch.tensor(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert (plain - ref).abs().max() < 1e-5
