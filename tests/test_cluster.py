"""The cluster path as the README launches it: bf16, 2 processes, the recipe files as written
(`scripts/cluster/zero3.yaml`, the DeepSpeed launcher with `sft/deepspeed_config.json`), on a model whose
tensors ZeRO-3 really partitions (hidden 384: the embedding and MLP matrices are over DeepSpeed's 1e5-element
persistence threshold, so each process holds shape-(0,) shards of them).

The launches share their outputs: the SFT run is the base of the RMs, and
the full and LoRA RMs are PPO's reward models."""

import json
import re
import subprocess

import pytest
import torch
from safetensors import safe_open

from conftest import CPU, ENV, ROOT, free_port, launch

pytestmark = [pytest.mark.slow, pytest.mark.two_process]

RECIPE = ["accelerate", "launch", "--config_file", "scripts/cluster/zero3.yaml", "--num_processes", "2",
          "--main_process_port", "0"]
BF16 = ["--bf16", "True", "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "True"]
ROWS = 576  # embedding rows: the tokenizer's 512 padded to a multiple of 64, as many checkpoints are



def tensors(folder, name="model.safetensors"):
    with safe_open(str(folder / name), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def assert_whole(folder, name="model.safetensors"):
    """Every saved tensor has elements, and the embedding kept its rows."""
    saved = tensors(folder, name)
    assert saved and all(t.numel() > 0 for t in saved.values()), {k: t.shape for k, t in saved.items() if not t.numel()}
    for key, t in saved.items():
        if key.endswith("embed_tokens.weight"):
            assert t.shape == (ROWS, 384), t.shape
    return saved


@pytest.fixture(scope="module")
def shard_model(tmp_path_factory):
    """A bf16 Llama of hidden size 384 (2 layers, 6 heads) with the synthetic task's tokenizer."""
    from transformers import AutoModelForCausalLM

    from ser import tiny

    out = tmp_path_factory.mktemp("shard") / "base"
    tiny.build(tiny.Args(out=str(out), hidden_size=384, num_heads=6))
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.bfloat16)
    model.resize_token_embeddings(ROWS)
    model.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def recipe_sft(shard_model, synthetic, tmp_path_factory):
    """Full-weight SFT under zero3.yaml in bf16, with the stage's own gradient accumulation (2)."""
    out = tmp_path_factory.mktemp("recipe_sft")
    proc = launch([*RECIPE, "sft.py", "--model_name", str(shard_model), "--dataset_name", str(synthetic),
                   "--output_dir", str(out), "--seq_length", "96", "--num_train_epochs", "1",
                   "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "2", "--learning_rate", "1e-3",
                   "--gradient_checkpointing", "True", *BF16])
    return out, proc


def test_full_sft_under_the_zero3_recipe_in_bf16_saves_whole_trained_weights(recipe_sft, shard_model):
    out, _ = recipe_sft
    saved, base = assert_whole(out), tensors(shard_model)
    assert saved.keys() == base.keys()
    assert any(not torch.equal(saved[k], base[k]) for k in base)  # it trained
    assert json.loads((out / "run_args.json").read_text())["SFTConfigSER"]["gradient_accumulation_steps"] == 2


def test_the_seed_sft_command_under_the_deepspeed_launcher_in_bf16(shard_model, synthetic, tmp_path):
    """The README's SFT command: `deepspeed ... sft.py --deepspeed sft/deepspeed_config.json --bf16 True`,
    with activation checkpointing on as it has it."""
    out = tmp_path / "sft"
    launch(["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), "sft.py",
            "--model_name", str(shard_model), "--tokenizer_name", str(shard_model), "--dataset_name", str(synthetic),
            "--load_from_json", "False", "--subset", "data/finetune", "--output_dir", str(out), "--seq_length", "96",
            "--num_train_epochs", "1", "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "1",
            "--evaluation_strategy", "no", "--learning_rate", "1e-3", "--warmup_steps", "2", "--logging_steps", "2",
            "--lr_scheduler_type", "cosine", "--gradient_checkpointing", "True",
            "--deepspeed", "sft/deepspeed_config.json", *BF16])
    assert_whole(out)


@pytest.fixture(scope="module")
def recipe_rm(recipe_sft, synthetic, tmp_path_factory):
    """Full-weight RM training under zero3.yaml in bf16."""
    out = tmp_path_factory.mktemp("recipe_rm")
    launch([*RECIPE, "rm_training.py", *rm_flags(recipe_sft[0], synthetic, out), "--use_lora", "False"])
    return out


def rm_flags(sft, synthetic, out):
    return ["--model_name", str(sft), "--dataset_name", str(synthetic), "--output_dir", str(out),
            "--num_train_epochs", "1", "--max_length", "96", "--per_device_train_batch_size", "8",
            "--per_device_eval_batch_size", "32", "--gradient_accumulation_steps", "2", "--learning_rate", "1e-3",
            "--gradient_checkpointing", "True", *BF16]


def reloaded_scores_match(out, synthetic):
    from ser.data import load_records, read_records
    from ser.modeling import load_reward_model, load_tokenizer
    from ser.scoring import score_pairs

    tok = load_tokenizer(str(out))
    r_j, r_k, _ = score_pairs(load_reward_model(str(out), tok), tok, load_records(str(synthetic), "data/evaluation"), 96)
    saved = read_records(out / "eval_scores.jsonl")
    # The run scored in bf16 across 2 processes, the reload in bf16 in one: the tolerance is bf16's rounding of
    # rewards of size ~1 (8 bits of mantissa), not a difference of weights.
    assert r_j == pytest.approx([s["reward_j"] for s in saved], abs=2e-2)
    assert r_k == pytest.approx([s["reward_k"] for s in saved], abs=2e-2)


@pytest.fixture(scope="module")
def recipe_lora_rm(recipe_sft, synthetic, tmp_path_factory):
    """LoRA RM training under zero3.yaml in bf16."""
    out = tmp_path_factory.mktemp("recipe_lora_rm")
    launch([*RECIPE, "rm_training.py", *rm_flags(recipe_sft[0], synthetic, out), "--use_lora", "True"])
    return out


@pytest.mark.parametrize("lora", [True, False])
def test_rm_training_under_the_zero3_recipe_in_bf16_saves_the_rm_it_evaluated(request, synthetic, lora):
    if lora:
        out = request.getfixturevalue("recipe_lora_rm")
        adapter = tensors(out, "adapter_model.safetensors")
        assert adapter and all(t.numel() for t in adapter.values())
        assert any(k.endswith("score.weight") for k in adapter)
    else:
        out = request.getfixturevalue("recipe_rm")
        assert_whole(out)
    reloaded_scores_match(out, synthetic)


def test_the_filter_under_the_zero3_recipe_scores_with_a_lora_rm_as_one_process(recipe_lora_rm, synthetic, tmp_path):
    """The driver's default RM, a LoRA adapter: its base partitioned at load, the adapter applied unmerged."""
    import rm_loop_filter_by_self as F
    from ser.cli import parse
    from ser.data import read_records

    flags = ["--dataset_name", str(synthetic), "--subset", "data/evaluation", "--reward_model_name", str(recipe_lora_rm),
             "--batch_size", "8", "--max_length", "96"]

    def outputs(out):
        return ["--rm_next_loop_save_path", str(out / "selected.jsonl"), "--remaining_data_save_path", str(out / "remaining.jsonl")]
    F.main(*parse([F.ScriptArguments], [*flags, *outputs(tmp_path / "one"), "--dtype", "bfloat16"]))
    launch([*RECIPE, "rm_loop_filter_by_self.py", *flags, *outputs(tmp_path / "sharded")])
    assert json.loads((tmp_path / "sharded" / "stats.json").read_text())["scoring"]["rm_share_held"] < 0.6
    a, b = read_records(tmp_path / "one" / "scored.jsonl"), read_records(tmp_path / "sharded" / "scored.jsonl")
    assert [x["id"] for x in a] == [y["id"] for y in b]
    for key in ("reward_j", "reward_k"):  # bf16 in both, the adapter unmerged in both
        assert [x[key] for x in a] == pytest.approx([y[key] for y in b], abs=2e-2)


@pytest.mark.parametrize("lora,rm,critic", [(True, "recipe_lora_rm", "separate"), (False, "recipe_rm", "shared"),
                                            (False, "recipe_rm", "separate")])
def test_ppo_under_the_zero3_recipe_in_bf16_writes_the_policy_it_trained(request, recipe_sft, synthetic, tmp_path,
                                                                         lora, rm, critic):
    """A LoRA or full policy; a LoRA RM (scoring unmerged) or a full one; a value head copied from the RM's head
    or a critic loaded from the RM (a LoRA RM's merged from whole weights)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    sft, out = recipe_sft[0], tmp_path / "ppo"
    rm = request.getfixturevalue(rm)
    proc = launch([*RECIPE, "ppo/ppo.py", "--model_name", str(sft), "--reward_model_name", str(rm),
                   "--dataset_name", str(synthetic), "--output_dir", str(out), "--steps", "2", "--batch_size", "4",
                   "--mini_batch_size", "1", "--gradient_accumulation_steps", "2", "--ppo_epochs", "1",
                   "--output_max_length", "8", "--learning_rate", "1e-3", "--save_freq", "0", "--peak_tflops", "1",
                   "--use_lora", str(lora), "--gather_for_generation", str(not lora),  # both ways of generating
                   "--critic", critic])
    # the launcher's precision (the recipe's bf16) and the stage's own accumulation, not the recipe's
    assert "gradient accumulation 2, bf16 precision" in proc.stdout, proc.stdout[-2000:]
    assert " 0 trainable parameters" not in proc.stdout
    # no process holds a model whole: each is partitioned as it loads (an RM or reference loaded whole would
    # be moved whole onto every GPU)
    held = re.findall(r"ppo: process (\d) holds ([\d,]+) of the ([\d,]+) weights of the (.+)", proc.stdout)
    models = {"policy and value", "reward model"} | (set() if lora else {"reference"})
    assert {(rank, name) for rank, *_, name in held} == {(rank, name) for rank in "01" for name in models}, held
    shares = {(rank, name): int(h.replace(",", "")) / int(w.replace(",", "")) for rank, h, w, name in held}
    assert all(share < 0.6 for share in shares.values()), shares
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert all(row["perf/mfu"] > 0 and row["perf/model_tflops"] > 0 for row in log), log
    policy, base = assert_whole(out / "policy"), tensors(sft)
    assert any(not torch.equal(policy[k], base[k]) for k in base if k in policy)  # it trained
    if lora:  # the merged policy is the base with the trained adapter
        ids = torch.tensor([[1, 5, 9, 13, 17, 21, 25]])
        merged = AutoModelForCausalLM.from_pretrained(str(out / "policy"), dtype=torch.float32).eval()
        adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(sft), dtype=torch.float32),
                                            str(out / "adapter")).eval()
        with torch.no_grad():
            want, got = adapted(ids).logits, merged(ids).logits
        assert torch.allclose(got, want, atol=5e-2), (got - want).abs().max()  # the merge is saved in bf16


def test_ppo_on_a_frozen_rm_s_bootstrap_heads_under_the_zero3_recipe_in_bf16(recipe_sft, synthetic, tmp_path):
    """--bootstrap_heads as README launches PPO: the frozen RM's K-head layer is partitioned with the rest of the RM
    (no process holds it whole), the value head starts from the gathered heads' mean, and the ensemble's members
    disagree."""
    rm = tmp_path / "rm"
    launch(["python", "rm_training.py", "--model_name", str(recipe_sft[0]), "--dataset_name", str(synthetic),
            "--output_dir", str(rm), "--trunk", "frozen", "--feature_cache", str(tmp_path / "cache"), "--max_length",
            "96", "--bootstrap_heads", "3", *CPU])
    proc = launch([*RECIPE, "--gradient_accumulation_steps", "1", "ppo/ppo.py", "--model_name", str(recipe_sft[0]),
                   "--reward_model_name", str(rm), "--bootstrap_heads", "True", "--reward_ensemble", "min",
                   "--dataset_name", str(synthetic), "--output_dir", str(tmp_path / "ppo"), "--steps", "2",
                   "--batch_size", "4", "--mini_batch_size", "2", "--gradient_accumulation_steps", "1", "--ppo_epochs",
                   "1", "--output_max_length", "8", "--normalize_samples", "8"])
    assert "bf16 precision" in proc.stdout, proc.stdout[-2000:]
    held = re.findall(r"ppo: process \d holds ([\d,]+) of the ([\d,]+) weights of the reward model", proc.stdout)
    assert len(held) == 2 and all(int(a.replace(",", "")) < int(b.replace(",", "")) for a, b in held), held
    log = [json.loads(line) for line in (tmp_path / "ppo" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and all(r["env/ensemble_spread"] > 0 for r in log)


def test_a_launcher_accumulation_other_than_ppo_s_own_is_refused(recipe_sft, recipe_rm, synthetic, tmp_path):
    proc = subprocess.run([*RECIPE, "--gradient_accumulation_steps", "1", "ppo/ppo.py", "--model_name", str(recipe_sft[0]),
                           "--reward_model_name", str(recipe_rm), "--dataset_name", str(synthetic),
                           "--output_dir", str(tmp_path), "--gradient_accumulation_steps", "4"],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert "the launcher sets gradient_accumulation_steps 1" in proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def wide_rm(tmp_path_factory):
    """A full-weight RM of 168M parameters (hidden 1024, 16 layers) saved in fp32: the recipe runs it in bf16,
    so a process that loaded it whole would hold a whole bf16 copy (336 MB), as a GPU would."""
    from transformers import AutoModelForSequenceClassification

    from ser import tiny
    from ser.modeling import load_tokenizer, save_whole

    base = tiny.build(tiny.Args(out=str(tmp_path_factory.mktemp("wide") / "base"), hidden_size=1024, num_layers=16,
                                num_heads=8))
    torch.manual_seed(0)
    rm = AutoModelForSequenceClassification.from_pretrained(str(base), num_labels=1, dtype=torch.float32)
    tokenizer = load_tokenizer(str(base))
    rm.config.pad_token_id = tokenizer.pad_token_id
    return save_whole(tmp_path_factory.mktemp("wide") / "rm", rm, tokenizer), sum(p.numel() for p in rm.parameters())


def test_the_filter_under_the_zero3_recipe_never_holds_the_rm_whole(wide_rm, synthetic, tmp_path):
    """Each process's peak memory while it loads, partitions and scores with an RM is well under the RM's whole
    bf16 size: the RM is partitioned as it loads. (Loaded whole, DeepSpeed would move it whole onto every GPU
    before partitioning it; on these CPUs the bf16 cast of the fp32 checkpoint is that whole copy: 1.2x the
    whole bf16 size per process before the change, 0.72x after.)

    One forward pass per process (4 pairs): from the second on, DeepSpeed keeps gathered weights for reuse, up
    to `stage3_max_live_parameters` (1e9 by default, more than this model)."""
    rm, n_params = wide_rm
    out, memory, pool = tmp_path / "filter", tmp_path / "memory", tmp_path / "data" / "pool" / "train.jsonl"
    pool.parent.mkdir(parents=True)
    pool.write_text("".join((synthetic / "data" / "reward" / "train.jsonl").read_text().splitlines(True)[:4]))
    launch([*RECIPE, "tests/peak_memory.py", str(memory), "rm_loop_filter_by_self.py", "--dataset_name",
            str(tmp_path), "--subset", "data/pool", "--reward_model_name", str(rm), "--batch_size", "8",
            "--rm_next_loop_save_path", str(out / "selected.jsonl"),
            "--remaining_data_save_path", str(out / "remaining.jsonl")],
           env={**ENV, "MALLOC_MMAP_THRESHOLD_": "131072"})  # freed tensors go back to the system (peak_memory.py)
    scoring = json.loads((out / "stats.json").read_text())["scoring"]
    assert scoring["rm_partitioned"] and scoring["rm_share_held"] < 0.55, scoring
    whole = 2 * n_params  # bytes in bf16
    peaks = [json.loads(p.read_text())["peak_bytes_above_start"] for p in sorted(memory.glob("rank*.json"))]
    # a process's share is half; DeepSpeed's engine adds ~50 MB, a module gathered to be read ~10 MB
    assert len(peaks) == 2 and all(p < 0.9 * whole for p in peaks), ([p / 2**20 for p in peaks], whole / 2**20)


def test_lora_rm_with_the_driver_s_defaults_under_ddp_trains_as_without_checkpointing(sft_model, synthetic, tmp_path):
    """The driver leaves TRL's activation checkpointing on: LoRA + DDP + checkpointing + split forwards, 2 processes,
    bf16. Recomputing the activations (with the dropout masks' RNG state kept) must not change what is learnt."""
    from ser.data import read_records

    scores = {}
    for checkpointing in ("True", "False"):
        out = tmp_path / checkpointing
        launch(["accelerate", "launch", "--config_file", "scripts/cluster/ddp.yaml", "--num_processes", "2",
                "--main_process_port", "0", "rm_training.py", "--model_name", str(sft_model), "--dataset_name",
                str(synthetic), "--output_dir", str(out), "--num_train_epochs", "1", "--max_length", "96",
                "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "32", "--learning_rate", "2e-3",
                "--forward_cost", "4", "--gradient_checkpointing", checkpointing, *BF16])
        assert json.loads((out / "eval_results.json").read_text())["train_padding_share"] < 0.05  # it did split
        scores[checkpointing] = [r for s in read_records(out / "eval_scores.jsonl") for r in (s["reward_j"], s["reward_k"])]
    assert scores["True"] == pytest.approx(scores["False"], abs=1e-5)
    assert len({a > b for a, b in zip(scores["True"][::2], scores["True"][1::2])}) == 2  # a trained RM, not a constant


def test_the_policy_evaluation_refuses_several_processes_instead_of_piling_them_on_one_gpu(tmp_path):
    proc = subprocess.run(["accelerate", "launch", "--config_file", "scripts/cluster/ddp.yaml", "--num_processes", "2",
                           "--main_process_port", "0", "ppo/evaluate.py", "--base_model", "a", "--policy", "b",
                           "--reward_model_name", "c", "--dataset_name", "d"],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "ppo/evaluate.py runs in one process (2 were launched)" in proc.stdout + proc.stderr
