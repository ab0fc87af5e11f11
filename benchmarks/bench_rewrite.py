"""Rewriting, measured: fact edits vs fine-tuning, a conv rule edit, key-statistics cost.

Run: ``.venv/bin/python benchmarks/bench_rewrite.py [--edits 24]``. Prints, side by
side in one run:

1. the tiny language model (``nethook.rewrite.facts``): efficacy (all templates and
   the two held-out paraphrases alone), specificity on other subjects and on the
   edited subject's other fact, for the rank-one edit and for fine-tuning the same
   layer without the direction constraint;
2. the demo scene CNN's ``block3.conv``: relative change on held-out keys and
   selectivity for context keys, rank-one edit vs gradient descent;
3. the time to collect the key second moment ``C`` vs the bare forward pass to the
   layer over the same batches.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch.utils.data import TensorDataset

from nethook.rewrite import facts as fw
from nethook.rewrite.keys import key_second_moment
from nethook.trace import Trace


def fact_edits(n_edits: int) -> None:
    facts = fw.make_facts(0)
    lm, vocab = fw.train_tiny_lm(facts, seed=0)
    layer = "blocks.0.mlp.fc_out"
    C = key_second_moment(lm, layer, fw.key_text(vocab, facts), progress=False).moment()
    step = max(1, len(facts) // n_edits)
    rows = {"rank-one edit": [], "fine-tune": []}
    for i, fact in enumerate(facts[::step][:n_edits]):
        pool = fw.CITIES if fact.relation == "city" else fw.SPORTS
        new = [a for a in pool if a != fact.attribute][i % 3]
        same = [f for f in facts if f.subject == fact.subject and f != fact]
        edit = fw.rewrite_fact(lm, vocab, fact, new, C, layer=layer, other_facts=same)
        edit.apply(lm)
        rows["rank-one edit"].append(_scores(lm, vocab, facts, fact, new))
        edit.revert(lm)
        tuned = copy.deepcopy(lm)
        fw.finetune_fact(tuned, vocab, fact, new, layer=layer)
        rows["fine-tune"].append(_scores(tuned, vocab, facts, fact, new))
    print(f"\n1. fact edits on the tiny LM ({n_edits} edits, layer {layer})")
    print(f"{'method':<15}{'efficacy':>10}{'paraphrase':>12}{'specificity':>13}{'same subj.':>12}")
    for name, scores in rows.items():
        means = [statistics.mean(s[k] for s in scores) for k in scores[0]]
        print(
            f"{name:<15}"
            + "".join(f"{m:>{w}.3f}" for m, w in zip(means, (10, 12, 13, 12), strict=True))
        )


def _scores(model, vocab, facts, fact, new):
    s = fw.evaluate_edit(model, vocab, facts, fact, new)
    para = fw.predict(model, vocab, [fw.prompt(fact, t) for t in (2, 3)])
    return {
        "efficacy": s["efficacy"],
        "paraphrase": sum(p == new for p in para) / 2,
        "specificity": s["specificity"],
        "same_subject": s["same_subject"],
    }


def conv_edit() -> None:
    from nethook_plugins.scenes.source import Scenes

    from nethook.demo.scene_cnn import scene_cnn
    from nethook.rewrite import LinearMemory, insert

    layer, tree_id = "block3.conv", 12
    source = Scenes(n=256, size=64, seed=3, progress=False)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in source.normalization)
    items = [source[i] for i in range(len(source))]
    images = (torch.stack([it["image"] for it in items]) - mean) / std
    objects = torch.stack([it["labels"]["object"][0] for it in items])
    model = scene_cnn()
    half = len(items) // 2
    C = key_second_moment(model, layer, TensorDataset(images[:half]), progress=False).moment()
    with torch.no_grad(), Trace(model, layer, retain_input=True, stop=True) as t:
        model(images)
    keys = t.input.permute(0, 2, 3, 1).double()
    tree = (
        torch.nn.functional.adaptive_avg_pool2d(
            (objects == tree_id).float()[:, None], keys.shape[1:3]
        )[:, 0]
        > 0.9
    )
    W0 = LinearMemory(model.get_submodule(layer)).matrix().double()
    context = keys[:half][tree[:half]]
    k_star = context.mean(0)
    v_star = W0 @ keys[:half][~tree[:half]][0]
    edit = insert(model, layer, k_star, v_star, C.double(), context=context, rank=1)
    ours = edit.lam.double() @ edit.directions.double().T
    tuned = torch.outer(v_star - W0 @ k_star, k_star) / (k_star @ k_star)  # where GD converges

    def change(delta, k):
        return float((k @ delta.T).norm(dim=1).pow(2).mean() / (k @ W0.T).norm(dim=1).pow(2).mean())

    held_tree, held_other = keys[half:][tree[half:]], keys[half:][~tree[half:]]
    print(f"\n2. conv rule edit, demo scene CNN {layer} (tree context, {len(context)} keys)")
    print(f"{'method':<15}{'held-out change':>17}{'tree change':>13}{'selectivity':>13}")
    for name, delta in (("rank-one edit", ours), ("fine-tune", tuned)):
        a, b = change(delta, held_other), change(delta, held_tree)
        print(f"{name:<15}{a:>17.4f}{b:>13.4f}{b / a:>13.2f}")


def key_statistics_cost(repeats: int = 3) -> None:
    from nethook.demo.scene_cnn import scene_cnn

    model = scene_cnn()
    images = torch.randn(1024, 3, 64, 64)
    layer = "block4.conv"
    bare, ours = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        with torch.no_grad():
            for b in images.split(64):
                with Trace(model, layer, retain_output=False, stop=True):
                    model(b)
        bare.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        key_second_moment(model, layer, TensorDataset(images), batch_size=64, progress=False)
        ours.append(time.perf_counter() - t0)
    n = len(images)
    print(f"\n3. key second moment of {layer} over {n} images (median of {repeats})")
    print(
        f"forward to the layer: {statistics.median(bare):.3f} s; with C: "
        f"{statistics.median(ours):.3f} s; ratio {statistics.median(ours) / statistics.median(bare):.2f}x"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edits", type=int, default=24)
    args = parser.parse_args()
    torch.manual_seed(0)
    fact_edits(args.edits)
    conv_edit()
    key_statistics_cost()


if __name__ == "__main__":
    main()
