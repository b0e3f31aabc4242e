"""ser/loop.py: what a SER loop decides is written once, and nothing else decides it."""

import re
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import ROOT
from ser import loop
from ser.selection import MAPPINGS, RULES, STATUS1, STATUS2, STOP, WITH_MEMBERS, Thresholds, by_status


def tracked(*patterns) -> list[str]:
    return subprocess.run(["git", "ls-files", *patterns], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.split()


def test_no_status_decision_or_training_mix_is_made_outside_the_loop_module():
    """The grep-able rule: a status is decided only by ser/selection.py's rules, called only from ser/loop.py;
    the driver asks ser.loop for the training mix and the model RM_t starts from."""
    offenders = []
    for path in tracked("*.py"):
        if path.startswith("tests/") or path in ("ser/loop.py", "ser/selection.py"):
            continue
        for n, line in enumerate((ROOT / path).read_text().splitlines(), start=1):
            code = line.split("#")[0]
            if re.search(r"(?<![\w.])select\(|selection\.select\(|\bDecision\(|\bby_status\(|\beligibility\(", code):
                offenders.append(f"{path}:{n}: {line.strip()}")
            if re.search(r"\bif\b.*\b(keep_seed|union|continue_training)\b", code):
                offenders.append(f"{path}:{n}: {line.strip()}")
    for path in tracked("*.sh"):
        for n, line in enumerate((ROOT / path).read_text().splitlines(), start=1):
            if re.search(r"\$(KEEP_SEED|UNION|CONTINUE)\b.*==|\(\((KEEP_SEED|UNION|CONTINUE)\b", line):
                offenders.append(f"{path}:{n}: {line.strip()}")
    assert offenders == []


@pytest.mark.parametrize("keep_seed", [True, False])
@pytest.mark.parametrize("union", [True, False])
def test_the_training_mix(keep_seed, union):
    mix = loop.training_mix("D", ["s1", "s2", "s3"], ["h1"], keep_seed, union)
    assert mix == (["D"] if keep_seed else []) + ["h1"] + (["s1", "s2", "s3"] if union else ["s3"])
    assert loop.start_from("prev", "sft", True) == "prev" and loop.start_from("prev", "sft", False) == "sft"


def test_the_driver_gets_the_same_answers_from_the_command_line(tmp_path):
    def ask(*args):
        return subprocess.run([sys.executable, "-m", "ser.loop", *args], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.splitlines()

    assert ask("mix", "D", "1", "0", "human", "h", "selected", "a", "b") == ["D", "h", "b"]
    assert ask("mix", "D", "0", "1", "human", "selected", "a", "b") == ["a", "b"]
    assert ask("start", "prev", "sft", "0") == ["sft"]
    (tmp_path / "1.json").write_text('{"status": "status2"}')
    (tmp_path / "2.json").write_text('{"status": "stop"}')
    assert ask("reached", str(tmp_path / "1.json")) == ["status2"] and ask("reached") == [""]
    assert ask("stopped", str(tmp_path / "2.json")) == ["True"]


rewards = st.lists(st.floats(-30, 30, allow_nan=False), min_size=1, max_size=30)


@settings(max_examples=100, deadline=None)
@given(rewards, st.floats(-50, 50, allow_nan=False))
def test_centred_and_pairwise_probabilities_ignore_a_constant_offset(r, offset):
    r_j, r_k = torch.tensor(r), torch.tensor(r[::-1])
    for mapping in ("centred", "pairwise"):
        a = loop.probabilities(r_j, r_k, mapping)
        b = loop.probabilities(r_j + offset, r_k + offset, mapping)
        assert torch.allclose(a[0], b[0], atol=1e-6) and torch.allclose(a[1], b[1], atol=1e-6)
    p_j, p_k = loop.probabilities(r_j, r_k, "sigmoid")
    assert torch.allclose(p_j, torch.sigmoid(r_j.double())) and set(MAPPINGS) == {"sigmoid", "pairwise", "centred"}


probability = st.floats(0, 1, allow_nan=False)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(probability, probability), min_size=1, max_size=40), st.integers(1, 10),
       st.floats(0, 0.5), st.sampled_from(sorted(RULES)))
def test_a_monotone_status_never_goes_back_to_status_1(pairs, floor, share, rule):
    t = Thresholds(status1_min_pairs=floor, status2_min_pairs=floor, status1_min_share=share, monotone=True)
    p_j, p_k = [a for a, _ in pairs], [b for _, b in pairs]
    members = [(p_k, p_j)] if rule in WITH_MEMBERS else None
    decision = loop.decide(p_j, p_k, t, rule, STATUS2, members if rule != "ensemble" else [(p_j, p_k)])
    assert decision.status != STATUS1
    assert len(decision.mask) == len(pairs)


def test_a_floor_given_as_a_share_of_the_pool():
    t = Thresholds(status1_min_pairs=1, status2_min_pairs=1, status1_min_share=0.5, status2_min_share=0.25)
    assert t.floors(10) == (5, 3) and t.floors(1000) == (500, 250)
    flags = [(True, True)] * 4 + [(False, True)] * 6
    assert by_status(flags, t).status == STATUS2  # 4 Status-1 pairs < 5, 10 Status-2 pairs >= 3
    assert by_status(flags[:4] + [(False, False)] * 96, t).status == STOP  # 4 < 50 and 4 < 25


def test_the_member_rules():
    p_j, p_k = [0.9, 0.9, 0.1, 0.52], [0.1, 0.1, 0.9, 0.48]
    t = Thresholds(status1_min_pairs=1, status2_min_pairs=1, delta_threshold=0.3)
    same = loop.decide(p_j, p_k, t, "agreement", members=[])
    assert same.mask == loop.decide(p_j, p_k, t, "paper").mask == [True, True, True, False]
    other = ([0.9, 0.1, 0.1, 0.9], [0.1, 0.9, 0.9, 0.1])  # disagrees on pair 1
    assert loop.decide(p_j, p_k, t, "agreement", members=[other]).mask == [True, False, True, False]
    # the ensemble's mean probabilities: pair 0 stays sure, pair 2 is averaged with a member at 0.5/0.5
    mean = loop.decide(p_j, p_k, t, "ensemble", members=[([0.9, 0.9, 0.5, 0.5], [0.1, 0.1, 0.5, 0.5])])
    assert mean.mask == [True, True, False, False]
    with pytest.raises(ValueError, match="ensemble: needs the ensemble's members"):
        loop.decide(p_j, p_k, t, "ensemble", members=[])


def test_continue_and_restart_differ_only_in_where_rm_t_starts():
    """The in-process loop on a toy scorer: each loop's RM is a count of what it was trained on, and
    restarting passes None as the start."""
    starts = []

    def score(rm, idx):
        return torch.linspace(-3, 3, len(idx)), -torch.linspace(-3, 3, len(idx))

    def train(mix, init):
        starts.append(init)
        return len(mix)

    t = Thresholds(status1_min_pairs=2, status2_min_pairs=2)
    for cont in (True, False):
        starts.clear()
        loops = loop.run("rm0", score, train, 40, loop.Settings(thresholds=t, continue_training=cont, max_loops=3))
        assert [r.rm for r in loops if r.rm is not None] == [2, 3, 4][:len(starts)]  # seed + every selection
        assert starts[0] == ("rm0" if cont else None)
        if len(starts) > 1:
            assert starts[1] == (2 if cont else None)
        selected = torch.cat([r.selected for r in loops if r.selected is not None])
        assert len(set(selected.tolist())) == len(selected)  # a pair is selected once


def test_run_asks_among_the_pairs_the_loop_did_not_select_and_trains_on_their_labels():
    """ser/loop.py's ask step, where the driver's ASK_HUMANS asks: after the loop's selection, among the pairs it
    did not select; the asked pairs leave the pool and join this and every later retraining's human sets."""
    import torch

    from ser.loop import Settings, run
    from ser.selection import Thresholds

    rewards = torch.linspace(-3, 3, 40)  # pair i: r_j = rewards[i], r_k = 0; RM_t is t + 1 times as sure

    def score(rm, idx):
        return rewards[idx] * (1 + rm), torch.zeros(len(idx))

    seen, mixes = [], []

    def ask(loop, rm, idx):
        seen.append((loop, idx.clone()))
        return (idx[:3], f"human-{loop}") if loop == 1 else None

    def train(mix, init):
        mixes.append(mix)
        return len(mixes)

    loops = run(0, score, train, 40, Settings(Thresholds(status1_min_pairs=1, status2_min_pairs=1), max_loops=2), ask=ask)
    first = loops[0]
    assert set(seen[0][1].tolist()) == set(range(40)) - set(first.selected.tolist())  # only the unselected pairs
    assert first.asked.tolist() == seen[0][1][:3].tolist()
    assert mixes[0][:2] == ["seed", "human-1"] and mixes[1][:2] == ["seed", "human-1"]  # in every later retraining
    assert not set(first.asked.tolist()) & set(loops[1].pool.tolist())  # the asked pairs left the pool
    assert loops[1].asked is None and len(seen) == 2
