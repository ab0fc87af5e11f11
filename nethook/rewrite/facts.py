"""A synthetic world of subject → attribute facts and a tiny language model that learns it.

Used by the tests, the benchmark and ``docs/rewriting.md`` to show fact editing end to
end without downloading a model: subjects are two-token names, each with one city
and one sport; several templates state each relation ("lives in", "is from", ...).
The model is a three-block causal transformer built from torch modules; its MLPs
(``blocks.<i>.mlp.fc_out``) are the layers rewriting edits, as in ROME.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import TensorDataset
from tqdm.auto import tqdm

from nethook.layers import resolve_layer
from nethook.rewrite.insert import insert
from nethook.rewrite.keys import optimize_value, token_keys

FIRST = ["ana", "ben", "cleo", "dev", "eli", "fay", "gus", "hana"]
LAST = ["ito", "jung", "kova", "lind", "moss", "nair"]
CITIES = ["paris", "lima", "oslo", "cairo", "tokyo", "quito", "rome", "delhi"]
SPORTS = ["chess", "golf", "judo", "polo", "rugby", "tennis"]
TEMPLATES = {
    "city": [("lives", "in"), ("is", "from"), ("was", "born", "in"), ("resides", "in")],
    "sport": [("plays",), ("is", "good", "at"), ("trains", "for"), ("loves", "playing")],
}


@dataclass(frozen=True)
class Fact:
    """One subject's attribute for one relation."""

    subject: tuple[str, str]
    relation: str
    attribute: str


class Vocab:
    """Token ids for every word of the fact world."""

    def __init__(self):
        words = ["<pad>", "<bos>", *FIRST, *LAST, *CITIES, *SPORTS]
        words += sorted({w for ts in TEMPLATES.values() for t in ts for w in t})
        self.words = words
        self.ids = {w: i for i, w in enumerate(words)}

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, words) -> list[int]:
        """Ids of ``words``."""
        return [self.ids[w] for w in words]


def make_facts(seed: int = 0) -> list[Fact]:
    """Every subject (first × last name) with a seeded city and sport."""
    g = torch.Generator().manual_seed(seed)
    facts = []
    for first in FIRST:
        for last in LAST:
            city = CITIES[int(torch.randint(len(CITIES), (1,), generator=g))]
            sport = SPORTS[int(torch.randint(len(SPORTS), (1,), generator=g))]
            facts += [Fact((first, last), "city", city), Fact((first, last), "sport", sport)]
    return facts


def prompt(fact: Fact, template: int) -> list[str]:
    """The words before the attribute: ``<bos> first last template...``."""
    return ["<bos>", *fact.subject, *TEMPLATES[fact.relation][template]]


class Block(nn.Module):
    """Pre-norm transformer block; ``mlp.fc_out`` is the associative memory to edit."""

    def __init__(self, dim: int, heads: int, hidden: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential()
        self.mlp.add_module("fc_in", nn.Linear(dim, hidden))
        self.mlp.add_module("act", nn.GELU())
        self.mlp.add_module("fc_out", nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class TinyLM(nn.Module):
    """A causal transformer language model: ids ``[B, T]`` → logits ``[B, T, vocab]``."""

    def __init__(
        self, vocab: int, dim: int = 64, heads: int = 4, hidden: int = 256, depth: int = 3
    ):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(16, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, hidden) for _ in range(depth))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        T = ids.shape[1]
        x = self.embed(ids) + self.pos(torch.arange(T, device=ids.device))
        mask = torch.triu(torch.ones(T, T, dtype=torch.bool, device=ids.device), 1)
        for block in self.blocks:
            x = block(x, mask)
        return self.head(self.ln(x))


def batch(vocab: Vocab, prompts: list[list[str]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad prompts; return ids ``[B, T]`` and the index of each prompt's last word."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = torch.tensor(vocab.encode(p))
    return ids, torch.tensor([len(p) - 1 for p in prompts])


def train_tiny_lm(
    facts: list[Fact], seed: int = 0, steps: int = 300, depth: int = 3, progress: bool = False
) -> tuple[TinyLM, Vocab]:
    """Train a :class:`TinyLM` to recall every fact in every template (seconds on a CPU).

    Deterministic for its arguments, so results are memoized within the process:
    each call returns a fresh copy of the trained model.
    """
    key = (tuple(facts), seed, steps, depth)
    if key not in _TRAINED:
        _TRAINED[key] = _train(facts, seed, steps, depth, progress)
    model, vocab = _TRAINED[key]
    return copy.deepcopy(model), vocab


_TRAINED: dict[tuple, tuple[TinyLM, Vocab]] = {}


def _train(facts, seed, steps, depth, progress) -> tuple[TinyLM, Vocab]:
    torch.manual_seed(seed)
    vocab = Vocab()
    model = TinyLM(len(vocab), depth=depth)
    pairs = [(prompt(f, t), f.attribute) for f in facts for t in range(len(TEMPLATES[f.relation]))]
    ids, last = batch(vocab, [p for p, _ in pairs])
    target = torch.tensor(vocab.encode([a for _, a in pairs]))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    rows = torch.arange(len(pairs))
    for _ in tqdm(range(steps), desc="train tiny LM", disable=not progress):
        logits = model(ids)[rows, last]
        loss = nn.functional.cross_entropy(logits, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), vocab


@torch.no_grad()
def predict(model: TinyLM, vocab: Vocab, prompts: list[list[str]]) -> list[str]:
    """The top next word after each prompt."""
    ids, last = batch(vocab, prompts)
    logits = model(ids)[torch.arange(len(prompts)), last]
    return [vocab.words[i] for i in logits.argmax(-1).tolist()]


def recall(model: TinyLM, vocab: Vocab, facts: list[Fact]) -> float:
    """Fraction of (fact, template) prompts answered with the fact's attribute."""
    prompts, answers = [], []
    for f in facts:
        for t in range(len(TEMPLATES[f.relation])):
            prompts.append(prompt(f, t))
            answers.append(f.attribute)
    got = predict(model, vocab, prompts)
    return sum(a == b for a, b in zip(got, answers, strict=True)) / len(answers)


def fact_batch(vocab: Vocab, fact: Fact, templates: Iterable[int]):
    """Ids, subject positions, last positions for ``fact`` stated in ``templates``."""
    ids, last = batch(vocab, [prompt(fact, t) for t in templates])
    return ids, torch.full_like(last, 2), last


def rewrite_fact(
    model: TinyLM,
    vocab: Vocab,
    fact: Fact,
    new_attribute: str,
    C: torch.Tensor,
    layer: str = "blocks.0.mlp.fc_out",
    templates: Iterable[int] = (0, 1),
    steps: int = 100,
    other_facts: list[Fact] | None = None,
):
    """ROME-style rank-one edit making ``fact.subject`` have ``new_attribute``.

    The key is the edited layer's input at the subject's last token; the value is
    optimized so the model states the new attribute in ``templates`` (the others are
    held out as paraphrases); the answers to ``other_facts`` of the same subject are
    kept as they were. Returns the (not yet applied) :class:`Edit`.
    """
    templates = list(templates)
    ids, positions, last = fact_batch(vocab, fact, templates)
    k_star = token_keys(model, layer, ids, positions)[0]
    target = torch.full((ids.shape[0],), vocab.ids[new_attribute])
    keep = None
    if other_facts:
        prompts = [prompt(f, t) for f in other_facts for t in templates]
        keep_ids, keep_last = batch(vocab, prompts)
        answers = predict(model, vocab, prompts)
        keep_targets = torch.tensor(vocab.encode(answers))
        keep = (keep_ids, torch.full_like(keep_last, 2), keep_last, keep_targets)
    v_star = optimize_value(model, layer, ids, positions, last, target, steps=steps, keep=keep)
    return insert(model, layer, k_star, v_star, C)


def finetune_fact(
    model: TinyLM,
    vocab: Vocab,
    fact: Fact,
    new_attribute: str,
    layer: str = "blocks.0.mlp.fc_out",
    templates: Iterable[int] = (0, 1),
    steps: int = 100,
    lr: float = 1e-2,
) -> None:
    """Baseline: fine-tune ``layer``'s weight without the direction constraint (in place)."""
    weight = resolve_layer(model, layer).weight
    ids, _, last = fact_batch(vocab, fact, templates)
    target = torch.full((ids.shape[0],), vocab.ids[new_attribute])
    opt = torch.optim.Adam([weight], lr=lr)
    rows = torch.arange(ids.shape[0])
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(ids)[rows, last], target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.05:
            break


def evaluate_edit(
    model: TinyLM, vocab: Vocab, facts: list[Fact], edited: Fact, new_attribute: str
) -> dict[str, float]:
    """Efficacy in every template, and specificity on every other fact.

    ``efficacy``: fraction of the edited fact's templates answered with the new
    attribute; ``specificity``: fraction of other subjects' (fact, template) prompts
    still answered correctly; ``same_subject``: the edited subject's other facts.
    """
    n = len(TEMPLATES[edited.relation])
    got = predict(model, vocab, [prompt(edited, t) for t in range(n)])
    others = [f for f in facts if f.subject != edited.subject]
    same = [f for f in facts if f.subject == edited.subject and f != edited]
    return {
        "efficacy": sum(g == new_attribute for g in got) / n,
        "specificity": recall(model, vocab, others),
        "same_subject": recall(model, vocab, same) if same else 1.0,
    }


def key_text(vocab: Vocab, facts: list[Fact], random: int = 1280, seed: int = 1) -> TensorDataset:
    """Text to collect key statistics on: random word sequences plus every fact prompt.

    Sequences are 8 words long (prompts right-padded), as a ``TensorDataset`` of ids.
    """
    g = torch.Generator().manual_seed(seed)
    noise = torch.randint(1, len(vocab), (random, 8), generator=g)
    ids, _ = batch(vocab, [prompt(f, t) for f in facts for t in range(len(TEMPLATES[f.relation]))])
    ids = nn.functional.pad(ids, (0, 8 - ids.shape[1]))
    return TensorDataset(torch.cat([noise, ids]))
