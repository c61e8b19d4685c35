"""Turn task rows into token ids for the three objectives, and pad them into batches.

* ``seq2seq`` (T5): source → encoder, label word (+ eos) → decoder targets.
* ``causal`` (LLaMA): ``source + " " + word + eos`` with the loss only on the word and eos; the
  word's tokens are those it becomes *after a prompt and a space* (:func:`continuation_ids`).
* ``classify`` (BERT): source → encoder, integer label → classification head.

Every example also carries one encoded *choice* per label word, so evaluation can score each
label (rank classification): a fixed number of forward passes, the same on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

import torch

from ..errors import DataError
from .task import Task

OBJECTIVES = {"t5": "seq2seq", "llama": "causal", "bert": "classify"}
_EMBEDDED_TOKENIZERS = {"tiny-t5": "t5", "tiny-t5-v1_1": "t5", "tiny-llama": "llama", "tiny-bert": "bert"}


def load_tokenizer(family: str, name_or_path: str, tokenizer: str | None = None, gguf_file: str | None = None):
    """The tokenizer of a model directory / hub id, or the embedded one for ``tiny-*`` defaults."""
    from transformers import AutoTokenizer, BertTokenizer, LlamaTokenizer, T5Tokenizer

    source = tokenizer or name_or_path
    embedded = _EMBEDDED_TOKENIZERS.get(source)
    if embedded is not None:
        path = str(resources.files("s3delta_ds") / "assets" / "tiny" / embedded)
        if embedded == "t5":
            return T5Tokenizer.from_pretrained(path, extra_ids=0)
        if embedded == "llama":
            tok = LlamaTokenizer.from_pretrained(path, add_bos_token=True)
            tok.pad_token = tok.unk_token
            return tok
        return BertTokenizer.from_pretrained(path)
    kwargs = {"gguf_file": gguf_file} if gguf_file and tokenizer is None else {}  # model.tokenizer: its own files
    _check_has_tokenizer_files(source, gguf=bool(kwargs))
    try:
        tok = AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot load a tokenizer from {source!r}: {e}{_shape_hint(family, source)}") from e
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


#: Files a tokenizer is built from (any one is enough for AutoTokenizer).
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
    "vocab.txt", "vocab.json", "tekken.json",
)  # fmt: skip


def _check_has_tokenizer_files(source: str, *, gguf: bool) -> None:
    """A model directory without tokenizer files: transformers builds an empty-vocabulary tokenizer
    from its config.json alone, and the run failed later on "label words become the same tokens"."""
    from pathlib import Path

    path = Path(source).expanduser()
    if gguf or not path.is_dir() or any((path / name).is_file() for name in TOKENIZER_FILES):
        return
    raise DataError(
        f"{source} holds no tokenizer ({', '.join(TOKENIZER_FILES[:4])}, ...): copy the model's tokenizer files "
        "there, or name a tokenizer directory with model.tokenizer=DIR"
    )


def _shape_hint(family: str, source: str) -> str:
    """Why a shipped shape name (config only, random weights) has no tokenizer offline, and the fix."""
    from pathlib import Path

    from ..backbones.loading import builtin_shapes

    # short shape names only: a hub id ("google/flan-t5-xxl") is also a shape's alias, but it names
    # a real model whose tokenizer simply is not cached here
    if "/" in source or Path(source).exists() or source not in builtin_shapes():
        return ""
    tiny = next((k for k, v in _EMBEDDED_TOKENIZERS.items() if v == family), None)
    embedded = f", or model.tokenizer={tiny} for the embedded test tokenizer (a systems run only)" if tiny else ""
    return (
        f"\n{source!r} is a shipped config-only shape: its weights are random and only its tokenizer "
        f"would come from the hub. Offline, pass model.tokenizer=DIR (a local tokenizer directory){embedded}"
    )


@dataclass(frozen=True)
class Encoder:
    """Encodes rows of one task for one objective."""

    task: Task
    tokenizer: object
    objective: str
    max_source_length: int
    max_target_length: int

    def _ids(self, text: str, max_len: int) -> list[int]:
        return self.tokenizer(text, truncation=True, max_length=max_len)["input_ids"]

    def _choice(self, source_ids: list[int], word: str) -> dict:
        if self.objective == "seq2seq":
            return {"input_ids": source_ids, "labels": self._ids(word, self.max_target_length)}
        # causal: prompt + word + eos, loss on word and eos only
        word_ids = continuation_ids(self.tokenizer, word, self.max_target_length) + [self.tokenizer.eos_token_id]
        return {"input_ids": source_ids + word_ids, "labels": [-100] * len(source_ids) + word_ids}

    def encode(self, row: dict) -> dict:
        label = row[self.task.label_column]
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(self.task.label_words):
            raise DataError(
                f"task {self.task.name!r}: label {label!r} is not an integer in [0, {len(self.task.label_words)})"
            )
        source_ids = self._ids(self.task.source(row), self.max_source_length)
        if self.objective == "classify":
            return {"input_ids": source_ids, "label": label, "choices": None}
        choices = [self._choice(source_ids, w) for w in self.task.label_words]
        return {**choices[label], "label": label, "choices": choices}


_ANCHOR = "a"  # any short text that ends at a word boundary


def continuation_ids(tokenizer, word: str, max_len: int) -> list[int]:
    """The tokens ``word`` adds after a prompt and one space, cut to ``max_len``.

    Tokenising ``" " + word`` on its own is not that for every tokenizer. A legacy SentencePiece
    ``tokenizer.json`` (LLaMA-2 and Mistral fine-tunes saved without their tokenizer class, which
    transformers then loads as a generic fast tokenizer) prepends ``▁`` and turns the space into a
    second one: ``" positive"`` becomes ``["▁", "▁positive"]``, a token pair the model never sees
    after a prompt, trained on and scored as part of the label. Encoding an anchor word, a space
    and the word, then dropping the anchor's tokens, gives the word as it reads in context with
    every tokenizer whose pieces do not cross a space (all of them here). Where the anchor's tokens
    are not a prefix of the joint encoding, the plain ``" " + word`` encoding is the fallback.
    """
    anchor = tokenizer(_ANCHOR, add_special_tokens=False)["input_ids"]
    joint = tokenizer(f"{_ANCHOR} {word}", add_special_tokens=False)["input_ids"]
    if anchor and len(joint) > len(anchor) and joint[: len(anchor)] == anchor:
        ids = joint[len(anchor) :]
    else:
        ids = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
    return ids[:max_len]


def check_targets(words: tuple[str, ...], targets: list[list[int]], max_target_length: int) -> None:
    """Two label words that tokenise alike (characters the vocabulary lacks, both ``<unk>``; or
    cut to the same prefix by ``max_target_length``) make one class impossible to predict.

    Raises:
        DataError: the colliding words and their token ids.
    """
    seen: dict[tuple[int, ...], str] = {}
    for word, ids in zip(words, targets, strict=True):
        if tuple(ids) in seen:
            raise DataError(
                f"label words {seen[tuple(ids)]!r} and {word!r} become the same tokens {ids} (a vocabulary without "
                f"their characters, or data.max_target_length={max_target_length} cutting them): rank "
                "classification could never tell them apart; choose label words the tokenizer keeps apart"
            )
        seen[tuple(ids)] = word


def encode_all(encoder: Encoder, rows: list[dict], chunk: int = 4096, stats: dict | None = None) -> list[dict]:
    """``[encoder.encode(r) for r in rows]``, with the sources tokenised in batches (a fast
    tokenizer's batched call runs in Rust, many times faster than one call per row) and every
    label word tokenised once. The result is identical to the per-row encoding (tested).
    ``stats["truncated"]``: how many sources were cut to ``max_source_length``.

    Raises:
        DataError: a label that is not a class id, or label words that tokenise alike."""
    task, tok = encoder.task, encoder.tokenizer
    for i, row in enumerate(rows):
        label = row[task.label_column]
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(task.label_words):
            raise DataError(
                f"task {task.name!r}: row {i}: label {label!r} is not an integer in [0, {len(task.label_words)})"
            )
    if encoder.objective == "seq2seq":
        targets = [encoder._ids(w, encoder.max_target_length) for w in task.label_words]
    elif encoder.objective == "causal":
        targets = [continuation_ids(tok, w, encoder.max_target_length) + [tok.eos_token_id] for w in task.label_words]
    if encoder.objective != "classify":
        check_targets(task.label_words, targets, encoder.max_target_length)
    out, truncated = [], 0
    for start in range(0, len(rows), chunk):
        part = rows[start : start + chunk]
        sources = tok([task.source(r) for r in part], truncation=True, max_length=encoder.max_source_length)[
            "input_ids"
        ]
        for row, ids in zip(part, sources, strict=True):
            truncated += len(ids) >= encoder.max_source_length  # at the cap: cut, or exactly that long
            label = row[task.label_column]
            if encoder.objective == "classify":
                out.append({"input_ids": ids, "label": label, "choices": None})
                continue
            if encoder.objective == "seq2seq":
                choices = [{"input_ids": ids, "labels": t} for t in targets]
            else:
                choices = [{"input_ids": ids + t, "labels": [-100] * len(ids) + t} for t in targets]
            out.append({**choices[label], "label": label, "choices": choices})
    if stats is not None:
        stats["truncated"] = truncated
    return out


def _pad(seqs: list[list[int]], value: int, multiple: int = 8) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    width = -(-width // multiple) * multiple
    return torch.tensor([s + [value] * (width - len(s)) for s in seqs], dtype=torch.long)


@dataclass(frozen=True)
class Collator:
    """Pads a list of encoded examples into model inputs (widths rounded up to a multiple of 8)."""

    objective: str
    pad_id: int
    decoder_start_id: int = 0

    def __call__(self, examples: list[dict], choice: int | None = None) -> dict[str, torch.Tensor]:
        rows = examples if choice is None else [e["choices"][choice] for e in examples]
        ids = _pad([r["input_ids"] for r in rows], self.pad_id)
        batch = {"input_ids": ids, "attention_mask": _pad([[1] * len(r["input_ids"]) for r in rows], 0)}
        if self.objective == "classify":
            batch["labels"] = torch.tensor([e["label"] for e in examples], dtype=torch.long)
            return batch
        labels = _pad([r["labels"] for r in rows], -100)
        batch["labels"] = labels
        if self.objective == "seq2seq":
            dec = torch.full_like(labels, self.pad_id)
            dec[:, 0] = self.decoder_start_id
            dec[:, 1:] = labels[:, :-1].clamp(min=0).masked_fill(labels[:, :-1] == -100, self.pad_id)
            batch["decoder_input_ids"] = dec
        return batch
