"""Regenerate the embedded tiny default: a small sentiment task and tokenizers for tiny T5,
LLaMA and BERT backbones. Deterministic; the outputs are committed under s3delta_ds/assets/tiny/.

    python scripts/make_tiny_assets.py
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import sentencepiece as spm

OUT = Path(__file__).resolve().parents[1] / "s3delta_ds" / "assets" / "tiny"

POSITIVE = [
    "great",
    "wonderful",
    "delightful",
    "brilliant",
    "charming",
    "superb",
    "lovely",
    "moving",
    "clever",
    "gripping",
    "joyful",
    "excellent",
    "stunning",
    "warm",
    "funny",
    "fresh",
    "elegant",
    "vivid",
]
NEGATIVE = [
    "awful",
    "dull",
    "boring",
    "clumsy",
    "tedious",
    "bland",
    "weak",
    "messy",
    "painful",
    "shallow",
    "stale",
    "sloppy",
    "dreary",
    "flat",
    "forgettable",
    "grim",
    "lifeless",
    "silly",
]
NOUNS = [
    "film",
    "movie",
    "story",
    "plot",
    "script",
    "cast",
    "ending",
    "soundtrack",
    "director",
    "performance",
    "dialogue",
    "premise",
    "sequel",
    "camera work",
    "pacing",
    "lead actor",
    "finale",
    "score",
]
ADVERBS = ["really", "truly", "rather", "quite", "mostly", "simply", "oddly", "very", "somewhat", "utterly"]
NEUTRAL = ["long", "short", "loud", "quiet", "colourful", "dark", "familiar", "modern", "old fashioned", "busy"]
TEMPLATES = [
    "the {noun} was {adv} {adj} .",
    "i found the {noun} {adv} {adj} , and the {noun2} was {neutral} .",
    "a {neutral} {noun} that is {adv} {adj} from start to end .",
    "overall the {noun} felt {adj} even if the {noun2} is {neutral} .",
    "{adv} {adj} {noun} with a {neutral} {noun2} .",
    "what a {adj} {noun} ; the {noun2} is {adv} {neutral} .",
]


def make_split(rng: random.Random, n: int) -> list[dict]:
    rows = []
    for _ in range(n):
        label = rng.randrange(2)
        adj = rng.choice(POSITIVE if label else NEGATIVE)
        noun, noun2 = rng.sample(NOUNS, 2)
        text = rng.choice(TEMPLATES).format(
            noun=noun, noun2=noun2, adj=adj, adv=rng.choice(ADVERBS), neutral=rng.choice(NEUTRAL)
        )
        rows.append({"sentence": text, "label": label})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def train_sentencepiece(lines: list[str], model_type: str, vocab_size: int, **options) -> bytes:
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=buf,
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=1.0,
        num_threads=1,
        minloglevel=2,
        **options,
    )
    return buf.getvalue()


def main() -> None:
    rng = random.Random(20221128)
    splits = {"train": make_split(rng, 2400), "validation": make_split(rng, 300), "test": make_split(rng, 300)}
    data = OUT / "data"
    data.mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        write_jsonl(data / f"{name}.jsonl", rows)
    corpus = [r["sentence"] for rows in splits.values() for r in rows]
    corpus += [f"sentiment: {s}" for s in corpus[:500]] + ["positive", "negative", "sentiment:"] * 50

    words = sorted({w for line in corpus for w in line.split()})
    # T5: a word-level model, so every word (label words included) is one token and a tiny random
    # backbone can learn the task from a few thousand parameters.
    t5 = OUT / "t5"
    t5.mkdir(exist_ok=True)
    (t5 / "spiece.model").write_bytes(
        train_sentencepiece(corpus, "word", len(words) + 3, pad_id=0, eos_id=1, unk_id=2, bos_id=-1)
    )
    llama = OUT / "llama"
    llama.mkdir(exist_ok=True)
    (llama / "tokenizer.model").write_bytes(
        train_sentencepiece(
            corpus, "bpe", 250, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, user_defined_symbols=["positive", "negative"]
        )
    )
    bert = OUT / "bert"
    bert.mkdir(exist_ok=True)
    (bert / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    print(f"wrote {OUT}: {sum(len(v) for v in splits.values())} examples, {len(words) + 5} BERT words")


if __name__ == "__main__":
    main()
