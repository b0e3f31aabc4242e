"""Where the reward is read, strict accuracy, and the LoRA RM save/reload round trip."""

import itertools
import json
import math
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForSequenceClassification

import rm_training
from conftest import CPU, shared_path
from ser import modeling, scoring
from ser.cli import parse
from ser.data import encode, load_records
from ser.modeling import load_reward_model, load_tokenizer
from ser.scoring import common_prefix, length_batches, pair_metrics, prefix_groups, score, score_ids, score_pairs, score_pairs_shared


def test_pair_metrics_counts_ties_apart():
    m = pair_metrics([1.0, 2.0, 0.5, 3.0], [0.0, 2.0, 0.5, 4.0])
    assert m["accuracy"] == 0.25  # a tie is not a win
    assert m["ties"] == 2 and m["tie_rate"] == 0.5
    assert m["margin"] == pytest.approx((1 + 0 + 0 - 1) / 4)


def test_real_llama_tokenizer_gets_pad_distinct_from_eos():
    path = shared_path("data", "models", "tinyllama-1.1b-chat-v1.0-tokenizer")
    tok = load_tokenizer(str(path))
    assert tok.pad_token_id != tok.eos_token_id
    assert tok.pad_token == "<unk>" and len(tok) == 32000  # no new token, no embedding resize


@pytest.fixture(scope="module")
def rm(tiny_model):
    tok = load_tokenizer(str(tiny_model))
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(str(tiny_model), num_labels=1).eval()
    model.config.pad_token_id = tok.pad_token_id
    return model, tok


def reward_at_last_token(model, tok, question, response):
    ids = torch.tensor([encode(tok, question, response, 512)["input_ids"]])
    return model(input_ids=ids).logits[0, 0].item()


def test_reward_is_read_at_eos_under_padding_and_with_eos_in_the_prompt(rm):
    model, tok = rm
    questions = ["What should I bring to the beach?", f"Odd prompt {tok.eos_token} with an eos inside?"]
    responses = ["Bring kite.", "Bring hammer, rope, lamp, tent, cup, hat, map, coat."]
    batched, _ = score(model, tok, questions * 2, responses + responses[::-1], max_length=512, batch_size=4)
    alone = [reward_at_last_token(model, tok, q, r) for q, r in zip(questions * 2, responses + responses[::-1])]
    assert batched == pytest.approx(alone, abs=1e-5)
    # The trap this guards against: with pad == eos the head takes the appended eos for padding.
    model.config.pad_token_id = tok.eos_token_id
    try:
        wrong, _ = score(model, tok, questions, responses, max_length=512, batch_size=2)
    finally:
        model.config.pad_token_id = tok.pad_token_id
    assert wrong != pytest.approx(alone[:2], abs=1e-5)


def test_lora_rm_saves_its_score_head_and_reloads_to_identical_scores(sft_model, synthetic, tmp_path):
    out = tmp_path / "rm_lora"
    rm_training.main(*parse(rm_training.ARGUMENTS, [
        "--model_name", str(sft_model), "--dataset_name", str(synthetic), "--output_dir", str(out),
        "--use_lora", "True", "--num_train_epochs", "1", "--per_device_train_batch_size", "16",
        "--learning_rate", "3e-3", *CPU]))
    assert (out / "adapter_config.json").is_file()
    saved = json.loads((out / "eval_results.json").read_text())
    tok = load_tokenizer(str(out))
    model = load_reward_model(str(out), tok)
    records = load_records(str(synthetic), "data/evaluation")
    r_j, r_k, _ = score_pairs(model, tok, records, max_length=1024)
    again = pair_metrics(r_j, r_k)
    assert again["accuracy"] == saved["accuracy"] and again["margin"] == pytest.approx(saved["margin"], abs=1e-6)
    # a fresh (unsaved) head would score differently: the reload really restored the trained head
    fresh = AutoModelForSequenceClassification.from_pretrained(str(sft_model), num_labels=1)
    fresh.config.pad_token_id = tok.pad_token_id
    assert not torch.allclose(fresh.score.weight, model.base_model.model.score.modules_to_save["default"].weight)


@pytest.mark.parametrize("max_length,batch_size", [(512, 8), (24, 3)])  # 24: questions cut from the left
def test_shared_prefix_scores_equal_plain_scores(sft_model, synthetic, max_length, batch_size):
    tok = load_tokenizer(str(sft_model))
    model = AutoModelForSequenceClassification.from_pretrained(str(sft_model), num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tok.pad_token_id
    pairs = load_records(str(synthetic), "data/evaluation")[:50]
    r_j, r_k, plain = score_pairs(model, tok, pairs, max_length, batch_size)
    s_j, s_k, shared = score_pairs(model, tok, pairs, max_length, batch_size, shared_prefix=True)
    assert s_j == pytest.approx(r_j, abs=1e-5) and s_k == pytest.approx(r_k, abs=1e-5)
    assert len(set(r_j)) > 40  # distinct scores: a mix-up between pairs would show
    assert shared["tokens_plain"] == sum(len(encode(tok, p["question"], p[side], max_length)["input_ids"])
                                         for p in pairs for side in ("response_j", "response_k"))
    assert 0 < shared["shared_prefix_token_saving"] < 1 and shared["tokens_run"] < shared["tokens_plain"]
    assert 0 <= shared["padding_share"] < 1


def test_shared_prefix_handles_pairs_sharing_nothing_and_dummy_batches(sft_model, synthetic, monkeypatch):
    """Pairs whose sides differ from the first token run whole over an empty prefix, mixed in batches with
    pairs that share a question; another process needing more chunks and forwards (under ZeRO-3) makes
    this one run dummy batches, which change no score; chunk boundaries change no score."""
    tok = load_tokenizer(str(sft_model))
    model = AutoModelForSequenceClassification.from_pretrained(str(sft_model), num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tok.pad_token_id
    records = load_records(str(synthetic), "data/evaluation")[:21]
    pairs = {i: (encode(tok, r["question"], r["response_j"], 64)["input_ids"],
                 encode(tok, r["question"], r["response_k"], 64)["input_ids"]) for i, r in enumerate(records)}
    for i in (0, 7, 8):  # the k side starts elsewhere: nothing shared
        pairs[i] = (pairs[i][0], pairs[i][1][3:])
    assert sum(common_prefix(*p) == 0 for p in pairs.values()) == 3
    plain, _ = score_ids(model, tok, [s for p in pairs.values() for s in p], 4)
    alone = score_pairs_shared(model, tok, pairs, 4)[2]["forward_passes"]
    two = SimpleNamespace(process_index=0, num_processes=2)
    # the other process: each of this one's chunks with 2 more prefix and 3 more continuation batches, then 1 more
    # chunk (counts go as prefix, continuation, prefix, ...)
    seen = []

    def gather_parts(counts, state):
        seen.append(len(counts) // 2)  # this process's chunks
        return [counts, [n + 2 + i % 2 for i, n in enumerate(counts)] + [1, 2]]

    monkeypatch.setattr(scoring, "gather_parts", gather_parts)
    for kwargs in ({}, {"in_step_with": two}, {"chunk_pairs": 5}, {"chunk_pairs": 5, "in_step_with": two}):
        s_j, s_k, stats = score_pairs_shared(model, tok, pairs, 4, **kwargs)
        assert [x for ab in zip(s_j, s_k) for x in ab] == pytest.approx(plain, abs=1e-5), kwargs
        assert stats["tokens_run"] < stats["tokens_plain"]
        if kwargs == {"in_step_with": two}:
            assert seen[-1] >= 2  # the default chunks: the extra batches come with each of them
            assert stats["forward_passes"] == alone + 5 * seen[-1] + 3


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(1, 60), min_size=0, max_size=9), st.integers(1, 4), st.sampled_from([0, 5, 64, math.inf]))
def test_length_batches_cover_every_sequence_once_at_the_least_cost(lengths, max_rows, forward_cost):
    batches = length_batches(lengths, max_rows, forward_cost)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert all(1 <= len(b) <= max_rows for b in batches)
    flat = [lengths[i] for b in batches for i in b]
    assert flat == sorted(lengths)  # contiguous runs of the length order, shortest first

    def cost(groups):
        return sum(len(g) * max(lengths[i] for i in g) for g in groups) + (0 if math.isinf(forward_cost) else
                                                                          forward_cost * len(groups))

    if math.isinf(forward_cost):  # plain length-sorted batching
        assert [len(b) for b in batches] == [len(b) for b in
                                             [lengths[i:i + max_rows] for i in range(0, len(lengths), max_rows)]]
        return
    # brute force: every way to cut the length order into batches of at most max_rows
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    best = min((cost([order[a:b] for a, b in zip((0, *cuts), (*cuts, len(order)))])
                for k in range(len(order))
                for cuts in itertools.combinations(range(1, len(order)), k)
                if all(b - a <= max_rows for a, b in zip((0, *cuts), (*cuts, len(order))))), default=0)
    assert cost(batches) == best


@pytest.mark.parametrize("forward_cost", [math.inf, 4])  # synthetic lengths vary little: a low cost splits
def test_length_grouped_rm_batches_give_trl_s_per_pair_losses_with_less_padding(sft_model, synthetic, tmp_path,
                                                                                 forward_cost):
    """rm_training.py's length-grouped batches, each run as forwards of similar length, against TRL's
    RewardTrainer with its defaults (random batches, its collator, one padded forward), on the same pairs:
    every pair once per epoch, the same loss pair by pair (each trainer's compute_loss), and less padding."""
    import torch.nn.functional as F
    from trl import RewardConfig, RewardTrainer

    tok = load_tokenizer(str(sft_model))
    model = AutoModelForSequenceClassification.from_pretrained(str(sft_model), num_labels=1, dtype=torch.float32).eval()
    model.config.pad_token_id = tok.pad_token_id
    dataset, _ = rm_training.tokenize_pairs(load_records(str(synthetic), "data/reward"), tok, 96)
    common = dict(use_cpu=True, bf16=False, gradient_checkpointing=False, report_to="none", per_device_train_batch_size=8,
                  max_length=96, seed=3)
    ours = rm_training.PairwiseRewardTrainer(
        model=model, args=rm_training.RMConfig(output_dir=str(tmp_path / "a"), forward_cost=forward_cost, **common),
        train_dataset=dataset, processing_class=tok)
    trl = RewardTrainer(model=model, args=RewardConfig(output_dir=str(tmp_path / "b"), **common),
                        train_dataset=dataset.remove_columns("length"), processing_class=tok)
    assert ours.args.train_sampling_strategy == "group_by_length" and trl.args.train_sampling_strategy == "random"

    def per_pair(trainer):
        losses, real, padded = {}, 0, 0
        model.train()  # the trainer counts its padding in training; dropout is off in this model
        for batch in trainer.get_train_dataloader():
            ids, mask = batch["input_ids"], batch["attention_mask"].bool()
            with torch.no_grad():
                loss, out = trainer.compute_loss(model, dict(batch), return_outputs=True)
            r_j, r_k = out.logits.squeeze(-1).chunk(2)
            assert loss.item() == pytest.approx((-F.logsigmoid(r_j - r_k)).mean().item(), abs=1e-6)
            n = len(r_j)
            for i in range(n):
                key = (tuple(ids[i][mask[i]].tolist()), tuple(ids[n + i][mask[n + i]].tolist()))
                assert key not in losses  # each pair once per epoch
                losses[key] = -F.logsigmoid(r_j[i] - r_k[i]).item()
            real, padded = real + mask.sum().item(), padded + mask.numel()
        model.eval()
        return losses, 1 - real / padded

    (a, pad_grouped), (b, pad_trl) = per_pair(ours), per_pair(trl)
    assert len(a) == len(b) == len(dataset) > 50 and a.keys() == b.keys()
    assert [a[k] for k in a] == pytest.approx([b[k] for k in a], abs=1e-5)
    assert pad_grouped < 0.85 * pad_trl, (pad_grouped, pad_trl)  # (synthetic lengths vary little; HH: the bench)
    # what the forwards ran: split by length, less than the length-grouped batches' own padding
    pad_ran = 1 - ours.tokens["real"] / ours.tokens["padded"]
    if math.isinf(forward_cost):
        assert pad_ran == pytest.approx(pad_grouped)
    else:
        assert pad_ran < 0.7 * pad_grouped, (pad_ran, pad_grouped)


def test_a_saved_model_with_an_empty_tensor_is_refused_and_not_written(tiny_model, tmp_path):
    """What a save of ZeRO-3 shards that were never gathered writes: shape-(0,) tensors, with rc 0."""
    from transformers import AutoModelForCausalLM

    model, tok = AutoModelForCausalLM.from_pretrained(str(tiny_model)), load_tokenizer(str(tiny_model))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["model.layers.0.mlp.up_proj.weight"] = torch.empty(0)
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.up_proj.weight of shape \(0,\).*ZeRO-3"):
        modeling.save_whole(tmp_path / "out", model, tok, state_dict=state)
    assert sorted(tmp_path.iterdir()) == []  # neither the output nor a temporary folder
    modeling.save_whole(tmp_path / "out", model, tok)  # the module's own, whole weights pass
    modeling.check_saved_weights(tmp_path / "out")


def test_embedding_rows_are_read_from_the_module_not_from_a_zero3_shard(tiny_model):
    """Under zero.Init each process holds a shape-(0,) shard of the embedding: its row count is the module's."""
    from transformers import AutoModelForCausalLM

    model, tok = AutoModelForCausalLM.from_pretrained(str(tiny_model)), load_tokenizer(str(tiny_model))
    model.resize_token_embeddings(576)  # a vocabulary padded beyond the tokenizer's 512
    embedding = model.get_input_embeddings()
    embedding.weight = torch.nn.Parameter(torch.empty(0))  # as a ZeRO-3 shard looks outside DeepSpeed
    modeling.fit_embeddings(model, tok)
    assert embedding.num_embeddings == 576 and model.get_input_embeddings() is embedding  # not resized


def _tokenizer_without_pad(tmp_path, reserved):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<|begin_of_text|>", "<|end_of_text|>", "a", "b", "c"])}
    tok = Tokenizer(models.WordLevel(vocab))  # no unk token, as Llama 3's BPE has none
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>")
    fast.add_special_tokens({"additional_special_tokens": [f"<|reserved_special_token_{i}|>" for i in range(reserved)]})
    fast.save_pretrained(tmp_path)
    return tmp_path


def test_a_llama3_like_tokenizer_pads_with_a_reserved_token_and_keeps_the_embedding(tmp_path):
    tok = load_tokenizer(str(_tokenizer_without_pad(tmp_path, reserved=2)))
    assert tok.pad_token == "<|reserved_special_token_0|>" and len(tok) == 7 and tok.pad_token_id != tok.eos_token_id


def test_a_pad_token_added_grows_the_embedding_to_a_multiple_of_64(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = load_tokenizer(str(_tokenizer_without_pad(tmp_path, reserved=0)))
    assert tok.pad_token == "<pad>" and len(tok) == 6
    model = LlamaForCausalLM(LlamaConfig(vocab_size=5, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    modeling.fit_embeddings(model, tok)
    assert model.get_input_embeddings().num_embeddings == 64 and model.config.pad_token_id == 5


def test_save_whole_refuses_a_folder_that_is_not_a_model_and_replaces_a_model_by_rename(tiny_model, tmp_path,
                                                                                        monkeypatch):
    """`--out runs/demo` named by mistake must not wipe the run; a model folder is replaced, never deleted first."""
    import os

    from transformers import AutoModelForCausalLM

    model, tok = AutoModelForCausalLM.from_pretrained(str(tiny_model)), load_tokenizer(str(tiny_model))
    run = tmp_path / "run"
    (run / "loop_0").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"settings": {"MAX_LOOPS": "3"}}))  # a driver's RUN/config.json
    with pytest.raises(FileExistsError, match="not a model folder"):
        modeling.save_whole(run, model, tok)
    assert (run / "loop_0").is_dir() and (run / "config.json").is_file()
    modeling.save_whole(tmp_path / "model", model, tok)
    renames, replace = [], os.replace

    def recorded(a, b):
        renames.append((os.path.basename(a), os.path.basename(b), os.path.exists(tmp_path / "model")))
        replace(a, b)

    monkeypatch.setattr(os, "replace", recorded)
    modeling.save_whole(tmp_path / "model", model, tok)  # a model folder: replaced
    (aside, _, existed), (moved, into, _) = renames  # aside first (into a fresh folder), then in place
    assert (aside, existed, into) == ("model", True, "model") and moved.startswith(".model.") and moved.endswith(".tmp")
    assert modeling.is_model_folder(tmp_path / "model") and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    modeling.save_whole(run, model, tok, replace=True)  # said explicitly
    assert modeling.is_model_folder(run)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=6), min_size=0, max_size=12),
       st.integers(1, 5))
def test_prefix_groups_cover_every_sequence_once_and_keep_pairs_of_a_question_together(tails, max_group):
    template = [9, 9, 9]  # what every sequence shares (a chat template's system prompt)
    sequences = [template + [100 + q] * 8 + tail for q, tail in enumerate(tails) for tail in (tail, tail + [7])]
    groups = prefix_groups(sequences, max_group=max_group)
    assert sorted(i for g in groups for i in g) == list(range(len(sequences)))
    assert all(1 <= len(g) <= max_group for g in groups)
    if max_group >= 2:  # both answers to question q (its 8 tokens) share 11 tokens, other questions only 3
        assert all(len({sequences[i][3] for i in g}) == 1 for g in groups)
        assert all(len(g) == 2 for g in groups)
