"""Fact editing on a tiny trained language model: efficacy and specificity, measured."""

import copy

import pytest
import torch

from nethook.rewrite import facts as fw
from nethook.rewrite.keys import key_second_moment

LAYER = "blocks.0.mlp.fc_out"


@pytest.fixture(scope="module")
def world():
    torch.manual_seed(0)
    facts = fw.make_facts(0)
    model, vocab = fw.train_tiny_lm(facts, seed=0)
    C = key_second_moment(model, LAYER, fw.key_text(vocab, facts), progress=False).moment()
    return model, vocab, facts, C


def edits(facts):
    """A fixed, seeded choice of facts to rewrite and their new attributes."""
    chosen = facts[3::25]
    for i, fact in enumerate(chosen):
        pool = fw.CITIES if fact.relation == "city" else fw.SPORTS
        yield fact, [a for a in pool if a != fact.attribute][i % 3]


def test_tiny_lm_knows_every_fact(world):
    model, vocab, facts, _ = world
    assert fw.recall(model, vocab, facts) == 1.0


def test_rank_one_fact_edit_is_effective_specific_and_reversible(world):
    model, vocab, facts, C = world
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ours, tuned = [], []
    for fact, new in edits(facts):
        same = [f for f in facts if f.subject == fact.subject and f != fact]
        edit = fw.rewrite_fact(model, vocab, fact, new, C, layer=LAYER, other_facts=same)
        assert edit.rank == 1
        edit.apply(model)
        ours.append(fw.evaluate_edit(model, vocab, facts, fact, new))
        edit.revert(model)
        baseline = copy.deepcopy(model)
        fw.finetune_fact(baseline, vocab, fact, new, layer=LAYER)
        tuned.append(fw.evaluate_edit(baseline, vocab, facts, fact, new))
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name  # every edit reverted bit for bit

    def mean(rows, key):
        return sum(r[key] for r in rows) / len(rows)

    # efficacy counts all four templates: two were used to find v*, two are paraphrases
    assert mean(ours, "efficacy") >= 0.9
    assert mean(ours, "specificity") >= 0.97
    assert mean(ours, "same_subject") >= 0.9
    assert mean(ours, "specificity") > mean(tuned, "specificity") + 0.1
