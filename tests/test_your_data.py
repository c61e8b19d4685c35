"""docs/your-data.md, executed: its bash block (CSV → search → transfer → retrain → merged model, no
Python) and its Python block, exactly as written, on the embedded tiny models."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest

from .launching import env

DOC = Path(__file__).parents[1] / "docs" / "your-data.md"


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", DOC.read_text(), flags=re.S)


def _write_csvs(where: Path) -> None:
    """The user's files, from the shipped tiny-sentiment rows: label words as labels in train,
    class ids in dev (both forms are accepted)."""
    data = resources.files("s3delta_ds") / "assets" / "tiny" / "data"
    words = ("negative", "positive")
    for split, name, limit, as_words in (("train", "train.csv", 400, True), ("validation", "dev.csv", 120, False)):
        rows = [json.loads(line) for line in (data / f"{split}.jsonl").read_text().splitlines()][:limit]
        with open(where / name, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["text", "label"])
            for r in rows:
                w.writerow([r["sentence"], words[r["label"]] if as_words else r["label"]])


def _bin_env() -> dict:
    e = env()
    e["PATH"] = f"{Path(sys.executable).parent}:{e['PATH']}"  # the venv's s3delta
    return e


@pytest.mark.distributed
def test_the_walkthrough_commands_run_as_written(tmp_path):
    _write_csvs(tmp_path)
    (bash,) = _blocks("bash")
    proc = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", bash],
        cwd=tmp_path,
        env=_bin_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    summary = json.loads((tmp_path / "runs" / "retrain" / "summary.json").read_text())
    assert summary["task"] == "custom" and 0.0 <= summary["test_score"] <= 1.0
    structure = json.loads((tmp_path / "big.json").read_text())
    assert structure["backbone"]["name_or_path"] == "tiny-t5-v1_1"
    assert (tmp_path / "merged" / "config.json").is_file()
    check = (
        "import sys, transformers; m = transformers.AutoModelForSeq2SeqLM.from_pretrained('merged'); "
        "assert not any(k.startswith('s3delta_ds') for k in sys.modules); print(type(m).__name__)"
    )
    out = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, env=env(), capture_output=True, text=True)
    assert out.returncode == 0 and "T5ForConditionalGeneration" in out.stdout, out.stderr[-2000:]


@pytest.mark.slow
def test_the_python_block_runs_as_written(tmp_path):
    _write_csvs(tmp_path)
    (code,) = _blocks("python")[:1]
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=_bin_env(), capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    score = float(proc.stdout.strip().splitlines()[-1])
    assert 0.0 <= score <= 1.0
    assert (tmp_path / "py" / "retrain" / "deltas.safetensors").is_file()


@pytest.mark.slow
def test_a_data_error_leaves_nothing_the_fixed_rerun_would_refuse(tmp_path):
    """A first run with a label the label words do not have stops with the row named and claims
    no output directory, so the same command succeeds once the file is fixed."""
    _write_csvs(tmp_path)
    dev = tmp_path / "dev.csv"
    good = dev.read_text()
    dev.write_text(good.splitlines()[0] + "\nan odd row,neutral\n" + "\n".join(good.splitlines()[1:]) + "\n")
    cmd = [
        "s3delta", "search", "--nproc", "1", "data.task=custom", "data.train_file=train.csv",
        "data.validation_file=dev.csv", "data.template=review: {text}", "data.label_words=[negative, positive]",
        "model.name_or_path=tiny-t5", "search.steps=2", "search.eval_every=2", "search.budget=0.02",
        "data.max_eval_examples=16", "output_dir=runs/search",
    ]  # fmt: skip
    bad = subprocess.run(cmd, cwd=tmp_path, env=_bin_env(), capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2, bad.stderr[-3000:]
    assert "dev.csv data row 1 (line 2): label 'neutral'" in bad.stderr, bad.stderr[-3000:]
    assert not (tmp_path / "runs" / "search").exists() or not any((tmp_path / "runs" / "search").iterdir())
    dev.write_text(good)
    ok = subprocess.run(cmd, cwd=tmp_path, env=_bin_env(), capture_output=True, text=True, timeout=600)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert (tmp_path / "runs" / "search" / "structure.json").is_file()


@pytest.mark.slow
def test_a_model_that_fails_to_load_gives_its_output_directory_back(tmp_path):
    """A checkpoint that fails only when its weights are read (after the directory was claimed):
    the claim is given back, so the rerun with a good checkpoint is not refused as "not empty"."""
    import torch

    from s3delta_ds.backbones.loading import build_model, load_config

    torch.manual_seed(0)
    build_model(load_config("tiny-t5")).save_pretrained(tmp_path / "model")
    weights = tmp_path / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # a cut download
    cmd = [
        "s3delta", "search", "model.name_or_path=model", "model.tokenizer=tiny-t5", "data.task=tiny-sentiment",
        "search.steps=2", "search.eval_every=2", "search.budget=0.02", "data.max_eval_examples=16", "output_dir=run",
    ]  # fmt: skip
    bad = subprocess.run(cmd, cwd=tmp_path, env=_bin_env(), capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir()), list((tmp_path / "run").iterdir())


@pytest.mark.slow
def test_a_setup_that_fails_after_the_model_loads_gives_its_output_directory_back(tmp_path):
    """A global batch the data cannot fill is found after the model loads and the configs are
    written: the directory is given back whole, and the rerun with a batch that fits is not refused."""
    _write_csvs(tmp_path)
    cmd = [
        "s3delta", "search", "data.task=custom", "data.train_file=train.csv", "data.validation_file=dev.csv",
        "data.template=review: {text}", "data.label_words=[negative, positive]", "model.name_or_path=tiny-t5",
        "search.steps=2", "search.eval_every=2", "search.budget=0.02", "data.max_train_examples=64",
        "data.max_eval_examples=16", "output_dir=run",
    ]  # fmt: skip
    bad = subprocess.run([*cmd, "search.micro_batch_size=100"], cwd=tmp_path, env=_bin_env(), capture_output=True,
                         text=True, timeout=600)  # fmt: skip
    assert bad.returncode == 2 and "cannot fill one global batch" in bad.stderr, bad.stderr[-3000:]
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir()), list((tmp_path / "run").iterdir())
    ok = subprocess.run(cmd, cwd=tmp_path, env=_bin_env(), capture_output=True, text=True, timeout=600)
    assert ok.returncode == 0, ok.stderr[-3000:]
