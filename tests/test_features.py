"""Frozen-trunk reward models on cached features (ser/features.py, rm_training.py --trunk frozen): the cache
computes what the saved checkpoint computes, is refused when stale, resumes exactly, and the saved RM is an
ordinary RM for the filter and PPO."""

import json
import math
import time

import pytest
import torch

import rm_loop_filter_by_self as F
import rm_training
from conftest import CPU, launch
from ser import features
from ser.cli import parse
from ser.data import load_records, read_records
from ser.modeling import load_reward_model, load_tokenizer
from ser.scoring import score_pairs


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
    saved = sum(len(json.loads(p.read_text())["keys"]) for p in (tmp_path / "resumed").glob("part-*.json"))
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


# ----------------------------------------------------------------------------- reliability


@pytest.mark.slow
def test_a_frozen_rm_is_not_scored_or_retrained_on_a_changed_trunk(sft_model, tiny_model, synthetic, tmp_path):
    """Trained on a copy T of the SFT model, then T's weights overwritten: a new --feature_cache would hold the
    changed trunk's features, which the old head does not fit. The filter and a retraining refuse it, naming
    both identities."""
    import shutil

    trunk = tmp_path / "T"
    shutil.copytree(sft_model, trunk)
    frozen_rm(trunk, synthetic, tmp_path / "rm", tmp_path / "cache1", "--feature_layer", "1")
    shutil.copy(tiny_model / "model.safetensors", trunk / "model.safetensors")  # same shape, other weights
    with pytest.raises(ValueError, match=r"its trunk .*T has changed since the RM was trained \(files differing in "
                                         r"size, modification time or hash: model.safetensors\); recorded identity"):
        F.main(*parse([F.ScriptArguments], [
            "--dataset_name", str(synthetic), "--reward_model_name", str(tmp_path / "rm"), "--max_length", "96",
            "--feature_cache", str(tmp_path / "cache2"), "--rm_next_loop_save_path", str(tmp_path / "f" / "sel.jsonl"),
            "--remaining_data_save_path", str(tmp_path / "f" / "rest.jsonl")]))
    assert not (tmp_path / "f").exists() and not (tmp_path / "cache2").exists()
    with pytest.raises(ValueError, match="has changed since the RM was trained"):
        rm_training.main(*parse(rm_training.ARGUMENTS, [
            "--model_name", str(tmp_path / "rm"), "--tokenizer_name", str(sft_model), "--dataset_name", str(synthetic),
            "--output_dir", str(tmp_path / "rm1"), "--trunk", "frozen", "--feature_cache", str(tmp_path / "cache2"),
            "--max_length", "96", *CPU]))


def test_rm_training_refuses_a_folder_it_cannot_save_to_before_featurising(sft_model, synthetic, tmp_path):
    run = tmp_path / "run"
    (run / "loop_0").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="is not a model folder"):
        frozen_rm(sft_model, synthetic, run, tmp_path / "cache")
    assert not (tmp_path / "cache").exists()  # refused before any work


def cache_sequences(sft_model, synthetic, n=80):
    from ser.data import encode

    tok = load_tokenizer(str(sft_model))
    records = load_records(str(synthetic), "data/evaluation")[:n]
    return tok, [encode(tok, r["question"], r[side], 96)["input_ids"] for r in records for side in ("response_j", "response_k")]


def build_args(sft_model, tok, seqs):
    return dict(trunk_path=sft_model, pad_id=tok.pad_token_id, sequences=seqs, max_length=96, layers=[1],
                batch_size=8, dtype="float32", state=OneProcess(), part_rows=16, progress=None, device="cpu")


@pytest.mark.slow
def test_a_damaged_cache_part_is_refused_by_a_reader_and_featurised_again_by_a_build(sft_model, synthetic, tmp_path,
                                                                                      caplog):
    from safetensors.torch import load_file, save_file

    from ser.data import DataError

    tok, seqs = cache_sequences(sft_model, synthetic, 40)
    cache = tmp_path / "cache"
    features.build_cache(cache, **build_args(sft_model, tok, seqs))
    whole = features.load_features(cache, seqs, 1)
    parts = sorted(cache.glob("part-*.json"))
    assert len(parts) >= 4

    def flip(part):  # one value changed by 1e24, the file otherwise valid
        t = load_file(part.with_suffix(".safetensors"))["features"]
        t[0, 0, 0] += 1e24
        save_file({"features": t}, part.with_suffix(".safetensors"))

    def reorder(part):  # two keys swapped: each row would be read as the other sequence's
        saved = json.loads(part.read_text())
        saved["keys"][0], saved["keys"][1] = saved["keys"][1], saved["keys"][0]
        part.write_text(json.dumps(saved))

    def truncate(part):
        data = part.with_suffix(".safetensors").read_bytes()
        part.with_suffix(".safetensors").write_bytes(data[:len(data) // 2])

    damages = {"flipped bytes": flip, "reordered keys": reorder, "truncated": truncate,
               "missing tensor": lambda part: part.with_suffix(".safetensors").unlink(),
               "garbage key file": lambda part: part.write_text("{not json")}
    for (what, damage), part in zip(damages.items(), parts):
        damage(part)
    with pytest.raises(DataError, match="build the cache again"):
        features.load_features(cache, seqs, 1)
    with caplog.at_level("WARNING"):
        again = features.build_cache(cache, **build_args(sft_model, tok, seqs))
    assert again["featurised_here"] > 0 and caplog.text.count("the part is removed") == len(damages)
    assert torch.allclose(features.load_features(cache, seqs, 1), whole, atol=1e-5)
    (cache / "meta.json").write_text("garbage")
    with pytest.raises(DataError, match=r"meta.json: unreadable .*remove the cache folder"):
        features.load_features(cache, seqs, 1)


BUILDER = """
import json, pathlib, sys, time
sys.path.insert(0, sys.argv[1])
from ser import features
from ser.modeling import load_tokenizer
trunk, cache, seqs_file, go = sys.argv[2:6]
seqs = json.loads(pathlib.Path(seqs_file).read_text())
tok = load_tokenizer(trunk)
while not pathlib.Path(go).exists():
    time.sleep(0.01)
print(json.dumps(features.build_cache(cache, trunk, tok.pad_token_id, seqs, 96, [1], 4, "float32", False,
                                     part_rows=4, progress=None, device="cpu")))
"""


@pytest.mark.slow
def test_two_jobs_building_one_cache_at_once_give_what_one_build_gives(sft_model, synthetic, tmp_path):
    """Two processes, started together, featurise overlapping sets into one cache: every sequence of both is
    there with its own features (one build's, to float32 rounding), and the overlap is featurised once."""
    import subprocess
    import sys

    from conftest import ROOT

    tok, seqs = cache_sequences(sft_model, synthetic, 60)
    distinct = list({tuple(s): s for s in seqs}.values())
    halves = [distinct[:80], distinct[40:]]  # 40 sequences in both
    features.build_cache(tmp_path / "one", **build_args(sft_model, tok, distinct))
    script, go = tmp_path / "builder.py", tmp_path / "go"
    script.write_text(BUILDER)
    procs = []
    for i, half in enumerate(halves):
        (tmp_path / f"seqs{i}.json").write_text(json.dumps(half))
        procs.append(subprocess.Popen([sys.executable, str(script), str(ROOT), str(sft_model), str(tmp_path / "shared"),
                                       str(tmp_path / f"seqs{i}.json"), str(go)], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    time.sleep(8)  # both have imported torch and loaded the tokenizer
    go.touch()
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    built = [json.loads(o[0].strip().splitlines()[-1]) for o in outs]
    assert sum(b["featurised_here"] for b in built) == len(distinct)  # the overlap once: the builders took turns
    assert torch.allclose(features.load_features(tmp_path / "shared", distinct, 1),
                          features.load_features(tmp_path / "one", distinct, 1), atol=1e-5)


@pytest.mark.slow
def test_no_layer_past_the_deepest_asked_is_computed(sft_model, synthetic, tmp_path, monkeypatch):
    tok, seqs = cache_sequences(sft_model, synthetic, 10)
    load, ran = features.load_trunk, []

    def watched(path, dtype="auto"):
        trunk = load(path, dtype)
        for i, layer in enumerate(trunk.layers):
            layer.register_forward_hook(lambda *_, i=i: ran.append(i))
        return trunk

    monkeypatch.setattr(features, "load_trunk", watched)
    features.build_cache(tmp_path / "one", **build_args(sft_model, tok, seqs))  # layer 1 of 2
    assert ran and set(ran) == {0}
    ran.clear()
    features.build_cache(tmp_path / "both", **{**build_args(sft_model, tok, seqs), "layers": [1, 2]})
    assert set(ran) == {0, 1}
    assert torch.allclose(features.load_features(tmp_path / "one", seqs, 1), features.load_features(tmp_path / "both", seqs, 1),
                          atol=1e-5)  # the cut trunk's layer-1 features are the whole trunk's


# ----------------------------------------------------------------------------- a head trained as the paper trains RMs


def toy_features(n=100, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    f_j, f_k = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    f_j[:, 0] += 1.0  # the preferred side is higher along one direction
    return f_j, f_k


def test_a_step_budget_head_stops_at_its_budget_and_continuing_differs_from_restarting():
    f_j, f_k = toy_features()
    w, steps = features.train_head_steps(f_j, f_k, epochs=2, batch_size=32, lr=1e-2)
    assert steps == 2 * 4  # ceil(100 / 32) minibatches a pass
    assert features.train_head_steps(f_j, f_k, epochs=2, batch_size=32, steps=5)[1] == 5  # a matched-steps control
    assert ((f_j - f_k) @ w > 0).float().mean() > 0.6  # it learnt the direction
    previous = features.train_head(f_j[:50], f_k[:50])
    cont, _ = features.train_head_steps(f_j, f_k, previous, epochs=1, batch_size=32, lr=1e-3)
    fresh, _ = features.train_head_steps(f_j, f_k, None, epochs=1, batch_size=32, lr=1e-3)
    assert not torch.allclose(cont, fresh, atol=1e-3)  # a few steps from another start end elsewhere
    conv_cont = features.train_head(f_j, f_k, previous)
    assert torch.allclose(conv_cont, features.train_head(f_j, f_k), atol=1e-3)  # to convergence: the same head


@pytest.mark.slow
def test_an_adamw_frozen_rm_is_an_ordinary_rm_for_the_filter(sft_model, synthetic, tmp_path):
    frozen_rm(sft_model, synthetic, tmp_path / "rm", tmp_path / "cache", "--feature_layer", "1",
              "--head_optimizer", "adamw", "--num_train_epochs", "3", "--per_device_train_batch_size", "32")
    results = json.loads((tmp_path / "rm" / "eval_results.json").read_text())
    assert results["head_optimizer"] == "adamw" and results["head_steps_run"] == 3 * math.ceil(results["train_pairs"] / 32)
    common = ["--dataset_name", str(synthetic), "--reward_model_name", str(tmp_path / "rm"), "--max_length", "96",
              "--dtype", "float32", "--status1_min_pairs", "5", "--status2_min_pairs", "5"]
    for name, extra in (("model", []), ("cache", ["--feature_cache", str(tmp_path / "cache")])):
        F.main(*parse([F.ScriptArguments], [*common, "--rm_next_loop_save_path", str(tmp_path / name / "sel.jsonl"),
                                            "--remaining_data_save_path", str(tmp_path / name / "rest.jsonl"), *extra]))
    a, b = read_records(tmp_path / "model" / "scored.jsonl"), read_records(tmp_path / "cache" / "scored.jsonl")
    assert [x["reward_j"] for x in a] == pytest.approx([y["reward_j"] for y in b], abs=1e-4)


@pytest.mark.slow
def test_ask_humans_rules_on_a_frozen_rm_s_features(sft_model, synthetic, tmp_path):
    """The filter's remaining pairs of a frozen-trunk RM with bootstrap heads, exported by each rule on features."""
    from data import ask_humans

    rm, cache = tmp_path / "rm", tmp_path / "cache"
    frozen_rm(sft_model, synthetic, rm, cache, "--feature_layer", "1", "--bootstrap_heads", "3")
    assert features.frozen_info(rm)["bootstrap_heads"] == 3
    F.main(*parse([F.ScriptArguments], [
        "--dataset_name", str(synthetic), "--reward_model_name", str(rm), "--max_length", "96", "--feature_cache",
        str(cache), "--rm_next_loop_save_path", str(tmp_path / "f" / "sel.jsonl"),
        "--remaining_data_save_path", str(tmp_path / "f" / "rest.jsonl")]))
    pool = read_records(tmp_path / "f" / "rest.jsonl")
    for rule in ("d-optimal", "ensemble-diverse", "typical"):
        out = tmp_path / rule
        ask_humans.main(ask_humans.Args(pool=str(tmp_path / "f" / "rest.jsonl"), n=12, out=str(out), rule=rule,
                                        reward_model_name=str(rm), feature_cache=str(cache)))
        asked = read_records(out / "asked.jsonl")
        assert len(asked) == 12 and len({a["question"] for a in asked}) == 12 and len(pool) >= 12, rule
        assert json.loads((out / "ask.json").read_text())["rule_name"] == rule


@pytest.mark.slow
def test_ppo_scores_a_frozen_rm_s_bootstrap_heads_as_ensemble_members(sft_model, synthetic, frozen, tmp_path):
    """PPO's --bootstrap_heads: the K heads score in one pass what K copies of the RM, one head each, score; PPO
    runs on their ensemble, and refuses an RM saved without heads before any work."""
    from ppo import ppo
    from ser.data import encode
    from ser.scoring import score_ids

    rm = tmp_path / "rm"
    frozen_rm(sft_model, synthetic, rm, tmp_path / "cache", "--feature_layer", "1", "--bootstrap_heads", "3")
    tok = load_tokenizer(str(rm))
    pairs = load_records(str(synthetic), "data/evaluation")[:10]
    ids = [encode(tok, p["question"], p["response_j"], 96)["input_ids"] for p in pairs]
    together = score_ids(ppo.load_scoring_rm(rm, tok, "float32", False, bootstrap_heads=True), tok, ids, heads=True)[0]
    heads = features.load_bootstrap_heads(rm)
    assert len(together[0]) == 3 and heads.shape[0] == 3
    for k, head in enumerate(heads):
        one = load_reward_model(str(rm), tok, "float32")
        with torch.no_grad():
            one.score.weight.copy_(head.view(1, -1))
        assert [t[k] for t in together] == pytest.approx(score_ids(one, tok, ids)[0], abs=1e-5)
    assert len({tuple(round(x, 4) for x in col) for col in zip(*together)}) == 3  # three different members

    args = ["--model_name", str(sft_model), "--dataset_name", str(synthetic), "--batch_size", "8", "--mini_batch_size",
            "4", "--gradient_accumulation_steps", "1", "--ppo_epochs", "1", "--output_max_length", "8", "--steps", "2",
            "--bootstrap_heads", "True", "--reward_ensemble", "min", "--normalize_samples", "8"]
    ppo.main(*parse(ppo.ARGUMENTS, [*args, "--reward_model_name", str(rm), "--output_dir", str(tmp_path / "ppo")]))
    log = [json.loads(line) for line in (tmp_path / "ppo" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and all(r["env/ensemble_spread"] > 0 for r in log)
    with pytest.raises(FileNotFoundError, match="bootstrap_heads.safetensors"):
        ppo.main(*parse(ppo.ARGUMENTS, [*args, "--reward_model_name", str(frozen[0]), "--output_dir", str(tmp_path / "x")]))
    assert not (tmp_path / "x").exists()


def test_shared_prefix_features_equal_plain_features(sft_model, synthetic, tmp_path):
    """Each pair's question runs once for both answers (and for every answer to the same question): the cache's
    features are those of the plain pass, at the trunk's last layer (after its final norm) and at a cut one."""
    tok, seqs = cache_sequences(sft_model, synthetic, 30)
    n_layers = json.loads((sft_model / "config.json").read_text())["num_hidden_layers"]
    layers = sorted({1, n_layers})
    for name, shared in (("plain", False), ("shared", True)):
        built = features.build_cache(tmp_path / name, **{**build_args(sft_model, tok, seqs), "layers": layers,
                                                         "shared_prefix": shared})
        assert built["featurised_here"] == len(set(map(tuple, seqs)))
    assert len(list((tmp_path / "shared").glob("part-*.json"))) >= 2  # parts of about part_rows rows, groups whole
    for layer in layers:
        plain, shared = (features.load_features(tmp_path / n, seqs, layer) for n in ("plain", "shared"))
        assert torch.allclose(plain, shared, atol=1e-4, rtol=1e-4), (layer, (plain - shared).abs().max())


@pytest.mark.slow
@pytest.mark.two_process
@pytest.mark.parametrize("shared_prefix", ["False", "True"])
def test_two_processes_featurise_and_fit_a_frozen_rm_as_one_process_does(sft_model, synthetic, frozen, tmp_path,
                                                                        shared_prefix):
    """torchrun with 2 processes (gloo): each featurises its share of the sequences (whole shared-prefix groups),
    the main process fits the head; the cache and the RM are the one-process fixture's, up to float rounding."""
    out, cache = tmp_path / "rm", tmp_path / "cache"
    launch(["torchrun", "--standalone", "--nproc_per_node", "2", "rm_training.py", "--model_name", str(sft_model),
            "--dataset_name", str(synthetic), "--output_dir", str(out), "--trunk", "frozen", "--feature_cache", str(cache),
            "--max_length", "96", "--dtype", "float32", "--feature_layer", "1", "--shared_prefix", shared_prefix, *CPU])
    one_rm, one_cache = frozen
    two, one = (json.loads((d / "eval_results.json").read_text()) for d in (out, one_rm))
    # the main process featurised its share only (the fixture's one process featurised every distinct sequence)
    assert 0 < two["featurising"]["featurised_here"] <= 0.75 * one["featurising"]["featurised_here"]
    _, seqs = cache_sequences(sft_model, synthetic)
    assert torch.allclose(features.load_features(cache, seqs, 1), features.load_features(one_cache, seqs, 1),
                          atol=1e-4, rtol=1e-4)
    assert two["accuracy"] == one["accuracy"] and two["margin"] == pytest.approx(one["margin"], abs=1e-4)
    assert torch.allclose(features.head_weight(out), features.head_weight(one_rm), atol=1e-4)
