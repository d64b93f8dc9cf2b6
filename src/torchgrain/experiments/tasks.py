"""The three fine-tuning tasks: real pretrained models on real data, all read offline.

=============  ==============================  ====================================  ============
task           model                           data                                  test metric
=============  ==============================  ====================================  ============
classification all-MiniLM-L6-v2 + linear head  BBC News: title + lead -> 5 topics    accuracy
regression     all-MiniLM-L6-v2 + linear head  VADER: word -> mean human valence     Pearson r
generation     SmolLM2-135M-Instruct           BBC News: article lead -> headline    perplexity
=============  ==============================  ====================================  ============

Splits are fixed (a seeded shuffle independent of the run's seed); the run's seed sets the new
head, the data order and dropout. MiniLM's word embeddings are frozen (the optimizer cost of 11.7M
rows for a few hundred examples); SmolLM2 trains its last ``size.layers`` decoder layers and final
norm. On a GPU with bfloat16 the forward runs under bfloat16 autocast; on a CPU in float32
(bfloat16 autocast was 25x slower than float32 for SmolLM2's step on this project's 2-core CPU).
"""

from __future__ import annotations

import copy
import itertools
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from torchgrain import losses as per_sample
from torchgrain.experiments import assets
from torchgrain.experiments.presets import Size

SPLIT_SEED = 0  # the fixed shuffle behind every train/test split
SPARE = 64  # examples kept out of both splits, for the stability experiment's swaps


@dataclass
class Example:
    """One tokenized example: ``ids`` (input tokens), ``target`` and, for LM, the scored span."""

    ids: list[int]
    target: float  # class index, standardized rating, or unused (generation)
    prompt_len: int = 0  # generation: tokens of the prompt, which are not scored


@dataclass
class Task:
    """A task with its data and its base model loaded; :meth:`new_model` is a fresh copy."""

    name: str
    metric: str
    higher_is_better: bool
    description: str
    size: Size
    device: torch.device
    train: list[Example]
    test: list[Example]
    spare: list[Example]
    base: nn.Module
    pad_id: int
    autocast: bool  # bfloat16 autocast of the forward
    extra: dict[str, Any] = field(default_factory=dict)
    val: list[Example] = field(default_factory=list)  # validation, from the training pool

    # ------------------------------------------------------------------------------ models
    def new_model(self, seed: int) -> nn.Module:
        """A copy of the pretrained model, its head drawn from ``seed``, on the task's device."""
        model: Any = copy.deepcopy(self.base)  # a transformers model (typed loosely)
        gen = torch.Generator().manual_seed(seed)
        if self.name != "generation":
            head = model.classifier
            head.weight.data.copy_(torch.randn(head.weight.shape, generator=gen) * 0.02)
            head.bias.data.zero_()
            model.bert.embeddings.word_embeddings.weight.requires_grad_(False)
        else:
            model.requires_grad_(False)
            layers = model.model.layers
            for layer in layers[len(layers) - (self.size.layers or len(layers)) :]:
                layer.requires_grad_(True)
            model.model.norm.requires_grad_(True)
        return model.to(self.device).train()

    # ------------------------------------------------------------------------------ batches
    def batch(self, examples: list[Example]) -> dict[str, Tensor]:
        """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` on the task's device."""
        T = max(len(e.ids) for e in examples)
        ids = torch.full((len(examples), T), self.pad_id, dtype=torch.long)  # (B, T)
        mask = torch.zeros(len(examples), T, dtype=torch.long)  # (B, T)
        for i, e in enumerate(examples):
            ids[i, : len(e.ids)] = torch.tensor(e.ids)
            mask[i, : len(e.ids)] = 1
        if self.name == "generation":
            labels = ids.masked_fill(mask == 0, per_sample.IGNORE_INDEX)  # (B, T)
            for i, e in enumerate(examples):
                labels[i, : e.prompt_len] = per_sample.IGNORE_INDEX
        elif self.name == "classification":
            labels = torch.tensor([int(e.target) for e in examples])  # (B,)
        else:
            labels = torch.tensor([e.target for e in examples])  # (B,)
        out = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        return {k: v.to(self.device) for k, v in out.items()}

    def losses(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        """Per-sample losses ``(B,)`` of a batch (the forward under the task's autocast)."""
        logits = self._logits(model, batch)
        if self.name == "classification":
            return per_sample.cross_entropy(logits, batch["labels"])
        if self.name == "regression":
            return per_sample.mse(logits, batch["labels"])
        return per_sample.causal_lm(logits, batch["labels"])

    # ----------------------------------------------------------------------------- evaluate
    def evaluate(self, model: nn.Module, examples: list[Example] | None = None) -> dict[str, float]:
        """The metric (first key) and extras on ``examples`` (default the test set), with the
        model in eval mode."""
        examples = self.test if examples is None else examples
        if not examples:
            raise ValueError("no examples to evaluate on; pass a non-empty list (or None: test)")
        outs = self._outputs(model, examples, raw=False)
        if self.name == "generation":
            nll = sum(o[0] for o in outs)
            count = sum(o[1] for o in outs)
            loss = nll / count
            return {"perplexity": math.exp(loss) if loss < 700 else math.inf, "test_loss": loss}
        pred = torch.cat([o[0] for o in outs])  # (N,) or (N, C)
        target = torch.tensor([e.target for e in examples])
        if self.name == "classification":
            return {"accuracy": float((pred.argmax(1) == target.long()).float().mean())}
        pred = pred.squeeze(1)
        r = torch.corrcoef(torch.stack([pred, target.to(pred.dtype)]))[0, 1]
        rmse = float(((pred - target) ** 2).mean().sqrt()) * self.extra["target_std"]
        return {"pearson": float(r), "rmse": rmse}

    def predictions(self, model: nn.Module, examples: list[Example]) -> Tensor:
        """Test predictions for the stability experiment: probabilities, ratings or token NLLs."""
        return torch.cat([o[0] for o in self._outputs(model, examples, raw=True)])

    @torch.no_grad()
    def _outputs(self, model: nn.Module, examples: list[Example], raw: bool) -> list[tuple]:
        """:meth:`_predict` over chunks of 32 examples, with the model in eval mode meanwhile."""
        model.eval()
        try:
            return [self._predict(model, chunk, raw) for chunk in _chunks(examples, 32)]
        finally:
            model.train()

    def _predict(self, model: nn.Module, examples: list[Example], raw: bool = False) -> tuple:
        batch = self.batch(examples)
        if self.name == "generation":
            per_seq = self.losses(model, batch)  # (B,) mean NLL of each headline
            scored = (batch["labels"][:, 1:] != per_sample.IGNORE_INDEX).sum(1)  # (B,)
            if raw:
                return (per_seq.float().cpu(),)
            return float((per_seq * scored).sum()), int(scored.sum())
        logits = self._logits(model, batch).float().cpu()
        if raw and self.name == "classification":
            return (logits.softmax(1),)
        return (logits,)

    def _logits(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        """The model's logits for a batch, the forward under the task's bfloat16 autocast."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            return model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits


def load_task(name: str, size: Size, device: torch.device | str = "cpu", val: int = 0) -> Task:
    """Load ``name``'s data and pretrained model at ``size``.

    Args:
        val: validation examples to carve from the training pool, after the test, train and
            spare slices (``Task.val``; for choosing a learning rate without reading the test set).
    """
    device = torch.device(device)
    autocast = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if val < 0:
        raise ValueError(f"val must be >= 0 examples, got {val}")
    if name == "classification":
        return _classification(size, device, autocast, val)
    if name == "regression":
        return _regression(size, device, autocast, val)
    if name == "generation":
        return _generation(size, device, autocast, val)
    raise ValueError(f"unknown task {name!r}; choose classification, regression or generation")


def _classification(size: Size, device: torch.device, autocast: bool, val: int) -> Task:
    articles = assets.bbc_news()
    gen = torch.Generator().manual_seed(SPLIT_SEED)
    by_topic = [[a for a in articles if a.topic == t] for t in range(len(assets.BBC_TOPICS))]
    shuffled = [[arts[i] for i in torch.randperm(len(arts), generator=gen)] for arts in by_topic]
    rounds = itertools.zip_longest(*shuffled)  # round-robin over topics: every prefix stratified
    order = [a for group in rounds for a in group if a is not None]  # all 2,225 articles
    tok, base = assets.load_minilm(
        len(assets.BBC_TOPICS), num_layers=size.layers if size.tiny else None
    )
    texts = [f"{a.title}. {a.body}" for a in order]
    ids = tok(texts, truncation=True, max_length=size.tokens)["input_ids"]
    examples = [Example(i, float(a.topic)) for i, a in zip(ids, order, strict=True)]
    test, train, spare, held = _split(examples, size, val)
    return Task(
        "classification", "accuracy", True,
        f"all-MiniLM-L6-v2 on BBC News topics ({size.train} train, {size.test} test, "
        f"<= {size.tokens} tokens)",
        size, device, train, test, spare, base, tok.pad_token_id, autocast, val=held,
    )  # fmt: skip


def _regression(size: Size, device: torch.device, autocast: bool, val: int) -> Task:
    words = assets.vader_lexicon()
    gen = torch.Generator().manual_seed(SPLIT_SEED)
    words = [words[i] for i in torch.randperm(len(words), generator=gen)]
    tok, base = assets.load_minilm(
        1, num_layers=size.layers if size.tiny else None, regression=True
    )
    ratings = torch.tensor([v for _, v in words])
    ids = tok([w for w, _ in words], truncation=True, max_length=size.tokens)["input_ids"]
    test, train, spare, held = _split(list(zip(ids, ratings.tolist(), strict=True)), size, val)
    train_ratings = torch.tensor([v for _, v in train])
    mean, std = float(train_ratings.mean()), float(train_ratings.std())

    def standardize(rows: list[tuple[list[int], float]]) -> list[Example]:
        return [Example(i, (v - mean) / std) for i, v in rows]

    return Task(
        "regression", "pearson", True,
        f"all-MiniLM-L6-v2 on VADER word valence ({size.train} train, {size.test} test)",
        size, device, standardize(train), standardize(test), standardize(spare), base,
        tok.pad_token_id, autocast, {"target_mean": mean, "target_std": std},
        standardize(held),
    )  # fmt: skip


def _generation(size: Size, device: torch.device, autocast: bool, val: int) -> Task:
    articles = assets.bbc_news()
    gen = torch.Generator().manual_seed(SPLIT_SEED + 1)
    order = [articles[i] for i in torch.randperm(len(articles), generator=gen)]
    if size.tiny:
        tok, base = _tiny_llama()
        eos = tok.sep_token_id
    else:
        tok, base = assets.load_smollm2()
        eos = tok.eos_token_id
    examples = []
    for a in order[: size.test + size.train + SPARE + val]:
        prompt = tok(
            "Article: " + a.body, add_special_tokens=False, truncation=True, max_length=size.tokens
        )["input_ids"]
        prompt += tok("\nHeadline:", add_special_tokens=False)["input_ids"]
        title = [*tok(" " + a.title, add_special_tokens=False)["input_ids"][:24], eos]
        examples.append(Example(prompt + title, 0.0, prompt_len=len(prompt)))
    test, train, spare, held = _split(examples, size, val)
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    model_name = "a random 2-layer Llama (test only)" if size.tiny else "SmolLM2-135M-Instruct"
    return Task(
        "generation", "perplexity", False,
        f"{model_name} writing BBC News headlines ({size.train} train, {size.test} test, "
        f"last {size.layers} layers trained)",
        size, device, train, test, spare, base, pad, autocast, val=held,
    )  # fmt: skip


def _tiny_llama() -> tuple[Any, nn.Module]:
    """A random two-layer Llama over MiniLM's tokenizer: the generation task's shape, in seconds."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(assets.minilm_dir())
    config = transformers.LlamaConfig(
        vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=True,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):  # the global generator is the caller's
        torch.manual_seed(SPLIT_SEED)
        return tok, transformers.LlamaForCausalLM(config)


def _split(rows: list, size: Size, val: int = 0) -> tuple[list, list, list, list]:
    """Fixed test, train, spare and validation slices of an already shuffled list."""
    need = size.test + size.train + SPARE
    if len(rows) < need + val:
        raise ValueError(f"the task has {len(rows)} examples; the size asks for {need + val}")
    return (
        rows[: size.test],
        rows[size.test : size.test + size.train],
        rows[size.test + size.train : need],
        rows[need : need + val],
    )


def _chunks(rows: list, n: int) -> list[list]:
    return [rows[i : i + n] for i in range(0, len(rows), n)]
