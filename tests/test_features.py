"""Frozen-trunk reward models on cached features (ser/features.py, rm_training.py --trunk frozen): the cache
computes what the saved checkpoint computes, is refused when stale, resumes exactly, and the saved RM is an
ordinary RM for the filter and PPO."""

import json

import pytest
import torch

import rm_loop_filter_by_self as F
import rm_training
from conftest import CPU
from ser import features
from ser.cli import parse
from ser.data import load_records, read_records
from ser.modeling import load_reward_model, load_tokenizer, score_pairs


def frozen_rm(sft_model, synthetic, out, cache, *extra):
    return rm_training.main(*parse(rm_training.ARGUMENTS, [
        "--model_name", str(sft_model), "--dataset_name", str(synthetic), "--output_dir", str(out),
        "--trunk", "frozen", "--feature_cache", str(cache), "--max_length", "96", "--dtype", "float32", *CPU, *extra]))


@pytest.fixture(scope="module")
def frozen(sft_model, synthetic, tmp_path_factory):
    """A frozen-trunk RM reading layer 1 of the tiny model's 2 (the saved trunk is truncated after it)."""
    root = tmp_path_factory.mktemp("frozen")
    frozen_rm(sft_model, synthetic, root / "rm", root / "cache", "--feature_layer", "1")
    return root / "rm", root / "cache"


@pytest.mark.parametrize("layer", ["1", "-1"])
def test_the_saved_rm_computes_the_cached_scores(sft_model, synthetic, frozen, tmp_path, layer):
    if layer == "1":
        out = frozen[0]
    else:
        out = tmp_path / "rm"
        frozen_rm(sft_model, synthetic, out, tmp_path / "cache", "--feature_layer", layer)
    results = json.loads((out / "eval_results.json").read_text())
    assert results["trunk"] == "frozen" and results["accuracy"] > 0.55  # the head learnt something
    tok = load_tokenizer(str(out))
    model = load_reward_model(str(out), tok, "float32")
    assert model.config.num_hidden_layers == (1 if layer == "1" else 2)  # truncated after the layer read
    r_j, r_k, _ = score_pairs(model, tok, load_records(str(synthetic), "data/evaluation"), 96)
    saved = read_records(out / "eval_scores.jsonl")
    # fp32 throughout: the cache's features @ head equal the checkpoint's forward to float32 rounding
    assert r_j == pytest.approx([s["reward_j"] for s in saved], abs=1e-4)
    assert r_k == pytest.approx([s["reward_k"] for s in saved], abs=1e-4)


def test_a_cache_of_another_length_or_trunk_is_refused(sft_model, tiny_model, synthetic, frozen, tmp_path):
    _, cache = frozen
    with pytest.raises(ValueError, match="built for another max_length"):
        rm_training.main(*parse(rm_training.ARGUMENTS, [
            "--model_name", str(sft_model), "--dataset_name", str(synthetic), "--output_dir", str(tmp_path / "a"),
            "--trunk", "frozen", "--feature_cache", str(cache), "--max_length", "64", *CPU]))
    with pytest.raises(ValueError, match="built for another trunk model"):
        frozen_rm(tiny_model, synthetic, tmp_path / "b", cache)
    with pytest.raises(ValueError, match=r"holds layers \[1\], not \[2\]"):
        frozen_rm(sft_model, synthetic, tmp_path / "c", cache, "--feature_layer", "2")


class OneProcess:
    """A process state of one process (what `build_cache` asks of it)."""

    process_index, num_processes, is_main_process, device = 0, 1, True, "cpu"

    def wait_for_everyone(self):
        pass


def test_a_resumed_cache_build_equals_an_uninterrupted_one(sft_model, synthetic, tmp_path, monkeypatch):
    from ser.data import encode

    tok = load_tokenizer(str(sft_model))
    seqs = [encode(tok, r["question"], r["response_j"], 96)["input_ids"]
            for r in load_records(str(synthetic), "data/evaluation")[:60]]
    build = dict(trunk_path=sft_model, pad_id=tok.pad_token_id, sequences=seqs, max_length=96, layers=[1, 2],
                 batch_size=8, dtype="float32", state=OneProcess(), part_rows=16, progress=None, device="cpu")
    features.build_cache(tmp_path / "whole", **build)
    save_part, calls = features.save_part, []

    def killed_at_the_third_part(*args):
        calls.append(args[1])
        if len(calls) == 3:
            raise KeyboardInterrupt
        save_part(*args)

    monkeypatch.setattr(features, "save_part", killed_at_the_third_part)
    with pytest.raises(KeyboardInterrupt):
        features.build_cache(tmp_path / "resumed", **build)
    monkeypatch.setattr(features, "save_part", save_part)
    saved = sum(len(json.loads(p.read_text())) for p in (tmp_path / "resumed").glob("part-*.json"))
    assert len(list((tmp_path / "resumed").glob("part-*.json"))) == 2 and saved >= 32  # parts of >= 16 rows
    again = features.build_cache(tmp_path / "resumed", **build)
    assert again["cached_before"] == saved and again["featurised_here"] == len(set(map(tuple, seqs))) - saved
    for layer in (1, 2):
        assert torch.equal(features.load_features(tmp_path / "whole", seqs, layer),
                           features.load_features(tmp_path / "resumed", seqs, layer))



def test_the_filter_scores_a_frozen_rm_from_the_cache_as_from_the_model(synthetic, frozen, tmp_path):
    rm, cache = frozen
    common = ["--dataset_name", str(synthetic), "--reward_model_name", str(rm), "--max_length", "96",
              "--dtype", "float32", "--status1_min_pairs", "5", "--status2_min_pairs", "5"]
    for name, extra in (("model", []), ("cache", ["--feature_cache", str(cache)])):
        F.main(*parse([F.ScriptArguments], [*common, "--rm_next_loop_save_path", str(tmp_path / name / "sel.jsonl"),
                                            "--remaining_data_save_path", str(tmp_path / name / "rest.jsonl"), *extra]))
    a, b = read_records(tmp_path / "model" / "scored.jsonl"), read_records(tmp_path / "cache" / "scored.jsonl")
    assert [x["reward_j"] for x in a] == pytest.approx([y["reward_j"] for y in b], abs=1e-4)
    assert [x["reward_k"] for x in a] == pytest.approx([y["reward_k"] for y in b], abs=1e-4)
    assert [r["id"] for r in read_records(tmp_path / "model" / "sel.jsonl")] == \
        [r["id"] for r in read_records(tmp_path / "cache" / "sel.jsonl")]
    stats = json.loads((tmp_path / "cache" / "stats.json").read_text())["scoring"]
    assert stats["feature_cache"] == str(cache) and stats["featurised_here"] > 0  # the pool was not cached yet


def test_ppo_runs_against_a_frozen_rm(sft_model, synthetic, frozen, tmp_path):
    from ppo import ppo

    rm, _ = frozen
    log = ppo.main(*parse(ppo.ARGUMENTS, [
        "--model_name", str(sft_model), "--reward_model_name", str(rm), "--dataset_name", str(synthetic),
        "--output_dir", str(tmp_path), "--steps", "1", "--batch_size", "4", "--mini_batch_size", "2",
        "--gradient_accumulation_steps", "1", "--ppo_epochs", "1", "--output_max_length", "8", "--save_freq", "0"]))
    assert log["env/reward_mean"] == log["env/reward_mean"] and (tmp_path / "policy" / "model.safetensors").is_file()


def test_a_retraining_from_a_frozen_rm_keeps_its_trunk_and_layer(synthetic, frozen, sft_model, tmp_path):
    rm, cache = frozen
    rm_training.main(*parse(rm_training.ARGUMENTS, [
        "--model_name", str(rm), "--tokenizer_name", str(sft_model), "--dataset_name", str(synthetic),
        "--output_dir", str(tmp_path / "rm1"), "--trunk", "frozen", "--max_length", "96", "--dtype", "float32", *CPU]))
    info = features.frozen_info(tmp_path / "rm1")
    assert info["layer"] == 1 and info["feature_cache"] == str(cache.resolve())
    assert info["trunk"] == str(sft_model.resolve())  # the trunk, not the truncated checkpoint it continued
