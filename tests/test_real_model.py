"""The original release's four commands on a real pretrained LLM: SmolLM2-135M-Instruct, bf16.

Placeholders filled, process counts at 2, on prepared HH-RLHF rows: SFT under DeepSpeed ZeRO-3, the
RM under accelerate (LoRA, the default), the filter self-labelling with that RM, and PPO. Each runs
a few steps and is checked for a real effect, not for having run.
"""

import json
import re

import pytest
import torch
from safetensors.torch import load_file

from conftest import run, seed_command, shared_path
from ser.data import read_records, write_records

pytestmark = [pytest.mark.slow, pytest.mark.real_model, pytest.mark.two_process]

SIZES = {"finetune": 16, "reward": 20, "evaluation": 24, "unlabeled": 32, "rl": 16}


def hh_rows(root):
    """Prepared HH-RLHF (helpful-online), each split cut to a few rows for CPU time."""
    from data import prepare

    raw = shared_path("data", "raw", "hh_rlhf", "helpful-online_test.jsonl.gz")
    prepare.main(prepare.Args(dataset="hh-rlhf", source=str(raw), out=str(root), labeled_fraction=0.15,
                              eval_fraction=0.1, finetune_fraction=0.1, rl_fraction=0.1))
    for split, n in SIZES.items():
        path = root / "data" / split / "train.jsonl"
        rows = read_records(path)
        assert len(rows) >= n, (split, len(rows))
        write_records(path, rows[:n])
    return root


def log_losses(checkpoint):
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    return [e["loss"] for e in state["log_history"] if "loss" in e]


def test_seed_commands_on_smollm2_in_bf16(smollm2, tmp_path):
    data = hh_rows(tmp_path / "data")
    sft_out, rm_out, sel, rest, ppo_out = (tmp_path / n for n in ("sft", "rm", "sel.jsonl", "rest.jsonl", "ppo"))

    # SFT under DeepSpeed ZeRO-3, bf16, activation checkpointing. As written it runs 8 epochs of one step
    # (16 rows, 64 per device); smaller batches give the loss steps to fall over.
    command = seed_command("sft.py").rstrip().rstrip("\\")
    run(command + " --num_train_epochs 2 --per_device_train_batch_size 4 --logging_steps 1",
        {"YOUR_MODEL_PATH": smollm2, "YOUR_TOKENIZER_PATH": smollm2, "YOUR_DATASET_PATH": data,
         "PRETRAIN_MODEL_SAVE_PATH": sft_out}, tmp_path)
    losses = log_losses(max(sft_out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1])))
    assert len(losses) == 4 and losses[-1] < losses[0], losses  # epoch 2 sees the same demonstrations again
    assert (sft_out / "model.safetensors").is_file()

    # the reward model under accelerate, LoRA by default, bf16 autocast over fp32 master weights
    run(seed_command("rm_training.py"), {"YOUR_MODEL_PATH": sft_out, "YOUR_TOKENIZER_PATH": sft_out,
                                         "YOUR_DATASET_PATH": data, "REWARD_MODEL_SAVE_PATH": rm_out}, tmp_path)
    results = json.loads((rm_out / "eval_results.json").read_text())
    assert results["use_lora"] and results["train_pairs"] == SIZES["reward"] and results["pairs"] == SIZES["evaluation"]
    adapter = load_file(rm_out / "adapter_model.safetensors")
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and all(v.dtype == torch.float32 for v in adapter.values())
    assert sum(v.abs().sum().item() for v in lora_b) > 0  # B starts at zero: the adapter trained
    assert any("score" in k for k in adapter)

    # self-labelling: the filter scores the pool with that RM and partitions it exactly
    command = seed_command("rm_loop_filter_by_self.py").replace("--left_threshold {UNUSEFUL_DATA_SAVE_PATH}",
                                                                "--left_threshold 0.45").rstrip().rstrip("\\")
    run(command + f" --subset data/unlabeled --reward_model_name {rm_out} --status1_min_pairs 1 "
        "--status2_min_pairs 1", {"YOUR_DATASET_PATH": data, "USEFUL_DATA_SAVE_PATH": sel,
                                  "UNUSEFUL_DATA_SAVE_PATH": rest}, tmp_path)
    pool = read_records(data / "data" / "unlabeled" / "train.jsonl")
    selected, remaining = read_records(sel), read_records(rest)
    assert sorted(r["id"] for r in selected + remaining) == sorted(r["id"] for r in pool)
    scored = read_records(tmp_path / "scored.jsonl")
    assert len({round(r["reward_j"], 4) for r in scored}) > len(scored) // 2  # real, varied rewards

    # PPO against the LoRA RM, bf16; as written it runs 20,000 steps: a later --steps wins
    command = seed_command("ppo/ppo.py").rstrip().rstrip("\\")
    proc = run(command + " --steps 2 --output_max_length 48",
               {"YOUR_MODEL_PATH": sft_out, "YOUR_TOKENIZER_PATH": sft_out, "YOUR_REWARD_MODEL_PATH": rm_out,
                "YOUR_DATASET_PATH": data, "PPO_MODEL_SAVE_PATH": ppo_out}, tmp_path)
    assert re.search(r"ppo step 2: reward [-+]\d", proc.stdout)
    from transformers import AutoModelForCausalLM

    from ser.modeling import load_tokenizer

    tok = load_tokenizer(str(ppo_out / "policy"))
    policy = AutoModelForCausalLM.from_pretrained(ppo_out / "policy")
    ids = tok("Question: What is the capital of France?\n\nAnswer:", return_tensors="pt")
    out = policy.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > ids["input_ids"].shape[1] and tok.decode(out[0, ids["input_ids"].shape[1]:]).strip()


@pytest.mark.parametrize("max_length", [512, 96])  # 96: most questions cut from the left, by different amounts
def test_shared_prefix_scores_equal_plain_scores_on_smollm2(smollm2, tmp_path, max_length):
    import torch
    from transformers import AutoModelForSequenceClassification

    from ser.modeling import load_tokenizer
    from ser.scoring import score_pairs

    data = hh_rows(tmp_path / "data")
    pairs = read_records(data / "data" / "evaluation" / "train.jsonl")
    tok = load_tokenizer(str(smollm2))
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(str(smollm2), num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tok.pad_token_id
    r_j, r_k, _ = score_pairs(model, tok, pairs, max_length, 8)
    s_j, s_k, shared = score_pairs(model, tok, pairs, max_length, 8, shared_prefix=True)
    assert s_j == pytest.approx(r_j, abs=1e-4) and s_k == pytest.approx(r_k, abs=1e-4)
    assert shared["shared_prefix_token_saving"] > 0  # the figure on 1,000+ pairs is the bench's
