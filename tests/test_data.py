"""Tasks and row loading, encoding and collation for the three objectives, batching and sharding."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter

import pandas as pd
import pytest
import torch

from s3delta_ds.data import (
    TASKS,
    BatchStream,
    Collator,
    Encoder,
    EvalShard,
    get_task,
    load_rows,
    load_tokenizer,
    split_halves,
)
from s3delta_ds.data.encode import encode_all
from s3delta_ds.errors import ConfigError, DataError

TASK = get_task("tiny-sentiment")
LOCAL = dataclasses.replace(TASK, protocol="small", builtin_dir=None)


def _rows(n: int, start: int = 0) -> list[dict]:
    return [{"sentence": f"sentence number {start + i} .", "label": (start + i) % 2} for i in range(n)]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


# -- tasks and rows -----------------------------------------------------------------------------


def test_get_task_fields():
    t = get_task("tiny-sentiment")
    assert t.name == "tiny-sentiment"
    assert t.label_words == ("negative", "positive")
    assert t.columns == ("sentence",)
    assert t.label_column == "label"
    assert t.metric == "accuracy"
    assert t.max_source_length == 64
    assert t.protocol == "given"
    assert t.builtin_dir == "assets/tiny/data"
    assert t.source({"sentence": "a fine film .", "label": 1}) == "sentiment: a fine film ."


def test_unknown_task_lists_known():
    with pytest.raises(ConfigError, match="'nope'") as err:
        get_task("nope")
    for name in TASKS:
        assert name in str(err.value)
    assert "tiny-sentiment" in str(err.value) and "did you mean" not in str(err.value)
    with pytest.raises(ConfigError, match="unknown task 'sst-2'; did you mean 'sst2'\\?"):
        get_task("sst-2")


def test_shipped_rows():
    rows = load_rows(TASK, None)
    assert {k: len(v) for k, v in rows.items()} == {"train": 2400, "validation": 300, "test": 300}
    for split in rows.values():
        assert all(set(r) == {"sentence", "label"} for r in split)
        assert {r["label"] for r in split} == {0, 1}
        assert all(type(r["label"]) is int and isinstance(r["sentence"], str) and r["sentence"] for r in split)
    assert rows["train"][0] == {"sentence": "quite painful sequel with a modern script .", "label": 0}


@pytest.mark.parametrize("n_val", [300, 7])
def test_small_protocol_halves_validation(tmp_path, n_val):
    _jsonl(tmp_path / "train.jsonl", _rows(20))
    val = _rows(n_val, start=1000)
    _jsonl(tmp_path / "validation.jsonl", val)
    a = load_rows(LOCAL, str(tmp_path), split_seed=0)
    b = load_rows(LOCAL, str(tmp_path), split_seed=0)
    c = load_rows(LOCAL, str(tmp_path), split_seed=1)
    assert a["train"] == _rows(20)
    assert len(a["validation"]) == n_val // 2
    assert len(a["test"]) == n_val - n_val // 2
    # a partition of the original validation split
    assert sorted(r["sentence"] for r in a["validation"] + a["test"]) == sorted(r["sentence"] for r in val)
    assert a == b
    assert a["validation"] != c["validation"]
    assert sorted(r["sentence"] for r in c["validation"] + c["test"]) == sorted(r["sentence"] for r in val)


def test_large_protocol_takes_validation_from_train(tmp_path):
    train, val = _rows(2100), _rows(50, start=5000)
    _jsonl(tmp_path / "train.jsonl", train)
    _jsonl(tmp_path / "validation.jsonl", val)
    task = dataclasses.replace(TASK, protocol="large", builtin_dir=None)
    a = load_rows(task, str(tmp_path), split_seed=3)
    assert len(a["train"]) == 100 and len(a["validation"]) == 2000
    assert a["test"] == val
    assert sorted(r["sentence"] for r in a["train"] + a["validation"]) == sorted(r["sentence"] for r in train)
    assert not {r["sentence"] for r in a["train"]} & {r["sentence"] for r in a["validation"]}
    assert load_rows(task, str(tmp_path), split_seed=3) == a
    assert load_rows(task, str(tmp_path), split_seed=4)["train"] != a["train"]


def test_given_test_split_is_kept(tmp_path):
    _jsonl(tmp_path / "train.jsonl", _rows(4))
    _jsonl(tmp_path / "validation.jsonl", _rows(3, 10))
    _jsonl(tmp_path / "test.jsonl", _rows(5, 20))
    rows = load_rows(LOCAL, str(tmp_path))
    assert rows == {"train": _rows(4), "validation": _rows(3, 10), "test": _rows(5, 20)}


def test_csv_and_parquet(tmp_path):
    pd.DataFrame(_rows(6)).to_csv(tmp_path / "train.csv", index=False)
    pd.DataFrame(_rows(4, 100)).to_parquet(tmp_path / "validation.parquet")
    pd.DataFrame(_rows(3, 200)).to_csv(tmp_path / "test.csv", index=False)
    rows = load_rows(LOCAL, str(tmp_path))
    assert rows["train"] == _rows(6)
    assert rows["validation"] == _rows(4, 100)
    assert rows["test"] == _rows(3, 200)
    assert all(type(r["label"]) is int for split in rows.values() for r in split)


def test_missing_column(tmp_path):
    _jsonl(tmp_path / "train.jsonl", [{"text": "a", "label": 0}])
    _jsonl(tmp_path / "validation.jsonl", _rows(2))
    with pytest.raises(DataError, match="'sentence'") as err:
        load_rows(LOCAL, str(tmp_path))
    assert str(tmp_path / "train.jsonl") in str(err.value)
    assert "text" in str(err.value)


def test_missing_label_column(tmp_path):
    _jsonl(tmp_path / "train.jsonl", _rows(2))
    pd.DataFrame({"sentence": ["a", "b"], "gold": [0, 1]}).to_csv(tmp_path / "validation.csv", index=False)
    with pytest.raises(DataError, match="'label'") as err:
        load_rows(LOCAL, str(tmp_path))
    assert str(tmp_path / "validation.csv") in str(err.value)


@pytest.mark.parametrize("kind", ["jsonl", "csv-header-only", "parquet-no-rows"])
def test_empty_split(tmp_path, kind):
    _jsonl(tmp_path / "train.jsonl", _rows(4))
    if kind == "jsonl":
        (tmp_path / "validation.jsonl").write_text("")
    elif kind == "csv-header-only":
        (tmp_path / "validation.csv").write_text("sentence,label\n")
    else:
        pd.DataFrame({"sentence": pd.Series([], dtype=str), "label": pd.Series([], dtype="int64")}).to_parquet(
            tmp_path / "validation.parquet"
        )
    with pytest.raises(DataError, match="validation"):
        load_rows(LOCAL, str(tmp_path))


def test_missing_dir(tmp_path):
    with pytest.raises(DataError, match="does not exist") as err:
        load_rows(LOCAL, str(tmp_path / "nope"))
    assert str(tmp_path / "nope") in str(err.value)


def test_missing_validation_file(tmp_path):
    _jsonl(tmp_path / "train.jsonl", _rows(4))
    with pytest.raises(DataError, match="train and validation"):
        load_rows(LOCAL, str(tmp_path))


def test_two_files_for_one_split(tmp_path):
    _jsonl(tmp_path / "train.jsonl", _rows(4))
    pd.DataFrame(_rows(4)).to_csv(tmp_path / "train.csv", index=False)
    _jsonl(tmp_path / "validation.jsonl", _rows(2))
    with pytest.raises(DataError, match="train") as err:
        load_rows(LOCAL, str(tmp_path))
    assert "train.jsonl" in str(err.value) and "train.csv" in str(err.value)


def test_no_data_anywhere():
    task = dataclasses.replace(TASK, builtin_dir=None, hub=None)
    with pytest.raises(DataError, match="data_dir"):
        load_rows(task, None)


# -- encoding -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def toks():
    return {
        "t5": load_tokenizer("t5", "tiny-t5"),
        "llama": load_tokenizer("llama", "tiny-llama"),
        "bert": load_tokenizer("bert", "tiny-bert"),
    }


def _offline(*args, **kwargs):
    raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")


@pytest.mark.parametrize(
    "family,shape,embedded", [("llama", "llama-2-70b", "tiny-llama"), ("t5", "flan-t5-xxl", "tiny-t5")]
)
def test_offline_shape_tokenizer_error_names_the_fix(monkeypatch, family, shape, embedded):
    """A shipped shape (config only) has no tokenizer of its own: offline, the error says what to pass."""
    import transformers

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", _offline)
    hint = rf"config-only shape(.|\n)*model.tokenizer=DIR(.|\n)*model.tokenizer={embedded}"
    with pytest.raises(DataError, match=hint):
        load_tokenizer(family, shape)
    assert len(load_tokenizer(family, shape, tokenizer=embedded)) > 0  # the named fix works


@pytest.mark.parametrize("hub_id", ["someone/own-t5", "google/flan-t5-xxl"])  # the second is also an alias
def test_offline_hub_id_tokenizer_error_has_no_shape_hint(monkeypatch, hub_id):
    import transformers

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", _offline)
    with pytest.raises(DataError, match="cannot load a tokenizer") as e:
        load_tokenizer("t5", hub_id)
    assert "shape" not in str(e.value) and "random" not in str(e.value)


ROWS = [
    {"sentence": "the plot was moving .", "label": 1},
    {"sentence": "a dull and lifeless sequel with a silly script that never ends .", "label": 0},
    {"sentence": "superb .", "label": 1},
]


def _encoder(tok, objective, max_source=64, max_target=16):
    return Encoder(TASK, tok, objective, max_source, max_target)


def test_seq2seq(toks):
    tok = toks["t5"]
    eos = tok.eos_token_id
    assert tok.pad_token_id == 0
    enc = _encoder(tok, "seq2seq")
    word_ids = {}
    for w in TASK.label_words:
        ids = tok(w)["input_ids"]
        assert len(ids) == 2 and ids[-1] == eos  # one word piece + eos
        word_ids[w] = ids
    assert word_ids["positive"] != word_ids["negative"]
    examples = [enc.encode(r) for r in ROWS]
    for row, ex in zip(ROWS, examples, strict=True):
        src = tok(TASK.source(row))["input_ids"]
        assert ex["input_ids"] == src and src[-1] == eos
        assert ex["label"] == row["label"]
        assert len(ex["choices"]) == 2
        for k, w in enumerate(TASK.label_words):
            assert ex["choices"][k] == {"input_ids": src, "labels": word_ids[w]}
        assert ex["labels"] == ex["choices"][row["label"]]["labels"]
        assert ex["labels"] == word_ids[TASK.label_words[row["label"]]]

    col = Collator("seq2seq", pad_id=tok.pad_token_id, decoder_start_id=0)
    batch = col(examples)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "decoder_input_ids"}
    lens = [len(e["input_ids"]) for e in examples]
    width = batch["input_ids"].shape[1]
    assert width % 8 == 0 and max(lens) <= width < max(lens) + 8
    assert batch["labels"].shape == (3, 8)
    assert batch["input_ids"].dtype == torch.long
    for i, ex in enumerate(examples):
        n = lens[i]
        assert batch["input_ids"][i, :n].tolist() == ex["input_ids"]
        assert (batch["input_ids"][i, n:] == 0).all()
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (width - n)
        lab = ex["labels"]
        assert batch["labels"][i].tolist() == lab + [-100] * (8 - len(lab))
        # decoder inputs: labels shifted right behind the start id, -100 replaced by pad
        assert batch["decoder_input_ids"][i].tolist() == [0] + lab + [0] * (8 - len(lab) - 1)
    expected_dec = torch.cat(
        [torch.zeros(3, 1, dtype=torch.long), batch["labels"][:, :-1].masked_fill(batch["labels"][:, :-1] == -100, 0)],
        dim=1,
    )
    assert torch.equal(batch["decoder_input_ids"], expected_dec)

    # scoring a choice: every example gets label word k
    for k, w in enumerate(TASK.label_words):
        b = col(examples, choice=k)
        for i in range(3):
            assert b["labels"][i, :2].tolist() == word_ids[w]
            assert b["decoder_input_ids"][i, :3].tolist() == [0, *word_ids[w]]


def test_seq2seq_decoder_start_and_pad_differ():
    col = Collator("seq2seq", pad_id=5, decoder_start_id=9)
    ex = [{"input_ids": [1, 2, 3], "labels": [7, 8]}, {"input_ids": [4], "labels": [6]}]
    b = col(ex)
    assert b["input_ids"].tolist() == [[1, 2, 3, 5, 5, 5, 5, 5], [4, 5, 5, 5, 5, 5, 5, 5]]
    assert b["labels"].tolist() == [[7, 8] + [-100] * 6, [6] + [-100] * 7]
    assert b["decoder_input_ids"].tolist() == [[9, 7, 8, 5, 5, 5, 5, 5], [9, 6, 5, 5, 5, 5, 5, 5]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0, 0]]


def test_causal(toks):
    tok = toks["llama"]
    eos = tok.eos_token_id
    enc = _encoder(tok, "causal")
    examples = [enc.encode(r) for r in ROWS]
    word_ids = {w: tok(" " + w, add_special_tokens=False)["input_ids"] + [eos] for w in TASK.label_words}
    for w, ids in word_ids.items():
        assert ids[-1] == eos and tok.decode(ids[:-1]).strip() == w
    assert word_ids["positive"] != word_ids["negative"]
    for row, ex in zip(ROWS, examples, strict=True):
        prompt = tok(TASK.source(row))["input_ids"]
        assert prompt[0] == tok.bos_token_id and eos not in prompt
        gold = word_ids[TASK.label_words[row["label"]]]
        assert ex["input_ids"] == prompt + gold
        assert ex["labels"] == [-100] * len(prompt) + gold
        assert len(ex["labels"]) == len(ex["input_ids"])
        for k, w in enumerate(TASK.label_words):
            assert ex["choices"][k]["input_ids"] == prompt + word_ids[w]
            assert ex["choices"][k]["labels"] == [-100] * len(prompt) + word_ids[w]

    col = Collator("causal", pad_id=tok.pad_token_id)
    for k, w in enumerate(TASK.label_words):
        b = col(examples, choice=k)
        assert "decoder_input_ids" not in b
        assert b["input_ids"].shape[1] % 8 == 0
        for i, row in enumerate(ROWS):
            prompt_len = len(tok(TASK.source(row))["input_ids"])
            n = prompt_len + len(word_ids[w])
            assert b["input_ids"][i, prompt_len:n].tolist() == word_ids[w]
            labels = b["labels"][i].tolist()
            assert labels[:prompt_len] == [-100] * prompt_len
            assert labels[prompt_len:n] == word_ids[w]
            assert all(v == -100 for v in labels[n:])
            assert b["attention_mask"][i].sum().item() == n
    gold_batch = col(examples)
    for i, row in enumerate(ROWS):
        assert torch.equal(gold_batch["labels"][i], col(examples, choice=row["label"])["labels"][i])


def _legacy_sentencepiece(path):
    """A tokenizer saved as LLaMA-2's ``tokenizer.json`` is, loaded without its class: a normalizer
    that prepends ``▁`` and turns every space into ``▁``, no pre-tokenizer, ``<s>`` in front."""
    from tokenizers import Tokenizer, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set("abcdefghijklmnopqrstuvwxyz0123456789.,:'-?!"))
    words = "the plot was moving a dull and lifeless sequel with silly script that never ends superb positive negative"
    vocab = [("<unk>", 0.0), ("<s>", 0.0), ("</s>", 0.0), ("▁", -2.0)]
    vocab += [(c, -5.0) for c in chars] + [("▁" + w, -1.0) for w in words.split()] + [("▁.", -1.0)]
    tk = Tokenizer(models.Unigram(vocab, unk_id=0))
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(path)
    return load_tokenizer("llama", str(path))


def test_causal_target_reads_as_in_context_with_legacy_sentencepiece(tmp_path):
    """The label word's tokens are those it becomes after the prompt, not ``" " + word`` alone,
    which a legacy SentencePiece tokenizer turns into ``["▁", "▁positive"]``."""
    tok = _legacy_sentencepiece(tmp_path / "tok")
    alone = tok.convert_ids_to_tokens(tok(" positive", add_special_tokens=False)["input_ids"])
    assert alone == ["▁", "▁positive"]  # the trap: the bare space becomes a token of its own
    enc = _encoder(tok, "causal")
    batched = encode_all(enc, ROWS)
    for row, ex, ex_b in zip(ROWS, [enc.encode(r) for r in ROWS], batched, strict=True):
        for k, word in enumerate(TASK.label_words):
            in_context = tok(f"{TASK.source(row)} {word}")["input_ids"]  # what the model reads at inference
            assert ex["choices"][k]["input_ids"] == in_context + [tok.eos_token_id]
            assert tok.convert_ids_to_tokens(ex["choices"][k]["input_ids"][-2:-1]) == [f"▁{word}"]
            assert ex_b["choices"][k] == ex["choices"][k]


def test_classify(toks):
    tok = toks["bert"]
    enc = _encoder(tok, "classify")
    examples = [enc.encode(r) for r in ROWS]
    for row, ex in zip(ROWS, examples, strict=True):
        ids = tok(TASK.source(row))["input_ids"]
        assert ex["input_ids"] == ids
        assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
        assert ex["label"] == row["label"]
        assert ex["choices"] is None
        assert "labels" not in ex
    b = Collator("classify", pad_id=tok.pad_token_id)(examples)
    assert set(b) == {"input_ids", "attention_mask", "labels"}
    assert b["labels"].tolist() == [1, 0, 1] and b["labels"].dtype == torch.long
    assert b["input_ids"].shape[1] % 8 == 0
    assert b["attention_mask"].sum(1).tolist() == [len(e["input_ids"]) for e in examples]


@pytest.mark.parametrize("objective,family", [("seq2seq", "t5"), ("causal", "llama"), ("classify", "bert")])
@pytest.mark.parametrize("label", [2, -1, "1", 1.0, True, None])
def test_bad_label(toks, objective, family, label):
    enc = _encoder(toks[family], objective)
    with pytest.raises(DataError, match="label"):
        enc.encode({"sentence": "fine .", "label": label})


@pytest.mark.parametrize("objective,family", [("seq2seq", "t5"), ("causal", "llama"), ("classify", "bert")])
def test_truncation(toks, objective, family):
    tok = toks[family]
    row = {"sentence": " ".join(["moving"] * 100), "label": 1}
    assert len(tok(TASK.source(row))["input_ids"]) > 50
    ex = _encoder(tok, objective, max_source=10).encode(row)
    if objective == "causal":
        assert len(ex["input_ids"]) == 10 + len(tok(" positive", add_special_tokens=False)["input_ids"]) + 1
        assert ex["labels"][:10] == [-100] * 10
    else:
        assert len(ex["input_ids"]) == 10
    if objective == "seq2seq":
        assert ex["input_ids"][-1] == tok.eos_token_id
    if objective == "classify":
        assert ex["input_ids"][-1] == tok.sep_token_id
    short = _encoder(tok, objective, max_source=64).encode({"sentence": "superb .", "label": 1})
    assert len(short["input_ids"]) < 15


# -- batching -----------------------------------------------------------------------------------


def _raw(xs):
    return list(xs)


def _stream(n=40, micro=2, accum=4, rank=0, world=1, seed=0, examples=None):
    return BatchStream(
        list(range(n)) if examples is None else examples,
        micro_batch=micro,
        grad_accum=accum,
        rank=rank,
        world=world,
        seed=seed,
        collate=_raw,
    )


def _step(stream):
    groups = stream.next()
    assert len(groups) == stream.grad_accum
    assert all(len(g) == stream.micro_batch for g in groups)
    return [x for g in groups for x in g]


def test_accum_vs_micro_same_examples():
    a = _stream(micro=2, accum=4)
    b = _stream(micro=8, accum=1)
    assert a.steps_per_epoch == b.steps_per_epoch == 5
    for _ in range(12):  # crosses two epoch boundaries
        assert _step(a) == _step(b)


def test_accum_vs_micro_collated_tensors(toks):
    enc = _encoder(toks["t5"], "seq2seq")
    examples = [enc.encode({"sentence": f"film {i} was fine .", "label": i % 2}) for i in range(16)]
    col = Collator("seq2seq", pad_id=0)
    kw = dict(rank=0, world=1, seed=5, collate=col)
    a = BatchStream(examples, micro_batch=2, grad_accum=4, **kw)
    b = BatchStream(examples, micro_batch=8, grad_accum=1, **kw)
    for _ in range(3):
        ga, (gb,) = a.next(), b.next()
        assert len(ga) == 4
        rows_a = [row[row != 0].tolist() for g in ga for row in g["input_ids"]]
        rows_b = [row[row != 0].tolist() for row in gb["input_ids"]]
        assert rows_a == rows_b


def test_ranks_take_contiguous_slices():
    one = _stream(micro=4, accum=2, world=1)
    r0 = _stream(micro=2, accum=2, rank=0, world=2)
    r1 = _stream(micro=2, accum=2, rank=1, world=2)
    for _ in range(11):
        g = _step(one)
        s0, s1 = _step(r0), _step(r1)
        assert len(s0) == len(s1) == 4
        assert s0 == g[:4]
        assert s1 == g[4:]
        assert not set(s0) & set(s1)


def test_ranks_slice_order_with_four_ranks():
    one = _stream(n=48, micro=12, accum=1, world=1, seed=3)
    ranks = [_stream(n=48, micro=1, accum=3, rank=r, world=4, seed=3) for r in range(4)]
    for _ in range(6):
        g = _step(one)
        for r, s in enumerate(ranks):
            assert _step(s) == g[3 * r : 3 * r + 3]


def test_epochs_cover_once_and_reshuffle():
    s = _stream(n=40, micro=2, accum=4)
    epochs = []
    for _ in range(3):
        seen = [x for _ in range(s.steps_per_epoch) for x in _step(s)]
        assert sorted(seen) == list(range(40))
        epochs.append(seen)
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2]
    assert s.state_dict()["epoch"] == 2
    assert epochs[0] != list(range(40))  # shuffled, not in order


def test_epochs_drop_last():
    s = _stream(n=43, micro=4, accum=2)
    assert s.steps_per_epoch == 5
    for _ in range(3):
        seen = [x for _ in range(5) for x in _step(s)]
        assert len(seen) == len(set(seen)) == 40
        assert set(seen) <= set(range(43))


def test_seed_changes_order():
    assert _step(_stream(seed=0)) != _step(_stream(seed=1))
    assert _step(_stream(seed=2)) == _step(_stream(seed=2))


@pytest.mark.parametrize("steps", [0, 3, 5, 7])
def test_resume(steps):
    a = _stream(n=40, micro=2, accum=2, rank=1, world=2, seed=4)
    for _ in range(steps):
        a.next()
    state = a.state_dict()
    assert state["n"] == 40 and state["global_batch"] == 8
    b = _stream(n=40, micro=2, accum=2, rank=1, world=2, seed=4)
    b.load_state_dict(json.loads(json.dumps(state)))
    for _ in range(7):
        assert b.next() == a.next()


def test_resume_with_other_geometry_same_global_batch():
    a = _stream(micro=4, accum=2)
    for _ in range(3):
        a.next()
    b = _stream(micro=8, accum=1)
    b.load_state_dict(a.state_dict())
    assert _step(b) == _step(a)


def test_resume_mismatch():
    state = _stream(n=40, micro=2, accum=4).state_dict()
    with pytest.raises(DataError, match="40") as err:
        _stream(n=48, micro=2, accum=4).load_state_dict(state)
    assert "48" in str(err.value)
    with pytest.raises(DataError, match="global batch"):
        _stream(n=40, micro=2, accum=2).load_state_dict(state)


def test_too_few_examples():
    with pytest.raises(DataError, match="global batch of 16") as err:
        _stream(n=15, micro=2, accum=4, world=2)
    assert "15" in str(err.value)
    _stream(n=16, micro=2, accum=4, world=2)  # exactly one global batch is enough


def test_split_halves():
    items = list(range(11))
    a, b = split_halves(items, seed=0)
    assert len(a) == len(b) == 5
    assert not set(a) & set(b)
    assert len(set(a) | set(b)) == 10 and set(a) | set(b) < set(items)
    assert split_halves(items, seed=0) == (a, b)
    assert split_halves(items, seed=1) != (a, b)
    even_a, even_b = split_halves(list(range(20)), seed=2)
    assert sorted(even_a + even_b) == list(range(20)) and len(even_a) == 10
    dict_items = [{"i": i} for i in range(6)]
    da, db = split_halves(dict_items, seed=0)
    assert sorted(x["i"] for x in da + db) == list(range(6))


@pytest.mark.parametrize(
    "n,world,batch",
    [(10, 1, 4), (10, 2, 4), (3, 4, 8), (7, 3, 2), (100, 8, 16), (1, 2, 1), (64, 4, 16), (5, 8, 3), (33, 2, 32)],
)
def test_eval_shard(n, world, batch):
    shards = [EvalShard.of(n, r, world, batch) for r in range(world)]
    sizes = {len(s.indices) for s in shards}
    assert len(sizes) == 1
    size = sizes.pop()
    assert size % batch == 0 and size >= batch
    assert size * world >= n
    assert size < max(batch, -(-n // world)) + batch  # no whole batch of padding beyond what's needed
    valid = Counter()
    for s in shards:
        assert len(s.valid) == len(s.indices)
        for i, ok in zip(s.indices, s.valid, strict=True):
            assert 0 <= i < n  # padding rows still point at a real example
            if ok:
                valid[i] += 1
        assert s.valid == sorted(s.valid, reverse=True)  # valid rows first, padding after
        batches = list(s.batches(batch))
        assert len(batches) == size // batch
        assert all(len(idx) == len(ok) == batch for idx, ok in batches)
    assert valid == Counter(range(n))
    assert sum(sum(s.valid) for s in shards) == n
    assert sum(len(s.valid) - sum(s.valid) for s in shards) == size * world - n
