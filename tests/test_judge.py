"""The LLM judge (ser/judge.py, ppo/judge.py) against a real HTTP server on 127.0.0.1 that speaks the chat-completions API."""

import json

import pytest

from conftest import Server
from ppo import judge as cli
from ser import judge

QUESTIONS = [f"question {i}" for i in range(6)]


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    s = Server()
    yield s
    s.close()


def judge_args(server, tmp_path, **kw):
    return judge.JudgeArgs(**{"model": "judge-model", "base_url": server.url, "cache": str(tmp_path / "cache.jsonl"),
                              "concurrency": 3, "timeout": 0.5, "max_retries": 1, **kw})


def test_scores_compare_per_question_and_a_rerun_asks_nothing(server, tmp_path):
    a = [f"answer a{i} score {s}" for i, s in enumerate([5, 4, 3, 3, 2, 5])]
    b = [f"answer b{i} score {s}" for i, s in enumerate([1, 4, 1, 3, 5, 0])]
    result = judge.judge_pair(QUESTIONS, a, b, judge_args(server, tmp_path), ("PPO", "SFT"))
    assert result["scores"] == {"PPO": [5, 4, 3, 3, 2, 5], "SFT": [1, 4, 1, 3, 5, 0]}
    assert (result["win_rate"], result["tie_rate"], result["lose_rate"]) == (3 / 6, 2 / 6, 1 / 6)
    lo, hi = result["win_ci"]
    assert 0 <= lo < 0.5 < hi <= 1
    assert "| PPO vs SFT | PPO wins | tie | SFT wins |" in result["table"] and "| 50.0 % [" in result["table"]
    assert server.requests == 12 and result["counts"]["PPO"]["requests"] == 6

    again = judge.judge_pair(QUESTIONS, a, b, judge_args(server, tmp_path), ("PPO", "SFT"))
    assert server.requests == 12  # all from the cache
    assert again["counts"]["PPO"]["cached"] == 6 and again["counts"]["PPO"]["requests"] == 0
    assert again["scores"] == result["scores"]
    other = judge.judge_pair(QUESTIONS, a, b, judge_args(server, tmp_path, model="judge-model-2"), ("PPO", "SFT"))
    assert other["counts"]["PPO"]["cached"] == 0  # the key holds the model: another judge is asked afresh


def test_malformed_replies_are_counted_never_guessed(server, tmp_path):
    a = ["a0 score 4", "a1 malformed score 5", "a2 score 1"]
    b = ["b0 score 2", "b1 score 2", "b2 score 3"]
    result = judge.judge_pair(QUESTIONS[:3], a, b, judge_args(server, tmp_path))
    assert result["scores"]["A"] == [4, None, 1] and result["counts"]["A"]["unparseable"] == 1
    assert (result["compared"], result["left_out"], result["win_rate"], result["lose_rate"]) == (2, 1, 0.5, 0.5)
    assert judge.parse_score("Score: 3\nScore: 4") == 4 and judge.parse_score("Score: 6") is None
    assert judge.parse_score("I'd say 4/5") is None and judge.parse_score("Score: 3 or 4") is None


@pytest.mark.slow  # waits out client timeouts: make test runs it, make test-fast does not
def test_rate_limits_are_retried_and_what_still_fails_is_reported(server, tmp_path):
    a = ["a0 rate-once score 5", "a1 rate-always score 5", "a2 slow score 5"]
    b = ["b0 score 1", "b1 score 1", "b2 score 1"]
    result = judge.judge_pair(QUESTIONS[:3], a, b, judge_args(server, tmp_path))
    counts = result["counts"]["A"]
    assert result["scores"]["A"] == [5, None, None]  # the 429 once was retried; the others failed
    assert counts["failed"] == 2 and counts["unparseable"] == 0
    assert any("RateLimitError" in e for e in counts["first_errors"])
    assert any("Timeout" in e for e in counts["first_errors"])
    assert server.seen["a0 rate-once score 5"] == 2 and server.seen["a1 rate-always score 5"] == 2  # 1 + max_retries
    assert (result["compared"], result["left_out"]) == (1, 2)
    # failures are not cached: a re-run asks them again (and only them)
    before = server.requests
    judge.judge_pair(QUESTIONS[:3], a, b, judge_args(server, tmp_path))
    assert server.requests - before == 4  # two failing answers, each tried twice


def test_a_torn_cache_line_is_ignored_and_said(server, tmp_path):
    a, b = ["a score 3"], ["b score 2"]
    judge.judge_pair(QUESTIONS[:1], a, b, judge_args(server, tmp_path))
    cache = tmp_path / "cache.jsonl"
    cache.write_text(cache.read_text() + '{"key": "abc", "rep')  # a kill during a write
    result = judge.judge_pair(QUESTIONS[:1], a, b, judge_args(server, tmp_path))
    assert result["counts"]["A"]["cache_torn_lines"] == 1 and result["counts"]["A"]["cached"] == 1
    cache.write_text('not json\n' + cache.read_text())
    with pytest.raises(ValueError, match=r"cache.jsonl:1: not a JSON line"):
        judge.judge_pair(QUESTIONS[:1], a, b, judge_args(server, tmp_path))


def test_the_cli_reads_answer_files_and_writes_a_table(server, tmp_path):
    from ser.data import write_records

    write_records(tmp_path / "a.jsonl", [{"question": q, "response": f"x score {i % 6}"} for i, q in enumerate(QUESTIONS)])
    write_records(tmp_path / "b.jsonl", [{"question": q, "response": "y score 2"} for q in QUESTIONS])
    out = tmp_path / "judge.json"
    result = cli.main(cli.Args(answers_a=str(tmp_path / "a.jsonl"), answers_b=str(tmp_path / "b.jsonl"),
                                   names=["PPO", "SFT"], output=str(out)), judge_args(server, tmp_path))
    assert json.loads(out.read_text())["win_rate"] == result["win_rate"] == 3 / 6
    assert (tmp_path / "judge.md").read_text() == result["table"]
    write_records(tmp_path / "c.jsonl", [{"question": "other", "response": "z"}] * 6)
    with pytest.raises(SystemExit, match=r"a.jsonl:1 and .*c.jsonl:1: different questions"):
        cli.main(cli.Args(answers_a=str(tmp_path / "a.jsonl"), answers_b=str(tmp_path / "c.jsonl")),
                   judge_args(server, tmp_path))


def test_a_torn_last_line_is_cut_off_so_later_runs_keep_the_whole_cache(server, tmp_path):
    a, b = ["a score 3"], ["b score 2"]
    judge.judge_pair(QUESTIONS[:1], a, b, judge_args(server, tmp_path))
    cache = tmp_path / "cache.jsonl"
    whole = cache.read_text()
    cache.write_text(whole + '{"key": "abc", "rep')  # a kill during a write
    judge.judge_pair(QUESTIONS[:2], a * 2, b * 2, judge_args(server, tmp_path))  # appends new replies
    assert cache.read_text().startswith(whole) and '"rep{' not in cache.read_text()
    before = server.requests
    again = judge.judge_pair(QUESTIONS[:2], a * 2, b * 2, judge_args(server, tmp_path))  # the run after that
    assert server.requests == before and again["counts"]["A"]["cache_torn_lines"] == 0


def test_cache_lines_of_the_wrong_shape_name_file_and_line(server, tmp_path):
    cache = tmp_path / "cache.jsonl"
    cache.write_text('{"key": "k", "reply": "Score: 3"}\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"cache.jsonl:2: expected"):
        judge.judge_pair(QUESTIONS[:1], ["a"], ["b"], judge_args(server, tmp_path))


def test_a_reply_without_content_is_failed_and_asked_again(server, tmp_path):
    a = ["a0 score 4", "a1 null-content score 5"]
    b = ["b0 score 2", "b1 score 2"]
    result = judge.judge_pair(QUESTIONS[:2], a, b, judge_args(server, tmp_path))
    assert result["scores"]["A"] == [4, None] and result["counts"]["A"]["failed"] == 1
    assert any("no content in the reply" in e for e in result["counts"]["A"]["first_errors"])
    before = server.seen["a1 null-content score 5"]
    judge.judge_pair(QUESTIONS[:2], a, b, judge_args(server, tmp_path))
    assert server.seen["a1 null-content score 5"] == before + 1  # not cached as an empty reply


def test_an_output_named_like_the_table_is_refused(server, tmp_path):
    from ppo import judge as judge_script

    for name in ("a", "b"):
        (tmp_path / f"{name}.jsonl").write_text(json.dumps({"question": "q", "response": name}) + "\n")
    args = judge_script.Args(answers_a=str(tmp_path / "a.jsonl"), answers_b=str(tmp_path / "b.jsonl"),
                             output=str(tmp_path / "R.md"))
    with pytest.raises(SystemExit, match=r"--output .*R.md: the results JSON"):
        judge_script.main(args, judge_args(server, tmp_path))
    assert server.requests == 0 and not (tmp_path / "R.md").exists()
