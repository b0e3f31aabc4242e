"""Asking humans: the choice rule (ser/ask.py), the export (data/ask_humans.py), the import of Label Studio and
JSONL labels (data/import_labels.py), and the driver's stop and resume (ASK_HUMANS, HUMAN_LABELS)."""

import json
import random
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import ROOT, toy_layers
from data import ask_humans, import_labels
from ser import ask
from ser.data import DataError, read_records, strip_meta

# ----------------------------------------------------------------------------- the rule


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 1), st.integers(0, 6)), min_size=1, max_size=40), st.integers(0, 12),
       st.booleans())
def test_pick_asks_each_question_once_most_uncertain_first(rows, n, diverse):
    p = [x for x, _ in rows]
    groups = [g for _, g in rows]
    vectors = torch.randn(len(rows), 8, generator=torch.Generator().manual_seed(len(rows)))
    chosen = ask.pick(p, vectors, n, groups=groups, diverse=diverse)
    assert len(chosen) == min(n, len(set(groups)))
    assert len({groups[i] for i in chosen}) == len(chosen)  # no question twice
    for i in chosen:  # the pair asked for a question is that question's most uncertain one
        assert ask.uncertainty(p[i]) == max(ask.uncertainty(p[j]) for j in range(len(p)) if groups[j] == groups[i])
    if chosen:  # the first is the most uncertain of all
        assert ask.uncertainty(p[chosen[0]]) == max(ask.uncertainty(x) for x in p)
    if not diverse:
        u = [ask.uncertainty(p[i]) for i in chosen]
        assert u == sorted(u, reverse=True)


def test_near_duplicate_questions_are_spread_out():
    """Ten rewordings of one question, a little more uncertain than ten distinct questions: plain uncertainty
    asks five rewordings; the diverse rule asks one and then the distinct ones."""
    dup = [f"how do I bake sourdough bread at home {w}" for w in "abcdefghij"]
    distinct = ["what is the capital of peru", "explain recursion to a child", "best way to learn chess openings",
                "why is the sky blue", "how to fix a flat bicycle tire", "write a haiku about autumn rain",
                "what causes inflation", "tips for a job interview", "how do vaccines work", "translate hello to french"]
    questions = dup + distinct
    p = [0.50 + 0.001 * i for i in range(10)] + [0.52 + 0.001 * i for i in range(10)]
    vectors = ask.ngram_vectors(questions)
    plain = ask.pick(p, vectors, 5, groups=questions, diverse=False)
    diverse = ask.pick(p, vectors, 5, groups=questions)
    assert sum(i < 10 for i in plain) == 5
    assert sum(i < 10 for i in diverse) == 1 and diverse[0] == 0


def test_pick_refuses_mismatched_inputs():
    with pytest.raises(ValueError, match="one of each per pair"):
        ask.pick([0.5, 0.5], torch.zeros(3, 2), 1)
    with pytest.raises(ValueError, match="0 or more"):
        ask.pick([0.5], torch.zeros(1, 2), -1)


# ----------------------------------------------------------------------------- export and import


def scored_pool(path, n=30, seed=0):
    """A scored pool as the filter writes remaining.jsonl: random response order, the hidden human label in
    gold_preferred, the RM's rewards; a few questions repeat."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        good, bad = f"a careful answer {i} with detail", f"a curt answer {i}"
        j_is_good = rng.random() < 0.5
        rows.append({"id": f"p{i}", "question": f"question number {i % 20} about topic {i % 20 % 7}",
                     "response_j": good if j_is_good else bad, "response_k": bad if j_is_good else good,
                     "gold_preferred": "j" if j_is_good else "k",
                     "reward_j": rng.gauss(0, 1), "reward_k": rng.gauss(0, 1)})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


@pytest.fixture
def exported(tmp_path):
    rows = scored_pool(tmp_path / "remaining.jsonl")
    out = tmp_path / "ask"
    ask_humans.main(ask_humans.Args(pool=str(tmp_path / "remaining.jsonl"), n=12, out=str(out)))
    return out, {r["id"]: r for r in rows}


def human_choice(task_data, rows) -> str:
    """The hidden label's answer, as left (answer A) or right (answer B)."""
    r = rows[task_data["pair_id"]]
    preferred = r[f"response_{r['gold_preferred']}"]
    return "left" if task_data["answer_a"] == preferred else "right"


def label_studio_export(out, rows, cancel=(), extra=None):
    """Label Studio's JSON export of the imported tasks: each task with its `annotations`, each annotation's
    `result` holding the Pairwise control's {"selected": "left" | "right"} (Label Studio's Pairwise tag)."""
    tasks = json.loads((out / "label_studio.json").read_text())
    items = []
    for n, t in enumerate(tasks, start=1):
        result = [{"id": f"r{n}", "from_name": "preference", "to_name": "answer_a", "type": "pairwise",
                   "origin": "manual", "value": {"selected": human_choice(t["data"], rows)}}]
        annotation = {"id": 100 + n, "completed_by": 1, "result": [] if n in cancel else result,
                      "was_cancelled": n in cancel, "ground_truth": False, "lead_time": 3.2,
                      "created_at": "2026-11-29T10:00:00Z", "updated_at": "2026-11-29T10:00:00Z"}
        items.append({"id": n, "data": t["data"], "annotations": [annotation], "predictions": t["predictions"],
                      "meta": {}, "created_at": "2026-11-29T09:00:00Z", "project": 1})
    if extra:
        extra(items)
    return items


def import_(out, labels, path, **kw):
    path.write_text(labels if isinstance(labels, str) else json.dumps(labels))
    import_labels.main(import_labels.Args(asked=str(out), labels=str(path), **kw))
    return read_records(out / "human.jsonl"), json.loads((out / "import.json").read_text())


def test_export_writes_the_tools_formats_with_random_answer_order(exported):
    out, rows = exported
    tasks = json.loads((out / "label_studio.json").read_text())
    plain = read_records(out / "pairs.jsonl")
    key = read_records(out / "asked.jsonl")
    assert len(tasks) == len(plain) == len(key) == 12
    assert len({t["data"]["question"] for t in tasks}) == 12  # no question twice
    assert {k["answer_a_is"] for k in key} == {"j", "k"}  # the order is random per pair
    for t, row, k in zip(tasks, plain, key):
        assert set(t["data"]) == {"pair_id", "question", "answer_a", "answer_b"}
        assert t["data"]["answer_a"] == rows[k["pair_id"]][f"response_{k['answer_a_is']}"]
        prediction = t["predictions"][0]["result"][0]
        assert prediction["type"] == "pairwise" and prediction["from_name"] == "preference"
        assert (prediction["value"]["selected"] == "left") == (row["rm_probability_a"] >= 0.5)
        assert row["choice"] == "" and row["pair_id"] == t["data"]["pair_id"]
    assert '<Pairwise name="preference" toName="answer_a,answer_b"/>' in (out / "label_studio.xml").read_text()
    assert json.loads((out / "ask.json").read_text())["asked"] == 12


def test_label_studio_round_trip_gives_the_human_s_response_j(exported, tmp_path):
    out, rows = exported
    human, result = import_(out, label_studio_export(out, rows, cancel={3}), tmp_path / "export.json")
    assert len(human) == 11 and result["skipped"] == 1 and result["labelled"] == 11
    a_is = {k["pair_id"]: k["answer_a_is"] for k in read_records(out / "asked.jsonl")}
    assert {a_is[h["id"]] for h in human} == {"j", "k"}  # both answer orders were imported
    for h in human:
        r = rows[h["id"]]
        assert h["response_j"] == r[f"response_{r['gold_preferred']}"] and h["label_source"] == "human"
        assert h["question"] == r["question"] and "reward_j" not in h and "gold_preferred" not in h
    assert result["gold_agreement"] == 1.0
    remaining = read_records(out / "remaining.jsonl")
    assert len(remaining) == 30 - 11 and not {r["id"] for r in remaining} & {h["id"] for h in human}


def test_json_min_export_and_filled_jsonl_give_the_same_pairs(exported, tmp_path):
    out, rows = exported
    tasks = json.loads((out / "label_studio.json").read_text())
    json_min = [{"id": n, **t["data"], "preference": [{"selected": human_choice(t["data"], rows)}], "annotator": 1,
                 "annotation_id": 100 + n, "created_at": "2026-11-29T10:00:00Z", "updated_at": "2026-11-29T10:00:00Z",
                 "lead_time": 3.2} for n, t in enumerate(tasks, start=1)]
    from_min, _ = import_(out, json_min, tmp_path / "min.json")
    plain = read_records(out / "pairs.jsonl")
    for row in plain:
        row["choice"] = {"left": "A", "right": "B"}[human_choice(row, rows)]
    plain[0]["choice"], plain[1]["choice"] = "tie", "skip"
    from_jsonl, result = import_(out, "".join(json.dumps(r) + "\n" for r in plain), tmp_path / "filled.jsonl")
    assert result["ties"] == 1 and result["skipped"] == 1 and len(from_jsonl) == 10
    assert [strip_meta(h) for h in from_min if h["id"] not in (plain[0]["pair_id"], plain[1]["pair_id"])] == \
        [strip_meta(h) for h in from_jsonl]


def _unknown_id(items):
    items[2]["data"]["pair_id"] = "not-asked"


def _no_annotation(items):
    items[4]["annotations"] = []


def _conflict(items):
    second = json.loads(json.dumps(items[5]["annotations"][0]))
    second["result"][0]["value"]["selected"] = {"left": "right", "right": "left"}[second["result"][0]["value"]["selected"]]
    items[5]["annotations"].append(second)


def _bad_choice(items):
    items[1]["annotations"][0]["result"][0]["value"]["selected"] = "middle"


def _another_task(items):
    for item in items:
        item["data"] = {"text": item["data"]["question"]}


def _other_ids(items):
    for n, item in enumerate(items):
        item["data"]["pair_id"] = f"other-{n}"


def _annotation_string(items):
    items[1]["annotations"][0] = "left"


def _result_null(items):
    items[2]["annotations"][0]["result"] = None


def _result_not_objects(items):
    items[3]["annotations"][0]["result"] = ["left"]


def _value_null(items):
    items[4]["annotations"][0]["result"][0]["value"] = None


def _annotations_object(items):
    items[5]["annotations"] = {"result": []}


@pytest.mark.parametrize("damage,message", [
    (_unknown_id, r"item 3 \(pair not-asked\), annotation 1: its pair id \(field 'pair_id'\) is 'not-asked', a pair that was not"),
    (_no_annotation, r"1 of the 12 asked pairs have no choice"),
    (_conflict, r"item 6 \(pair p\d+\), annotation 2: pair p\d+ is labelled [AB] here and [AB] at"),
    (_bad_choice, r"item 2 \(pair p\d+\), annotation 1: field 'value.selected' is 'middle'"),
    (_another_task, r"item 1: field 'data.pair_id' is missing: not an export of the tasks"),
    (_other_ids, r"none of its 12 items names a pair of this export"),
    (_annotation_string, r"item 2 \(pair p\d+\), annotation 1: is str, expected an annotation object"),
    (_result_null, r"item 3 \(pair p\d+\), annotation 1: field 'result' is None; expected a list"),
    (_result_not_objects, r"item 4 \(pair p\d+\), annotation 1: field 'result' is \['left'\]; expected a list"),
    (_value_null, r"item 5 \(pair p\d+\), annotation 1: field 'value' is None; expected an object"),
    (_annotations_object, r"item 6: field 'annotations' is dict; expected a list"),
])
def test_bad_exports_are_refused_and_nothing_is_written(exported, tmp_path, damage, message):
    out, rows = exported
    with pytest.raises(DataError, match=message):
        import_(out, label_studio_export(out, rows, extra=damage), tmp_path / "export.json")
    assert not any((out / name).exists() for name in ("human.jsonl", "remaining.jsonl", "import.json"))


def test_unlabelled_pairs_can_be_counted_as_skipped(exported, tmp_path):
    out, rows = exported
    human, result = import_(out, label_studio_export(out, rows, extra=_no_annotation), tmp_path / "export.json",
                            unlabelled="skip")
    assert len(human) == 11 and result["unlabelled"] == 1 and result["skipped"] == 1


def test_jsonl_with_an_unknown_choice_names_the_line(exported, tmp_path):
    out, _ = exported
    plain = read_records(out / "pairs.jsonl")
    for row in plain:
        row["choice"] = "A"
    plain[6]["choice"] = "maybe"
    with pytest.raises(DataError, match=r"filled.jsonl:7: field 'choice' is 'maybe'; expected A, B, tie or skip"):
        import_(out, "".join(json.dumps(r) + "\n" for r in plain), tmp_path / "filled.jsonl")


def test_a_pool_without_rewards_is_refused_naming_line_and_field(tmp_path):
    pool = tmp_path / "pool.jsonl"
    pool.write_text(json.dumps({"question": "q", "response_j": "a", "response_k": "b", "reward_j": 1.0}) + "\n")
    with pytest.raises(DataError, match=r"pool.jsonl:1: field 'reward_k' is missing"):
        ask_humans.main(ask_humans.Args(pool=str(pool), n=1, out=str(tmp_path / "ask")))
    assert not (tmp_path / "ask" / "ask.json").exists()


# ----------------------------------------------------------------------------- the driver


@pytest.mark.slow
def test_the_driver_stops_for_labels_and_resumes_with_them(sft_model, synthetic, tmp_path):
    """ASK_HUMANS=20 on frozen-trunk RMs: the driver stops after loop 1's filter, refuses a half-labelled file
    (naming the count), resumes with the labels (the human pairs train loop 1's RM and leave the pool), and
    stops again after loop 2's filter."""
    from conftest import CPU, ENV

    run, cache = tmp_path / "run", tmp_path / "cache"
    common = ["--feature_cache", str(cache), "--dtype", "float32"]
    env = {**ENV, "DATA": str(synthetic), "SFT": str(sft_model), "RUN": str(run), "MAX_LOOPS": "2", "MAX_LENGTH": "96",
           "ASK_HUMANS": "20", "RM_ARGS": " ".join(["--trunk", "frozen", "--head_l2", "1e-5", "--center_rewards_coefficient",
                                                   "0.01", *common, *CPU]),  # the study's heads (frozen_study.CENTER)
           "FILTER_ARGS": " ".join([*common, "--status1_min_pairs", "40", "--status2_min_pairs", "40",
                                    "--probability", "pairwise"]),
           "PY": sys.executable, "LAUNCH": sys.executable}

    def driver(**more):
        return subprocess.run(["bash", "scripts/ser_loop.sh"], cwd=ROOT, env={**env, **more}, capture_output=True,
                              text=True, timeout=900)

    first = driver()
    ask_dir = run / "loop_1" / "ask"
    assert first.returncode == 5, first.stdout[-2000:] + first.stderr[-2000:]
    assert f"{ask_dir}/label_studio.json" in first.stderr and "HUMAN_LABELS=" in first.stderr
    assert 10 < json.loads((ask_dir / "ask.json").read_text())["asked"] <= 20
    assert not (run / "loop_1" / "rm").exists()
    assert json.loads((run / "config.json").read_text())["settings"]["ASK_HUMANS"] == "20"

    plain = read_records(ask_dir / "pairs.jsonl")
    key = {k["pair_id"]: k for k in read_records(ask_dir / "asked.jsonl")}
    for row in plain:  # the hidden label plays the human
        k = key[row["pair_id"]]
        row["choice"] = "A" if k["gold_preferred"] == k["answer_a_is"] else "B"
    half = tmp_path / "half.jsonl"
    half.write_text("".join(json.dumps({**r, "choice": r["choice"] if i % 2 else ""}) + "\n" for i, r in enumerate(plain)))
    refused = driver(HUMAN_LABELS=str(half))
    n = json.loads((ask_dir / "ask.json").read_text())["asked"]  # at most 20: one pair per question
    said = f"{(n + 1) // 2} of the {n} asked pairs have no choice"
    assert refused.returncode != 0 and said in refused.stderr, refused.stderr[-2000:]
    assert not (ask_dir / "import.json").exists()

    full = tmp_path / "labels.jsonl"
    full.write_text("".join(json.dumps(r) + "\n" for r in plain))
    resumed = driver(HUMAN_LABELS=str(full))
    assert resumed.returncode == 5, resumed.stdout[-2000:] + resumed.stderr[-2000:]  # stopped again at loop 2
    assert f"{run}/loop_2/ask/label_studio.json" in resumed.stderr
    imported = json.loads((ask_dir / "import.json").read_text())
    assert imported["labelled"] == n and imported["gold_agreement"] == 1.0
    assert json.loads((run / "config.json").read_text())["notes"] == {"human_labels.loop_1": str(full)}
    assert (run / "loop_1" / "rm" / "eval_results.json").is_file()
    loop_1, loop_2 = (json.loads((run / f"loop_{t}" / "stats.json").read_text()) for t in (1, 2))
    assert loop_2["pool"] == loop_1["remaining"] - n  # the human pairs left the pool
    sources = json.loads((run / "loop_1" / "rm" / "eval_results.json").read_text())["train_sources"]
    assert sources[str(ask_dir / "human.jsonl")] == n  # loop 1's RM was trained on the human pairs
    again = driver(HUMAN_LABELS=str(full))  # the resume command run again: loop 1's labels are not loop 2's
    assert again.returncode == 5 and "ser: loop 2 awaits labels" in again.stderr, again.stderr[-2000:]
    assert "holds the labels loop 1 imported already" in again.stderr and not (run / "loop_2" / "ask" / "import.json").exists()

    # the same run in process (ser/loop.py's `run` with its ask step, as the budget study runs it): the same
    # pairs asked at both loops, loop 1's RM as accurate, loop 2's status and selection the same
    from experiments import frozen_study
    from ser import features
    from ser.data import load_records
    from ser.modeling import load_tokenizer

    tok = load_tokenizer(str(sft_model))
    layer = features.frozen_info(run / "loop_0" / "rm")["layer"]
    records = load_records(str(synthetic), "data/unlabeled")
    seed, pool, held = (frozen_study.feature_pairs(cache, tok, load_records(str(synthetic), f"data/{split}"), layer, 96)
                        for split in ("reward", "unlabeled", "evaluation"))

    def identity(r):
        return r["question"], frozenset((r["response_j"], r["response_k"]))

    asked_here = {}

    def ask_step(loop, rm, idx):  # p as ask_humans.py computes it: from each response's reward, in float64
        sub = pool.take(idx)
        chosen = ask.choose(ask_humans.DEFAULT_RULE, 20, torch.sigmoid((sub.j @ rm).double() - (sub.k @ rm).double()).tolist(),
                            [records[i]["question"] for i in idx.tolist()], seed=loop)
        asked_here[loop] = idx[torch.tensor(chosen, dtype=torch.long)]
        return asked_here[loop]

    rows, _ = frozen_study.ser_run(seed, pool, held, 1e-5, 40, probability="pairwise", max_loops=2, ask=ask_step)
    for t in (1, 2):
        theirs = {identity(r) for r in read_records(run / f"loop_{t}" / "ask" / "asked.jsonl")}
        assert {identity(records[i]) for i in asked_here[t].tolist()} == theirs, t
    assert rows[1]["accuracy"] == pytest.approx(
        json.loads((run / "loop_1" / "rm" / "eval_results.json").read_text())["accuracy"], abs=1e-9)
    assert (rows[2]["status"], rows[2]["selected"], rows[2]["pool"]) == (loop_2["status"], loop_2["selected"], loop_2["pool"])


# ----------------------------------------------------------------------------- the budget study's report


@pytest.mark.slow
def test_the_budget_study_asks_every_rule_alone_and_after_ser_and_reports_against_random(tmp_path, monkeypatch):
    """One seed on toy features: each rule's asked pairs alone and after SER's loop 1 (as many as B, one per
    question), and the report's tests against random and its pre-registered decision."""
    from experiments import ask_study

    pools, helds = toy_layers(n_pool=1000, n_held=200)
    rest = list(range(len(pools[2])))
    questions = [f"q{i // 2}" for i in range(len(rest))]  # two pairs per question
    monkeypatch.setattr(ask_study, "BUDGETS", [0.01, 0.05])
    rows = ask_study.one_seed(0, pools, helds, rest, questions) + ask_study.one_seed(1, pools, helds, rest, questions)
    by = {(r["variant"], r["fraction"], r["seed"]): r for r in rows}
    for b, n in ((0.01, 10), (0.05, 50)):
        for rule in ask.RULES:
            alone, after = by[(f"alone:{rule}", b, 0)], by[(f"ser:{rule}", b, 0)]
            assert alone["asked"] == alone["distinct_questions"] == n, rule
            assert after["asked"] == (n if after["loops"] >= 1 else 0), rule
    state = {"setting": "toy", "seed_fraction": 0.01, "budgets": [0.01, 0.05], "pool_pairs": len(rest),
             "held_out_pairs": 200, "seed_pairs": 10, "budget_pairs": {"0.01": 10, "0.05": 50}, "rows": rows}
    path = tmp_path / "ask-toy.json"
    path.write_text(json.dumps(state))
    text = ask_study.write_report(path)
    assert "| after SER | 5 % | d-optimal |" in text and "## The pre-registered decision" in text
    assert (tmp_path / "REPORT-ask-toy.md").is_file() and (tmp_path / "ask-toy.png").is_file()
    state["diagnostics"] = ask_study.diagnose_seed(0, pools, helds, rest, questions, {})
    assert {(d["fraction"], d["rule"]) for d in state["diagnostics"]} == {(b, r) for b in (0.01, 0.05) for r in ask.RULES}
    for d in state["diagnostics"]:
        assert 0 <= d["cover_pair"] <= 2 and 0 <= d["cover_diff"] <= 2 and 0 <= d["full_agree"] <= 1
    for rule in ask.RULES:  # five times the pairs (those of 1 % among them or not) never cover the held-out worse by much
        small, large = (next(d for d in state["diagnostics"] if d["fraction"] == b and d["rule"] == rule) for b in (0.01, 0.05))
        assert large["cover_diff"] <= small["cover_diff"] + 0.05, rule
    path.write_text(json.dumps(state))
    assert "| 5 % | typical |" in ask_study.write_report(path).split("## Why")[1]


def test_cosine_cover_is_zero_on_itself_and_never_grows_with_more_asked_pairs():
    from experiments import ask_study

    g = torch.Generator().manual_seed(0)
    held, pool = torch.randn(50, 8, generator=g) + 3, torch.randn(200, 8, generator=g) + 3
    centre = pool.mean(0)
    assert ask_study.cosine_cover(held, held, centre) == pytest.approx(0, abs=1e-6)
    covers = [ask_study.cosine_cover(held, pool[:n], centre) for n in (10, 50, 200)]
    assert covers == sorted(covers, reverse=True) and covers[0] > covers[-1]


# ----------------------------------------------------------------------------- bad input (reliability)


def filled_pairs(out, rows) -> list[dict]:
    plain = read_records(out / "pairs.jsonl")
    for row in plain:
        row["choice"] = {"left": "A", "right": "B"}[human_choice(row, rows)]
    return [strip_meta(r) for r in plain]


def test_an_import_into_the_pool_s_own_folder_is_refused_and_the_pool_kept(tmp_path):
    scored_pool(tmp_path / "remaining.jsonl")
    before = (tmp_path / "remaining.jsonl").read_bytes()
    ask_humans.main(ask_humans.Args(pool=str(tmp_path / "remaining.jsonl"), n=12, out=str(tmp_path)))
    rows = {r["id"]: r for r in read_records(tmp_path / "remaining.jsonl")}
    with pytest.raises(DataError, match=r"remaining.jsonl: is the pool the pairs were asked from; export to another"):
        import_(tmp_path, "".join(json.dumps(r) + "\n" for r in filled_pairs(tmp_path, rows)), tmp_path / "f.jsonl")
    assert (tmp_path / "remaining.jsonl").read_bytes() == before and not (tmp_path / "human.jsonl").exists()


def test_the_labels_format_is_told_by_content_not_by_name(exported, tmp_path):
    out, rows = exported
    filled = filled_pairs(out, rows)
    human, result = import_(out, "".join(json.dumps(r) + "\n" for r in filled), tmp_path / "pairs.json")  # JSONL as .json
    assert result["labelled"] == 12 and len(human) == 12
    human, result = import_(out, filled, tmp_path / "pairs-list.jsonl")  # a JSON list named .jsonl
    assert result["labelled"] == 12
    mixed = label_studio_export(out, rows)[:3] + filled[3:]
    with pytest.raises(DataError, match=r"mixed.json: item 4 is a pairs.jsonl row and item 1 a Label Studio task"):
        import_(out, mixed, tmp_path / "mixed.json")


def test_a_json_min_choice_that_is_not_a_choice_names_the_item(exported, tmp_path):
    out, rows = exported
    tasks = json.loads((out / "label_studio.json").read_text())
    json_min = [{"id": n, **t["data"], "preference": [{"selected": human_choice(t["data"], rows)}]}
                for n, t in enumerate(tasks, start=1)]
    json_min[2]["preference"] = [["left"]]
    with pytest.raises(DataError, match=r"min.json: item 3: field 'preference' is \[\['left'\]\]; expected one Pairwise"):
        import_(out, json_min, tmp_path / "min.json")


def test_a_damaged_ask_folder_is_named(exported, tmp_path):
    out, rows = exported
    labels = "".join(json.dumps(r) + "\n" for r in filled_pairs(out, rows))
    asked = (out / "asked.jsonl").read_text().splitlines()
    (out / "asked.jsonl").write_text("\n".join(asked[:4] + [asked[4].replace('"answer_a_is": "', '"answer_a_is": "x')]
                                               + asked[5:]) + "\n")
    with pytest.raises(DataError, match=r"asked.jsonl:5: field 'answer_a_is' is '[xjk]+'; expected 'j' or 'k'"):
        import_(out, labels, tmp_path / "f.jsonl")
    (out / "asked.jsonl").write_text("\n".join(asked) + "\n")
    (out / "ask.json").write_text('{"pool": ')
    with pytest.raises(DataError, match=r"ask.json: not valid JSON .*run data/ask_humans.py --out"):
        import_(out, labels, tmp_path / "f.jsonl")


@pytest.mark.parametrize("value,ok", [("left", False), ("LEFT", False), (" left", False), (" b ", True), ("Tie", True)])
def test_a_jsonl_choice_is_normalised_before_it_is_checked(exported, tmp_path, value, ok):
    out, rows = exported
    filled = filled_pairs(out, rows)
    filled[0]["choice"] = value
    labels = "".join(json.dumps(r) + "\n" for r in filled)
    if ok:
        import_(out, labels, tmp_path / "f.jsonl")
    else:
        with pytest.raises(DataError, match=r"f.jsonl:1: field 'choice' is .*; expected A, B, tie or skip"):
            import_(out, labels, tmp_path / "f.jsonl")


def test_pair_ids_do_not_collide_where_a_separator_moves_between_fields():
    a = {"question": "a\0b", "response_j": "c", "response_k": "d"}
    b = {"question": "a", "response_j": "b\0c", "response_k": "d"}
    assert ask.pair_id(a) != ask.pair_id(b)


def test_killed_exports_and_imports_leave_no_temporaries_behind(exported, tmp_path):
    out, rows = exported
    stale = [out / ".human.jsonl.k1.tmp", out / ".remaining.jsonl.k2.tmp", out / ".import.json.k3.tmp"]
    for p in stale:
        p.write_text("half")
    import_(out, "".join(json.dumps(r) + "\n" for r in filled_pairs(out, rows)), tmp_path / "f.jsonl")
    assert not any(p.exists() for p in stale)
    stale = [out / ".asked.jsonl.k4.tmp", out / ".ask.json.k5.tmp"]
    for p in stale:
        p.write_text("half")
    ask_humans.main(ask_humans.Args(pool=str(tmp_path / "remaining.jsonl"), n=12, out=str(out)))
    assert not any(p.exists() for p in stale)


def test_a_moved_run_imports_from_its_own_pool_and_a_changed_pool_is_refused(tmp_path):
    import shutil

    run = tmp_path / "run" / "loop_1"
    run.mkdir(parents=True)
    rows = {r["id"]: r for r in scored_pool(run / "remaining.jsonl")}
    ask_humans.main(ask_humans.Args(pool=str(run / "remaining.jsonl"), n=12, out=str(run / "ask")))
    moved = tmp_path / "moved" / "loop_1"
    shutil.move(tmp_path / "run", tmp_path / "moved")
    labels = "".join(json.dumps(r) + "\n" for r in filled_pairs(moved / "ask", rows))
    _, result = import_(moved / "ask", labels, tmp_path / "f.jsonl")
    assert result["labelled"] == 12 and len(read_records(moved / "ask" / "remaining.jsonl")) == 30 - 12
    with open(moved / "remaining.jsonl", "a") as f:
        f.write(json.dumps({**rows["p0"], "id": "p-new"}) + "\n")
    with pytest.raises(DataError, match=r"remaining.jsonl: changed since the pairs were asked from it"):
        import_(moved / "ask", labels, tmp_path / "f.jsonl")


# ----------------------------------------------------------------------------- the rules on features


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 30), st.integers(1, 6), st.integers(0, 10_000), st.integers(1, 12))
def test_d_optimal_log_det_never_decreases_as_pairs_are_added(n_pairs, dim, seed, n):
    g = torch.Generator().manual_seed(seed)
    diffs = torch.randn(n_pairs, dim, generator=g)
    p = torch.rand(n_pairs, generator=g).tolist()
    chosen, logdets = ask.d_optimal(diffs, p, n)
    assert len(chosen) == len(set(chosen)) == min(n, n_pairs)
    assert all(b >= a - 1e-9 for a, b in zip(logdets, logdets[1:]))
    x = diffs[chosen].double()  # the running value is the determinant's
    w = torch.tensor([p[i] * (1 - p[i]) for i in chosen], dtype=torch.float64)
    a = 1e-3 * torch.eye(dim, dtype=torch.float64) + (x.T * w) @ x
    assert torch.logdet(a).item() == pytest.approx(logdets[-1], rel=1e-6, abs=1e-6)


def two_clusters(per=10, dim=6, seed=0):
    """Pairs in two planted clusters along orthogonal directions, the first cluster a little more attractive to
    every rule (larger, more uncertain, more disagreed on)."""
    g = torch.Generator().manual_seed(seed)
    a, b = torch.zeros(dim), torch.zeros(dim)
    a[0], b[1] = 1.0, 1.0
    vectors = torch.cat([a + 0.05 * torch.randn(per + 2, dim, generator=g), b + 0.05 * torch.randn(per, dim, generator=g)])
    return vectors, [0] * (per + 2) + [1] * per


@pytest.mark.parametrize("rule", ["d-optimal", "ensemble-diverse", "typical"])
def test_each_feature_rule_covers_both_planted_clusters_before_repeating_one(rule):
    vectors, cluster = two_clusters()
    n = len(vectors)
    if rule == "d-optimal":
        chosen = ask.d_optimal(vectors, [0.5] * n, 2)[0]
    elif rule == "typical":
        chosen = ask.typical(vectors, 2)
    else:
        member_p = torch.full((4, n), 0.5)
        member_p[:, :] += torch.linspace(-0.2, 0.2, 4)[:, None]  # equal disagreement everywhere
        chosen = ask.ensemble_diverse(member_p, vectors, 2)
    assert sorted(cluster[i] for i in chosen) == [0, 1], chosen


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 5), min_size=1, max_size=30), st.integers(0, 12), st.integers(0, 1000))
def test_every_rule_returns_distinct_pairs_at_most_one_per_question(groups, n, seed):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(len(groups), 4, generator=g)
    p = torch.rand(len(groups), generator=g).tolist()
    member_p = torch.rand(3, len(groups), generator=g)
    results = {rule: ask.choose(rule, n, p, [str(x) for x in groups], seed=seed, f_j=feats, f_k=torch.zeros_like(feats),
                                member_p=member_p) for rule in ask.RULES}  # f_j - f_k and f_j + f_k are feats
    for rule, chosen in results.items():
        assert len(chosen) == len(set(chosen)) == min(n, len(set(groups))), rule
        assert len({groups[i] for i in chosen}) == len(chosen), rule
    with pytest.raises(ValueError, match="reads the head's features"):
        ask.choose("d-optimal", n, p, groups)


def test_the_rules_on_features_say_what_they_miss(tmp_path):
    scored_pool(tmp_path / "remaining.jsonl")
    for rule in ("d-optimal", "ensemble-diverse", "typical"):
        with pytest.raises(SystemExit, match=rf"--rule {rule}: reads the head's features; give --reward_model_name"):
            ask_humans.main(ask_humans.Args(pool=str(tmp_path / "remaining.jsonl"), n=3, out=str(tmp_path / rule), rule=rule))
    ask_humans.main(ask_humans.Args(pool=str(tmp_path / "remaining.jsonl"), n=5, out=str(tmp_path / "r"), rule="random"))
    assert json.loads((tmp_path / "r" / "ask.json").read_text())["asked"] == 5
