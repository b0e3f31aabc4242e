"""data/generate_pairs.py: a pool of sampled pairs from prompts, reproducible, duplicates counted,
accepted by the loop driver."""

import json
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from data import generate_pairs as G
from ser.data import read_records


def generate(sft_model, synthetic, out, **kw):
    settings = {"max_tokens": 24, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "batch_size": 8, "device": "cpu", **kw}
    args = G.Args(prompts=str(synthetic), model=str(sft_model), out=str(out), subset="data/rl", **settings)
    return G.main(args)


def test_presence_penalty_is_vllms_on_generated_tokens_only():
    penalty = G.PresencePenalty(1.5)
    prompt = torch.tensor([[3, 4, 5]])
    scores = torch.zeros(1, 8)
    assert torch.equal(penalty(prompt, scores), scores)  # first call: the prompt alone, nothing generated
    after = penalty(torch.tensor([[3, 4, 5, 6, 6, 2]]), scores)
    want = torch.zeros(1, 8)
    want[0, [6, 2]] = -1.5  # once per distinct generated token (presence, not frequency); 3-5 are the prompt's
    assert torch.equal(after, want)


@pytest.mark.slow
def test_same_seed_same_pool_and_every_prompt_accounted_for(sft_model, synthetic, tmp_path):
    a = generate(sft_model, synthetic, tmp_path / "a.jsonl", seed=3)
    generate(sft_model, synthetic, tmp_path / "b.jsonl", seed=3)
    assert (tmp_path / "a.jsonl").read_text() == (tmp_path / "b.jsonl").read_text()
    pool = read_records(tmp_path / "a.jsonl")
    assert a["pairs"] == len(pool) > 0 and a["pairs"] + a["dropped_identical"] + a["dropped_empty"] == a["prompts"] == 32
    assert all(set(r) == {"id", "question", "response_j", "response_k", "_line"} for r in pool)  # nobody's label
    assert all(r["response_j"].strip() != r["response_k"].strip() for r in pool)
    prompts = {r["id"]: r["question"] for r in read_records(synthetic / "data" / "rl" / "train.jsonl")}
    kept = [r["id"] for r in pool]
    assert kept == [i for i in prompts if i in set(kept)] and all(prompts[r["id"]] == r["question"] for r in pool)
    c = generate(sft_model, synthetic, tmp_path / "c.jsonl", seed=4)
    assert (tmp_path / "c.jsonl").read_text() != (tmp_path / "a.jsonl").read_text() and c["prompts"] == 32
    assert json.loads((tmp_path / "a.stats.json").read_text())["pairs"] == a["pairs"]


def test_identical_answers_are_dropped_and_counted(sft_model, synthetic, tmp_path):
    """Greedy decoding: both answers are the same for every prompt. The drops are counted, and a pool with no
    pair left is an error, not an empty pool that the driver would mark done."""
    import re

    from ser.data import DataError

    with pytest.raises(DataError, match="none of the 32 prompts gave two different") as refused:
        generate(sft_model, synthetic, tmp_path / "pool.jsonl", top_k=1)
    identical, empty = map(int, re.search(r"\((\d+) identical, (\d+) with an empty answer\)", str(refused.value)).groups())
    assert identical + empty == 32 and identical > 0
    assert not (tmp_path / "pool.jsonl").exists()


@pytest.mark.slow
def test_the_driver_builds_its_pool_by_generation(synthetic, sft_model, tmp_path):
    from conftest import ENV, RM_ARGS

    run = tmp_path / "run"
    env = {**ENV, "DATA": str(synthetic), "SFT": str(sft_model), "RUN": str(run), "MAX_LOOPS": "1", "MAX_LENGTH": "96",
           "SEED_EPOCHS": "4", "LOOP_EPOCHS": "2", "RM_ARGS": RM_ARGS, "POOL_FROM": "generate", "POOL_PROMPTS": "data/rl",
           "GENERATE_ARGS": "--max_tokens 24 --temperature 1.0 --top_k 0 --top_p 1.0 --device cpu",
           "FILTER_ARGS": "--status1_min_pairs 1 --status2_min_pairs 1 --probability pairwise", "PY": sys.executable}
    proc = subprocess.run(["bash", "scripts/ser_loop.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    generated = json.loads((run / "pool" / "train.stats.json").read_text())
    stats = json.loads((run / "loop_1" / "stats.json").read_text())
    assert stats["pool"] == generated["pairs"] > 0, stats  # loop 1 self-labelled the generated pool
    assert stats["pseudo_label_precision"] is None  # no human label exists for generated pairs
    assert json.loads((run / "config.json").read_text())["settings"]["POOL_FROM"] == "generate"


@pytest.mark.slow
@pytest.mark.two_process
def test_two_processes_share_the_prompts(synthetic, sft_model, tmp_path):
    from conftest import ENV

    out = tmp_path / "pool.jsonl"
    cmd = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port", "0",
           "--mixed_precision", "no", "--dynamo_backend", "no", "data/generate_pairs.py", "--prompts", str(synthetic),
           "--model", str(sft_model), "--out", str(out), "--max_tokens", "16", "--temperature", "1.0", "--top_k", "0",
           "--batch_size", "8"]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    stats = json.loads((tmp_path / "pool.stats.json").read_text())
    assert stats["processes"] == 2 and stats["pairs"] + stats["dropped_identical"] + stats["dropped_empty"] == 32
    ids = [r["id"] for r in read_records(out)]
    assert len(ids) == len(set(ids)) == stats["pairs"] > 0  # every prompt answered once, by one of the two


@pytest.mark.slow
@pytest.mark.parametrize("timeout_hours", [0.0005, 0.01])  # 1.8 s, 36 s
@pytest.mark.two_process
def test_the_final_gather_waits_for_a_late_process_as_long_as_the_flag_says(synthetic, sft_model, tmp_path,
                                                                            timeout_hours):
    """Process 1 reaches the gather 6 s after process 0: past a 1.8 s timeout the run fails naming the timeout
    and writes nothing; within 36 s it completes."""
    from conftest import ENV

    out = tmp_path / "pool.jsonl"
    cmd = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port", "0",
           "--mixed_precision", "no", "--dynamo_backend", "no", "tests/late_rank.py", "1", "6", "data/generate_pairs.py",
           "--prompts", str(synthetic), "--model", str(sft_model), "--out", str(out), "--max_tokens", "4",
           "--max_prompts", "4", "--temperature", "1.0", "--top_k", "0", "--gather_timeout_hours", str(timeout_hours)]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    if timeout_hours < 0.001:
        assert proc.returncode != 0 and not out.exists()
        assert "Timed out waiting 1800ms" in proc.stderr, proc.stderr[-3000:]  # gloo's words, with the flag's time
    else:
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert json.loads((tmp_path / "pool.stats.json").read_text())["processes"] == 2


def test_vllm_engine_seeds_each_request_prompts_the_hf_ids_and_keeps_one_engine_alive(sft_model, synthetic, tmp_path,
                                                                                      monkeypatch):
    """vLLM is not installed here: a stand-in module records what the engine is asked."""
    import gc
    import types

    from ser.data import load_records, prompt_ids
    from ser.modeling import load_tokenizer
    from ser.rollout import model_prompt

    engines, requests = {"alive": 0, "most": 0, "built": []}, []

    class LLM:
        def __init__(self, model, dtype, seed, tensor_parallel_size):
            gc.collect()
            engines["alive"] += 1
            engines["most"] = max(engines["most"], engines["alive"])
            engines["built"].append((model, tensor_parallel_size))
            self.model = model

        def __del__(self):
            engines["alive"] -= 1

        def generate(self, prompts, params):
            requests.extend((self.model, p["prompt_token_ids"], s.seed) for p, s in zip(prompts, params))
            text = lambda s: f"answer {s.seed % 7}"  # noqa: E731 (two seeds seldom give the same answer)
            return [types.SimpleNamespace(outputs=[types.SimpleNamespace(text=text(s))]) for s in params]

    class SamplingParams:
        def __init__(self, seed, **kwargs):
            self.seed = seed

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=LLM, SamplingParams=SamplingParams))
    stats = generate(sft_model, synthetic, tmp_path / "pool.jsonl", engine="vllm", model_b=str(synthetic),
                     max_prompt_length=12, tensor_parallel_size=2)
    questions = [r["question"] for r in load_records(str(synthetic), "data/rl", fields=("question",))]
    tok = load_tokenizer(str(sft_model))
    assert engines["most"] == 1 and engines["built"] == [(str(sft_model), 2), (str(synthetic), 2)]
    assert len(requests) == 2 * len(questions) and len({seed for *_, seed in requests}) == len(requests)
    prompts = {tuple(ids) for _, ids, _ in requests}
    hf = {tuple(model_prompt(tok, prompt_ids(tok, q), 12)) for q in questions}  # what `sample` prompts with
    assert prompts == hf and all(len(p) == 12 and p[0] == tok.bos_token_id for p in prompts)  # cut from the left
    assert stats["pairs"] + stats["dropped_identical"] == stats["prompts"] and stats["pairs"] > 0


def test_a_pool_with_no_pair_is_an_error_not_a_done_stage(sft_model, synthetic, tmp_path, monkeypatch):
    from ser.data import DataError

    monkeypatch.setattr(G, "answers_hf", lambda model, tok, questions, *a: ["same"] * len(questions))
    with pytest.raises(DataError, match="none of the 32 prompts gave two different"):
        generate(sft_model, synthetic, tmp_path / "pool.jsonl")
    assert not (tmp_path / "pool.jsonl").exists() and not (tmp_path / "pool.stats.json").exists()


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan")])
def test_a_temperature_that_cannot_sample_is_refused_with_advice_the_script_takes(tmp_path, temperature):
    with pytest.raises(SystemExit, match=r"--temperature .*: answers are sampled, at a temperature above 0"):
        G.main(G.Args(prompts=str(tmp_path / "p.jsonl"), model="m", out=str(tmp_path / "pool.jsonl"),
                      temperature=temperature))
    assert not (tmp_path / "pool.jsonl").exists()


def test_a_prompt_length_with_no_room_for_the_prompt_is_named(tiny_model):
    from ser.modeling import load_tokenizer
    from ser.rollout import model_prompt

    tok = load_tokenizer(str(tiny_model))
    with pytest.raises(ValueError, match="max_prompt_length 1 leaves no room for the prompt"):
        model_prompt(tok, [5, 6, 7], 1)
    assert model_prompt(tok, [5, 6, 7], 3)[-2:] == [6, 7]  # cut from the left
