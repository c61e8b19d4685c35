"""Structure transfer across sizes (meta-device shapes, no weights) and budget sweeps."""

from __future__ import annotations

import json
import random
import re

import pytest

from s3delta_ds.cli import main
from s3delta_ds.errors import BudgetError, SearchSpaceError, StructureError
from s3delta_ds.structure import ModuleChoice, Structure, builders
from s3delta_ds.structure.builders import Backbone
from s3delta_ds.structure.transfer import RULE, map_probabilities, rediscretise, transfer


def _searched(shape: str, budget: float, seed: int = 0, space: str = "mixed") -> Structure:
    plan = Backbone.plan(shape)
    s = plan.space(space)
    rng = random.Random(seed)
    p = [rng.random() for _ in s.candidates]
    return builders.searched(s, plan.info, p, [0.0] * len(p), budget, search={"method": "test"})


@pytest.fixture(scope="module")
def base():
    return _searched("t5-base", 1e-4)


@pytest.fixture(scope="module")
def xxl():
    return Backbone.plan("flan-t5-xxl")


def _p_table(structure: Structure) -> dict[tuple[str, str], float]:
    return {(c.site, c.type): c.p for c in structure.candidates}


def _assert_greedy_full(structure: Structure) -> None:
    """Within budget, and as close as the greedy fill allows: nothing unchosen still fits."""
    used, budget = structure.budget.used, structure.budget.absolute
    assert used <= budget
    chosen = {(m.site, m.type) for m in structure.modules}
    leftover = [c.params for c in structure.candidates if (c.site, c.type) not in chosen]
    assert all(n > budget - used for n in leftover)


def test_t5_base_to_xxl_maps_by_relative_depth(base, xxl):
    out = transfer(base, xxl)
    assert out.kind == "transferred" and out.backbone.depths == {"encoder": 24, "decoder": 24}
    assert len(out.candidates) == 24 * 20 + 24 * 22 + 4 - 48  # the XXL (gated FFN) mixed space, less key biases
    src, dst = _p_table(base), _p_table(out)
    for layer in range(24):  # 12 -> 24: target layers 2s and 2s+1 take source layer s
        for comp, typ in (("attn.q", "lora"), ("mlp.down", "lora"), ("cross_attn_norm", "lnfit"), ("attn", "lra")):
            stack = "decoder" if comp == "cross_attn_norm" else "encoder"
            assert dst[(f"{stack}.{layer}.{comp}", typ)] == pytest.approx(src[(f"{stack}.{layer // 2}.{comp}", typ)])
    # T5 v1.0 has no mlp.gate: the gated FFN's gate takes the p of the FFN input (same role)
    assert dst[("encoder.5.mlp.gate", "lora")] == pytest.approx(src[("encoder.2.mlp.up", "lora")])
    assert dst[("decoder.final_norm", "bitfit")] == src[("decoder.final_norm", "bitfit")]
    # parameter counts are the target's: XXL q is 4096 -> 4096, so LoRA r=1 has 8192 parameters
    params = {(c.site, c.type): c.params for c in out.candidates}
    assert params[("encoder.0.attn.q", "lora")] == 8192
    assert params[("encoder.0.mlp.gate", "lora")] == 4096 + 10240
    assert params[("decoder.3.attn", "lra")] == 2 * (4096 + 128) + 128 + 4096
    assert out.budget.relative == base.budget.relative
    assert out.budget.absolute == pytest.approx(1e-4 * xxl.info.num_params)
    _assert_greedy_full(out)
    assert out.provenance["source"]["digest"] == base.digest() and out.provenance["rule"] == RULE
    assert (
        out.provenance["by_role"] == 96
    )  # lora and bitfit on mlp.gate, 48 layers and out.provenance["unmatched"] == 0


def test_explicit_budget_and_greedy_fill(base, xxl):
    for budget in (1e-5, 3e-5, 2e-4):
        out = transfer(base, xxl, budget)
        assert out.budget.relative == budget
        _assert_greedy_full(out)
    small, large = transfer(base, xxl, 1e-5), transfer(base, xxl, 2e-4)
    assert small.budget.used < large.budget.used


def test_llama_32_to_80_layers_blends_neighbours():
    src = _searched("llama-2-7b", 1e-4, seed=3)
    out = transfer(src, Backbone.plan("llama-2-70b"))
    assert out.backbone.depths == {"decoder": 80}
    p_src, p_dst = _p_table(src), _p_table(out)
    q = lambda layer, table: table[(f"decoder.{layer}.attn.q", "lora")]  # noqa: E731
    # layer 1 of 80 = [0.0125, 0.025) lies inside source layer 0 = [0, 0.03125)
    assert q(1, p_dst) == pytest.approx(q(0, p_src))
    # layer 2 of 80 = [0.025, 0.0375) overlaps source layers 0 and 1 equally
    assert q(2, p_dst) == pytest.approx((q(0, p_src) + q(1, p_src)) / 2)
    # layer 79 = [0.9875, 1) lies inside source layer 31
    assert q(79, p_dst) == pytest.approx(q(31, p_src))
    assert len(out.candidates) == 80 * 20 + 2
    _assert_greedy_full(out)


def test_deeper_to_shallower_averages(base):
    large = _searched("t5-large", 1e-4, seed=5)
    out = transfer(large, Backbone.plan("t5-base"))
    p_src, p_dst = _p_table(large), _p_table(out)
    for layer in range(12):
        key = lambda lay: (f"decoder.{lay}.mlp_norm", "bitfit")  # noqa: E731
        assert p_dst[key(layer)] == pytest.approx((p_src[key(2 * layer)] + p_src[key(2 * layer + 1)]) / 2)


def test_same_backbone_same_budget_reproduces_the_structure(base):
    again = rediscretise(base, 1e-4, Backbone.plan("t5-base"))
    assert [(m.site, m.type) for m in again.modules] == [(m.site, m.type) for m in base.modules]
    assert again.budget.used == base.budget.used


def test_manual_structure_transfers_its_modules():
    plan = Backbone.plan("t5-base")
    lora = builders.manual(plan, "lora")
    out = transfer(lora, Backbone.plan("t5-large"))
    assert len(out.modules) == 2 * 48 and out.space is None
    assert all(m.params == 8 * (1024 + 1024) for m in out.modules)
    with pytest.raises(StructureError, match="no gate probabilities"):
        transfer(lora, Backbone.plan("t5-large"), budget=1e-4)


@pytest.mark.parametrize("preset", ["lora", "lora-all-r1", "bitfit", "hiwi", "pafi"])
def test_manual_preset_is_rebuilt_on_the_target_and_covers_what_the_source_lacks(preset):
    """T5 v1.0 has no ``mlp.gate``; a preset on every FFN projection must cover it on v1.1, as the
    same preset built there does, instead of mapping v1.0's sites one by one."""
    src = builders.manual(Backbone.plan("t5-base"), preset)
    target = Backbone.plan("flan-t5-base")
    out = transfer(src, target)
    want = builders.manual(target, preset)
    assert [m.to_dict() for m in out.modules] == [m.to_dict() for m in want.modules]
    assert out.kind == "transferred" and out.budget.used == want.budget.used
    assert out.provenance["rule"] == "preset rebuilt on the target"
    gated = [m for m in out.modules if m.site.endswith("mlp.gate")]
    assert bool(gated) == any(m.site.endswith("mlp.up") for m in want.modules)


def test_scaled_preset_keeps_its_knob_on_the_target():
    src = builders.scaled_manual(Backbone.plan("t5-base"), "lora", 1e-3)
    rank = src.search["scaled"]["r"]
    out = transfer(src, Backbone.plan("t5-large"))
    assert {m.kwargs["r"] for m in out.modules} == {rank}
    assert len(out.modules) == 2 * 48 and all(m.params == rank * (1024 + 1024) for m in out.modules)


def test_per_matrix_pafi_counts_are_recounted_on_the_target():
    """``pafi-mask --ranking per-matrix --structure`` writes each matrix's count; copied to a larger
    target it would train the source's count there, a fraction of the density the file states."""
    d = builders.manual(Backbone.plan("t5-base"), "pafi").to_dict()
    for m in d["modules"]:
        m["kwargs"] = {**m["kwargs"], "count": m["params"]}
    d["search"] = {"method": "pafi-mask"}
    d.pop("digest", None)
    large = Backbone.plan("t5-large")
    out = transfer(Structure.from_dict(d), large)
    want = {m.site: m.params for m in builders.manual(large, "pafi").modules}
    assert {m.site: m.params for m in out.modules} == want
    assert all("count" not in m.kwargs for m in out.modules)


@pytest.mark.parametrize("source, target", [("llama-2-70b", "llama-2-7b"), ("t5-base", "t5-large")])
def test_a_random_baseline_is_redrawn_on_the_target_at_its_budget(source, target):
    """A random baseline exists to sit at the budget of what it is compared with. Mapped module by
    module it did not: 70B at 1e-4 landed on 7B at 4.4e-4 (each module on every layer it overlaps)."""
    src_plan, dst = Backbone.plan(source), Backbone.plan(target)
    src = builders.random_baseline(src_plan.space("mixed"), src_plan.info, 1e-4, seed=3)
    out = transfer(src, dst)
    again = builders.random_baseline(dst.space("mixed"), dst.info, 1e-4, seed=3)
    assert out.kind == "transferred" and out.modules == again.modules
    assert out.budget.relative == 1e-4 and out.budget.used <= out.budget.absolute
    assert out.budget.used > 0.9 * out.budget.absolute  # filled, as the source was
    assert out.provenance["rule"].startswith("random redrawn") and out.search == src.search
    # a random baseline has no gates, but a budget is all a redraw needs
    wider = builders.random_baseline(dst.space("mixed"), dst.info, 3e-4, 3)
    assert transfer(src, dst, budget=3e-4).modules == wider.modules
    # one without what drew it (edited, or transferred by an older version) maps its modules
    hand = Structure(**{**src.__dict__, "space": None})
    mapped = transfer(hand, dst)
    assert mapped.provenance["rule"] == "overlap-mean"
    with pytest.raises(StructureError, match="no gate probabilities"):
        transfer(hand, dst, budget=1e-3)


def test_unmatched_candidates_are_never_chosen(base):
    """Target candidates nothing maps to (p = 0) stay out even when budget is left over."""
    d = base.to_dict()
    d["candidates"] = [c for c in d["candidates"] if c["site"].startswith("decoder")]  # an encoder-less record
    d["modules"] = [m for m in d["modules"] if m["site"].startswith("decoder")]
    d["budget"]["used"] = sum(m["params"] for m in d["modules"])
    src = Structure.from_dict(d)
    out = transfer(src, Backbone.plan("t5-large"), budget=2e-3)  # more than all decoder candidates need
    decoder = sum(c.params for c in out.candidates if c.site.startswith("decoder"))
    assert all(m.site.startswith("decoder") for m in out.modules)
    assert out.budget.used == decoder < out.budget.absolute


def test_manual_kwargs_follow_the_overlapping_source_layer():
    plan = Backbone.plan("t5-base")
    d = builders.manual(plan, "lora").to_dict()
    for m in d["modules"]:  # rank 2 in the first half of the encoder, 4 in the second
        if m["site"].startswith("encoder."):
            m["kwargs"] = {**m["kwargs"], "r": 2 if int(m["site"].split(".")[1]) < 6 else 4}
    d.pop("digest", None)
    out = transfer(Structure.from_dict(d), Backbone.plan("t5-large"))
    ranks = {int(m.site.split(".")[1]): m.kwargs["r"] for m in out.modules if m.site.startswith("encoder.")}
    assert ranks == {layer: 2 if layer < 12 else 4 for layer in range(24)}


def test_global_pafi_is_refused_with_the_command_that_makes_the_targets():
    plan = Backbone.plan("t5-base")
    d = builders.manual(plan, "pafi").to_dict()
    for i, m in enumerate(d["modules"]):
        m["kwargs"] = {**m["kwargs"], "ranking": "global", "count": 10 + i}
        m["params"] = 10 + i
    d["budget"]["used"] = sum(m["params"] for m in d["modules"])
    d.pop("digest", None)
    with pytest.raises(StructureError, match="globally ranked PaFi.*s3delta pafi-mask TARGET"):
        transfer(Structure.from_dict(d), Backbone.plan("t5-large"))


def test_transfer_errors(base, tmp_path):
    with pytest.raises(StructureError, match="no mapping between these families"):
        transfer(base, Backbone.plan("llama-2-7b"))
    with pytest.raises(BudgetError, match="cheapest candidate"):
        transfer(base, Backbone.plan("t5-large"), budget=1e-9)
    d = base.to_dict()
    d["modules"][0]["site"] = "encoder.0.attn.z"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(d))
    with pytest.raises(StructureError, match=r"modules\[0\]: encoder.0.attn.z .* is not one of the structure's cand"):
        Structure.load(bad)  # a searched structure chooses among its candidates
    site = d["modules"][0]["site"] = base.modules[0].site
    d["modules"][0]["params"] = 999  # the field that was edited is the one named
    bad.write_text(json.dumps(d))
    with pytest.raises(
        StructureError, match=rf"modules\[0\].params: 999, but the candidate {site} .* has [0-9,]+ param"
    ):
        Structure.load(bad)
    d["modules"][0]["params"] = base.modules[0].params
    i = next(i for i, m in enumerate(base.modules) if "alpha" in m.kwargs)
    d["modules"][i]["kwargs"] = {**base.modules[i].kwargs, "alpha": 123.0}
    bad.write_text(json.dumps(d))
    with pytest.raises(StructureError, match=rf"modules\[{i}\].kwargs: .*'alpha': 123.0.*, but the candidate"):
        Structure.load(bad)
    d["modules"][i]["kwargs"] = dict(base.modules[i].kwargs)
    d["modules"][0]["site"] = "encoder.0.attn.z"
    d["candidates"] = []  # a hand-made structure: its modules are all it has
    bad.write_text(json.dumps(d))
    with pytest.raises(StructureError, match="unknown on the target"):
        transfer(Structure.load(bad), Backbone.plan("t5-large"))


def test_map_probabilities_counts_role_matches(base, xxl):
    p, stats = map_probabilities(base, xxl.space("mixed"))
    assert len(p) == len(xxl.space("mixed")) and all(0 <= x <= 1 for x in p)
    assert stats == {"matched": 1012 - 48 - 96, "by_role": 96, "unmatched": 0}


def test_cli_transfer_and_budget_sweep(base, tmp_path, capsys):
    src = base.save(tmp_path / "base.json")
    out = tmp_path / "xxl.json"
    assert main(["transfer", str(src), "--to", "t5-v1_1-xxl", "--budget", "5e-5", "-o", str(out)]) == 0
    assert Structure.load(out).budget.relative == 5e-5
    capsys.readouterr()
    assert (
        main(
            [
                "inspect",
                str(src),
                "--budgets",
                "1e-4,5e-5,1e-5",
                "--json",
                "--plot",
                str(tmp_path / "p.png"),
                "--write",
                str(tmp_path / "sweep"),
            ]
        )
        == 0
    )
    rows = json.loads(capsys.readouterr().out)
    assert [r["budget"] for r in rows] == [1e-4, 5e-5, 1e-5]
    assert rows[0]["params_used"] == base.budget.used
    assert rows[0]["params_used"] > rows[1]["params_used"] > rows[2]["params_used"]
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    assert Structure.load(tmp_path / "sweep" / "structure_5e-05.json").budget.used == rows[1]["params_used"]
    assert main(["inspect", str(src), "--budgets", "1e-4,x"]) == 2
    # a budget below the cheapest candidate is one refused row, named with the smallest that fits
    capsys.readouterr()
    assert main(["inspect", str(src), "--budgets", "1e-4,1e-9", "--json"]) == 0
    out, err = capsys.readouterr()
    assert [r["budget"] for r in json.loads(out)] == [1e-4]
    floor = min(c.params for c in base.candidates) / base.backbone.num_params
    assert "budget 1e-09: no structure" in err and f"smallest relative budget that fits one is {floor:.3g}" in err
    assert main(["inspect", str(src), "--budgets", "1e-9"]) == 2


def test_rediscretise_on_its_own_backbone_needs_no_model(base, tmp_path):
    """The stored candidates hold the sizes: the same modules as mapping onto the planned backbone,
    and nothing is loaded (a structure whose backbone path exists nowhere here still sweeps)."""
    for budget in (5e-5, 1e-4, 3e-4):
        own, mapped = rediscretise(base, budget), rediscretise(base, budget, Backbone.plan("t5-base"))
        assert [(m.site, m.type, m.params) for m in own.modules] == [(m.site, m.type, m.params) for m in mapped.modules]
        assert own.budget.used == mapped.budget.used and own.kind == base.kind
    d = base.to_dict()
    d["backbone"]["name_or_path"] = str(tmp_path / "moved" / "gguf-model")  # not here any more
    src = Structure.from_dict(d).save(tmp_path / "moved.json")
    assert main(["inspect", str(src), "--budgets", "5e-5,1e-4", "--write", str(tmp_path / "sweep")]) == 0
    assert Structure.load(tmp_path / "sweep" / "structure_5e-05.json").budget.relative == 5e-5


def test_rediscretise_at_a_budget_every_candidate_fits_takes_them_all():
    s = _searched("tiny-t5", 0.01, space="lora")
    total = sum(c.params for c in s.candidates)
    every = rediscretise(s, 10 * total / s.backbone.num_params)
    assert len(every.modules) == len(s.candidates) and every.budget.used == total


def test_rediscretise_breaks_clamped_ties_by_the_stored_logit():
    plan = Backbone.plan("tiny-t5")
    space = plan.space("lora")
    n = len(space.candidates)
    p = [1e-87] * n  # every gate clamped at sigmoid(-200): only the logits still rank them
    alpha = [-300.0 - i for i in range(n)]
    alpha[n - 1] = -250.0  # the least rejected is the last candidate
    s = builders.searched(space, plan.info, p, alpha, 0.001, search={"method": "test"})
    one = rediscretise(s, (space.params[n - 1] + 1) / plan.info.num_params)
    assert [(m.site, m.type) for m in one.modules] == [(space.candidates[n - 1].site, space.candidates[n - 1].type)]


def test_searched_and_transfer_break_saturated_ties_by_the_stored_logit():
    """Gates far above the shift all read p = 1.0 in float64: the logits rank them, in the search's
    own discretisation and in a transfer alike (transfer ranked them in site order, encoder first)."""
    plan = Backbone.plan("tiny-t5")
    space = plan.space("lora")
    n = len(space.candidates)
    p = [1.0] * n
    alpha = [60.0 + i for i in range(n)]  # the last candidates are the most certain
    top = list(range(n - 4, n))
    relative = sum(space.params[i] for i in top) / plan.info.num_params
    s = builders.searched(space, plan.info, p, alpha, relative, search={"method": "test"})
    want = [(space.candidates[i].site, space.candidates[i].type) for i in top]
    assert [(m.site, m.type) for m in s.modules] == want
    moved = transfer(s, plan)
    assert [(m.site, m.type) for m in moved.modules] == want
    assert [(m.site, m.type) for m in rediscretise(s, relative).modules] == want
    # the transferred file keeps the mapped logits, so its own re-discretisation ranks them too
    assert [c.alpha for c in moved.candidates] == alpha
    assert [(m.site, m.type) for m in rediscretise(moved, relative).modules] == want


def test_a_preset_edited_by_hand_transfers_its_modules_not_the_whole_preset():
    """A preset with a stack (or a layer) removed must not come back whole on the target."""
    base = Backbone.plan("t5-base")
    preset = builders.manual(base, "lora")
    encoder_only = Structure(
        **{**preset.__dict__, "modules": tuple(m for m in preset.modules if m.site.startswith("encoder."))}
    )
    assert {m.site.split(".")[0] for m in transfer(encoder_only, Backbone.plan("t5-large")).modules} == {"encoder"}
    no_layer_3 = Structure(**{**preset.__dict__, "modules": tuple(m for m in preset.modules if ".3." not in m.site)})
    out = transfer(no_layer_3, Backbone.plan("t5-large"))  # 12 -> 24: source layer 3 is target layers 6-7
    assert not any(m.site.split(".")[1] in ("6", "7") for m in out.modules)
    assert transfer(preset, Backbone.plan("t5-large")).provenance["rule"] == "preset rebuilt on the target"


def test_the_whole_preset_check_works_without_the_source_backbone_at_hand():
    """A source that cannot be planned (a local path gone, a hub id offline): the check falls back
    to every (stack, role, type, settings) of the preset on every layer."""
    for name in ("bitfit", "lnfit", "ia3"):  # per-layer norms and final_norm share the role "norm"
        preset = builders.manual(Backbone.plan("t5-base"), name)
        info = preset.backbone.__class__(**{**preset.backbone.__dict__, "name_or_path": "/nowhere/t5-base"})
        rebuilt = transfer(Structure(**{**preset.__dict__, "backbone": info}), Backbone.plan("flan-t5-large"))
        assert rebuilt.provenance["rule"] == "preset rebuilt on the target", name
    preset = builders.manual(Backbone.plan("t5-base"), "lora")
    info = preset.backbone.__class__(**{**preset.backbone.__dict__, "name_or_path": "/nowhere/t5-base"})
    whole = Structure(**{**preset.__dict__, "backbone": info})
    assert transfer(whole, Backbone.plan("t5-large")).provenance["rule"] == "preset rebuilt on the target"
    # (a component dropped within a role, e.g. attn.v beside attn.q, needs the source's sites to see)
    for drop in ("encoder.", ".3."):
        edited = Structure(**{**whole.__dict__, "modules": tuple(m for m in whole.modules if drop not in m.site)})
        assert transfer(edited, Backbone.plan("t5-large")).provenance["rule"] == "overlap-mean", drop


def test_a_searched_v1_1_structure_with_gate_modules_transfers_to_v1_0_and_says_what_it_lost():
    plan = Backbone.plan("flan-t5-base")
    space = plan.space("lora")
    p = [0.9 if c.site.endswith("mlp.gate") else 0.05 + 0.001 * i for i, c in enumerate(space.candidates)]
    s = builders.searched(space, plan.info, p, None, 1e-4, search={"method": "test"})
    assert any(m.site.endswith("mlp.gate") for m in s.modules)
    out = transfer(s, Backbone.plan("t5-large"))  # refused before: "sites unknown on the target backbone"
    assert out.provenance["unmapped_source"] == ["decoder.*.mlp.gate lora", "encoder.*.mlp.gate lora"]
    assert not any("gate" in m.site for m in out.modules) and out.budget.used <= out.budget.absolute


def test_a_per_matrix_pafi_count_that_is_not_its_density_is_refused():
    """transfer recounts a per-matrix PaFi module from its density; a count of its own (set by
    hand) changed the size silently, even onto the same backbone (100 -> 2,950 per matrix)."""
    base = Backbone.plan("t5-base")
    preset = builders.manual(base, "pafi")
    edited = [ModuleChoice(m.site, m.type, {**m.kwargs, "count": 100}, 100) for m in preset.modules]
    bad = Structure(**{**preset.__dict__, "modules": tuple(edited)})
    with pytest.raises(StructureError, match=r"per-matrix count must be ceil\(density × entries\) = \d+"):
        bad.check_backbone(base.site_map)
    with pytest.raises((StructureError, SearchSpaceError), match="per-matrix count must be"):
        transfer(bad, base)
    # the count a per-matrix mask file writes is its density's, and stays accepted
    same = [ModuleChoice(m.site, m.type, {**m.kwargs, "count": m.params}, m.params) for m in preset.modules]
    Structure(**{**preset.__dict__, "modules": tuple(same)}).check_backbone(base.site_map)


def test_a_tiny_models_random_baseline_onto_a_real_shape_says_to_pass_a_budget():
    """The embedded models' 0.02 is no budget for t5-large: the error said to lower the budget,
    not how (transfer keeps the source's relative budget unless --budget says otherwise)."""
    from s3delta_ds.errors import BudgetError

    tiny = Backbone.plan("tiny-t5")
    src = builders.random_baseline(tiny.space("mixed"), tiny.info, 0.02, seed=0)
    large = Backbone.plan("t5-large")
    with pytest.raises(BudgetError, match=r"budget, 0.02, on google-t5/t5-large\): pass --budget") as e:
        transfer(src, large)
    assert transfer(src, large, budget=1e-4).budget.relative == 1e-4
    _check_the_range_it_names(str(e.value), src, large)


def test_a_real_shapes_random_baseline_onto_a_tiny_model_names_budgets_that_fit():
    """The other way round the source's budget is too small (below the tiny model's cheapest
    candidate), and "e.g. 1e-4" was as wrong there as it was right above: the range is named."""
    from s3delta_ds.errors import BudgetError

    large = Backbone.plan("t5-large")
    src = builders.random_baseline(large.space("mixed"), large.info, 1e-4, seed=0)
    tiny = Backbone.plan("tiny-t5")
    with pytest.raises(BudgetError, match=r"smaller than the cheapest candidate.*pass --budget") as e:
        transfer(src, tiny)
    _check_the_range_it_names(str(e.value), src, tiny)


def _check_the_range_it_names(message: str, src, target):
    """Both ends of the named range draw, as printed, and just outside either is refused."""
    from s3delta_ds.errors import BudgetError

    lo, hi = (float(x) for x in re.search(r"in \[([0-9.e+-]+), ([0-9.e+-]+)\]", message).groups())
    assert not lo <= src.budget.relative <= hi
    assert transfer(src, target, budget=lo).modules
    assert transfer(src, target, budget=hi).modules
    for outside in (lo * 0.99, hi * 1.01):
        with pytest.raises(BudgetError):
            transfer(src, target, budget=outside)
