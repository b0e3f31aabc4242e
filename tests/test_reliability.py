"""Bad input and careless use: a clear error that names what is wrong, and nothing half-written."""

import json
import math

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
                                            ('"0.9"', "is '0.9'"), ("1e308", r"is 1e\+308, expected the RM's probability"),
                                            ("-0.5", r"is -0.5, expected the RM's probability")])
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


@pytest.mark.slow
def test_a_lora_run_folder_moves_whole(sft_model, synthetic, tmp_path):
    """A LoRA RM records its base relative to itself when the base is in the same run (RUN/sft), so the
    run can move; the RM of the next loop, continued from it, records the same base."""
    import shutil

    from ser.scoring import score_pairs

    run = tmp_path / "run"
    shutil.copytree(sft_model, run / "sft")
    common = ["--dataset_name", str(synthetic), "--use_lora", "True", "--num_train_epochs", "1",
              "--per_device_train_batch_size", "16", "--learning_rate", "3e-3", "--max_length", "96", *CPU]
    rm_training.main(*parse(rm_training.ARGUMENTS, [
        "--model_name", str(run / "sft"), "--output_dir", str(run / "loop_0" / "rm"), *common]))
    rm_training.main(*parse(rm_training.ARGUMENTS, [
        "--model_name", str(run / "loop_0" / "rm"), "--output_dir", str(run / "loop_1" / "rm"), *common]))
    for loop in ("loop_0", "loop_1"):
        config = json.loads((run / loop / "rm" / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == "../../sft", config["base_model_name_or_path"]
    pairs = read_records(synthetic / "data" / "evaluation" / "train.jsonl")[:16]
    tok = load_tokenizer(str(run / "loop_1" / "rm"))
    before = score_pairs(load_reward_model(str(run / "loop_1" / "rm"), tok), tok, pairs, 96)[:2]
    moved = tmp_path / "elsewhere" / "run"
    shutil.move(run, moved)
    after = score_pairs(load_reward_model(str(moved / "loop_1" / "rm"), tok), tok, pairs, 96)[:2]
    assert after == before
    shutil.rmtree(moved / "sft")
    with pytest.raises(FileNotFoundError, match=r"loop_1/rm: the LoRA adapter's base model \.\./\.\./sft .* is missing"):
        load_reward_model(str(moved / "loop_1" / "rm"), tok)


def test_an_empty_training_set_is_a_clear_error(sft_model, synthetic, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="no training pairs"):
        rm_training.main(*parse(rm_training.ARGUMENTS, [
            "--model_name", str(sft_model), "--dataset_name", str(empty), "--eval_subset",
            str(synthetic / "data" / "evaluation"), "--output_dir", str(tmp_path / "rm"), *CPU]))
    assert not (tmp_path / "rm" / "eval_results.json").exists()


def test_undecodable_and_truncated_files_name_themselves_and_honour_skip(tmp_path):
    import gzip

    good = b'{"question": "q", "response_j": "a", "response_k": "b"}\n'
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(good + b'{"question": "caf\xe9", "response_j": "a", "response_k": "b"}\n' + good)
    with pytest.raises(DataError, match=r"latin.jsonl:2: not UTF-8 text \(byte 0xe9"):
        read_records(latin)
    skipped = []
    assert len(read_records(latin, skipped)) == 2 and "latin.jsonl:2: not UTF-8" in skipped[0]

    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(gzip.compress(good * 20000)[:-40])
    with pytest.raises(DataError, match=r"cut.jsonl.gz: truncated or corrupt gzip"):
        read_records(cut)
    skipped = []
    rows = read_records(cut, skipped)
    assert 0 < len(rows) < 20000 and "the rest of the file is skipped" in skipped[0]


def test_a_lone_surrogate_is_named_not_a_tokenizer_crash(tmp_path):
    from ser.data import load_records

    path = tmp_path / "pairs.jsonl"
    path.write_text('{"question": "q", "response_j": "a\\ud800b", "response_k": "b"}\n')
    with pytest.raises(DataError, match=r"pairs.jsonl:1: field 'response_j' holds an unpaired surrogate"):
        load_records(str(path))


def test_outputs_that_cannot_be_written_fail_before_any_work(tmp_path):
    pool = tmp_path / "pool.jsonl"
    write_records(pool, [{"question": "q", "response_j": "a", "response_k": "b", "score_j": 0.9, "score_k": 0.1}])
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(PermissionError, match="cannot write here"):
        F.main(filter_args(pool, blocker / "out"))


def test_a_huge_question_is_cut_by_characters_before_tokenising(tiny_model):
    import time

    from ser.data import encode

    tok = load_tokenizer(str(tiny_model))
    start = time.perf_counter()
    e = encode(tok, "Where to? " * 2_000_000, "Bring hat.", 64)  # 20 MB of question
    assert time.perf_counter() - start < 5 and len(e["input_ids"]) == 64 and e["truncated"]
    assert e["input_ids"][-1] == tok.eos_token_id and tok.decode(e["input_ids"][e["prompt_length"]:-1]) == " Bring hat."


def test_identical_pairs_only_is_not_a_training_set(sft_model, synthetic, tmp_path):
    same = tmp_path / "same.jsonl"
    write_records(same, [{"question": f"q{i}", "response_j": "a", "response_k": "a "} for i in range(8)])
    with pytest.raises(DataError, match="identical responses"):
        rm_training.main(*parse(rm_training.ARGUMENTS, [
            "--model_name", str(sft_model), "--dataset_name", str(same), "--eval_subset",
            str(synthetic / "data" / "evaluation"), "--output_dir", str(tmp_path / "rm"), *CPU]))


def test_the_report_of_a_missing_or_corrupt_run_names_it(tmp_path):
    from scripts import ser_report

    with pytest.raises(SystemExit, match="not a SER run folder"):
        ser_report.main(ser_report.Args(run=str(tmp_path / "TYPO"), report_to="none"))
    assert not (tmp_path / "TYPO").exists()
    (tmp_path / "run" / "loop_0" / "rm").mkdir(parents=True)
    (tmp_path / "run" / "loop_0" / "rm" / "eval_results.json").write_text('{"accuracy": 0.6')
    with pytest.raises(SystemExit, match=r"eval_results.json: not a readable JSON file"):
        ser_report.main(ser_report.Args(run=str(tmp_path / "run"), report_to="none"))


def test_written_files_respect_the_umask_and_keep_user_fields(tmp_path):
    import os
    import stat

    old = os.umask(0o022)
    try:
        write_records(tmp_path / "pairs.jsonl", [{"question": "q", "_note": "mine", "_line": 7}])
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "pairs.jsonl").stat().st_mode) == 0o644  # not 0600 on a shared cluster
    (row,) = read_records(tmp_path / "pairs.jsonl")
    assert row["_note"] == "mine" and row["_line"] == 1  # the reader's own bookkeeping is not written


def test_duplicate_pool_pairs_are_counted(tmp_path, capsys):
    pool = tmp_path / "pool.jsonl"
    pair = {"question": "q", "response_j": "a", "response_k": "b", "score_j": 0.9, "score_k": 0.1}
    write_records(pool, [pair, {**pair, "response_j": "b", "response_k": "a"}, {**pair, "question": "other"}])
    F.main(filter_args(pool, tmp_path / "out", "--status1_min_pairs", "1"))
    assert json.loads((tmp_path / "out" / "stats.json").read_text())["duplicate_pairs"] == 1
    assert "1 pool pairs repeat an earlier one" in capsys.readouterr().out


def test_rewards_near_the_float_limit_do_not_overflow_the_statistics():
    """An RM's rewards of ±1e308 (finite) are binned; the histogram's span would overflow if taken whole."""
    h = F.histogram([-1e308, 0.0, 1e308], -1e308, 1e308 + 1e-9)
    assert h["counts"] == [1, 0, 0, 0, 0, 1, 0, 0, 0, 1] and h["edges"][0] == -1e308 and h["edges"][-1] == 1e308
    assert all(math.isfinite(e) for e in h["edges"])


def test_a_pool_line_nested_too_deeply_is_named(tmp_path):
    from ser.data import iter_records

    pool = tmp_path / "pool.jsonl"
    pool.write_text('{"question": "q", "response_j": "a", "response_k": "b"}\n' + "[" * 200_000 + "]" * 200_000 + "\n")
    with pytest.raises(DataError, match=r"pool.jsonl:2: JSON nested too deeply to parse"):
        read_records(pool)
    with pytest.raises(DataError, match=r"pool.jsonl:2: JSON nested too deeply to parse"):
        list(iter_records(pool))


@pytest.mark.parametrize("settings", [None, "x", [1, 2]])
def test_a_run_config_with_settings_of_the_wrong_type_is_named_and_force_replaces_it(tmp_path, settings):
    from ser import run_config

    (tmp_path / "config.json").write_text(json.dumps({"settings": settings}))
    with pytest.raises(SystemExit, match=r"config.json: unreadable run config \(field 'settings' is \w+, expected an object"):
        run_config.check(tmp_path, {"DATA": "d"})
    assert "replaced under FORCE" in run_config.check(tmp_path, {"DATA": "d"}, force=True)
    assert json.loads((tmp_path / "config.json").read_text())["settings"] == {"DATA": "d"}
    assert run_config.check(tmp_path, {"DATA": "d"}) == "same settings"


def test_bad_rm_folders_are_named_before_any_work(sft_model, tmp_path):
    """An empty folder, a missing path and a truncated weights file: each named, nothing written."""
    import shutil

    pool = tmp_path / "pool.jsonl"
    write_records(pool, [{"question": "q", "response_j": "a", "response_k": "b"}])
    (tmp_path / "empty").mkdir()
    truncated = tmp_path / "truncated"
    shutil.copytree(sft_model, truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    for rm, message in ((tmp_path / "empty", r"empty: not a saved model: no config.json"),
                        (tmp_path / "gone", r"gone: no such model folder"),
                        (truncated, r"truncated/model.safetensors: truncated \(\d+ bytes; its header describes \d+\)")):
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            F.main(filter_args(pool, tmp_path / "out", "--reward_model_name", str(rm)))
        assert not (tmp_path / "out").exists()


def test_temporaries_of_a_killed_write_are_removed_by_the_next_run(tmp_path):
    pool = tmp_path / "pool.jsonl"
    write_records(pool, [{"question": "q", "response_j": "a", "response_k": "b", "score_j": 0.9, "score_k": 0.1}])
    out = tmp_path / "out"
    out.mkdir()
    stale = [out / ".sel.jsonl.x1y2.tmp", out / ".rest.jsonl.abcd.tmp", out / ".stats.json.q.tmp"]
    for path in stale:
        path.write_text("half a file")
    (out / ".other.jsonl.zz.tmp").write_text("not ours")
    F.main(filter_args(pool, out, "--status1_min_pairs", "1"))
    assert not any(p.exists() for p in stale) and (out / ".other.jsonl.zz.tmp").exists()
    assert len(json.loads((out / "stats.json").read_text())["stale_temporaries_removed"]) == 3


def test_every_writer_takes_a_fresh_temporary_name():
    """A temporary file or folder at a predictable name (`.OUT.tmp`) follows a link planted there: every writer
    takes a fresh one (ser.data.replacing, mkstemp/mkdtemp, mktemp in shell) instead."""
    import re
    import subprocess

    from conftest import ROOT

    files = subprocess.run(["git", "ls-files", "*.py", "*.sh"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    named = re.compile(r"""with_suffix\(\s*["']\.tmp|["'][^"'\n]*\.tmp["'\)]""")
    fresh = ("mkstemp", "mkdtemp", "mktemp", ".glob(")
    offenders = [f"{path}:{n}: {line.strip()}" for path in files if not path.startswith("tests/")
                 for n, line in enumerate((ROOT / path).read_text().splitlines(), start=1)
                 if named.search(line) and not any(f in line for f in fresh)]
    assert offenders == []


def test_the_frozen_study_resumes_saved_rows_only_on_the_same_data_and_features(tmp_path, tiny_model):
    from types import SimpleNamespace

    from experiments import frozen_study

    work, results = tmp_path / "work", tmp_path / "results"
    (work / "data").mkdir(parents=True)
    (work / "cache").mkdir()
    manifest = {"source_sha256": "ab" * 32, "seed": 0, "counts": {"reward_full": 3, "evaluation": 2}}
    (work / "data" / "manifest.json").write_text(json.dumps(manifest))
    (work / "cache" / "meta.json").write_text(json.dumps({
        "trunk": {}, "trunk_path": str(tiny_model), "max_length": 96, "layers": [1], "hidden": 8,
        "compute": {"dtype": "torch.float32", "bf16_autocast": False}}))
    splits = {"reward_full": ([{}] * 3, [], []), "evaluation": ([{}] * 2, [], [])}
    args = SimpleNamespace(results=str(results), setting="s")
    saved = {"setting": "s", "fingerprint": frozen_study.fingerprint(work), "pool_pairs": 3, "held_out_pairs": 2,
             "tuning": {"layer": 1}}
    manifest["source_sha256"] = "cd" * 32  # the data was prepared again from another source
    (work / "data" / "manifest.json").write_text(json.dumps(manifest))
    results.mkdir()
    (results / "s.json").write_text(json.dumps(saved))
    with pytest.raises(SystemExit, match=r"s.json: its rows were computed on other data \("):
        frozen_study.run(args, work, splits)
    del saved["fingerprint"]
    (results / "s.json").write_text(json.dumps({**saved, "pool_pairs": 4}))  # an old file: no fingerprint
    with pytest.raises(SystemExit, match=r"computed on 4 pool and 2 held-out pairs, this data has 3 and 2"):
        frozen_study.run(args, work, splits)
