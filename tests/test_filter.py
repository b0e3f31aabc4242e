"""Selection invariants of rm_loop_filter_by_self.py (its rules are ser/selection.py's), as properties over
random scored pools."""

import json
from collections import Counter
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import rm_loop_filter_by_self as F
from ser import selection
from ser.data import load_records, write_records

probability = st.floats(0.0, 1.0, allow_nan=False)


@st.composite
def pools(draw):
    n = draw(st.integers(0, 40))
    pool = []
    for i in range(n):
        p_j, p_k = draw(probability), draw(probability)
        pair = {"id": i, "question": f"q{i}", "response_j": f"a{i}", "response_k": f"b{i}",
                "score_j": p_j, "score_k": p_k}
        if draw(st.booleans()):
            pair[F.GOLD] = draw(st.sampled_from("jk"))
        pool.append(pair)
    return pool


@st.composite
def settings_(draw):
    lo = draw(st.floats(0.0, 0.6))
    hi = draw(st.floats(lo, 1.0))
    return F.ScriptArguments(
        dataset_name="-", rm_next_loop_save_path="-", remaining_data_save_path="-",
        left_threshold=lo, right_threshold=hi, delta_threshold=draw(st.floats(0.0, 1.0)),
        status1_min_pairs=draw(st.integers(0, 30)), status2_min_pairs=draw(st.integers(0, 30)),
        selection=draw(st.sampled_from(sorted(selection.RULES))))  # every registered rule


def members_of(pool, args):
    """For the rules that read other RMs: two members, one agreeing with the RM, one that reverses its
    preference on every third pair."""
    if args.selection not in selection.WITH_MEMBERS:
        return None
    p_j, p_k = [p["score_j"] for p in pool], [p["score_k"] for p in pool]
    flipped = [(b, a) if i % 3 == 0 else (a, b) for i, (a, b) in enumerate(zip(p_j, p_k))]
    return [(p_j, p_k), ([a for a, _ in flipped], [b for _, b in flipped])]


def select_pairs(pool, args):
    return F.select_pairs(pool, args, members_of(pool, args))


def key(pair):
    return (pair["id"], frozenset((pair["response_j"], pair["response_k"])))


@settings(max_examples=300, deadline=None)
@given(pools(), settings_())
def test_selected_plus_remaining_is_the_pool(pool, args):
    _, selected, remaining, _ = select_pairs(pool, args)
    assert Counter(map(key, selected + remaining)) == Counter(map(key, pool))
    assert remaining == [p for p in pool if p["id"] not in {s["id"] for s in selected}]


@settings(max_examples=300, deadline=None)
@given(pools(), settings_())
def test_response_j_is_the_one_the_rm_prefers(pool, args):
    _, selected, _, _ = select_pairs(pool, args)
    by_id = {p["id"]: p for p in pool}
    for s in selected:
        src = by_id[s["id"]]
        assert s["score_j"] >= s["score_k"]
        assert s["score_j"] == max(src["score_j"], src["score_k"])
        winner = src["response_j"] if src["score_j"] >= src["score_k"] else src["response_k"]
        assert s["response_j"] == winner
        if F.GOLD in src:  # the hidden human label follows the responses it names
            human_choice = src["response_" + src[F.GOLD]]
            assert s["response_" + s[F.GOLD]] == human_choice


@settings(max_examples=300, deadline=None)
@given(pools(), settings_())
def test_paper_status_follows_thresholds_and_counts(pool, args):
    args = replace(args, selection="paper")
    lo, hi, delta = args.left_threshold, args.right_threshold, args.delta_threshold
    s1 = [(p["score_j"] > hi and p["score_k"] < lo) or (p["score_k"] > hi and p["score_j"] < lo) for p in pool]
    s2 = [abs(p["score_j"] - p["score_k"]) >= delta for p in pool]
    status, selected, _, counts = F.select_pairs(pool, args)
    assert counts == {"status1_eligible": sum(s1), "status2_eligible": sum(s2)}
    if sum(s1) >= args.status1_min_pairs:
        assert status == "status1" and [s["id"] for s in selected] == [p["id"] for p, e in zip(pool, s1) if e]
    elif sum(s2) >= args.status2_min_pairs:
        assert status == "status2" and [s["id"] for s in selected] == [p["id"] for p, e in zip(pool, s2) if e]
    else:
        assert status == "stop" and selected == []


def released_rule(items, left, right):
    """The original script's loop, restated: keep j-wins, swap k-wins, the rest remains."""
    use, remaining = [], []
    for item in items:
        j, k = float(item["score_j"]), float(item["score_k"])
        if (j > right and k < left) or (j - k > 0.3):
            use.append(item)
        elif (k > right and j < left) or (k - j > 0.3):
            t = dict(item)
            t["response_j"], t["response_k"] = item["response_k"], item["response_j"]
            t["score_j"], t["score_k"] = item["score_k"], item["score_j"]
            use.append(t)
        else:
            remaining.append(item)
    return use, remaining


@settings(max_examples=500, deadline=None)
@given(pools(), settings_())
def test_released_mode_equals_the_original_rule(pool, args):
    args = replace(args, selection="released", delta_threshold=0.3)
    pool = [{k: v for k, v in p.items() if k != F.GOLD} for p in pool]
    status, selected, remaining, _ = F.select_pairs(pool, args)
    use, rest = released_rule(pool, args.left_threshold, args.right_threshold)
    assert status == "released"
    assert selected == use and remaining == rest


@settings(max_examples=200, deadline=None)
@given(pools(), settings_())
def test_gold_labels_never_change_the_selection(pool, args):
    blind = [{k: v for k, v in p.items() if k != F.GOLD} for p in pool]
    with_gold = select_pairs(pool, args)
    without = select_pairs(blind, args)
    strip = lambda rows: [{k: v for k, v in r.items() if k != F.GOLD} for r in rows]  # noqa: E731
    assert with_gold[0] == without[0] and with_gold[3] == without[3]
    assert strip(with_gold[1]) == without[1] and strip(with_gold[2]) == without[2]


def test_precision_is_counted_against_the_hidden_label():
    pool = [{"id": 0, "question": "q", "response_j": "a", "response_k": "b", "score_j": 0.9, "score_k": 0.1,
             F.GOLD: "j"},
            {"id": 1, "question": "q", "response_j": "a", "response_k": "b", "score_j": 0.1, "score_k": 0.9,
             F.GOLD: "j"},  # the RM prefers k: wrong
            {"id": 2, "question": "q", "response_j": "a", "response_k": "b", "score_j": 0.2, "score_k": 0.95,
             F.GOLD: "k"}]
    args = F.ScriptArguments(dataset_name="-", rm_next_loop_save_path="-", remaining_data_save_path="-", status1_min_pairs=1)
    pool = [{**p, "texts": F.texts_hash(p)} for p in pool]  # what F.read_pool keeps of each pair
    decision = F.decide(pool, args)
    stats = F.statistics(pool, decision.mask, decision.status, decision.counts, args)
    assert stats["status"] == "status1" and stats["selected"] == 3
    assert stats["pseudo_label_precision"] == pytest.approx(2 / 3)
    assert sum(stats["score_histogram"]["counts"]) == 6


def test_seed_mode_reads_scores_and_writes_json_lists(tmp_path):
    pool = [{"question": "q", "response_j": "a", "response_k": "b", "score_j": 0.2, "score_k": 0.8},
            {"question": "q", "response_j": "c", "response_k": "d", "score_j": 0.5, "score_k": 0.5}]
    (tmp_path / "pool.json").write_text(json.dumps(pool))
    F.main(F.ScriptArguments(dataset_name=str(tmp_path / "pool.json"), rm_next_loop_save_path=str(tmp_path / "out" / "use.json"),
                             remaining_data_save_path=str(tmp_path / "out" / "rest.json"), selection="released"))
    use = json.loads((tmp_path / "out" / "use.json").read_text())
    assert use == [{"question": "q", "response_j": "b", "response_k": "a", "score_j": 0.8, "score_k": 0.2}]
    assert len(load_records(tmp_path / "out" / "rest.json")) == 1


def test_seed_mode_without_scores_is_a_clear_error(tmp_path):
    write_records(tmp_path / "pool.jsonl", [{"question": "q", "response_j": "a", "response_k": "b"}])
    with pytest.raises(ValueError, match=r"pool.jsonl:1: field 'score_j' missing"):
        F.main(F.ScriptArguments(dataset_name=str(tmp_path / "pool.jsonl"), rm_next_loop_save_path=str(tmp_path / "u.json"),
                                remaining_data_save_path=str(tmp_path / "r.json")))


# ----------------------------------------------------------------------------- pairwise probability

reward = st.floats(-8.0, 8.0, allow_nan=False)


@st.composite
def reward_pools(draw):
    """Pools scored with raw rewards, turned into probabilities the way self_label does."""
    n = draw(st.integers(1, 40))
    return [{"id": i, "question": f"q{i}", "response_j": f"a{i}", "response_k": f"b{i}",
             "reward_j": draw(reward), "reward_k": draw(reward)} for i in range(n)]


def pairwise(pool, offset=0.0):
    out = []
    for p in pool:
        a, b = p["reward_j"] + offset, p["reward_k"] + offset
        out.append({**p, "reward_j": a, "reward_k": b, "score_j": selection.sigmoid(a - b), "score_k": selection.sigmoid(b - a)})
    return out


def pairwise_args(**kw):
    return F.ScriptArguments(dataset_name="-", rm_next_loop_save_path="-", remaining_data_save_path="-",
                             probability="pairwise", **kw)


@settings(max_examples=300, deadline=None)
@given(reward_pools(), st.floats(0.05, 0.95), st.floats(0.05, 0.95))
def test_pairwise_status1_pairs_are_the_easy_ones(pool, gap_a, gap_b):
    """Status 1 takes sure pairs, Status 2 adds less sure ones: every Status-1 eligible pair is at least
    as confident as every pair only Status 2 takes."""
    args = pairwise_args(pairwise_easy_gap=max(gap_a, gap_b), delta_threshold=min(gap_a, gap_b))
    flags = [selection.eligibility(p["score_j"], p["score_k"], selection.Thresholds.of(args)) for p in pairwise(pool)]
    conf = [abs(p["reward_j"] - p["reward_k"]) for p in pool]
    easy = [c for c, (s1, _) in zip(conf, flags) if s1]
    hard_only = [c for c, (s1, s2) in zip(conf, flags) if s2 and not s1]
    assert all(s2 for s1, s2 in flags if s1)  # Status 1 is a subset of Status 2
    if easy and hard_only:
        assert min(easy) >= max(hard_only)


def test_pairwise_reaches_status_2_once_the_easy_pairs_are_gone():
    """With p_j = sigmoid(r_j - r_k) the paper's Status-1 rule (|dr| > 0.20) contains its Status-2 rule
    (|dr| >= 0.62), so Status 2 was unreachable. A pool of clear but not sure pairs now reaches it."""
    args = pairwise_args(status1_min_pairs=5, status2_min_pairs=5)
    pool = pairwise([{"id": i, "question": "q", "response_j": "a", "response_k": "b", "reward_j": 0.3 + 0.7 * (i % 2),
                      "reward_k": 0.0} for i in range(20)])  # |dr| = 0.3 or 1.0: p 0.57 or 0.73, none >= 0.8
    status, selected, remaining, counts = F.select_pairs(pool, args)
    assert status == "status2" and {s["id"] % 2 for s in selected} == {1}  # p 0.73 >= 0.65; p 0.57 remain
    # and with enough sure pairs, Status 1 comes first and takes only those
    args = pairwise_args(status1_min_pairs=1, status2_min_pairs=1)
    pool = pairwise([{"id": i, "question": "q", "response_j": "a", "response_k": "b", "reward_j": 2.0 * (i % 3),
                      "reward_k": 0.0} for i in range(30)])  # |dr| 0, 2 or 4
    status, selected, _, _ = F.select_pairs(pool, args)
    assert status == "status1" and {s["id"] % 3 for s in selected} == {1, 2}
    args = pairwise_args(status1_min_pairs=11, status2_min_pairs=1, pairwise_easy_gap=0.97)  # only |dr|=4 is sure
    status, selected, _, _ = F.select_pairs(pool, args)
    assert status == "status2" and {s["id"] % 3 for s in selected} == {1, 2}


@settings(max_examples=200, deadline=None)
@given(reward_pools(), st.floats(-20.0, 20.0))
def test_pairwise_selection_ignores_the_reward_offset(pool, offset):
    """A Bradley-Terry reward is defined up to a constant; the pairwise selection must not depend on it."""
    args = pairwise_args(status1_min_pairs=3, status2_min_pairs=3)
    a = F.select_pairs(pairwise(pool), args)
    b = F.select_pairs(pairwise(pool, offset), args)
    assert a[0] == b[0] and [p["id"] for p in a[1]] == [p["id"] for p in b[1]]


def test_a_new_rule_is_one_registered_function_and_the_filter_offers_it(tmp_path):
    """A toy rule: every pair the RM prefers by any margin, as Status 1. Registered, it is a --selection choice."""
    from ser.cli import parse

    @selection.rule("toy-any-preference")
    def any_preference(p_j, p_k, t):
        mask = [a != b for a, b in zip(p_j, p_k)]
        return selection.Decision(selection.STATUS1, mask, sum(mask), sum(mask))

    try:
        pool = [{"question": "q", "response_j": f"a{i}", "response_k": f"b{i}", "score_j": 0.5 + i / 10,
                 "score_k": 0.5} for i in range(3)]
        write_records(tmp_path / "pool.jsonl", pool)
        (args,) = parse([F.ScriptArguments], [
            "--dataset_name", str(tmp_path / "pool.jsonl"), "--rm_next_loop_save_path", str(tmp_path / "use.jsonl"),
            "--remaining_data_save_path", str(tmp_path / "rest.jsonl"), "--selection", "toy-any-preference"])
        F.main(args)
        assert len(load_records(tmp_path / "use.jsonl")) == 2 and len(load_records(tmp_path / "rest.jsonl")) == 1
        assert json.loads((tmp_path / "stats.json").read_text())["status"] == "status1"
    finally:
        del selection.RULES["toy-any-preference"]


odd_float = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, 0.45, 0.55, 1.0, -0.1, 1.1]))


@settings(max_examples=150, deadline=None)
@given(st.fixed_dictionaries({
    "left_threshold": odd_float, "right_threshold": odd_float, "delta_threshold": odd_float,
    "pairwise_easy_gap": odd_float, "status1_min_pairs": st.integers(-3, 8), "status2_min_pairs": st.integers(-3, 8),
    "batch_size": st.integers(-2, 4), "chunk_pairs": st.integers(-2, 5), "forward_cost": odd_float,
    "probability": st.sampled_from(selection.MAPPINGS),
    "selection": st.sampled_from(sorted(set(selection.RULES) - selection.WITH_MEMBERS))}))  # members need an RM
def test_any_flags_give_an_exact_partition_or_stop_before_writing_naming_the_flag(tmp_path_factory, flags):
    folder = tmp_path_factory.mktemp("flags")
    pool = [{"id": i, "question": "q", "response_j": f"a{i}", "response_k": f"b{i}", "score_j": (i % 7) / 7,
             "score_k": (i % 3) / 3} for i in range(12)]
    write_records(folder / "pool.jsonl", pool)
    args = F.ScriptArguments(dataset_name=str(folder / "pool.jsonl"), rm_next_loop_save_path=str(folder / "use.jsonl"),
                             remaining_data_save_path=str(folder / "rest.jsonl"), **flags)
    try:
        F.main(args)
    except ValueError as e:
        assert "--" in str(e) and "nothing was written" in str(e)
        assert not any(folder.glob("use*")) and not any(folder.glob("rest*")) and not (folder / "stats.json").exists()
        return
    use, rest = load_records(folder / "use.jsonl"), load_records(folder / "rest.jsonl")
    assert sorted(r["id"] for r in use + rest) == list(range(12))
