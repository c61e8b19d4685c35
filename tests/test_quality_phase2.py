"""benchmarks/quality_phase2.py without training: the plan (paired seeds, manual methods chosen on
validation), the shared queue's locks, and the verdicts and report built from records."""

from __future__ import annotations

import json
import os

import pytest

from benchmarks import quality_phase2 as q2
from benchmarks.quality_launch import Launch, run_resumable
from benchmarks.quality_stats import paired_t_interval, welch_interval
from s3delta_ds.errors import CheckpointError
from s3delta_ds.structure import builders


@pytest.fixture
def phase2(tmp_path, monkeypatch):
    """The runner on the embedded tiny-bert (no assets), writing under tmp_path."""
    plan = builders.Backbone.plan("tiny-bert")
    monkeypatch.setattr(q2, "_plan", lambda: plan)
    monkeypatch.setattr(q2, "P2_OUT", tmp_path / "q2")
    monkeypatch.setattr(q2, "P2_MD", tmp_path / "quality.md")
    monkeypatch.setattr(q2, "P2_NOTES", None)
    monkeypatch.setattr(q2, "P2_TASKS", ("tiny-sentiment",))
    monkeypatch.setattr(q2, "P2_BUDGETS", (0.02,))
    return plan


def _write(u: q2.Unit, **rec):
    u.path.parent.mkdir(parents=True, exist_ok=True)
    base = {"task": u.task, "method": u.kind, "budget": u.budget, "seed": u.seed, "preset": u.preset}
    base.update(trainable_params=100, best_step=50, curve=[], steps=u.steps)
    u.path.write_text(json.dumps({**base, **rec}))


def _searched(task: str, seed: int, budget: float, key: str = "k", **rec):
    """A searched retrain and the search it retrained (today's defaults, the same structure key)."""
    search = {"settings": q2.search_defaults(), "structure": "structures/not-written.json"}
    _write(q2.Unit(task, "search", seed, budget), modules_key=f"{key}{seed}", **search)
    _write(q2.Unit(task, "searched", seed, budget), modules_key=f"{key}{seed}", **rec)


def test_plan_pairs_seeds_and_carries_the_validation_best_manual_methods(phase2):
    cands = q2.manual_candidates(phase2, 0.02)
    assert len(cands) >= 3  # the test needs a choice to make
    absolute = builders.absolute_budget(0.02, phase2.info.num_params)
    assert all(s.budget.used <= absolute for s in cands.values())
    units = q2.units()
    # the convergence check comes first: seed-0 runs twice as long, random at the smallest budget
    assert [(u.kind, u.preset, u.budget, u.steps) for u in units[:3]] == [
        ("curve", "full", None, 2 * q2.P2_STEPS),
        ("curve", "lora", None, 2 * q2.P2_STEPS),
        ("curve", "random", 0.02, 2 * q2.P2_STEPS),
    ]
    # then the references' seeds, which the length check compares the curves with
    assert [(u.kind, u.seed) for u in units[3:9]] == [(m, s) for m in ("full", "lora") for s in q2.P2_SEEDS]
    seeds = lambda kind: [u.seed for u in units if u.kind == kind]  # noqa: E731
    assert seeds("search") == seeds("searched") == seeds("random") == list(q2.P2_PAIRED)
    assert sorted(seeds("full")) == sorted(seeds("lora")) == list(q2.P2_SEEDS)
    screens = [u for u in units if u.kind == "manual" and u.seed == 0]
    assert sorted(u.preset for u in screens) == sorted(cands)
    tops = [u for u in units if u.kind == "manual" and u.seed != 0]
    assert {u.preset for u in tops} == {"top0", "top1"} and not any(q2.ready(u) for u in tops)
    # searched waits for its search
    searched0 = next(u for u in units if u.kind == "searched" and u.seed == 0)
    assert not q2.ready(searched0)
    search0, today = q2.Unit("tiny-sentiment", "search", 0, 0.02), q2.search_defaults()
    _write(search0, steps=q2.P2_STEPS + 1, settings=today)  # made with other lengths
    assert not q2.ready(searched0) and not search0.done()
    _write(search0, settings=today)
    assert q2.ready(searched0)
    # screen scores: validation ranks them one way, test the opposite way; validation decides
    order = sorted(cands)
    for i, preset in enumerate(order):
        _write(q2.Unit("tiny-sentiment", "manual", 0, 0.02, preset), validation=0.5 + 0.01 * i, test=0.9 - 0.01 * i)
    assert q2.ranked_manual("tiny-sentiment", 0.02) == order[::-1]
    tops = [u for u in q2.units() if u.kind == "manual" and u.seed != 0]
    assert {u.preset for u in tops} == set(order[-2:]) and all(q2.ready(u) for u in tops)
    assert len(tops) == 2 * (len(q2.P2_SEEDS) - 1)


def test_a_unit_is_claimed_once_and_a_dead_workers_lock_is_free(phase2):
    u = q2.Unit("tiny-sentiment", "random", 3, 0.02)
    lock = q2._lock_path(u)
    assert q2.claim(u) and not q2.claim(u)  # a second claim (another open file) is refused
    assert q2._held_elsewhere(lock) and lock.read_text().split()[1] == str(q2.os.getpid())
    q2.os.close(q2._HELD.pop(u.key))  # what the kernel does when the holder dies: the file stays
    assert lock.exists() and not q2._held_elsewhere(lock)
    assert q2.claim(u)
    q2.release(u)
    assert not lock.exists() and not q2._HELD


def test_an_unreadable_record_is_not_done_and_the_report_skips_it(phase2):
    u = q2.Unit("tiny-sentiment", "random", 0, 0.02)
    u.path.parent.mkdir(parents=True)
    u.path.write_text('{"steps": 4')  # a crash mid-write
    assert not u.done() and q2._load() == []


def test_a_searched_retrain_of_an_older_search_is_not_done(phase2):
    search, searched = (q2.Unit("tiny-sentiment", k, 0, 0.02) for k in ("search", "searched"))
    _write(search, modules_key="abc", settings=q2.search_defaults())
    _write(searched, modules_key="abc", validation=0.8, test=0.8)
    assert searched.done()
    _write(search, modules_key="def", settings=q2.search_defaults())  # ran again, found another structure
    assert not searched.done()


def test_a_search_made_under_other_defaults_is_not_done(phase2):
    search = q2.Unit("tiny-sentiment", "search", 0, 0.02)
    _write(search, modules_key="abc", settings=q2.search_defaults())
    assert search.done()
    _write(search, modules_key="abc", settings={**q2.search_defaults(), "shift_gradient": "other"})
    assert not search.done()  # a default changed since: the search (and its retrain) reruns
    _write(search, modules_key="abc")  # a record without settings does not count either
    assert not search.done()
    # what a search unit runs with is what done() expects (else the queue would rerun it forever),
    # and the protocol's own keys are the only ones left out
    from s3delta_ds.config import load_run_config

    overrides = q2._overrides("tiny-sentiment", 0, q2.P2_OUT, "search", 4, q2.P2_LR)
    ran = load_run_config(None, [*overrides, "search.budget=0.02"]).search
    assert q2.search_settings(ran) == q2.search_defaults()
    assert {"shift_gradient", "gate_clip", "virtual_step", "weight_decay"} <= set(q2.search_defaults())
    assert not q2.P2_SEARCH_PROTOCOL_KEYS & set(q2.search_defaults())


def test_the_length_check_applies_its_margin_to_the_mean_of_seeds_0_to_2(phase2):
    t = "tiny-sentiment"
    _write(q2.Unit(t, "curve", 0, None, "full"), validation=0.86, test=0.5, best_step=1300)
    _write(q2.Unit(t, "curve", 0, None, "lora"), validation=0.84, test=0.5, best_step=1300)
    for seed, score in enumerate((0.80, 0.81, 0.82)):
        _write(q2.Unit(t, "full", seed), validation=score, test=0.5)
    for seed in (0, 1):  # LoRA's third seed has not run yet
        _write(q2.Unit(t, "lora", seed), validation=0.83, test=0.5, best_step=q2.P2_STEPS)
    lines = {line.split(" | ")[1]: line for line in q2.report().splitlines() if line.startswith(f"| {t} | ")}
    assert "| 86.0 (1300) | 81.0 (n=3) | +5.0 | **no** | 0/3 |" in lines["full"]
    assert "| 84.0 (1300) | 83.0 (n=2) | +1.0 | yes (so far) | 2/2 |" in lines["lora"]


def _checkpoint(work, step: int) -> None:
    ckpt = work / "run" / "checkpoints" / f"step-{step:08d}"
    ckpt.mkdir(parents=True)
    (ckpt / "COMPLETE").write_text("{}")


def test_a_killed_unit_continues_from_its_checkpoint_only_under_the_same_inputs(phase2, tmp_path):
    work, structure = tmp_path / "unit", tmp_path / "s.json"
    builders.manual(phase2, "lora").save(structure)
    overrides = q2._overrides("tiny-sentiment", 0, work / "run", "retrain", 4, 1e-3)
    first = Launch.begin(work, overrides, structure)
    assert not first.resume and first.launches == 1 and first.run_dir == work / "run"
    assert not Launch.begin(work, overrides, structure).resume  # killed before its first checkpoint
    _checkpoint(work, 2)
    # the earlier launch's time counts up to the checkpoint the next one continues from
    meta = json.loads((work / "unit.json").read_text())
    meta.update(start=1000.0, spent_s=5.0)
    (work / "unit.json").write_text(json.dumps(meta))
    os.utime(work / "run" / "checkpoints" / "step-00000002" / "COMPLETE", (1030.0, 1030.0))
    again = Launch.begin(work, overrides, structure)
    assert again.resume and again.launches == 2 and again.spent_s == 35.0
    assert (work / "run" / "checkpoints").is_dir()  # continued in place, nothing deleted
    # another protocol, a package default that changed since, a structure a newer search replaced,
    # a unit.json of an older runner: the unit starts over
    meta = json.loads((work / "unit.json").read_text())
    meta["inputs"]["config"]["retrain"]["weight_decay"] += 0.1
    changes = [
        ("overrides", q2._overrides("tiny-sentiment", 0, work / "run", "retrain", 8, 1e-3)),
        ("unit.json", json.dumps(meta)),
        ("structure", "bitfit"),
        ("unit.json", '{"spent_s": 0, "launches": 1, "start": 0}'),
    ]
    for what, change in changes:
        builders.manual(phase2, "lora").save(structure)
        Launch.begin(work, overrides, structure, fresh=True)
        _checkpoint(work, 2)
        assert Launch.begin(work, overrides, structure).resume  # unchanged: it would continue
        if what == "unit.json":
            (work / "unit.json").write_text(change)
        elif what == "structure":
            builders.manual(phase2, change).save(structure)
        fresh = Launch.begin(work, change if what == "overrides" else overrides, structure)
        assert not fresh.resume and fresh.launches == 1 and not (work / "run").exists(), what


def test_a_checkpoint_the_package_cannot_load_starts_the_unit_over_once(phase2, tmp_path):
    work = tmp_path / "unit"
    overrides = q2._overrides("tiny-sentiment", 0, work / "run", "retrain", 4, 1e-3)
    calls = []

    def run(cfg, resume):
        calls.append(resume)
        if resume:
            raise CheckpointError("trains other parameters than this run")
        return {"steps": cfg.retrain.steps}

    Launch.begin(work, overrides)
    _checkpoint(work, 2)
    launch, summary = run_resumable(run, work, overrides)
    assert calls == [True, False] and summary == {"steps": 4}
    assert not launch.resume and launch.launches == 1 and not (work / "run" / "checkpoints").exists()
    with pytest.raises(CheckpointError):  # a fresh run's own error is the unit's failure
        run_resumable(lambda cfg, resume: run(cfg, True), work, overrides)


def test_verdicts_use_test_scores_paired_by_seed_and_the_validation_best_manual(phase2):
    t, b = "tiny-sentiment", 0.02
    searched = [0.84, 0.82, 0.85, 0.83, 0.86]
    random_ = [0.80, 0.81, 0.80, 0.79, 0.82]
    for s in q2.P2_PAIRED:
        _searched(t, s, b, validation=0.8, test=searched[s], params_used=90)
        _write(q2.Unit(t, "random", s, b), validation=0.8, test=random_[s], params_used=95)
    # the screen ranks lnfit and lora first on validation (the others far behind on validation,
    # far ahead on test); of those two, lnfit is better on validation, lora on test: lnfit it is
    for preset in q2.manual_candidates(phase2, b):
        if preset not in ("lnfit", "lora"):
            _write(q2.Unit(t, "manual", 0, b, preset), validation=0.5, test=0.99, params_used=80)
    for s in q2.P2_SEEDS:
        _write(q2.Unit(t, "manual", s, b, "lnfit"), validation=0.83, test=0.78 + 0.01 * s, params_used=80)
        _write(q2.Unit(t, "manual", s, b, "lora"), validation=0.81, test=0.90, params_used=80)
        _write(q2.Unit(t, "full", s), validation=0.9, test=0.88)
    rows = [r for r in q2._load() if r["method"] != "search"]
    v = q2.cell_verdicts(rows, t, b)
    assert v["best_manual"] == "lnfit" and v["seeds"] == list(q2.P2_PAIRED)
    assert v["vs_random"] == paired_t_interval(searched, random_) and v["vs_random"].win
    assert v["vs_manual"] == welch_interval(searched, [0.78, 0.79, 0.80]) and v["vs_manual"].win
    text = q2.report()
    assert text == (q2.P2_MD).read_text()
    row = next(line for line in text.splitlines() if line.startswith(f"| {t} @ 0.02 |"))
    assert "| lnfit |" in row and row.count("**win**") == 2
    assert f"{100 * sum(searched) / 5 / 0.88:.1f}%" in row  # searched / full fine-tuning
    # a search rerun (another structure) takes its old retrain out of the verdicts until redone
    _write(q2.Unit(t, "search", 4, b), settings=q2.search_defaults(), modules_key="other", structure="x.json")
    v = q2.cell_verdicts([r for r in q2._load() if r["method"] != "search"], t, b)
    assert v["seeds"] == [0, 1, 2, 3] and not v["complete"] and not v["searched_complete"]
    row = next(line for line in q2.report().splitlines() if line.startswith(f"| {t} @ 0.02 |"))
    assert "**" not in row and row.count("pending (4 of 5 seeds)") == 2, row


def test_a_searched_retrain_leaves_the_verdicts_with_its_search_when_the_defaults_change(phase2, monkeypatch):
    t, b = "tiny-sentiment", 0.02
    for s in q2.P2_PAIRED:
        _searched(t, s, b, validation=0.8, test=0.85 + 0.01 * s)
        _write(q2.Unit(t, "random", s, b), validation=0.8, test=0.80)
    assert q2.cell_verdicts(q2._load(), t, b)["vs_random"].win
    changed = {**q2.search_defaults(), "shift_gradient": "other"}
    monkeypatch.setattr(q2, "search_defaults", lambda: changed)
    # every search now reruns; their retrains, still of the same structures, must not stay in
    assert not q2.Unit(t, "searched", 0, b).done()
    assert [r["method"] for r in q2._load()] == ["random"] * len(q2.P2_PAIRED)
    row = next(line for line in q2.report().splitlines() if line.startswith(f"| {t} @ 0.02 |"))
    assert "**" not in row and row.split("|")[2].strip() == "—", row


def test_a_non_finite_score_is_named_and_its_cell_stays_pending(phase2):
    t, b = "tiny-sentiment", 0.02
    for s in q2.P2_PAIRED:
        _searched(t, s, b, validation=0.8, test=0.85 + 0.01 * s)
        _write(q2.Unit(t, "random", s, b), validation=0.8, test=0.80)
    bad = q2.Unit(t, "random", 3, b)
    bad.path.write_text(bad.path.read_text().replace('"test": 0.8', '"test": NaN'))
    failed: list[str] = []
    assert bad.key not in {q2.Unit(r["task"], r["method"], r["seed"], r["budget"]).key for r in q2._load(failed)}
    assert failed == [bad.key]
    text = q2.report()  # before: statistics.mean raised on the NaN and the report went stale
    row = next(line for line in text.splitlines() if line.startswith(f"| {t} @ 0.02 |"))
    assert "pending (4 of 5 seeds)" in row and "**win**" not in row
    assert f"non-finite score, left out (their cells stay pending): {bad.key}." in text


def test_a_record_outside_the_plan_changes_no_table(phase2):
    t, b = "tiny-sentiment", 0.02
    for s in q2.P2_PAIRED:
        _searched(t, s, b, validation=0.8, test=0.85 + 0.01 * s)
        _write(q2.Unit(t, "random", s, b), validation=0.8, test=0.80)
    before = q2.report()
    stray = max(q2.P2_PAIRED) + 1  # e.g. a seed run by hand, or left from a larger plan
    _searched(t, stray, b, validation=0.8, test=0.10)
    _write(q2.Unit(t, "random", stray, b), validation=0.8, test=0.99)
    assert q2.report() == before
    assert {r["seed"] for r in q2._load()} == set(q2.P2_PAIRED)


def test_the_report_says_which_verdicts_survive_the_number_of_comparisons(phase2):
    t, b = "tiny-sentiment", 0.02
    clear = [0.84, 0.85, 0.86, 0.85, 0.84]  # +4 to +6 points: holds at any of these confidences
    for s in q2.P2_PAIRED:
        _searched(t, s, b, validation=0.8, test=clear[s])
        _write(q2.Unit(t, "random", s, b), validation=0.8, test=0.80)
    text = q2.report()
    assert "makes 2 such comparisons" in text and "97.50% intervals" in text
    assert f"these hold: {t} @ 0.02 vs random: " in text
    # a difference of a 95% win that a 97.5% interval no longer clears
    barely = [0.80, 0.84, 0.82, 0.83, 0.81]  # differences 0-4 points: mean 2, sd 1.58
    for s in q2.P2_PAIRED:
        _searched(t, s, b, validation=0.8, test=barely[s])
    assert paired_t_interval(barely, [0.80] * 5).win
    assert not paired_t_interval(barely, [0.80] * 5, 0.975).win
    text = q2.report()
    assert "**win**" in text and "of the 1 complete comparisons none is a win or a loss." in text


@pytest.fixture
def my_reviews(tmp_path, monkeypatch):
    """Your own data: the tiny sentiment rows as files, and a task file that names them relative to
    the current directory."""
    import shutil

    from .launching import ROOT

    shutil.copytree(ROOT / "s3delta_ds" / "assets" / "tiny" / "data", tmp_path / "data")
    (tmp_path / "my-reviews.yaml").write_text(_MY_REVIEWS)
    monkeypatch.chdir(tmp_path)
    for name in ("P2_TASKS", "P2_BUDGETS", "P2_OUT", "P2_MD", "P2_NOTES", "P2_TASK_DATA", "P2_ARGS"):
        monkeypatch.setattr(q2, name, getattr(q2, name))  # use_tasks rebinds them: restore after the test
    return tmp_path


def test_a_task_file_runs_the_protocol_on_your_data(phase2, my_reviews):
    from s3delta_ds.config import load_run_config
    from s3delta_ds.data.tasks import resolve_task

    q2.use_tasks(["my-reviews.yaml", "tiny-sentiment"], [0.02, 0.01], my_reviews / "study")
    assert (q2.P2_TASKS, q2.P2_BUDGETS) == (("my-reviews", "tiny-sentiment"), (0.02, 0.01))
    assert (q2.P2_OUT, q2.P2_MD, q2.P2_NOTES) == (my_reviews / "study", my_reviews / "study.md", None)
    cells = {u.cell for u in q2.units() if u.budget is not None}
    assert cells == {f"{t}@{b}" for t in q2.P2_TASKS for b in ("0.02", "0.01")}
    assert all(u.path.is_relative_to(my_reviews / "study") for u in q2.units())

    mine = load_run_config(None, q2._overrides("my-reviews", 3, my_reviews / "run", "retrain", 4, q2.P2_LR)).data
    assert mine.task == "custom" and mine.template == "review: {sentence}"
    assert mine.label_words == ["negative", "positive"]
    assert mine.train_file == str(my_reviews / "data" / "train.jsonl")  # absolute: any worker's cwd reads it
    assert mine.max_eval_examples == q2.P2_VAL and mine.split_seed == 0  # the protocol's, not the file's
    assert mine.max_source_length == 32  # the task's own length
    assert resolve_task(mine).label_words == ("negative", "positive")
    named = load_run_config(None, q2._overrides("tiny-sentiment", 3, my_reviews / "run", "retrain", 4, q2.P2_LR))
    assert named.data.task == "tiny-sentiment" and named.data.max_source_length == q2.P2_SOURCE_LENGTH


@pytest.mark.parametrize(
    ("spec", "error", "names"),
    [
        ("no-such-task", "ConfigError", "unknown task 'no-such-task'"),
        ("gone.yaml", "ConfigError", "cannot read config gone.yaml"),
        ("no-task.yaml", "ConfigError", "task file no-task.yaml: its data section names no task"),
        ("typo.yaml", "ConfigError", "task file typo.yaml"),
        ("missing-file.yaml", "DataError", "nope.jsonl"),
        ("no-template.yaml", "ConfigError", "data.template"),
    ],
)
def test_a_bad_task_names_the_problem_before_anything_trains(phase2, my_reviews, spec, error, names):
    from s3delta_ds.errors import S3DeltaError

    (my_reviews / "no-task.yaml").write_text("data:\n  max_source_length: 32\n")
    (my_reviews / "typo.yaml").write_text(_MY_REVIEWS.replace("template:", "templat:"))
    (my_reviews / "missing-file.yaml").write_text(_MY_REVIEWS.replace("data/test.jsonl", "data/nope.jsonl"))
    (my_reviews / "no-template.yaml").write_text(_MY_REVIEWS.replace('  template: "review: {sentence}"\n', ""))
    with pytest.raises(S3DeltaError) as info:
        q2.use_tasks([spec], None, my_reviews / "study")
    assert type(info.value).__name__ == error and names in str(info.value)
    assert q2.P2_TASKS == ("tiny-sentiment",)  # nothing changed


@pytest.mark.parametrize(
    "template,words",
    [
        ("😀 {sentence}", ["négatif", "😀"]),
        ("a=b: {sentence} # c", ["no", "true"]),
        ("naïve\u2028{sentence}", ["yes", "null"]),
        ("{sentence}", ["1e3", "2020-01-01"]),
    ],
)
def test_a_task_files_values_reach_the_run_exactly(phase2, my_reviews, template, words):
    """Templates and label words that YAML or JSON would turn into something else (a number, a
    boolean, a date, a mapping, two surrogates) arrive in the run's config as written."""
    import yaml

    from s3delta_ds.config import load_run_config

    body = yaml.safe_load(_MY_REVIEWS)
    body["data"].update(template=template, label_words=words, columns=["sentence"])
    (my_reviews / "odd.yaml").write_text(yaml.safe_dump(body, allow_unicode=True), encoding="utf-8")
    q2.use_tasks(["odd.yaml"], None, my_reviews / "study")
    data = load_run_config(None, q2._overrides("odd", 0, my_reviews / "run", "retrain", 4, q2.P2_LR)).data
    assert (data.template, data.label_words) == (template, words)


def test_a_changed_task_file_reruns_its_units_and_the_default_study_is_untouched(phase2, my_reviews):
    u = q2.Unit("tiny-sentiment", "full", 0)
    _write(u, validation=0.8, test=0.7)  # a record of the registered task, as the project's study writes them
    assert u.done() and "data.task=tiny-sentiment" in q2._overrides(u.task, 0, my_reviews, "retrain", 4, 0.1)

    q2.use_tasks(["my-reviews.yaml"], None, my_reviews / "study")
    mine = q2.Unit("my-reviews", "full", 0)
    _write(mine, validation=0.8, test=0.7, task_data=q2._task_data("my-reviews"))
    assert mine.done()
    (my_reviews / "my-reviews.yaml").write_text(_MY_REVIEWS.replace("review:", "critique:"))
    q2.use_tasks(["my-reviews.yaml"], None, my_reviews / "study")
    assert not mine.done()  # made with the old template


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--tasks", "tiny-sentiment", "--budgets", "1e-3,x", "--out", "s"], "--budgets takes numbers"),
        (["--budgets", "0", "--out", "s"], "budgets are fractions of the backbone in (0, 1)"),
        (["--tasks", "structures.yaml", "--out", "s"], "'structures' cannot label a task"),
        (["--out", "PROJECT"], "cannot write into, or around, the project's records"),
        (["--out", "PROJECT/mine"], "cannot write into, or around, the project's records"),
        (["--out", "RESULTS"], "cannot write into, or around, the project's records"),
    ],
)
def test_the_command_line_refuses_a_study_that_would_mix_with_the_projects(phase2, my_reviews, capsys, argv, message):
    from benchmarks import quality

    (my_reviews / "structures.yaml").write_text(_MY_REVIEWS)
    own = q2._PROJECT_OUT
    argv = [a.replace("PROJECT", str(own)).replace("RESULTS", str(own.parent)) for a in argv]
    with pytest.raises(SystemExit) as info:
        quality.main(["--phase", "2", *argv, "--report"])
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_another_study_has_its_own_scratch_folder(phase2, my_reviews, monkeypatch):
    from benchmarks import quality

    works = []
    monkeypatch.setattr(q2, "run_phase2", lambda work, kinds=None: works.append(work))
    monkeypatch.setattr(q2, "report", lambda: "")
    for out in ("a", "b", "a"):
        quality.main(["--phase", "2", "--tasks", "my-reviews.yaml", "--out", out])
    assert works[0] == works[2] != works[1] and str(works[0]).startswith("/tmp/s3delta-quality-phase2-")


def test_the_command_line_keeps_another_study_out_of_the_projects_results(phase2, my_reviews, capsys):
    from benchmarks import quality

    with pytest.raises(SystemExit) as info:
        quality.main(["--phase", "2", "--tasks", "my-reviews.yaml", "--report"])
    assert info.value.code == 2 and "needs --out DIR" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        quality.main(["--phase", "2", "--tasks", "no-such-task", "--out", "x", "--report"])
    assert info.value.code == 2 and "unknown task 'no-such-task'" in capsys.readouterr().err
    assert quality.main(["--phase", "2", "--tasks", "my-reviews.yaml", "--out", "study", "--report"]) == 0
    text = (my_reviews / "study.md").read_text()
    assert "Tasks: my-reviews; budgets: 0.02." in text and "Progress: 0 of" in text
    assert not (my_reviews / "study").exists() or not list((my_reviews / "study").rglob("*.json"))


_INTERRUPTED = """
import json, sys
from pathlib import Path
from benchmarks import quality_phase2 as q2
from benchmarks.quality import Setup
from s3delta_ds.recipes import retrain, search

out = Path(sys.argv[1])
q2.SETUPS = {"minilm": Setup("tiny-bert", steps=0, batch=0, eval_every=0, val=0, test=0, lr=0, full_lr=0)}
q2.P2_OUT, q2.P2_MD, q2.P2_NOTES = out / "q2", out / "quality.md", None
q2.P2_STEPS, q2.P2_EVAL_EVERY, q2.P2_VAL, q2.P2_BATCH = 6, 2, 16, 4


def killed_at(module, step):
    # the launch dies just before its checkpoint at `step`: the rows of the steps since the last
    # checkpoint are written, their checkpoint is not
    real = module.save_run_checkpoint

    def save(engine, root, at, *a, **k):
        if at == step:
            module.save_run_checkpoint = real
            raise KeyboardInterrupt
        return real(engine, root, at, *a, **k)

    module.save_run_checkpoint = save


recs = {}
for kind, module in (("search", search), ("random", retrain)):
    u = q2.Unit("tiny-sentiment", kind, 0, 0.02)
    ref = q2.run_unit(u, out / f"{kind}-reference")
    killed_at(module, 4)
    try:
        q2.run_unit(u, out / kind)
        raise SystemExit("the launch was not interrupted")
    except KeyboardInterrupt:
        pass
    recs[kind] = [ref, q2.run_unit(u, out / kind)]
print(json.dumps(recs))
"""


@pytest.mark.slow
def test_an_interrupted_unit_resumes_to_the_uninterrupted_record(tmp_path):
    """A search and a retrain killed between two checkpoints continue from the first and record
    what runs that were never interrupted record: the same curve (one row per evaluation), step,
    scores and structure."""
    import subprocess
    import sys

    from .launching import ROOT, env

    proc = subprocess.run(
        [sys.executable, "-c", _INTERRUPTED, str(tmp_path)],
        cwd=ROOT,
        env=env({"PYTHONPATH": str(ROOT)}),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "continuing from step-00000002 (launch 2)" in proc.stdout
    for kind, keys in (
        ("search", ("supernet_curve", "selected_step", "modules_key", "params_used")),
        ("random", ("curve", "best_step", "validation", "test", "test_all", "modules_key")),
    ):
        ref, resumed = recs[kind]
        assert (resumed["launches"], ref["launches"]) == (2, 1), kind
        for key in keys:
            assert _flat(resumed[key]) == pytest.approx(_flat(ref[key]), abs=1e-6), (kind, key)
    assert [step for step, *_ in recs["random"][1]["curve"]] == [2, 4, 6]


def _flat(value) -> list:
    if isinstance(value, dict):
        return [x for k in sorted(value) for x in [k, *_flat(value[k])]]
    if isinstance(value, list):
        return [x for v in value for x in _flat(v)]
    return [value]


_END_TO_END = """
import os, sys
from pathlib import Path
from benchmarks import quality, quality_phase2 as q2
from benchmarks.quality import Setup

out = Path(sys.argv[1])
q2.SETUPS = {"minilm": Setup("tiny-bert", steps=0, batch=0, eval_every=0, val=0, test=0, lr=0, full_lr=0)}
q2.P2_PAIRED, q2.P2_SEEDS = (0, 1), (0, 1)
q2.P2_STEPS, q2.P2_CURVE_STEPS, q2.P2_EVAL_EVERY, q2.P2_VAL, q2.P2_BATCH = 4, 8, 2, 16, 4
q2.manual_candidates = lambda plan, budget, f=q2.manual_candidates: dict(list(f(plan, budget).items())[:3])
os.chdir(out)  # the task file's data paths are relative to where the command runs
argv = ["--phase", "2", "--tasks", "my-reviews.yaml", "--budgets", "0.02", "--out", "q2", "--work", "work"]
sys.exit(quality.main(argv))
"""

_MY_REVIEWS = """
data:
  task: custom
  train_file: data/train.jsonl
  validation_file: data/validation.jsonl
  test_file: data/test.jsonl
  template: "review: {sentence}"
  label_words: [negative, positive]
  max_source_length: 32
  max_eval_examples: 1000   # the protocol's own cap wins
search:
  steps: 7                  # other sections are ignored
"""


@pytest.mark.slow
def test_phase2_runs_every_kind_of_unit_end_to_end(tmp_path):
    """Every unit kind trains for real (tiny-bert, 4 steps) on your own data (a task file with
    relative paths, through the command line), records validation and test, and the report reads
    them; rerunning skips everything."""
    import shutil
    import subprocess
    import sys

    from .launching import ROOT, env

    shutil.copytree(ROOT / "s3delta_ds" / "assets" / "tiny" / "data", tmp_path / "data")
    (tmp_path / "my-reviews.yaml").write_text(_MY_REVIEWS)
    proc = subprocess.run(
        [sys.executable, "-c", _END_TO_END, str(tmp_path)],
        cwd=ROOT,
        env=env({"PYTHONPATH": str(ROOT)}),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = [json.loads(p.read_text()) for p in (tmp_path / "q2").rglob("*.json") if "structures" not in p.parts]
    kinds = sorted({r["method"] for r in recs})
    assert kinds == ["curve", "full", "lora", "manual", "random", "search", "searched"]
    assert {r["task"] for r in recs} == {"my-reviews"}
    for r in recs:
        if r["method"] != "search":
            assert 0 <= r["test"] <= 1 and 0 <= r["validation"] <= 1
            assert r["curve"][-1][0] == r["steps"] == (8 if r["method"] == "curve" else 4)
    # 2 tops x 1 extra seed, chosen among the 3 screened presets
    assert len([r for r in recs if r["method"] == "manual"]) == 3 + 2
    text = (tmp_path / "q2.md").read_text()
    assert "| my-reviews @ 0.02 |" in text and "| my-reviews | random @0.02 |" in text
    assert "--phase 2 --tasks my-reviews.yaml --budgets 0.02 --out" in text
    assert (tmp_path / "q2-curves-my-reviews.png").exists()
    assert not list((tmp_path / "q2" / ".locks").iterdir())
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "q2").rglob("*.json")}
    again = subprocess.run(
        [sys.executable, "-c", _END_TO_END, str(tmp_path)],
        cwd=ROOT,
        env=env({"PYTHONPATH": str(ROOT)}),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert "[phase2]" not in again.stdout
    assert before == {p: p.stat().st_mtime_ns for p in (tmp_path / "q2").rglob("*.json")}
