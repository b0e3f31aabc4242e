"""ZeRO-3 in the stages that train or score, with 2 CPU processes under DeepSpeed: what is saved
reloads to what was trained, and what is scored equals one process's scores."""


import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from conftest import CPU, ENV, ROOT, filter_flags, free_port, launch, rm0  # noqa: F401 (rm0: a fixture)

pytestmark = [pytest.mark.slow, pytest.mark.two_process]

ACCELERATE_ZERO3 = ["accelerate", "launch", "--use_deepspeed", "--zero_stage", "3", "--num_processes", "2",
                    "--main_process_port", "0", "--mixed_precision", "no", "--dynamo_backend", "no",
                    "--zero3_save_16bit_model", "true"]



def test_sft_with_lora_under_zero3_saves_the_merge_of_what_it_trained(tiny_model, synthetic, tmp_path):
    out = tmp_path / "sft"
    launch([*ACCELERATE_ZERO3, "sft.py", "--model_name", str(tiny_model), "--dataset_name", str(synthetic),
            "--output_dir", str(out), "--use_lora", "True", "--lora_r", "8", "--num_train_epochs", "1",
            "--per_device_train_batch_size", "16", "--learning_rate", "3e-3", "--use_cpu", "True", "--bf16", "False",
            "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "True"])
    merged = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32)
    adapted = PeftModel.from_pretrained(base, str(out / "adapter")).eval()
    ids = torch.tensor([[1, 5, 9, 13, 17, 21, 25]])
    with torch.no_grad():
        want, got = adapted(ids).logits, merged(ids).logits
        plain = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32)(ids).logits
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(plain, want, atol=1e-3)  # the adapter trained (its B is no longer zero)




@pytest.mark.parametrize("lora,launcher", [("True", "accelerate"), ("False", "accelerate"), ("True", "deepspeed")])
def test_rm_training_under_zero3_saves_what_it_evaluated(sft_model, synthetic, tmp_path, lora, launcher):
    import json

    from ser.data import load_records
    from ser.modeling import load_reward_model, load_tokenizer
    from ser.scoring import score_pairs

    out = tmp_path / "rm"
    head = [*ACCELERATE_ZERO3, "rm_training.py"] if launcher == "accelerate" else \
        ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), "rm_training.py",
         "--deepspeed", "sft/deepspeed_config.json"]  # the DeepSpeed launcher, the seed's ZeRO-3 config
    launch([*head, "--model_name", str(sft_model), "--dataset_name", str(synthetic),
            "--output_dir", str(out), "--use_lora", lora, "--num_train_epochs", "2", "--max_length", "96",
            "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "32", "--learning_rate", "2e-3",
            "--use_cpu", "True", "--bf16", "False", "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "True",
            "--train_sampling_strategy", "random",  # the batches the accuracy bound below was set with
            "--forward_cost", "4"])  # batches split by length; the processes agree on their forward counts
    results = json.loads((out / "eval_results.json").read_text())
    assert results["train_padding_share"] < 0.05, results  # it did split
    assert results["accuracy"] > (0.6 if lora == "False" else 0.5), results  # it learned (LoRA more slowly)
    tok = load_tokenizer(str(out))
    pairs = load_records(str(synthetic), "data/evaluation")
    r_j, r_k, _ = score_pairs(load_reward_model(str(out), tok), tok, pairs, 96)
    saved = read_scores(out)
    assert r_j == pytest.approx([s["reward_j"] for s in saved], abs=1e-4)  # the saved RM is the one evaluated
    assert r_k == pytest.approx([s["reward_k"] for s in saved], abs=1e-4)


def read_scores(out):
    from ser.data import read_records

    return read_records(out / "eval_scores.jsonl")


def test_ppo_under_zero3_generates_in_step_and_resumes_exactly(sft_model, synthetic, tmp_path):
    from safetensors.torch import load_file

    rm = tmp_path / "rm"
    launch(["python", "rm_training.py", "--model_name", str(sft_model), "--dataset_name", str(synthetic),
            "--output_dir", str(rm), "--use_lora", "False", "--num_train_epochs", "1", "--max_length", "96",
            "--per_device_train_batch_size", "16", "--learning_rate", "2e-3", "--use_cpu", "True", "--bf16", "False",
            "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "True"])

    def ppo(out, steps, *extra):
        return launch([*ACCELERATE_ZERO3, "--gradient_accumulation_steps", "1", "ppo/ppo.py", "--model_name",
                       str(sft_model), "--reward_model_name", str(rm), "--dataset_name", str(synthetic),
                       "--output_dir", str(out), "--steps", str(steps), "--batch_size", "4", "--mini_batch_size", "2",
                       "--gradient_accumulation_steps", "1", "--ppo_epochs", "1", "--output_max_length", "12",
                       "--save_freq", "2", *extra])

    straight = ppo(tmp_path / "straight", 4)
    assert "ppo: 2 process(es), DistributedType.DEEPSPEED" in straight.stdout and "ppo step 4:" in straight.stdout
    ppo(tmp_path / "halves", 2)
    ppo(tmp_path / "halves", 4, "--resume_from_checkpoint", str(tmp_path / "halves" / "checkpoint-2"))
    a = load_file(tmp_path / "straight" / "policy" / "model.safetensors")
    b = load_file(tmp_path / "halves" / "policy" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    base = load_file(sft_model / "model.safetensors")
    assert any(not torch.equal(a[k], base[k]) for k in base if k in a)  # it trained


@pytest.mark.parametrize("shared_prefix", [False, True])
def test_pool_scoring_with_a_zero3_sharded_rm_equals_one_process(synthetic, rm0, tmp_path, shared_prefix):  # noqa: F811
    import json

    import rm_loop_filter_by_self as F
    from ser.cli import parse
    from ser.data import read_records

    one, sharded = tmp_path / "one", tmp_path / "sharded"
    F.main(*parse([F.ScriptArguments], filter_flags(synthetic, rm0, one)))
    launch([*ACCELERATE_ZERO3, "rm_loop_filter_by_self.py", *filter_flags(synthetic, rm0, sharded),
            *(["--shared_prefix", "True"] if shared_prefix else [])])
    stats = json.loads((sharded / "stats.json").read_text())["scoring"]
    assert stats["rm_partitioned"] and stats["processes"] == 2 and stats.get("shared_prefix", False) == shared_prefix
    a, b = read_records(one / "scored.jsonl"), read_records(sharded / "scored.jsonl")
    assert [x["id"] for x in a] == [y["id"] for y in b]
    assert [x["reward_j"] for x in a] == pytest.approx([y["reward_j"] for y in b], abs=1e-5)
    assert [x["reward_k"] for x in a] == pytest.approx([y["reward_k"] for y in b], abs=1e-5)
    assert [r["id"] for r in read_records(one / "selected.jsonl")] == [r["id"] for r in read_records(sharded / "selected.jsonl")]


SCORE_HEADS = """
import json, sys
sys.path.insert(0, sys.argv[1])
from ppo.ppo import load_scoring_rm
from ser.modeling import end_processes, inference_engine, load_tokenizer, partitioned_at_load, process_state
from ser.modeling import zero3_accelerator
from ser.scoring import score_ids

rm_path, ids, out = sys.argv[2], json.loads(open(sys.argv[3]).read()), sys.argv[4]
process_state()  # the process group (gloo on CPUs), as the filter starts it
accelerator = zero3_accelerator()
tokenizer = load_tokenizer(rm_path)
with partitioned_at_load(accelerator.state.deepspeed_plugin):
    rm = load_scoring_rm(rm_path, tokenizer, "float32", True, bootstrap_heads=True)
rm = inference_engine(rm, accelerator)
managed = hasattr(rm.module.score.weight, "ds_id")  # the K-head layer is a ZeRO-3 parameter of the engine
scores = score_ids(rm, tokenizer, ids, 4, in_step_with=accelerator.state, heads=True)[0]
if accelerator.is_main_process:
    open(out, "w").write(json.dumps({"scores": scores, "head_managed": managed}))
end_processes()
"""


def test_ppo_s_bootstrap_heads_of_a_zero3_sharded_rm_score_what_one_process_scores(sft_model, synthetic, tmp_path):
    """PPO's --bootstrap_heads under ZeRO-3: the K-head score layer becomes a ZeRO-3 parameter of the RM's inference
    engine, and the 2 processes' scores of every head equal one process's."""
    import json

    from ppo.ppo import load_scoring_rm
    from ser.data import encode, load_records
    from ser.modeling import load_tokenizer
    from ser.scoring import score_ids

    rm = tmp_path / "rm"
    launch(["python", "rm_training.py", "--model_name", str(sft_model), "--dataset_name", str(synthetic), "--output_dir",
            str(rm), "--trunk", "frozen", "--feature_cache", str(tmp_path / "cache"), "--max_length", "96", "--dtype",
            "float32", "--bootstrap_heads", "3", *CPU])
    tokenizer = load_tokenizer(str(rm))
    ids = [encode(tokenizer, p["question"], p["response_j"], 96)["input_ids"]
           for p in load_records(str(synthetic), "data/evaluation")[:10]]
    (tmp_path / "ids.json").write_text(json.dumps(ids))
    (tmp_path / "score_heads.py").write_text(SCORE_HEADS)
    launch([*ACCELERATE_ZERO3, str(tmp_path / "score_heads.py"), str(ROOT), str(rm), str(tmp_path / "ids.json"),
            str(tmp_path / "sharded.json")])
    sharded = json.loads((tmp_path / "sharded.json").read_text())
    one = score_ids(load_scoring_rm(rm, tokenizer, "float32", False, bootstrap_heads=True), tokenizer, ids, heads=True)[0]
    assert sharded["head_managed"] and len(one[0]) == 3
    assert [s for row in sharded["scores"] for s in row] == pytest.approx([s for row in one for s in row], abs=1e-5)
