"""The why-SER study (experiments/why_study.py): tuning spends no label outside the seed, the matched-steps
control runs SER's optimiser steps, the precision dial's labels have the precision it names, and the report
reads its rows."""

import torch

from conftest import toy_layers as layers
from experiments import frozen_study as fs
from experiments import why_study as why


def test_cv_picks_the_informative_layer_and_extends_the_l2_grid_for_pure_noise():
    pools, _ = layers()
    layer, _ = why.choose_layer(pools, list(range(200)), seed=0)
    assert layer == 2  # layer 1's labels are coin flips
    l2, _ = why.choose_l2(pools[1].j[:60], pools[1].k[:60], seed=0)
    assert l2 > why.L2_GRID[-1]  # noise: the largest L2 keeps winning, so the grid grew past its first top


def test_one_seed_matches_steps_and_dials_precision(monkeypatch):
    monkeypatch.setitem(why.STEPS, "lr", 0.05)  # a toy head needs a larger step for its rewards to pass 0.55 / 0.45
    pools, helds = layers()
    rest = list(range(len(pools[2])))
    rows = why.one_seed(why.PRIMARY, 0, pools, helds, rest)
    by = {(r["variant"], r.get("pi")): r for r in rows}
    assert by[("cv-seed", None)]["labelled"] == 26 and by[("cv-seed", None)]["layer"] == 2
    ser, matched, seed = by[("steps-ser", None)], by[("steps-matched", None)], by[("steps-seed", None)]
    assert ser["loops"] >= 1 and matched["steps"] == ser["steps"] == seed["steps"] + sum(ser["loop_steps"])
    cv_ser, cv_matched = by[("stepscv-ser", None)], by[("stepscv-matched", None)]
    assert cv_matched["steps"] == cv_ser["steps"] and cv_ser["lr"] in why.LR_GRID + [10.0, 100.0]
    assert seed["steps"] == 2 * -(-26 // why.STEPS["batch_size"])  # 2 epochs of batch 40: not to convergence
    assert [pi for v, pi in by if v == "flip"] == why.PIS
    precision = by[("correct", 1.0)]["self_precision"]
    assert 0.5 < precision < 1
    n = by[("cv-ser", None)]["selected_total"]  # the dial relabels the CV protocol's SER selections
    assert {pi for v, pi in by if v == "correct"} == {pi for pi in why.PIS if round(pi * n) >= round(precision * n)}
    assert by[("flip", 1.0)]["selected"] == n == by[("random-human", None)]["selected"] == by[("random-self", None)]["selected"]


def test_the_dial_sets_the_precision_it_names(monkeypatch):
    """flip at pi trains on exactly round((1 - pi) n) wrong labels; correct at pi on round(pi n) right ones."""
    pools, helds = layers()
    unlabelled, held = pools[2].take(list(range(100, 2600))), helds[2]
    labelled = pools[2].take(list(range(100)))
    w0 = fs.fit(labelled.j, labelled.k, 1.0)
    selections = [(torch.arange(200), (unlabelled.take(range(200)).j - unlabelled.take(range(200)).k) @ w0 > 0)]
    seen = []
    real_fit = fs.fit
    monkeypatch.setattr(fs, "fit", lambda j, k, l2, w=None: seen.append((j, k)) or real_fit(j, k, l2, w))
    why.dial_and_comparators(0.01, 0, labelled, unlabelled, held, w0, 1.0, [], selections, {})
    truth = unlabelled.take(range(200))
    right = lambda j: int((j[100:] == truth.j).all(1).sum())  # noqa: E731 (selected pairs whose j is the human's)
    own = int(selections[0][1].sum())
    expected = []
    for pi in why.PIS:
        expected.append(round(pi * 200))  # flip
        if round(pi * 200) >= own:
            expected.append(round(pi * 200))  # correct
    assert [right(j) for j, _ in seen[:len(expected)]] == expected


def test_the_report_reads_its_rows():
    pools, helds = layers()
    rest = list(range(len(pools[2])))
    full = why.full_rows(pools, helds, rest)
    rows = []
    for seed in (0, 1):
        rows += why.one_seed(why.PRIMARY, seed, pools, helds, rest) + [{**r, "fraction": why.PRIMARY, "seed": seed} for r in full]
    text = why.report({"setting": "toy", "held_out_pairs": 300, "validation_pairs": 0, "why": {"rows": rows}})
    for needed in ("## 2. The optimisation confound", "| STEPS-CV | 1 % |", "## 3. The precision dial", "oracle − random-human",
                   "gap recovered"):
        assert needed in text
    assert "| 1 % | CV |" in text
