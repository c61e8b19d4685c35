"""The ``s3delta`` console script: space / structure / inspect, in-process, plus the installed entry point."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from s3delta_ds import __version__
from s3delta_ds.backbones.loading import load_config
from s3delta_ds.cli import main
from s3delta_ds.structure import Structure


def run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def run_json(capsys, *argv):
    rc, out, err = run(capsys, *argv)
    assert (rc, err) == (0, ""), err
    return json.loads(out)


# -- space -----------------------------------------------------------------------------------------


def test_space_t5_base_mixed_json(capsys):
    s = run_json(capsys, "space", "t5-base", "--space", "mixed", "--json")
    assert s["family"] == "t5"
    assert s["space"] == "mixed"
    assert s["candidates"] == 460 - 24  # the original's 460, less the 24 self-attention key biases
    assert s["inert_left_out"] == 24
    assert s["params"] == 706944 - 24 * 768
    assert s["backbone_params"] == 222903552
    assert s["depths"] == {"encoder": 12, "decoder": 12}
    assert {t: v["count"] for t, v in s["by_type"].items()} == {"lora": 144, "bitfit": 182, "lnfit": 62, "lra": 48}
    assert {t: v["params"] for t, v in s["by_type"].items()} == {
        "lora": 331776,
        "bitfit": 213504 - 24 * 768,
        "lnfit": 47616,
        "lra": 114048,
    }
    assert sum(v["params"] for v in s["by_type"].values()) == 688512
    assert s["fraction_of_backbone"] == pytest.approx(688512 / 222903552)
    assert "candidate_list" not in s


def test_space_t5_large_lora_json(capsys):
    s = run_json(capsys, "space", "t5-large", "--space", "lora", "--json")
    assert (s["family"], s["space"], s["candidates"], s["params"]) == ("t5", "lora", 288, 884736)
    assert s["backbone_params"] == 737668096
    assert s["by_type"] == {"lora": {"count": 288, "params": 884736}}


def test_space_default_is_mixed(capsys):
    s = run_json(capsys, "space", "t5-large", "--json")
    assert (s["space"], s["candidates"]) == ("mixed", 916 - 48)


def _type_rows(out: str) -> dict[str, tuple[int, int]]:
    rows = {}
    for line in out.splitlines():
        m = re.fullmatch(r"(lora|bitfit|lnfit|lra|adapter)\s+(\d+)\s+([\d,]+)", line)
        if m:
            rows[m[1]] = (int(m[2]), int(m[3].replace(",", "")))
    return rows


def test_space_table_t5_base(capsys):
    rc, out, err = run(capsys, "space", "t5-base")
    assert (rc, err) == (0, "")
    lines = out.splitlines()
    assert lines[0] == "t5-base: family t5, 222,903,552 parameters, layers: encoder 12, decoder 12"
    assert lines[1] == "space 'mixed': 436 candidates, 688,512 parameters (0.3089% of the backbone) if all were on"
    assert "left out: 24 candidates that cannot change the output" in out
    assert _type_rows(out) == {
        "bitfit": (182, 213504 - 24 * 768),
        "lnfit": (62, 47616),
        "lra": (48, 114048),
        "lora": (144, 331776),
    }


def test_space_table_t5_large_lora(capsys):
    rc, out, err = run(capsys, "space", "t5-large", "--space", "lora")
    assert (rc, err) == (0, "")
    assert out.splitlines()[0] == "t5-large: family t5, 737,668,096 parameters, layers: encoder 24, decoder 24"
    assert "space 'lora': 288 candidates, 884,736 parameters" in out
    assert _type_rows(out) == {"lora": (288, 884736)}


def test_space_candidates_json_lists_every_candidate(capsys):
    s = run_json(capsys, "space", "tiny-t5", "--space", "mixed", "--json", "--candidates")
    cands = s["candidate_list"]
    assert len(cands) == s["candidates"] == 80 - 4  # 4 self-attention key biases left out
    assert [c["index"] for c in cands] == list(range(76))
    assert sum(c["params"] for c in cands) == s["params"] == 8496 - 4 * 64
    assert len({(c["site"], c["type"]) for c in cands}) == 76
    first = cands[0]
    assert first == {"index": 0, "site": "encoder.0.attn_norm", "type": "bitfit", "kwargs": {}, "params": 64}
    lora = next(c for c in cands if c["type"] == "lora")
    assert lora["kwargs"] == {"r": 1, "alpha": 16.0, "dropout": 0.0}
    assert {c["type"] for c in cands} == {"lora", "bitfit", "lnfit", "lra"}


def test_space_candidates_table_lists_every_candidate(capsys):
    listed = run_json(capsys, "space", "tiny-t5", "--space", "mixed", "--json", "--candidates")["candidate_list"]
    rc, out, err = run(capsys, "space", "tiny-t5", "--space", "mixed", "--candidates")
    assert (rc, err) == (0, "")
    rows = [m.groups() for m in re.finditer(r"^(\d+)\s+(\S+)\s+(lora|bitfit|lnfit|lra)\s+([\d,]+)$", out, re.M)]
    assert [(int(i), site, t, int(n.replace(",", ""))) for i, site, t, n in rows] == [
        (c["index"], c["site"], c["type"], c["params"]) for c in listed
    ]
    # without --candidates there is no candidate table
    _, plain, _ = run(capsys, "space", "tiny-t5", "--space", "mixed")
    assert "encoder.0.attn_norm" not in plain


def test_space_on_a_directory_with_only_config_json(capsys, tmp_path):
    load_config("tiny-llama").save_pretrained(tmp_path / "model")
    assert os.listdir(tmp_path / "model") == ["config.json"]
    s = run_json(capsys, "space", tmp_path / "model", "--space", "lora", "--json")
    # LoRA r=1 on q (64->64), k, v (64->32), o, gate, up (64->128), down (128->64) of 2 layers
    per_layer = 128 + 96 + 96 + 128 + 192 + 192 + 192
    assert (s["family"], s["depths"], s["candidates"], s["params"]) == ("llama", {"decoder": 2}, 14, 2 * per_layer)
    rc, out, _ = run(capsys, "space", tmp_path / "model", "--space", "lora")
    assert rc == 0
    assert out.startswith(f"{tmp_path / 'model'}: family llama, ")


def test_space_on_a_bare_config_file(capsys, tmp_path):
    path = tmp_path / "shape.json"
    path.write_text(
        json.dumps(
            {
                "model_type": "bert",
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 3,
                "num_attention_heads": 4,
                "vocab_size": 64,
            }
        )
    )
    s = run_json(capsys, "space", path, "--space", "bias", "--json")
    # bitfit on q,v,o (32), up (64), down (32) and 2 norms (32) (k: inert); lnfit on the 2 norms; 3 layers
    assert (s["family"], s["depths"]) == ("bert", {"encoder": 3})
    assert s["by_type"] == {
        "bitfit": {"count": 3 * 7, "params": 3 * (6 * 32 + 64)},
        "lnfit": {"count": 3 * 2, "params": 3 * 2 * 32},
    }


# -- structure random / manual, inspect ------------------------------------------------------------


def _random(capsys, out: Path, seed: int, budget: float = 0.02, space: str = "mixed"):
    rc, stdout, err = run(
        capsys, "structure", "random", "tiny-t5", "--space", space, "--budget", budget, "--seed", seed, "-o", out
    )
    assert (rc, err) == (0, ""), err
    return stdout


def test_structure_random_writes_a_valid_file(capsys, tmp_path):
    out = tmp_path / "out.json"
    stdout = _random(capsys, out, seed=1)
    assert out.is_file()
    s = Structure.load(out)
    assert (
        stdout == f"wrote {out}: {len(s.modules)} modules, {s.budget.used:,} parameters "
        f"({100 * s.budget.used / 181056:.5f}% of 181,056)\n"
    )
    summary = run_json(capsys, "inspect", out, "--json")
    assert summary["kind"] == "random"
    assert summary["space"] == "mixed"
    assert summary["backbone"] == "tiny-t5"
    assert summary["backbone_params"] == 181056
    assert summary["params_used"] <= 0.02 * summary["backbone_params"]
    assert summary["params_used"] == sum(m.params for m in s.modules)
    assert summary["modules"] == len(s.modules) > 0
    assert summary["budget_relative"] == 0.02
    assert summary["budget_absolute"] == pytest.approx(0.02 * 181056)
    assert s.search == {"method": "random", "seed": 1}
    assert sorted(os.listdir(tmp_path)) == ["out.json"]


def test_inspect_text(capsys, tmp_path):
    out = tmp_path / "out.json"
    _random(capsys, out, seed=1)
    s = Structure.load(out)
    rc, stdout, err = run(capsys, "inspect", out)
    assert (rc, err) == (0, "")
    lines = stdout.splitlines()
    assert lines[0] == f"{out}: valid random structure for tiny-t5 (t5, 181,056 parameters), space mixed"
    assert (
        lines[1] == f"{len(s.modules)} modules, {s.budget.used:,} parameters used of a budget of 3,621 "
        "(0.02 of the backbone); 0 candidates recorded"
    )
    rows = _type_rows(stdout)
    assert sum(c for c, _ in rows.values()) == len(s.modules)
    assert sum(n for _, n in rows.values()) == s.budget.used


def test_structure_random_same_seed_same_modules(capsys, tmp_path):
    _random(capsys, tmp_path / "a.json", seed=1)
    _random(capsys, tmp_path / "b.json", seed=1)
    _random(capsys, tmp_path / "c.json", seed=2)
    a, b, c = (json.loads((tmp_path / f"{x}.json").read_text())["modules"] for x in "abc")
    assert a == b
    assert a != c
    assert (len(a), len(c)) == (35, 32)  # tiny-t5, mixed, 2% budget


def test_structure_random_lora_space(capsys, tmp_path):
    _random(capsys, tmp_path / "l.json", seed=3, budget=0.01, space="lora")
    s = Structure.load(tmp_path / "l.json")
    assert {m.type for m in s.modules} == {"lora"}
    assert s.space == "lora"
    assert s.budget.used <= 0.01 * 181056


T5_BASE_LORA_SITES = {f"{stack}.{i}.attn.{x}" for stack in ("encoder", "decoder") for i in range(12) for x in "qv"}


def test_structure_manual_lora_t5_base(capsys, tmp_path):
    out = tmp_path / "f.json"
    rc, stdout, err = run(capsys, "structure", "manual", "t5-base", "--preset", "lora", "-o", out)
    assert (rc, err) == (0, "")
    assert stdout.startswith(f"wrote {out}: 48 modules, 589,824 parameters (")
    s = Structure.load(out)
    assert len(s.modules) == 48
    assert {m.site for m in s.modules} == T5_BASE_LORA_SITES
    assert all(m.type == "lora" and dict(m.kwargs) == {"r": 8, "alpha": 16.0, "dropout": 0.0} for m in s.modules)
    assert all(m.params == 8 * (768 + 768) for m in s.modules)
    assert s.budget.used == 48 * 8 * (768 + 768) == 589824
    assert s.kind == "manual"
    assert s.space is None
    assert s.search == {"method": "manual", "preset": "lora"}


@pytest.mark.parametrize(
    "preset, count, params",
    [
        ("bitfit", 206, 213504),
        ("lnfit", 62, 47616),
        ("lra", 48, 114048),
        ("adapter", 48, 48 * (2 * 768 * 24 + 24 + 768)),
        ("lora-all-r1", 144, 331776),
    ],
)
def test_structure_manual_presets_t5_base(capsys, tmp_path, preset, count, params):
    out = tmp_path / "f.json"
    rc, _, err = run(capsys, "structure", "manual", "t5-base", "--preset", preset, "-o", out)
    assert (rc, err) == (0, "")
    summary = run_json(capsys, "inspect", out, "--json")
    assert summary["by_type"] == {("lora" if preset.startswith("lora") else preset): {"count": count, "params": params}}
    assert summary["params_used"] == params
    assert summary["modules"] == count


# -- errors ----------------------------------------------------------------------------------------


def _assert_fails(capsys, tmp_path, argv, *expected, out_name="out.json"):
    before = sorted(os.listdir(tmp_path))
    t0 = time.monotonic()
    rc, out, err = run(capsys, *argv)
    elapsed = time.monotonic() - t0
    assert rc == 2
    assert out == ""
    assert err.startswith("error: ") and err.endswith("\n") and err.count("\n") >= 1
    for e in expected:
        assert e in err, err
    assert not (tmp_path / out_name).exists()
    assert sorted(os.listdir(tmp_path)) == before  # no output, no temp file
    return err, elapsed


@pytest.mark.parametrize(
    "budget, expected",
    [
        ("1e-9", "is smaller than the cheapest candidate (64 parameters): no structure fits; raise the budget"),
        ("0.9999", "is not below the total of all candidates (8,240): every candidate fits"),
        ("1.0", "budget 1.0 must be a fraction of the backbone's parameters in (0, 1)"),
        ("0", "budget 0.0 must be a fraction of the backbone's parameters in (0, 1)"),
        ("-0.01", "budget -0.01 must be a fraction"),
        ("nan", "budget must be a number, got nan"),
    ],
)
def test_structure_random_impossible_budget(capsys, tmp_path, budget, expected):
    _assert_fails(
        capsys, tmp_path, ["structure", "random", "tiny-t5", "--budget", budget, "-o", tmp_path / "out.json"], expected
    )


@pytest.mark.parametrize(
    "command",
    [
        ["space", "{nope}"],
        ["space", "{nope}", "--json"],
        ["structure", "random", "{nope}", "--budget", "0.01", "-o", "{out}"],
        ["structure", "manual", "{nope}", "--preset", "lora", "-o", "{out}"],
    ],
)
def test_unknown_model_path(capsys, tmp_path, command):
    nope = tmp_path / "nope"
    argv = [str(a).format(nope=nope, out=tmp_path / "out.json") for a in command]
    err, elapsed = _assert_fails(
        capsys,
        tmp_path,
        argv,
        f"error: cannot find a model or config called {str(nope)!r}: not a file, "
        "not a directory, not a shipped shape (",
    )
    assert elapsed < 10, f"a missing local path took {elapsed:.1f}s (hub retries?)"


def test_unknown_bare_name_fails_fast_offline(capsys, tmp_path):
    """A name that is neither a path nor a shape goes to the hub; offline (scripts/test.sh) that fails at once."""
    if os.environ.get("HF_HUB_OFFLINE") != "1":
        pytest.skip("needs HF_HUB_OFFLINE=1 (set by scripts/test.sh); see the subprocess test for the same check")
    err, elapsed = _assert_fails(
        capsys,
        tmp_path,
        ["space", "no-such-model-s3delta-test"],
        "error: cannot find a model or config called 'no-such-model-s3delta-test'",
        "the hub lookup failed",
    )
    assert elapsed < 10


def test_inspect_malformed_file(capsys, tmp_path):
    good = tmp_path / "good.json"
    _random(capsys, good, seed=1)
    d = json.loads(good.read_text())
    d["modules"][2]["params"] = -1
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(d))
    _assert_fails(
        capsys, tmp_path, ["inspect", bad], f"error: {bad}: modules[2].params: expected a positive integer, got -1"
    )
    d = json.loads(good.read_text())
    d["budget"]["used"] += 1
    bad.write_text(json.dumps(d))
    _assert_fails(capsys, tmp_path, ["inspect", bad, "--json"], f"error: {bad}: budget.used: is ")


def test_inspect_not_json_and_missing(capsys, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "format": ,\n}')
    _assert_fails(capsys, tmp_path, ["inspect", bad], f"error: {bad}: not valid JSON: ", "at line 2 column 13")
    _assert_fails(
        capsys, tmp_path, ["inspect", tmp_path / "missing.json"], f"error: {tmp_path / 'missing.json'}: cannot read ("
    )


def test_inspect_binary_file(capsys, tmp_path):
    """A non-UTF-8 file is a user error like any other: exit 2 with a message, not a traceback."""
    bad = tmp_path / "bad.json"
    bad.write_bytes(b"\xff\xfe\x00\x01binary")
    _assert_fails(capsys, tmp_path, ["inspect", bad], f"error: {bad}: ")


def test_failed_run_keeps_an_existing_output(capsys, tmp_path):
    """An existing output file survives a failed run (the budget error happens before anything is written)."""
    out = tmp_path / "out.json"
    out.write_text("KEEP")
    rc, _, err = run(capsys, "structure", "random", "tiny-t5", "--budget", "1e-9", "-o", out)
    assert rc == 2 and err.startswith("error: budget ")
    assert out.read_text() == "KEEP"
    assert os.listdir(tmp_path) == ["out.json"]


@pytest.mark.parametrize(
    "argv",
    [
        ["space", "t5-base", "--space", "nonsense"],
        ["structure", "manual", "t5-base", "--preset", "nonsense", "-o", "x.json"],
        ["structure", "random", "t5-base", "-o", "x.json"],  # --budget is required
        ["structure", "random", "t5-base", "--budget", "lots", "-o", "x.json"],
        ["frobnicate"],
        [],
    ],
)
def test_usage_errors_exit_2(capsys, argv):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert "usage: s3delta" in err


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out == f"s3delta_ds {__version__}\n"


# -- the installed console script ------------------------------------------------------------------


def _script() -> str:
    path = Path(sys.executable).parent / "s3delta"
    assert path.is_file(), f"console script not installed at {path} (pip install -e .)"
    return str(path)


@pytest.mark.slow
def test_console_script_is_installed(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu")
    proc = subprocess.run(
        [_script(), "space", "t5-base", "--space", "lora", "--json"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    s = json.loads(proc.stdout)
    assert (s["family"], s["candidates"], s["params"]) == ("t5", 144, 331776)


@pytest.mark.slow
def test_console_script_error_exit_code_and_offline_speed(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu")
    t0 = time.monotonic()
    proc = subprocess.run(
        [_script(), "structure", "random", "no-such-model-s3delta-test", "--budget", "0.01", "-o", "out.json"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    elapsed = time.monotonic() - t0
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.startswith("error: cannot find a model or config called 'no-such-model-s3delta-test'")
    assert "Traceback" not in proc.stderr
    assert os.listdir(tmp_path) == []
    assert elapsed < 60, f"offline hub lookup took {elapsed:.1f}s"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["inspect", "{s}", "--plot", "{tmp}/p.png"], "error: --plot works with --budgets"),
        (["inspect", "{s}", "--write", "{tmp}/sweep"], "error: --write works with --budgets"),
        # a budget of 0 was "no structure" on stderr and an exit of 0 (the sweep's other rows printed)
        (["inspect", "{s}", "--budgets", "0,0.01", "--write", "{tmp}/w"], "each between 0 and 1 (e.g. 1e-4); got 0.0"),
        (["inspect", "{s}", "--budgets", "0.01,1.5,nan"], "got 1.5, nan"),
        (
            ["export", "{tmp}", "--peft", "--keep-unmergeable", "-o", "{tmp}/o"],
            "--keep-unmergeable does not apply to --peft",
        ),
        (["export", "{tmp}", "--merge", "--partial", "-o", "{tmp}/o"], "--partial does not apply to --merge"),
        (["export", "{tmp}", "--peft", "--full-precision-base", "-o", "{tmp}/o"], "--full-precision-base does not"),
    ],
)
def test_a_flag_that_would_be_ignored_is_an_error(capsys, tmp_path, argv, message):
    """inspect --plot without --budgets printed the summary and wrote no plot, as if it had worked."""
    structure = tmp_path / "s.json"
    _random(capsys, structure, seed=1)
    before = sorted(os.listdir(tmp_path))
    rc, out, err = run(capsys, *[a.format(s=structure, tmp=tmp_path) for a in argv])
    assert (rc, out) == (2, "") and message in err, err
    assert sorted(os.listdir(tmp_path)) == before


def test_an_output_path_that_cannot_be_written_is_an_error_not_a_traceback(tmp_path, capsys):
    from s3delta_ds.structure import builders

    src = builders.manual(builders.Backbone.plan("tiny-t5"), "lora").save(tmp_path / "lora.json")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    assert main(["transfer", str(src), "--to", "tiny-t5-v1_1", "-o", str(blocker / "out.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(blocker) in err
    assert blocker.read_text() == "not a directory"


@pytest.mark.parametrize("value", ["-1", "two"])
def test_a_negative_or_non_numeric_nproc_is_refused(capsys, value):
    """``--nproc -1`` ran on one rank in this process, silently."""
    from s3delta_ds.cli import main

    with pytest.raises(SystemExit) as e:
        main(["search", "--nproc", value])
    assert e.value.code == 2 and "is not a number of ranks" in capsys.readouterr().err


@pytest.fixture
def launches(monkeypatch):
    """The ranks ``--nproc`` would start, recorded instead of started (what is tested is whether the
    parent process gets that far)."""
    import s3delta_ds.run.launch as launch_mod

    calls = []
    monkeypatch.setattr(launch_mod, "launch", lambda script, args, nproc: calls.append((script, args, nproc)) or 0)
    return calls


@pytest.mark.parametrize(
    "argv, said",
    [
        (["search", "search.budget=0.9"], "the budget must lie in [0.000354, 0.0455]"),
        (["search", "search.space=mixd"], "mixd"),
        (["search", "model.name_or_path=tiny-bret"], "tiny-bret"),
        (["retrain"], "retrain.structure must name a structure JSON"),
        (["search", "--resume"], "does not exist"),
    ],
)
def test_nproc_checks_the_run_before_it_starts_the_ranks(capsys, tmp_path, launches, argv, said):
    """Each of these used to surface only after the launcher's ~30 s start-up, once per rank."""
    rc, _, err = run(capsys, *argv, "--nproc", 2, f"output_dir={tmp_path / 'run'}")
    assert (rc, launches) == (2, []), err
    assert err.startswith("error: ") and said in err
    assert not (tmp_path / "run").exists()


def test_nproc_refuses_a_non_empty_output_dir_before_the_ranks(capsys, tmp_path, launches):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    rc, _, err = run(capsys, "search", "--nproc", 2, f"output_dir={tmp_path / 'run'}")
    assert (rc, launches) == (2, []) and "is not empty" in err
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["notes.txt"]


def test_nproc_starts_the_ranks_with_the_command_as_given(capsys, tmp_path, launches):
    out = tmp_path / "run"
    rc, _, err = run(capsys, "search", "--nproc", 2, "search.budget=0.02", f"output_dir={out}")
    assert (rc, err) == (0, "")
    assert launches == [("search", ["search.budget=0.02", f"output_dir={out}"], 2)]
    assert not out.exists()  # the parent checks, the ranks write


def test_overrides_may_sit_on_both_sides_of_an_option(capsys, tmp_path, launches):
    """argparse ended the overrides at ``--nproc`` and refused the rest as unrecognized."""
    out = tmp_path / "run"
    rc, _, err = run(capsys, "search", "search.budget=0.02", "--nproc", 2, f"output_dir={out}")
    assert (rc, err) == (0, "")
    assert launches == [("search", ["search.budget=0.02", f"output_dir={out}"], 2)]
    with pytest.raises(SystemExit):
        main(["search", "search.budget=0.02", "--nproc", "2", "--bogus"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_a_run_config_given_for_a_model_or_a_structure_says_what_to_pass(capsys, tmp_path):
    """``s3delta space run.yaml`` said only "not a readable JSON config"."""
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model:\n  name_or_path: tiny-bert\noutput_dir: runs/mine\n")
    rc, _, err = run(capsys, "space", cfg)
    assert rc == 2 and err.rstrip().endswith(f"{cfg} looks like a run config: pass its model, tiny-bert")
    rc, _, err = run(capsys, "inspect", cfg)
    assert rc == 2 and err.rstrip().endswith("a search writes its structure to runs/mine/structure.json")
    bare = tmp_path / "bare.yml"
    bare.write_text("seed: 3\n")
    rc, _, err = run(capsys, "space", bare)
    assert rc == 2 and "pass its model.name_or_path (unset: the embedded tiny-t5)" in err
    broken = tmp_path / "x.json"
    broken.write_text("{")
    rc, _, err = run(capsys, "inspect", broken)
    assert rc == 2 and "looks like a run config" not in err


@pytest.mark.parametrize(
    "nproc, visible, cuda, flags",
    [
        (2, None, True, ["--num_gpus", "2"]),  # nothing set: devices 0..N-1
        (2, "2,3", True, ["--include", "localhost:2,3"]),
        (1, " 5, 7 ", True, ["--include", "localhost:5"]),  # the first N of the visible ones
        (2, "2,3", False, ["--num_gpus", "2"]),  # the CPU accelerator: CUDA_VISIBLE_DEVICES means nothing
    ],
)
def test_nproc_starts_on_the_visible_devices(nproc, visible, cuda, flags):
    """DeepSpeed's launcher ignores CUDA_VISIBLE_DEVICES once --num_gpus is given and starts on
    devices 0..N-1: CUDA_VISIBLE_DEVICES=2,3 s3delta search --nproc 2 ran on GPUs 0 and 1."""
    from s3delta_ds.run.launch import device_selection

    assert device_selection(nproc, visible, cuda) == flags


def test_nproc_refuses_more_ranks_than_visible_devices_before_the_launcher(capsys, tmp_path, monkeypatch):
    import s3delta_ds.run.launch as launch_mod

    started = []
    monkeypatch.setattr(launch_mod.subprocess, "call", lambda cmd, env: started.append(cmd) or 0)
    monkeypatch.setattr(launch_mod, "_cuda", lambda: True)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    rc, _, err = run(capsys, "search", "--nproc", 2, "search.budget=0.02", f"output_dir={tmp_path / 'a'}")
    assert (rc, err) == (0, "")
    assert "--num_gpus" not in started[0] and started[0][started[0].index("--include") + 1] == "localhost:2,3"
    rc, _, err = run(capsys, "search", "--nproc", 3, "search.budget=0.02", f"output_dir={tmp_path / 'b'}")
    assert rc == 2 and len(started) == 1
    assert "error: --nproc 3 but CUDA_VISIBLE_DEVICES=2,3 makes 2 device(s) visible" in err
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-8f1c,GPU-2a9e")
    rc, _, err = run(capsys, "search", "--nproc", 2, "search.budget=0.02", f"output_dir={tmp_path / 'c'}")
    assert rc == 2 and len(started) == 1 and "by UUID or MIG id" in err and "torchrun" in err


def test_nproc_reads_the_users_data_files_before_the_ranks(capsys, tmp_path, launches, monkeypatch):
    """A missing file or column of the user's own data surfaced after ~30 s of launcher start-up."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.csv").write_text("sentence,label\n" + "good film,positive\nbad film,negative\n" * 8)
    (tmp_path / "dev.csv").write_text("sentence,label\n" + "fine,positive\nawful,negative\n" * 4)
    base = ["search", "--nproc", 2, "data.task=custom", "data.template=review: {text}",
            "data.label_words=[negative, positive]", "model.name_or_path=tiny-t5", "search.budget=0.02",
            "data.validation_file=dev.csv"]  # fmt: skip
    rc, _, err = run(capsys, *base, "data.train_file=trian.csv", "output_dir=a")
    assert (rc, launches) == (2, []) and "data.train_file trian.csv does not exist" in err
    rc, _, err = run(capsys, *base, "data.train_file=train.csv", "output_dir=b")
    assert (rc, launches) == (2, []) and "needs a column 'text'" in err, err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    rc, _, err = run(capsys, *base, "data.train_file=train.csv", "data.template=review: {sentence}", "output_dir=c")
    assert (rc, err) == (0, "") and len(launches) == 1


def test_nproc_loads_the_tokenizer_before_the_ranks(capsys, tmp_path, launches, monkeypatch):
    """A hub model whose shapes ship (the preflight passes) but that is not in the local cache,
    offline: each rank said it after ~30 s of launcher start-up."""
    import transformers

    def offline(*a, **k):  # what the hub client raises offline with no local copy (the env is read at import)
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files, and couldn't find them")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", offline)
    monkeypatch.chdir(tmp_path)
    rc, _, err = run(capsys, "search", "--nproc", 2, "model.name_or_path=google/flan-t5-base", "output_dir=a")
    assert (rc, launches) == (2, []) and "cannot load a tokenizer from 'google/flan-t5-base'" in err, err
