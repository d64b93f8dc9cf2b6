"""Frozen all-MiniLM-L6-v2 sentence embeddings of the study's data, computed once and cached.

The embedding is the model's own: the mean of the last hidden states over the real tokens,
L2-normalised (sentence-transformers' pooling for this model). BBC News: title and lead, at most
64 tokens; VADER: the word. On a 2-core CPU the two take about half a minute; the cache file
(``features.pt``, 15 MB) is then read in milliseconds.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from torchgrain.experiments import assets

VERSION = 1  # bump when the embedding recipe changes: an old cache is then recomputed
MAX_TOKENS = 64


def load_features(cache: Path) -> dict[str, tuple[Tensor, Tensor]]:
    """``{"topics": (X (2225, 384), labels (2225,)), "valence": (X (7217, 384), ratings)}`` from
    ``cache`` (a ``.pt`` file), computing and writing it when missing or stale."""
    if cache.exists():
        data = torch.load(cache, weights_only=True)
        if data.get("version") == VERSION:
            return {k: (v["x"], v["y"]) for k, v in data["tasks"].items()}
    articles = assets.bbc_news()
    words = assets.vader_lexicon()
    texts = [f"{a.title}. {a.body}" for a in articles]
    tasks = {
        "topics": {"x": embed(texts), "y": torch.tensor([a.topic for a in articles])},
        "valence": {
            "x": embed([w for w, _ in words]),
            "y": torch.tensor([v for _, v in words], dtype=torch.float32),
        },
    }
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp")
    torch.save({"version": VERSION, "tasks": tasks}, tmp)
    tmp.replace(cache)
    return {k: (v["x"], v["y"]) for k, v in tasks.items()}


@torch.no_grad()
def embed(texts: list[str], batch: int = 64) -> Tensor:
    """``(N, 384)`` float32 normalised mean-pooled MiniLM embeddings of ``texts``."""
    import transformers

    path = assets.minilm_dir()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()
    out = []
    for i in range(0, len(texts), batch):
        enc = tok(
            texts[i : i + batch],
            truncation=True,
            max_length=MAX_TOKENS,
            padding=True,
            return_tensors="pt",
        )
        hidden = model(**enc).last_hidden_state  # (b, T, 384)
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (b, T, 1)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        out.append(torch.nn.functional.normalize(pooled, dim=1))
    return torch.cat(out)
