"""Encoder classifiers pool as their checkpoint was trained: sentence-transformers checkpoints
declare mean pooling (modules.json → 1_Pooling/config.json), BERT checkpoints use the CLS pooler."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from importlib import resources

import pytest
import torch

from s3delta_ds.artifacts.export import _check_pooling
from s3delta_ds.backbones.pooling import checkpoint_pooling, pooling_of, resolve_pooling, use_mean_pooling
from s3delta_ds.config import ModelConfig, load_run_config
from s3delta_ds.engine.backbone import load_backbone, materialise_embedded
from s3delta_ds.errors import BackboneError, ConfigError, StructureError

from .helpers import tiny_inputs, tiny_model
from .launching import env


def _sentence_transformers_dir(tmp_path, **modes):
    """The embedded tiny BERT re-saved as a sentence-transformers checkpoint with ``modes``."""
    out = tmp_path / "st-model"
    shutil.copytree(materialise_embedded("tiny-bert"), out)
    # a sentence-transformers directory carries its tokenizer (without one, a run is refused)
    shutil.copy(resources.files("s3delta_ds") / "assets" / "tiny" / "bert" / "vocab.txt", out / "vocab.txt")
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    (out / "modules.json").write_text(json.dumps(modules))
    (out / "1_Pooling").mkdir()
    config = {"word_embedding_dimension": 32, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": False}
    config.update(modes)
    (out / "1_Pooling" / "config.json").write_text(json.dumps(config))
    return out


def test_checkpoint_pooling_reads_the_sentence_transformers_config(tmp_path):
    assert checkpoint_pooling(str(_sentence_transformers_dir(tmp_path, pooling_mode_mean_tokens=True))) == "mean"
    shutil.rmtree(tmp_path / "st-model")
    assert checkpoint_pooling(str(_sentence_transformers_dir(tmp_path, pooling_mode_cls_token=True))) == "cls"
    assert checkpoint_pooling(str(materialise_embedded("tiny-bert"))) is None  # a plain HF checkpoint


def test_unsupported_sentence_pooling_is_refused_by_name(tmp_path):
    src = _sentence_transformers_dir(tmp_path, pooling_mode_max_tokens=True)
    with pytest.raises(BackboneError, match="pooling_mode_max_tokens"):
        checkpoint_pooling(str(src))


def test_resolve_pooling(tmp_path):
    src = str(_sentence_transformers_dir(tmp_path, pooling_mode_mean_tokens=True))
    assert resolve_pooling("auto", src, pretrained=True) == "mean"
    assert resolve_pooling("auto", src, pretrained=False) == "cls"  # random weights were trained on nothing
    assert resolve_pooling("cls", src, pretrained=True) == "cls"
    with pytest.raises(BackboneError, match="model.pooling"):
        resolve_pooling("max", src, pretrained=True)
    with pytest.raises(ConfigError, match="model.pooling"):
        ModelConfig(pooling="max")
    assert load_run_config(None, ["model.pooling=mean"]).model.pooling == "mean"


def test_mean_pooling_feeds_the_head_the_masked_mean():
    model = tiny_model("tiny-bert")
    batch = tiny_inputs("tiny-bert")
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        cls_logits = model(**inputs).logits
        use_mean_pooling(model)
        logits = model(**inputs).logits
        hidden = model.bert(**inputs).last_hidden_state
        mask = inputs["attention_mask"][..., None].float()
        expected = model.classifier((hidden * mask).sum(1) / mask.sum(1))
        changed = dict(inputs, input_ids=inputs["input_ids"].clone())
        changed["input_ids"][0, -2:] = 7  # padded positions of row 0: must not matter
        padded_changed = model(**changed).logits
    torch.testing.assert_close(logits, expected)
    torch.testing.assert_close(padded_changed, logits)
    assert not torch.allclose(logits, cls_logits)
    assert pooling_of(model) == "mean"


def test_load_backbone_applies_the_checkpoint_pooling(tmp_path):
    src = str(_sentence_transformers_dir(tmp_path, pooling_mode_mean_tokens=True))
    auto = load_backbone(ModelConfig(name_or_path=src), source=src, dtype="fp32", ds_config={}, num_labels=2)
    assert pooling_of(auto) == "mean"
    with pytest.raises(StructureError, match="model.pooling"):
        _check_pooling(auto)  # export refuses: a saved HF classifier would pool CLS
    cls = load_backbone(
        ModelConfig(name_or_path=src, pooling="cls"), source=src, dtype="fp32", ds_config={}, num_labels=2
    )
    assert pooling_of(cls) == "cls"
    _check_pooling(cls)
    with pytest.raises(BackboneError, match="bert family"):
        load_backbone(
            ModelConfig(name_or_path="tiny-llama", pooling="mean", random_init=True),
            source="tiny-llama",
            dtype="fp32",
            ds_config={},
        )


def test_mean_pooling_on_a_roberta_head_without_pooler():
    from transformers import RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(0)
    config = RobertaConfig(
        vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, num_labels=2
    )
    model = RobertaForSequenceClassification(config).eval()
    assert model.base_model.pooler is None
    ids = torch.randint(3, 300, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    with torch.no_grad():
        cls_logits = model(input_ids=ids, attention_mask=mask).logits
        use_mean_pooling(model)
        logits = model(input_ids=ids, attention_mask=mask).logits
        hidden = model.roberta(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask[..., None].float()
        expected = model.classifier(((hidden * m).sum(1) / m.sum(1))[:, None, :])
    torch.testing.assert_close(logits, expected)
    assert not torch.allclose(logits, cls_logits)


@pytest.mark.distributed
def test_a_run_records_the_pooling_auto_chose(tmp_path):
    """In a subprocess: setting up a run initialises a process group, which must not leak into the
    test process (its MASTER_PORT would be inherited by every later launch)."""
    src = str(_sentence_transformers_dir(tmp_path, pooling_mode_mean_tokens=True))
    overrides = [
        f"model.name_or_path={src}",
        "data.task=tiny-sentiment",
        "data.max_train_examples=8",
        "data.max_eval_examples=4",
        "zero_stage=0",
        f"output_dir={tmp_path / 'run'}",
    ]
    script = (
        "import sys; from s3delta_ds.config import load_run_config; from s3delta_ds.run.runtime import prepare; "
        "cfg = load_run_config(None, sys.argv[1:]); "
        "print('pooling', prepare(cfg, cfg.search, resume=False, kind='retrain').cfg.model.pooling)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, *overrides], env=env(), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "pooling mean" in proc.stdout
    assert load_run_config(tmp_path / "run" / "config.yaml").model.pooling == "mean"
