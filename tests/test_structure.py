"""Structure JSON v1: round trips, layout, atomic writes, validation messages, backbone checks, summaries."""

from __future__ import annotations

import copy
import json
import math
import os

import pytest

from s3delta_ds.errors import StructureError
from s3delta_ds.structure import ModuleChoice, Structure, builders
from s3delta_ds.structure.builders import MANUAL_PRESETS, Backbone

TOP_KEYS = [
    "format",
    "version",
    "kind",
    "backbone",
    "space",
    "budget",
    "search",
    "modules",
    "candidates",
    "provenance",
    "versions",
    "created",
]


@pytest.fixture(scope="module")
def tiny_t5():
    return Backbone.plan("tiny-t5")


@pytest.fixture(scope="module")
def mixed(tiny_t5):
    return tiny_t5.space("mixed")


def _p_alpha(n: int):
    p = [((i * 37) % 101) / 100 for i in range(n)]
    alpha = [round(i * 0.25 - 7.0, 6) for i in range(n)]
    return p, alpha


def _searched(tiny_t5, mixed) -> Structure:
    p, alpha = _p_alpha(len(mixed))
    return builders.searched(mixed, tiny_t5.info, p, alpha, 0.02, search={"method": "s3delta", "steps": 10})


def _make(kind: str, tiny_t5, mixed) -> Structure:
    if kind == "random":
        return builders.random_baseline(mixed, tiny_t5.info, 0.02, seed=1)
    if kind == "searched":
        return _searched(tiny_t5, mixed)
    return builders.manual(tiny_t5, kind.split(":", 1)[1])


KINDS = ["random", "searched"] + [f"manual:{p}" for p in MANUAL_PRESETS]


# -- round trip and layout -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip(tmp_path, tiny_t5, mixed, kind):
    s = _make(kind, tiny_t5, mixed)
    assert s.modules, "a structure without modules tests nothing"
    path = s.save(tmp_path / "s.json")
    assert path == tmp_path / "s.json"
    loaded = Structure.load(path)
    assert loaded.to_dict() == s.to_dict()
    assert loaded.digest() == s.digest()
    assert loaded == s
    assert loaded.dumps() == path.read_text()  # re-serialising gives the identical bytes


def test_searched_structure_content(tiny_t5, mixed):
    s = _searched(tiny_t5, mixed)
    p, alpha = _p_alpha(len(mixed))
    assert s.kind == "searched"
    assert s.space == "mixed"
    assert len(s.candidates) == len(mixed) == 76
    assert [c.p for c in s.candidates] == p
    assert [c.alpha for c in s.candidates] == alpha
    assert [(c.site, c.type, c.params) for c in s.candidates] == [(c.site, c.type, c.params) for c in mixed.candidates]
    assert s.budget.relative == 0.02
    assert s.budget.absolute == pytest.approx(0.02 * 181056)
    assert s.budget.used == sum(m.params for m in s.modules) <= s.budget.absolute
    # greedy by p: every chosen candidate has p >= every unchosen one that would still have fit
    chosen = {(m.site, m.type) for m in s.modules}
    left = s.budget.absolute - s.budget.used
    for c in s.candidates:
        if (c.site, c.type) not in chosen:
            assert c.params > left


def test_saved_text_layout(tmp_path, tiny_t5, mixed):
    s = _searched(tiny_t5, mixed)
    text = s.save(tmp_path / "s.json").read_text()
    assert text.endswith("}\n")
    d = json.loads(text)
    assert list(d) == TOP_KEYS
    assert list(d["budget"]) == ["relative", "absolute", "used"]
    assert list(d["backbone"]) == [
        "family",
        "name_or_path",
        "model_type",
        "config_hash",
        "num_params",
        "depths",
        "hidden_size",
    ]
    lines = text.splitlines()
    for key, rows, keys in (
        ("modules", s.modules, ["site", "type", "kwargs", "params"]),
        ("candidates", s.candidates, ["site", "type", "kwargs", "params", "alpha", "p"]),
    ):
        start = lines.index(f'  "{key}": [')
        block = lines[start + 1 : start + 1 + len(rows)]
        assert lines[start + 1 + len(rows)] == "  ],"
        assert len(block) == len(rows)
        for i, (line, row) in enumerate(zip(block, rows, strict=True)):
            assert line.startswith('    {"site": ')
            assert line.endswith("," if i < len(rows) - 1 else "}")
            obj = json.loads(line.rstrip(","))
            assert list(obj) == keys
            assert obj == row.to_dict()


def test_empty_candidates_are_written_inline(tmp_path, tiny_t5):
    s = builders.manual(tiny_t5, "lora")
    text = s.save(tmp_path / "s.json").read_text()
    assert '  "candidates": [],' in text.splitlines()
    assert '  "space": null,' in text.splitlines()


def test_digest_is_whitespace_independent_and_content_dependent(tmp_path, tiny_t5, mixed):
    s = builders.random_baseline(mixed, tiny_t5.info, 0.02, seed=1)
    path = tmp_path / "compact.json"
    path.write_text(json.dumps(s.to_dict(), separators=(",", ":")))
    assert Structure.load(path).digest() == s.digest()
    assert s.digest().startswith("sha256:") and len(s.digest()) == 7 + 64
    other = builders.random_baseline(mixed, tiny_t5.info, 0.02, seed=2)
    assert other.modules != s.modules
    assert other.digest() != s.digest()


# -- atomic writes ---------------------------------------------------------------------------------


def test_save_leaves_no_temp_files(tmp_path, tiny_t5, mixed):
    s = builders.random_baseline(mixed, tiny_t5.info, 0.02, seed=1)
    s.save(tmp_path / "s.json")
    s.save(tmp_path / "s.json")  # overwrite
    s.save(tmp_path / "sub" / "dir" / "t.json")  # parents are created
    assert sorted(os.listdir(tmp_path)) == ["s.json", "sub"]
    assert os.listdir(tmp_path / "sub" / "dir") == ["t.json"]
    assert Structure.load(tmp_path / "s.json").digest() == s.digest()


@pytest.mark.parametrize("target", ["replace", "fsync"])
def test_failed_write_keeps_the_old_file_and_no_temp_file(tmp_path, monkeypatch, tiny_t5, mixed, target):
    s = builders.random_baseline(mixed, tiny_t5.info, 0.02, seed=1)
    path = tmp_path / "s.json"
    path.write_text("ORIGINAL")

    def boom(*args, **kwargs):
        raise OSError(f"simulated {target} failure")

    monkeypatch.setattr(os, target, boom)
    with pytest.raises(OSError, match=f"simulated {target} failure"):
        s.save(path)
    monkeypatch.undo()
    assert path.read_text() == "ORIGINAL"
    assert os.listdir(tmp_path) == ["s.json"]


def test_failed_serialisation_keeps_the_old_file(tmp_path, monkeypatch, tiny_t5, mixed):
    s = builders.random_baseline(mixed, tiny_t5.info, 0.02, seed=1)
    path = tmp_path / "s.json"
    path.write_text("ORIGINAL")

    def boom(self):
        raise RuntimeError("cannot serialise")

    monkeypatch.setattr(Structure, "dumps", boom)
    with pytest.raises(RuntimeError, match="cannot serialise"):
        s.save(path)
    assert path.read_text() == "ORIGINAL"
    assert os.listdir(tmp_path) == ["s.json"]


# -- validation ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def valid(tiny_t5, mixed) -> dict:
    """A valid searched structure as a JSON-decoded dict (has modules and candidates)."""
    return json.loads(_searched(tiny_t5, mixed).dumps())


def _first(d, key, type_name):
    return next(i for i, m in enumerate(d[key]) if m["type"] == type_name)


def _set_kwargs(value, key=None):
    def mutate(d):
        i = _first(d, "modules", "lora")
        d["modules"][i]["kwargs"] = value
        return f"modules[{i}].kwargs" + (f".{key}" if key else "")

    return mutate


def _set_module(key, value, i=0, where=None):
    def mutate(d):
        d["modules"][i][key] = value
        return where or f"modules[{i}].{key}"

    return mutate


def _set_params(value):
    def mutate(d):
        old = d["modules"][0]["params"]
        d["modules"][0]["params"] = value
        if isinstance(value, int) and not isinstance(value, bool):
            d["budget"]["used"] += value - old  # keep the sum consistent: only params is wrong
        return "modules[0].params"

    return mutate


def _where(keys) -> str:
    """("modules", 0, "params") -> "modules[0].params", the way the validator names fields."""
    out = ""
    for k in keys:
        out += f"[{k}]" if isinstance(k, int) else (f".{k}" if out else k)
    return out


def _drop(*keys):
    def mutate(d):
        target = d
        for k in keys[:-1]:
            target = target[k]
        del target[keys[-1]]
        return _where(keys)

    return mutate


def _put(value, *keys, where=None):
    def mutate(d):
        target = d
        for k in keys[:-1]:
            target = target[k]
        target[keys[-1]] = value
        return where or _where(keys)

    return mutate


def _duplicate(d):
    d["modules"].append(copy.deepcopy(d["modules"][0]))
    d["budget"]["used"] += d["modules"][0]["params"]
    return f"modules[{len(d['modules']) - 1}]"


def _used_mismatch(d):
    d["budget"]["used"] += 1
    return "budget.used"


def _over_budget(d):
    d["budget"]["absolute"] = d["budget"]["used"] - 1
    return "budget.used"


def _candidate(key, value, i=3):
    def mutate(d):
        d["candidates"][i][key] = value
        return f"candidates[{i}].{key}"

    return mutate


MALFORMED = {
    "top_level_unknown_key": (_put(1, "extra", where="top level"), "unknown keys ['extra']"),
    "format": (_put("other-format", "format"), "expected 's3delta-structure', got 'other-format'"),
    "version_2": (_put(2, "version"), "unsupported version 2; this s3delta_ds reads version 1"),
    "version_string": (_put("1", "version"), "unsupported version '1'"),
    "version_bool": (_put(True, "version"), "unsupported version True"),  # true == 1 in Python, not in the format
    "kind": (_put("bogus", "kind"), "expected one of searched, random, manual, transferred, got 'bogus'"),
    "missing_modules": (_drop("modules"), "missing required field"),
    "missing_budget": (_drop("budget"), "missing required field"),
    "modules_not_list": (_put({}, "modules"), "expected a list, got dict"),
    "family": (_put("gpt2", "backbone", "family"), "unknown family 'gpt2'; supported: t5, llama, bert"),
    "depths_missing": (_drop("backbone", "depths"), "missing required field"),
    "depths_empty": (_put({}, "backbone", "depths"), "expected at least one stack"),
    "depth_zero": (_put(0, "backbone", "depths", "decoder"), "expected a positive integer, got 0"),
    "config_hash": (_put("md5:abc", "backbone", "config_hash"), "expected 'sha256:<hex>', got 'md5:abc'"),
    "config_hash_not_hex": (_put("sha256:", "backbone", "config_hash"), "expected 'sha256:<hex>', got 'sha256:'"),
    "space_unknown": (_put("nope", "space"), "unknown search space 'nope'; known spaces: mixed"),
    "candidates_without_space": (_put(None, "space", where="candidates"), "a manual structure, or one without a"),
    "manual_with_candidates": (_put("manual", "kind", where="candidates"), "a manual structure, or one without a"),
    "num_params": (_put(-3, "backbone", "num_params"), "expected a positive integer, got -3"),
    "site_malformed": (_set_module("site", "encoder..q"), "malformed site name 'encoder..q'"),
    "site_digit_stack": (_set_module("site", "3.attn"), "malformed site name '3.attn'"),
    "site_layer_range": (_set_module("site", "encoder.99.attn.q"), "layer 99 is out of range: encoder has 2 layers"),
    "site_stack": (
        _set_module("site", "middle.0.attn.q"),
        "stack 'middle' is not in backbone.depths ['decoder', 'encoder']",
    ),
    "site_not_string": (_set_module("site", 5), "expected a non-empty string, got 5"),
    "type": (_set_module("type", "prefix"), "unknown delta type 'prefix'; known: lora, bitfit, lnfit, lra, adapter"),
    "kwargs_unknown": (_set_kwargs({"r": 1, "rank": 2}), "unknown kwargs ['rank'] for delta type 'lora'"),
    "kwargs_str": (_set_kwargs({"r": "8"}), "lora.r must be int, got '8'"),
    "kwargs_zero": (_set_kwargs({"r": 0}), "r must be >= 1, got 0"),
    "kwargs_bool": (_set_kwargs({"r": True}), "lora.r must be int, got True"),
    "kwargs_not_object": (_set_kwargs([1]), "expected an object, got list"),
    "params_negative": (_set_params(-5), "expected a positive integer, got -5"),
    "params_bool": (_set_params(True), "expected a positive integer, got True"),
    "params_float": (_set_params(64.0), "expected a positive integer, got 64.0"),
    "params_missing": (_drop("modules", 0, "params"), "missing required field"),
    "module_extra_key": (
        _set_module("gate", 0.5, where="modules[0]"),
        "unknown keys ['gate']; valid keys: kwargs, params, site, type",
    ),
    "duplicate": (_duplicate, "duplicate entry for site"),
    "used_not_sum": (_used_mismatch, "but the modules add up to"),
    "used_over_budget": (_over_budget, "parameters exceed the budget of"),
    "budget_relative": (_put(-0.5, "budget", "relative"), "expected a positive number, got -0.5"),
    "budget_relative_above_one": (_put(5.0, "budget", "relative"), "expected a number < 1.0, got 5.0"),
    "budget_relative_one": (_put(1.0, "budget", "relative"), "expected a number < 1.0, got 1.0"),
    "budget_extra": (_put(1, "budget", "spent", where="budget"), "unknown keys ['spent']"),
    "p_high": (_candidate("p", 1.5), "expected a number in [0.0, 1.0], got 1.5"),
    "p_negative": (_candidate("p", -0.25), "expected a number in [0.0, 1.0], got -0.25"),
    "p_string": (_candidate("p", "0.5"), "expected a finite number, got '0.5'"),
    "alpha_nan": (_candidate("alpha", float("nan"), i=2), "expected a finite number, got nan"),
    "p_infinite": (_candidate("p", float("inf"), i=0), "expected a finite number, got inf"),
    "candidate_p_missing": (_drop("candidates", 1, "p"), "missing required field"),
    "search_not_object": (_put([1], "search"), "expected an object, got list"),
    "search_empty_list": (_put([], "search"), "expected an object, got list"),
    "provenance_zero": (_put(0, "provenance"), "expected an object, got int"),
    "kind_list": (_put(["searched"], "kind"), "expected one of searched"),
    "family_list": (_put(["t5"], "backbone", "family"), "expected a non-empty string, got ['t5']"),
    "type_list": (_set_module("type", ["lora"]), "expected a non-empty string, got ['lora']"),
    "kwargs_nan": (_set_kwargs({"r": 1, "alpha": float("nan")}, "alpha"), "expected a finite number, got nan"),
    "kwargs_infinite": (_set_kwargs({"r": 1, "dropout": float("inf")}, "dropout"), "expected a finite number, got inf"),
    "site_leading_zero": (_set_module("site", "encoder.01.attn.q"), "write 'encoder.1.attn.q'"),
    "created": (_put(5, "created"), "expected a non-empty string, got 5"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_structure(tmp_path, valid, case):
    mutate, message = MALFORMED[case]
    d = copy.deepcopy(valid)
    where = mutate(d)
    path = tmp_path / "bad.json"
    text = json.dumps(d)
    if case in ("alpha_nan", "p_infinite", "kwargs_nan"):
        assert ("Infinity" if case == "p_infinite" else "NaN") in text  # raw non-standard JSON in the file
    path.write_text(text)
    with pytest.raises(StructureError) as info:
        Structure.load(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: {where}: "), msg
    assert message in msg, msg


def test_valid_base_loads(tmp_path, valid):
    """Control for the malformed cases: the unmodified dict loads."""
    path = tmp_path / "good.json"
    path.write_text(json.dumps(valid))
    assert Structure.load(path).to_dict() == valid


def test_not_json_gives_line_and_column(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{\n  "format": "s3delta-structure",\n  "version": 1,,\n}\n')
    with pytest.raises(StructureError) as info:
        Structure.load(path)
    assert (
        str(info.value) == f"{path}: not valid JSON: Expecting property name enclosed in double quotes "
        "at line 3 column 16"
    )


def test_top_level_not_an_object(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("[1, 2, 3]")
    with pytest.raises(StructureError) as info:
        Structure.load(path)
    assert str(info.value) == f"{path}: top level: expected an object, got list"


def test_unreadable_file(tmp_path):
    path = tmp_path / "missing.json"
    with pytest.raises(StructureError) as info:
        Structure.load(path)
    assert str(info.value).startswith(f"{path}: cannot read (")


def test_non_utf8_file_is_a_structure_error(tmp_path):
    """Binary garbage is 'unreadable' too: it must surface as StructureError (CLI exit 2), not UnicodeDecodeError."""
    path = tmp_path / "binary.json"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(StructureError) as info:
        Structure.load(path)
    assert str(info.value).startswith(f"{path}: ")


def test_from_dict_source_defaults_to_structure(valid):
    d = copy.deepcopy(valid)
    d["version"] = 2
    with pytest.raises(StructureError, match=r"^structure: version: unsupported version 2"):
        Structure.from_dict(d)


# -- check_backbone --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_check_backbone_passes_on_its_own_backbone(tmp_path, tiny_t5, mixed, kind):
    s = _make(kind, tiny_t5, mixed)
    plan = Backbone.plan("tiny-t5")
    assert s.check_backbone(plan.site_map) is None
    loaded = Structure.load(s.save(tmp_path / "s.json"))
    assert loaded.check_backbone(plan.site_map) is None


def test_check_backbone_other_family(tiny_t5, mixed):
    s = builders.random_baseline(mixed, tiny_t5.info, 0.02, seed=1)
    llama = Backbone.plan("tiny-llama")
    with pytest.raises(StructureError) as info:
        s.check_backbone(llama.site_map)
    assert str(info.value) == "structure is for a t5 backbone but this one is llama; use `s3delta transfer` to map it"


def test_check_backbone_other_width():
    s = builders.manual(Backbone.plan("t5-base"), "lora")
    large = Backbone.plan("t5-large")
    with pytest.raises(StructureError) as info:
        s.check_backbone(large.site_map)
    # LoRA r=8 on encoder.0.attn.q: 8 * (1024 + 1024) on t5-large, 8 * (768 + 768) recorded for t5-base
    assert str(info.value) == (
        "modules[0] (encoder.0.attn.q lora) has 16384 parameters on this backbone but the structure records 12288: "
        "it was made for google-t5/t5-base (hidden size 768); use `s3delta transfer` to map it"
    )


def test_check_backbone_other_depth():
    """tiny-t5-v1_1 has a third decoder layer that tiny-t5 lacks (attention widths are the same)."""
    s = builders.manual(Backbone.plan("tiny-t5-v1_1"), "lora")
    i = next(i for i, m in enumerate(s.modules) if m.site == "decoder.2.attn.q")
    assert i == 8
    small = Backbone.plan("tiny-t5")
    with pytest.raises(StructureError) as info:
        s.check_backbone(small.site_map)
    msg = str(info.value)
    assert msg.startswith("modules[8] does not fit this backbone (unknown site 'decoder.2.attn.q'")
    assert "made for tiny-t5-v1_1 (depths {'encoder': 2, 'decoder': 3}): use `s3delta transfer`" in msg


def test_check_backbone_wrong_site_kind(tiny_t5, valid, tmp_path):
    """A structure that names a site of the right depth but a delta the site cannot take."""
    d = copy.deepcopy(valid)
    i = _first(d, "modules", "lnfit")
    d["modules"][i]["site"] = "encoder.0.attn.q"  # a linear, not a norm
    d["candidates"] = []  # a structure with gates is checked against its candidates at load already
    path = tmp_path / "s.json"
    path.write_text(json.dumps(d))
    s = Structure.load(path)
    with pytest.raises(
        StructureError,
        match=rf"^modules\[{i}\] does not fit this backbone \(delta type 'lnfit' "
        r"cannot go on 'encoder\.0\.attn\.q'",
    ):
        s.check_backbone(tiny_t5.site_map)


# -- summary ---------------------------------------------------------------------------------------


def _hand_made(tiny_t5) -> Structure:
    info = tiny_t5.info.to_dict()
    modules = [
        {"site": "encoder.0.attn.q", "type": "lora", "kwargs": {"r": 1}, "params": 128},
        {"site": "encoder.0.attn.q", "type": "bitfit", "kwargs": {}, "params": 64},
        {"site": "encoder.final_norm", "type": "lnfit", "kwargs": {}, "params": 64},
        {"site": "decoder.1.mlp", "type": "lra", "kwargs": {"reduction": 32, "rank": 1}, "params": 198},
        {"site": "decoder.1.mlp_norm", "type": "bitfit", "kwargs": {}, "params": 64},
        {"site": "decoder.1.mlp.up", "type": "lora", "kwargs": {"r": 2, "alpha": 8}, "params": 384},
    ]
    d = {
        "format": "s3delta-structure",
        "version": 1,
        "kind": "manual",
        "backbone": info,
        "budget": {"relative": 0.01, "absolute": 1810.56, "used": 902},
        "modules": modules,
    }
    return Structure.from_dict(d)


def test_summary_hand_computed(tiny_t5):
    s = _hand_made(tiny_t5)
    summary = s.summary()
    assert summary["by_type"] == {
        "lora": {"count": 2, "params": 128 + 384},
        "bitfit": {"count": 2, "params": 64 + 64},
        "lnfit": {"count": 1, "params": 64},
        "lra": {"count": 1, "params": 198},
    }
    assert summary["params_used"] == 902
    assert summary["used_relative"] == 902 / 181056
    assert summary["modules"] == 6
    assert summary["candidates"] == 0
    assert summary["modules_per_layer"] == {"encoder.0": 2, "encoder.-": 1, "decoder.1": 3}
    assert summary["backbone"] == "tiny-t5"
    assert summary["backbone_params"] == 181056
    assert (summary["kind"], summary["family"], summary["space"]) == ("manual", "t5", None)
    assert (summary["budget_relative"], summary["budget_absolute"]) == (0.01, 1810.56)
    # defaults filled in on load: LoRA alpha / dropout, LRA activation
    assert dict(s.modules[0].kwargs) == {"r": 1, "alpha": 16.0, "dropout": 0.0}
    assert dict(s.modules[5].kwargs) == {"r": 2, "alpha": 8, "dropout": 0.0}
    assert dict(s.modules[3].kwargs) == {"reduction": 32, "rank": 1, "activation": "gelu_new"}
    # and the hand-written params are the real ones on tiny-t5
    s.check_backbone(tiny_t5.site_map)


def test_summary_of_a_random_structure(tiny_t5, mixed):
    s = builders.random_baseline(mixed, tiny_t5.info, 0.02, seed=1)
    summary = s.summary()
    assert summary["params_used"] == s.budget.used == sum(m.params for m in s.modules) == 3602
    assert summary["modules"] == len(s.modules) == 35
    assert sum(v["count"] for v in summary["by_type"].values()) == 35
    assert sum(v["params"] for v in summary["by_type"].values()) == 3602
    assert sum(summary["modules_per_layer"].values()) == 35
    assert summary["candidates"] == 0
    assert summary["budget_absolute"] == pytest.approx(3621.12)


@pytest.mark.parametrize(
    "preset, count, params",
    [
        # tiny-t5: d_model 64, d_ff 128, 2 encoder + 2 decoder layers
        ("lora", 8, 8 * 8 * (64 + 64)),
        ("bitfit", 36, 20 * 64 + 4 * 128 + 12 * 64),  # q,k,v,o,down: 64; up: 128; 12 norms of 64
        ("lnfit", 10 + 2, 12 * 64),
        ("lra", 8, 8 * ((64 + 2) + 2 + (2 + 64) + 64)),  # bottleneck 64 // 32 = 2, rank 1, with biases
        ("adapter", 8, 8 * (2 * 64 * 24 + 24 + 64)),
        ("lora-all-r1", 24, 16 * 128 + 4 * 192 + 4 * 192),
    ],
)
def test_manual_presets_on_tiny_t5(tiny_t5, preset, count, params):
    s = builders.manual(tiny_t5, preset)
    summary = s.summary()
    assert summary["modules"] == count
    assert summary["params_used"] == params
    assert s.budget.relative == params / 181056
    assert s.budget.absolute is None
    assert s.search == {"method": "manual", "preset": preset}


@pytest.mark.parametrize("name", ["tiny-t5", "tiny-bert", "tiny-llama"])
@pytest.mark.parametrize("preset", sorted(builders.SCALABLE))
def test_a_scaled_preset_is_the_largest_that_fits_as_a_full_scan_finds_it(name, preset):
    """scaled_manual bisects the knob; its definition is a scan for the first value (largest
    structure) that fits, skipping values that build nothing."""
    backbone = Backbone.plan(name)
    n = backbone.info.num_params
    key, values = builders.SCALABLE[preset]
    scan = []  # (value, size) along the knob, as a linear scan meets them
    for value in values:
        try:
            scan.append((value, sum(m.params for m in builders.preset_modules(backbone, preset, {key: value}))))
        except builders.SearchSpaceError:
            pass
    sizes = {size for _, size in scan}
    # Every exact fit, one parameter short of each, below the smallest and above the largest version.
    budgets = sorted(r for r in {s / n for s in sizes} | {(s - 1) / n for s in sizes} | {0.9, 1e-9} if 0 < r < 1)
    checked = 0
    for relative in budgets[:: max(1, len(budgets) // 40)] + budgets[-3:] + budgets[:3]:
        absolute = builders.absolute_budget(relative, n)
        expected = next(((v, size) for v, size in scan if size <= absolute), None)
        got = builders.scaled_manual(backbone, preset, relative)
        if expected is None:
            assert got is None, (preset, relative)
            continue
        checked += 1
        assert got.search["scaled"] == {key: expected[0]}, (preset, relative)
        assert got.budget.used == expected[1]
    assert checked >= 5


def test_a_non_finite_value_in_search_or_provenance_is_written_as_strict_json(tiny_t5, tmp_path):
    s = builders.manual(tiny_t5, "lora")
    s = Structure(**{**s.__dict__, "search": {**s.search, "best": float("-inf")}, "provenance": {"x": [float("nan")]}})
    text = s.save(tmp_path / "s.json").read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} is not strict JSON"))
    loaded = Structure.load(tmp_path / "s.json")
    assert loaded.search["best"] is None and loaded.provenance == {"x": [None]}
    assert loaded.digest() == s.digest()  # the file and the digest agree


def test_a_key_written_twice_is_refused_not_the_last_kept(tmp_path, valid):
    """A hand edit that pastes a second "modules": [] was loaded as an empty structure."""
    text = json.dumps(valid)
    path = tmp_path / "twice.json"
    path.write_text(text[:-1] + ', "modules": []}')
    with pytest.raises(StructureError, match=r"twice.json: the key 'modules' appears twice in one object"):
        Structure.load(path)


def test_the_modules_digest_names_what_trains_not_when_the_file_was_written(tiny_t5, tmp_path):
    """A retrain's resume checks its structure by this digest: a file without 'created' (the loader
    stamps the time) or a preset saved again must stay the same structure; an edited alpha must not."""
    s = builders.manual(tiny_t5, "lora")
    d = json.loads(s.dumps())
    del d["created"]
    (tmp_path / "a.json").write_text(json.dumps(d))
    first, second = Structure.load(tmp_path / "a.json"), Structure.load(tmp_path / "a.json")
    assert first.modules_digest() == second.modules_digest() == s.modules_digest()
    assert builders.manual(tiny_t5, "lora").modules_digest() == s.modules_digest()  # saved again
    edited = [ModuleChoice(m.site, m.type, {**m.kwargs, "alpha": 1.0}, m.params) for m in s.modules]
    assert Structure(**{**s.__dict__, "modules": tuple(edited)}).modules_digest() != s.modules_digest()


@pytest.mark.parametrize(
    "params, num_params, printed",
    [
        ([3, 50], 10_000, (0.0003, 0.00529)),  # an exact ratio: 3e-4 × 10,000 is 2.9999999999999996 in floats
        ([1, 50], 10_000, (0.0001, 0.00509)),  # 1e-4 / 1e-6 is 100.00000000000001: ceil made it 0.000101
        ([803, 9000], 10**8, (8.03e-06, 9.8e-05)),  # the total exactly at 3 digits: one unit under it
        ([64, 8_176], 181_056, (0.000354, 0.0455)),  # tiny-t5's mixed space: 0.0003535 printed 0.000353
    ],
)
def test_a_budget_range_names_ends_that_both_fit(params, num_params, printed):
    """Either end of the range an error prints, copied back, is a budget a search can meet, and
    the next 3-digit number outside it is not."""
    from s3delta_ds.errors import BudgetError
    from s3delta_ds.method.gates import check_budget

    lo, hi = builders.budget_range(params, num_params)
    assert (float(f"{lo:.3g}"), float(f"{hi:.3g}")) == printed
    for fits in (lo, hi):
        check_budget(params, builders.absolute_budget(float(f"{fits:.3g}"), num_params))
    for end, step in ((lo, -1), (hi, +1)):  # the next 3-digit number outside the range
        outside = float(f"{end + step * 10 ** (math.floor(math.log10(end)) - 2):.3g}")  # as a user types it
        with pytest.raises(BudgetError):
            check_budget(params, builders.absolute_budget(outside, num_params))


def test_a_space_of_one_size_has_no_budget_range():
    assert builders.budget_range([500], 10_000) is None
    assert builders.budget_range([5, 5], 10_000) == (0.0005, 0.000999)  # not 0.00099: a digit of its own decade


def test_a_budget_within_float_rounding_of_a_whole_count_is_that_count():
    assert builders.absolute_budget(3e-4, 10_000) == 3.0
    assert builders.absolute_budget(1e-3, 22_713_216) == pytest.approx(22_713.216)  # a real fraction stays one


def test_a_printed_high_end_close_under_the_total_is_accepted():
    """A tolerance that snapped budgets within 1e-9 of a whole count took 0.0455 of 100,000,989
    (4,550,044.9995) up to the total, 4,550,045, and refused the range's own high end."""
    from s3delta_ds.method.gates import check_budget

    params, n = [1000, 4_549_045], 100_000_989
    lo, hi = builders.budget_range(params, n)
    assert f"{hi:.3g}" == "0.0455"
    check_budget(params, builders.absolute_budget(hi, n))
