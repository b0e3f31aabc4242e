"""Bad input and careless use: a clear error that names what is wrong, and nothing half-written."""


import pytest

import rm_loop_filter_by_self as F
import rm_training
from conftest import CPU
from ser.cli import parse
from ser.data import DataError, read_records, write_records
from ser.modeling import load_reward_model, load_tokenizer

AWKWARD = ["line\u2028separator", "paragraph\u2029separator", "next\u0085line", "nul\x00byte", "emoji 🦜🏖️",
           "עברית وعربي RTL", "tab\tand \"quotes\" and \\ backslash", "\r carriage"]


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_what_the_project_writes_it_reads_back(tmp_path, suffix):
    rows = [{"id": i, "question": f"q {t}", "response_j": t, "response_k": t[::-1], "gold_preferred": "j"}
            for i, t in enumerate(AWKWARD)]
    path = tmp_path / f"pairs{suffix}"
    write_records(path, rows)
    back = [{k: v for k, v in r.items() if not k.startswith("_")} for r in read_records(path)]
    assert back == rows


def filter_args(pool, out, *extra):
    return parse([F.ScriptArguments], ["--dataset_name", str(pool), "--rm_next_loop_save_path", str(out / "sel.jsonl"),
                                       "--remaining_data_save_path", str(out / "rest.jsonl"), *extra])[0]


@pytest.mark.parametrize("value, message", [("NaN", "is nan"), ("Infinity", "is inf"), ("true", "is True"),
                                            ('"0.9"', "is '0.9'")])
def test_bad_scores_stop_the_filter_before_any_output(tmp_path, value, message):
    pool = tmp_path / "pool.jsonl"
    good = '{"question": "q", "response_j": "a", "response_k": "b", "score_j": 0.9, "score_k": 0.1}'
    bad = f'{{"question": "q", "response_j": "a", "response_k": "b", "score_j": {value}, "score_k": 0.1}}'
    pool.write_text(good + "\n" + bad + "\n")
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=rf"pool.jsonl:2: field 'score_j' {message}"):
        F.main(filter_args(pool, out))
    assert not out.exists()


def test_an_empty_pool_is_an_error_not_a_stop(tmp_path):
    pool = tmp_path / "pool.jsonl"
    pool.write_text("")
    with pytest.raises(ValueError, match="the pool is empty"):
        F.main(filter_args(pool, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_a_model_without_a_score_head_is_not_a_reward_model(sft_model, tmp_path):
    tok = load_tokenizer(str(sft_model))
    with pytest.raises(ValueError, match=r"sft.*architectures \['LlamaForCausalLM'\].*expected a reward model"):
        load_reward_model(str(sft_model), tok)
    pool = tmp_path / "pool.jsonl"
    write_records(pool, [{"question": "q", "response_j": "a", "response_k": "b"}])
    with pytest.raises(ValueError, match="expected a reward model"):
        F.main(filter_args(pool, tmp_path / "out", "--reward_model_name", str(sft_model)))
    assert not (tmp_path / "out").exists()


def test_an_empty_training_set_is_a_clear_error(sft_model, synthetic, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="no training pairs"):
        rm_training.main(*parse(rm_training.ARGUMENTS, [
            "--model_name", str(sft_model), "--dataset_name", str(empty), "--eval_subset",
            str(synthetic / "data" / "evaluation"), "--output_dir", str(tmp_path / "rm"), *CPU]))
    assert not (tmp_path / "rm" / "eval_results.json").exists()
