"""Linear probes on frozen all-MiniLM-L6-v2 features for the RT snippets: the CLS pooler output (what
BertForSequenceClassification feeds its head) against mean pooling (what the checkpoint was trained
for). The evidence behind ``model.pooling`` (benchmarks/results/quality-round1-notes.md).

    python benchmarks/probe_pooling.py      # after `s3delta fetch-assets minilm rt`
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from sklearn.linear_model import LogisticRegression
from transformers import AutoModel, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from s3delta_ds.data.assets import asset_path  # noqa: E402


def features(model, tok, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    cls, mean = [], []
    for i in range(0, len(texts), 64):
        x = tok(texts[i : i + 64], padding=True, truncation=True, max_length=128, return_tensors="pt")
        with torch.no_grad():
            out = model(**x)
        mask = x["attention_mask"][..., None].float()
        cls.append(out.pooler_output)
        mean.append((out.last_hidden_state * mask).sum(1) / mask.sum(1))
    return torch.cat(cls), torch.cat(mean)


def main() -> int:
    torch.set_num_threads(1)
    model_dir, data = asset_path("models", "all-MiniLM-L6-v2"), asset_path("data", "rt-sentiment")
    rows = {s: [json.loads(line) for line in (data / f"{s}.jsonl").open()] for s in ("train", "validation")}
    train, val = rows["train"][:1280], rows["validation"][:300]
    tok, model = AutoTokenizer.from_pretrained(model_dir), AutoModel.from_pretrained(model_dir).eval()
    (c_tr, m_tr), (c_va, m_va) = (features(model, tok, [r["text"] for r in part]) for part in (train, val))
    y_tr, y_va = [r["label"] for r in train], [r["label"] for r in val]
    print(
        f"feature std across examples (mean over dims): cls pooler {c_tr.std(0).mean():.3f}, "
        f"mean {m_tr.std(0).mean():.3f}"
    )
    print("| features | C=0.1 | C=1 | C=10 |\n|---|---|---|---|")
    for name, (a, b) in {"CLS pooler": (c_tr, c_va), "mean pooling": (m_tr, m_va)}.items():
        accs = [
            LogisticRegression(C=c, max_iter=2000).fit(a.numpy(), y_tr).score(b.numpy(), y_va) for c in (0.1, 1, 10)
        ]
        print(f"| {name} | " + " | ".join(f"{100 * a:.1f}" for a in accs) + " |")
    print(f"majority class: {100 * max(sum(y_va), len(y_va) - sum(y_va)) / len(y_va):.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
