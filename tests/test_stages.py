"""Tiny end-to-end runs of sft.py and rm_training.py, called the way users call them."""

import json

import pytest

import rm_training
import sft
from conftest import CPU
from ser.cli import parse
from ser.data import load_records, write_records
from ser.modeling import load_tokenizer


def test_sft_loss_is_on_the_answer_only(tiny_model, synthetic, tmp_path):
    trainer = sft.main(*parse(sft.ARGUMENTS, [
        "--model_name", str(tiny_model), "--dataset_name", str(synthetic), "--output_dir", str(tmp_path),
        "--train_subset_size", "8", "--max_steps", "1", *CPU]))
    tok = load_tokenizer(str(tmp_path))
    by_ids = {tuple(r["input_ids"]): r for r in trainer.train_dataset}
    records = load_records(str(synthetic), "data/finetune", fields=("question", "response_j"))
    assert len(by_ids) == 8
    batch = trainer.data_collator(list(by_ids.values()))
    answers = {r["response_j"] for r in records}
    for row in range(len(by_ids)):
        labels, ids = batch["labels"][row], batch["input_ids"][row]
        kept = ids[labels != -100].tolist()
        # answer + eos, nothing of the question (the space after "Answer:" is the answer's first character)
        text = tok.decode(kept)
        assert text.startswith(" ") and text.endswith(tok.eos_token) and text[1:-len(tok.eos_token)] in answers
        assert (labels[:3] == -100).all()


def run_rm(out, *flags):
    rm_training.main(*parse(rm_training.ARGUMENTS,
                            ["--output_dir", str(out), "--use_lora", "False", "--per_device_train_batch_size", "16",
                             "--per_device_eval_batch_size", "64", "--learning_rate", "2e-3", *CPU, *flags],
                            counted=("--train_subset", "--eval_subset")))
    return json.loads((out / "eval_results.json").read_text())


@pytest.fixture(scope="module")
def toy_task(tmp_path_factory):
    """A learnable toy signal: the preferred answer names a towel, the other does not."""
    import random

    from ser.synthetic import make_question, make_response

    rng, out = random.Random(0), tmp_path_factory.mktemp("toy")

    def pair(i):
        plain = make_response(rng).replace("towel", "cup")
        towel = plain[:-1] + ", towel."
        other = make_response(rng).replace("towel", "cup")
        return {"id": i, "question": make_question(rng), "response_j": towel, "response_k": other}

    write_records(out / "data" / "reward" / "train.jsonl", [pair(i) for i in range(600)])
    write_records(out / "data" / "evaluation" / "test.jsonl", [pair(i) for i in range(200)])
    return out


@pytest.mark.slow
def test_rm_learns_a_toy_signal(sft_model, toy_task, tmp_path):
    res = run_rm(tmp_path / "rm", "--model_name", str(sft_model), "--dataset_name", str(toy_task),
                 "--num_train_epochs", "2")
    assert res["pairs"] == 200 and res["train_pairs"] == 600
    assert res["accuracy"] >= 0.95, res


@pytest.mark.slow
def test_hinge_loss_learns_too(sft_model, toy_task, tmp_path):
    res = run_rm(tmp_path / "rm", "--model_name", str(sft_model), "--dataset_name", str(toy_task),
                 "--num_train_epochs", "2", "--loss", "hinge")
    assert res["loss_type"] == "hinge" and res["accuracy"] >= 0.95, res


@pytest.mark.slow
def test_union_of_sources_and_continuing_from_a_previous_rm(sft_model, synthetic, tmp_path):
    extra = tmp_path / "selected.jsonl"
    write_records(extra, load_records(str(synthetic), "data/reward")[:7])
    first = run_rm(tmp_path / "rm0", "--model_name", str(sft_model), "--dataset_name", str(synthetic),
                   "--num_train_epochs", "1")
    second = run_rm(tmp_path / "rm1", "--model_name", str(tmp_path / "rm0"), "--dataset_name", str(synthetic),
                    str(extra), "--num_train_epochs", "1", "--train_subset", "data/reward", "--eval_subset", "50")
    assert second["train_pairs"] == first["train_pairs"] + 7
    assert second["pairs"] == 50
    assert second["model_name"].endswith("rm0")


def test_subsets_are_seeded_samples_of_every_source(sft_model, synthetic, tmp_path):
    """--train_subset_size samples the union (not the human seed first); --eval_subset_size samples too."""
    from ser.data import subsample

    selected = tmp_path / "selected.jsonl"
    write_records(selected, load_records(str(synthetic), "data/unlabeled")[:90])
    res = run_rm(tmp_path / "rm", "--model_name", str(sft_model), "--dataset_name", str(synthetic), str(selected),
                 "--max_steps", "1", "--train_subset_size", "60", "--eval_subset_size", "20")
    assert res["train_pairs"] == 60 and res["pairs"] == 20
    assert len(res["train_sources"]) == 2 and min(res["train_sources"].values()) >= 15  # about 30 each
    items = list(range(100))
    a, b, c = subsample(items, 10, 0), subsample(items, 10, 0), subsample(items, 10, 1)
    assert a == b != c and a == sorted(a) and a != items[:10]
    assert subsample(items, None, 0) == subsample(items, 200, 0) == items


def test_missing_data_is_a_clear_error(sft_model, tmp_path):
    from ser.data import DataError

    with pytest.raises(DataError, match="no such file or folder"):
        run_rm(tmp_path / "rm", "--model_name", str(sft_model), "--dataset_name", str(tmp_path / "missing.jsonl"))
