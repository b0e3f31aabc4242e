"""Pair schema, loading the three ways the seed uses, clear errors, atomic writes, left truncation."""

import gzip
import json

import pytest

from ser.data import (
    DataError,
    encode,
    iter_records,
    load_records,
    pool_chunks,
    read_records,
    resolve_sources,
    write_records,
)
from ser.modeling import load_tokenizer

PAIR = {"question": "q?", "response_j": "good", "response_k": "bad"}


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_jsonl_json_and_gzip_read_alike(tmp_path):
    rows = [PAIR, {**PAIR, "id": 7}]
    write_lines(tmp_path / "a.jsonl", [json.dumps(r) for r in rows])
    (tmp_path / "b.json").write_text(json.dumps(rows))
    with gzip.open(tmp_path / "c.jsonl.gz", "wt") as f:
        f.write("\n".join(json.dumps(r) for r in rows))
    for name in ("a.jsonl", "b.json", "c.jsonl.gz"):
        got = read_records(tmp_path / name)
        assert [r["question"] for r in got] == ["q?", "q?"]
        assert [r["_line"] for r in got] == [1, 2]
        assert list(iter_records(tmp_path / name)) == got  # the lazy reader reads the same
    for name in ("out.jsonl", "out.json"):
        write_records(tmp_path / name, got)
        assert [{k: v for k, v in r.items() if k != "_line"} for r in read_records(tmp_path / name)] == rows


def test_the_pool_in_chunks_is_the_pool(tmp_path):
    folder = tmp_path / "pool"
    folder.mkdir()
    write_lines(folder / "a.jsonl", ["", *[json.dumps({**PAIR, "id": i}) for i in range(3)]])
    (folder / "b.json").write_text(json.dumps([{**PAIR, "id": i} for i in range(3, 5)]))
    chunks = list(pool_chunks(str(folder), None, 2))
    assert [len(c) for c in chunks] == [2, 2, 1]
    assert [r for c in chunks for r in c] == load_records(str(folder), None)
    with gzip.open(tmp_path / "cut.jsonl.gz", "wb") as f:
        f.write(("\n".join(json.dumps(PAIR) for _ in range(500)) + "\n").encode())
    (tmp_path / "cut.jsonl.gz").write_bytes((tmp_path / "cut.jsonl.gz").read_bytes()[:-30])
    with pytest.raises(DataError, match="cut.jsonl.gz: truncated or corrupt gzip"):
        list(pool_chunks(str(tmp_path / "cut.jsonl.gz"), None, 100))


def test_folder_with_subset_like_stack_exchange_paired(tmp_path):
    folder = tmp_path / "se" / "data" / "reward"
    folder.mkdir(parents=True)
    write_lines(folder / "part-0.jsonl", [json.dumps(PAIR)] * 2)
    write_lines(folder / "part-1.jsonl", [json.dumps(PAIR)] * 3)
    (folder / "README.txt").write_text("not data")
    assert len(load_records(str(tmp_path / "se"), "data/reward")) == 5


def test_file_with_load_from_json_and_hub_id_passthrough(tmp_path):
    path = write_lines(tmp_path / "pairs.jsonl", [json.dumps(PAIR)])
    assert len(load_records(str(path), "data/reward", load_from_json=True)) == 1
    assert resolve_sources("lvwerra/stack-exchange-paired", "data/reward") == "lvwerra/stack-exchange-paired"
    with pytest.raises(DataError, match="not a JSON/JSONL file"):
        resolve_sources(str(tmp_path), None, load_from_json=True)


@pytest.mark.parametrize("line, message", [
    ('{"question": "q", "response_j": "a"', "malformed JSON line"),
    ('{"question": "q", "response_j": "a"}', "missing field 'response_k'"),
    ('{"question": "q", "response_j": "", "response_k": "b"}', "field 'response_j' is empty"),
    ('{"question": 3, "response_j": "a", "response_k": "b"}', "field 'question' is int"),
    ('["q", "a", "b"]', "expected an object"),
])
def test_bad_record_names_file_line_and_field(tmp_path, line, message):
    path = write_lines(tmp_path / "bad.jsonl", [json.dumps(PAIR), line])
    with pytest.raises(DataError) as err:
        load_records(str(path))
    assert str(err.value).startswith(f"{path}:2:")
    assert message in str(err.value)
    with pytest.raises(DataError) as err:
        list(pool_chunks(str(path), None, 1))
    assert str(err.value).startswith(f"{path}:2:") and message in str(err.value)


def test_missing_data_file_or_folder_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="no such file or folder"):
        load_records(str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match="no such folder"):
        load_records(str(tmp_path), "data/reward")


def test_write_records_is_atomic(tmp_path):
    path = tmp_path / "out.jsonl"
    write_records(path, [PAIR])

    def broken():
        yield PAIR
        raise RuntimeError("crash while writing")

    with pytest.raises(RuntimeError):
        write_records(path, broken())
    assert read_records(path)[0]["question"] == "q?"  # the old file, whole
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]  # no temporary left behind


def test_left_truncation_keeps_the_end_of_the_response(tiny_model):
    tok = load_tokenizer(str(tiny_model))
    question = "Which things are useful at the beach? " * 40
    response = "Bring kite, towel, hat."
    enc = encode(tok, question, response, max_length=32)
    ids = enc["input_ids"]
    assert len(ids) == 32 and enc["truncated"] and not enc["response_truncated"]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.decode(ids[1:-1]).endswith("Answer: Bring kite, towel, hat.")
    assert tok.decode(ids[enc["prompt_length"]:-1]).strip() == response
    short = encode(tok, "Beach?", response, max_length=512)
    assert not short["truncated"]
    assert tok.decode(short["input_ids"][1:-1]) == "Question: Beach?\n\nAnswer: Bring kite, towel, hat."


def test_write_json_never_follows_a_link_planted_at_a_predictable_name(tmp_path):
    from ser.data import write_json

    outside = tmp_path / "outside.txt"
    outside.write_text("keep me")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / ".stats.json.tmp").symlink_to(outside)  # the old temporary name
    write_json(tmp_path / "out" / "stats.json", {"a": 1})
    assert outside.read_text() == "keep me" and json.loads((tmp_path / "out" / "stats.json").read_text()) == {"a": 1}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [".stats.json.tmp", "stats.json"]  # no leftover of ours
