"""data/prepare.py on real rows of the four datasets, the SER splits, and every bad-input case."""

import json

import pytest

import rm_training
import sft
from conftest import CPU, shared_path
from data import prepare
from ser import tiny
from ser.cli import parse
from ser.data import DataError, load_records, read_records

RAW = {"hh-rlhf": "hh_rlhf", "ultrafeedback": "ultrafeedback_binarized", "summarize": "summarize_from_feedback",
       "stack-exchange": "stack_exchange_paired"}
SPLITS = ("finetune", "reward", "unlabeled", "reward_full", "evaluation", "rl")


def run(dataset, source, out, **kw):
    return prepare.main(prepare.Args(dataset=dataset, source=str(source), out=str(out), **kw))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared")
    return {name: (run(name, shared_path("data", "raw", raw), out / name), out / name) for name, raw in RAW.items()}


@pytest.mark.parametrize("name", list(RAW))
def test_counts_match_the_source_less_counted_drops(prepared, name):
    manifest, out = prepared[name]
    assert manifest["source_rows"] == manifest["pairs"] + sum(manifest["dropped"].values()) + \
        manifest["skipped_bad_rows"]
    for split in SPLITS:
        assert len(read_records(out / "data" / split / "train.jsonl")) == manifest["counts"][split]
    c = manifest["counts"]
    assert c["reward"] + c["unlabeled"] == c["reward_full"]
    assert c["finetune"] + c["reward_full"] + c["evaluation"] + manifest["pairs_behind_rl_prompts"] == manifest["pairs"]
    assert len(manifest["source_sha256"]) == 64


def test_hh_rlhf_keeps_earlier_turns_in_the_question(prepared):
    manifest, out = prepared["hh-rlhf"]
    assert manifest["source_rows"] == 6240
    assert manifest["dropped"]["identical chosen and rejected"] == 36  # 2 + 2 + 32, as SOURCES.md counts
    pairs = load_records(str(out), "data/reward_full")
    multi = [p for p in pairs if p["question"].count("Human:") > 1]
    assert multi, "multi-turn conversations exist in helpful-*"
    for p in pairs[:200]:
        assert p["question"].startswith("Human:") and not p["question"].endswith("Assistant:")
        assert "\n\nHuman:" not in p["response_j"] and "\n\nAssistant:" not in p["response_j"]


def test_ultrafeedback_drops_ties_by_default_and_keeps_them_on_request(prepared, tmp_path):
    manifest, _ = prepared["ultrafeedback"]
    assert manifest["dropped"]["tied scores (--ultrafeedback_ties drop)"] == 136  # 111 + 25, as SOURCES.md counts
    kept = run("ultrafeedback", shared_path("data", "raw", RAW["ultrafeedback"]), tmp_path / "keep",
               ultrafeedback_ties="keep")
    assert "tied scores (--ultrafeedback_ties drop)" not in kept["dropped"]
    assert kept["pairs"] > manifest["pairs"]


def test_ultrafeedback_message_list_layout(tmp_path):
    row = {"prompt": "Hi?", "chosen": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello!"}],
           "rejected": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Go away."}],
           "score_chosen": 8.0, "score_rejected": 3.0}
    (tmp_path / "src.jsonl").write_text("\n".join(json.dumps({**row, "prompt": f"Hi {i}?"}) for i in range(20)))
    run("ultrafeedback", tmp_path / "src.jsonl", tmp_path / "out")
    p = load_records(str(tmp_path / "out"), "data/reward_full")[0]
    assert p["response_j"] == "Hello!" and p["response_k"] == "Go away."


def test_summarize_uses_title_and_post_as_the_question(prepared):
    _, out = prepared["summarize"]
    questions = [r["question"] for s in SPLITS for r in read_records(out / "data" / s / "train.jsonl")]
    first = [q for q in questions if q.startswith("Mother [51] not speaking to me [21]")]
    assert first and "\n\nMy boyfriend and I are long distance." in first[0]


def test_summarize_original_comparison_layout(tmp_path):
    rows = [{"info": {"post": f"post {i}", "title": f"title {i}"}, "summaries": [{"text": "a"}, {"text": "b"}],
             "choice": i % 2} for i in range(10)]
    (tmp_path / "batch.jsonl").write_text("\n".join(map(json.dumps, rows)))
    run("summarize", tmp_path / "batch.jsonl", tmp_path / "out", eval_fraction=0, finetune_fraction=0, rl_fraction=0)
    pairs = {p["question"]: p for p in load_records(str(tmp_path / "out"), "data/reward_full")}
    assert pairs["title 1\n\npost 1"]["response_j"] == "b" and pairs["title 2\n\npost 2"]["response_j"] == "a"


def test_splits_are_disjoint_by_question_and_deterministic(prepared, tmp_path):
    manifest, out = prepared["hh-rlhf"]
    questions = {s: {r["question"] for r in read_records(out / "data" / s / "train.jsonl")}
                 for s in ("finetune", "reward_full", "evaluation", "rl")}
    names = list(questions)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not questions[a] & questions[b], (a, b)
    again = run("hh-rlhf", shared_path("data", "raw", RAW["hh-rlhf"]), tmp_path / "again")
    assert again["counts"] == manifest["counts"]
    for s in SPLITS:
        assert (out / "data" / s / "train.jsonl").read_bytes() == \
            (tmp_path / "again" / "data" / s / "train.jsonl").read_bytes()


def test_no_conversation_opening_is_shared_across_splits(prepared):
    """HH-RLHF holds several multi-turn conversations that open with the same human turn; they go to
    one split together, so no held-out pair shares its opening with a pool pair."""
    from data import prepare

    manifest, out = prepared["hh-rlhf"]
    assert set(manifest["root_overlap"].values()) == {0}
    pool = {prepare.conversation_root(r["question"]) for r in read_records(out / "data" / "reward_full" / "train.jsonl")}
    held_out = [prepare.conversation_root(r["question"]) for r in read_records(out / "data" / "evaluation" / "train.jsonl")]
    assert held_out and not [r for r in held_out if r in pool]
    # the shipped rows do hold distinct conversations with one opening, so the rule has work to do
    roots = [prepare.conversation_root(r["question"]) for s in ("reward_full", "evaluation", "finetune")
             for r in read_records(out / "data" / s / "train.jsonl")]
    questions = [r["question"] for s in ("reward_full", "evaluation", "finetune")
                 for r in read_records(out / "data" / s / "train.jsonl")]
    assert len(set(questions)) > len(set(roots))


def test_pool_hides_the_label_and_randomises_the_order(prepared):
    _, out = prepared["hh-rlhf"]
    full = {p["id"]: p for p in load_records(str(out), "data/reward_full")}
    pool = load_records(str(out), "data/unlabeled")
    assert {p["gold_preferred"] for p in pool} == {"j", "k"}
    for p in pool:
        human = full[p["id"]]["response_j"]
        assert p["response_" + p["gold_preferred"]] == human
    share_k = sum(p["gold_preferred"] == "k" for p in pool) / len(pool)
    assert 0.4 < share_k < 0.6


GOOD = {"question": "q?", "response_j": "a", "response_k": "b"}


@pytest.mark.parametrize("line, message", [
    ('{"question": "q?", "response_j": "a"', "malformed JSON line"),
    ('{"question": "q?", "response_j": "a"}', "missing field 'response_k'"),
    ('{"question": "", "response_j": "a", "response_k": "b"}', "field 'question' is empty"),
    ('{"question": "q?", "response_j": 5, "response_k": "b"}', "field 'response_j' is int"),
])
def test_bad_rows_raise_naming_file_line_field_or_are_counted_skips(tmp_path, line, message):
    src = tmp_path / "src.jsonl"
    src.write_text(json.dumps({**GOOD, "question": "q1"}) + "\n" + line + "\n" + json.dumps({**GOOD, "question": "q3"}))
    with pytest.raises(DataError) as err:
        run("stack-exchange", src, tmp_path / "out")
    assert str(err.value).startswith(f"{src}:2:") and message in str(err.value)
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir()] == ["src.jsonl"]
    manifest = run("stack-exchange", src, tmp_path / "out", on_error="skip")
    assert manifest["skipped_bad_rows"] == 1 and manifest["pairs"] == 2
    assert message in manifest["skipped_examples"][0]


def test_unknown_dataset_missing_source_and_non_empty_out(tmp_path):
    with pytest.raises(DataError, match="unknown dataset"):
        run("imdb", tmp_path, tmp_path / "out")
    with pytest.raises(DataError, match="no such file or folder"):
        run("hh-rlhf", tmp_path / "missing", tmp_path / "out")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    src = tmp_path / "src.jsonl"
    src.write_text(json.dumps(GOOD))
    with pytest.raises(DataError, match="not an empty folder"):
        run("stack-exchange", src, tmp_path / "full")
    assert (tmp_path / "full" / "x").read_text() == "keep me"


@pytest.mark.slow
def test_stages_run_on_prepared_real_data(prepared, tmp_path):
    """SFT and RM on prepared HH-RLHF and UltraFeedback, tiny model with the real Llama tokenizer."""

    base = tmp_path / "base"
    tiny.build(tiny.Args(
        out=str(base), tokenizer=str(shared_path("data", "models", "tinyllama-1.1b-chat-v1.0-tokenizer"))))
    for name in ("hh-rlhf", "ultrafeedback"):
        data = prepared[name][1]
        sft.main(*parse(sft.ARGUMENTS, [
            "--model_name", str(base), "--dataset_name", str(data), "--output_dir", str(tmp_path / name / "sft"),
            "--seq_length", "256", "--train_subset_size", "32", "--max_steps", "2",
            "--per_device_train_batch_size", "8", *CPU]))
        rm_training.main(*parse(rm_training.ARGUMENTS, [
            "--model_name", str(tmp_path / name / "sft"), "--dataset_name", str(data),
            "--output_dir", str(tmp_path / name / "rm"), "--max_length", "256", "--train_subset", "32",
            "--eval_subset", "16", "--max_steps", "2", "--per_device_train_batch_size", "4", *CPU],
            counted=("--train_subset", "--eval_subset")))
        res = json.loads((tmp_path / name / "rm" / "eval_results.json").read_text())
        assert res["pairs"] == 16 and res["train_pairs"] == 32
        assert res["train_truncated"] > 0 or name == "ultrafeedback"  # long HH conversations are cut, not dropped


@pytest.mark.parametrize("flag,value,message", [("--labeled_fraction", "-0.1", "a share between 0 and 1"),
                                                ("--eval_fraction", "1.5", "a share between 0 and 1"),
                                                ("--eval_fraction", "nan", "a share between 0 and 1"),
                                                ("--rl_fraction", "0.9", "nothing would be left")])
def test_fractions_outside_their_range_are_refused(tmp_path, flag, value, message):
    from ser.cli import parse
    from ser.data import DataError

    (args,) = parse([prepare.Args], ["--dataset", "hh-rlhf", "--source", str(tmp_path), "--out", str(tmp_path / "o"),
                                     flag, value])
    with pytest.raises(DataError, match=message):
        prepare.main(args)
    assert not (tmp_path / "o").exists()
