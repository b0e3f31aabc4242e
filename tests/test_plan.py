"""The capacity planner (ser/plan.py): parameter counts, ZeRO accounting, measured memory, the CLI."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

from ser import plan as P
from ser.flags import ModelArguments

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "scripts" / "cluster" / "configs"


def real_counts(folder):
    config = AutoConfig.from_pretrained(folder)
    config.num_labels = 1
    lm = AutoModelForCausalLM.from_config(config)
    rm = AutoModelForSequenceClassification.from_config(config)
    return (sum(p.numel() for p in lm.parameters()), sum(p.numel() for p in rm.parameters()), rm)


def test_parameter_counts_match_the_models(tiny_model):
    s = P.Shape.from_config(tiny_model)
    lm, rm, rm_model = real_counts(tiny_model)
    assert (s.params("lm"), s.params("score")) == (lm, rm)
    from peft import get_peft_model

    peft = get_peft_model(rm_model, ModelArguments(lora_r=4).lora_config("SEQ_CLS", modules_to_save=["score"]))
    trained = sum(p.numel() for p in peft.parameters() if p.requires_grad)
    assert s.lora_params(4, ["q_proj", "v_proj"], "score") == trained


@pytest.mark.slow
def test_parameter_counts_match_smollm2(smollm2):
    s = P.Shape.from_config(smollm2)
    lm, rm, _ = real_counts(smollm2)
    assert (s.params("lm"), s.params("score")) == (lm, rm) and lm == 134_515_008


def test_llama_configs_give_the_published_sizes():
    assert round(P.Shape.from_config(CONFIGS / "llama-3-8b.json").params("lm") / 1e9, 2) == 8.03
    assert round(P.Shape.from_config(CONFIGS / "llama-2-70b.json").params("lm") / 1e9, 1) == 69.0


def test_zero_states_equal_deepspeeds_estimator():
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    for name in ("llama-3-8b", "llama-2-70b"):
        s = P.Shape.from_config(CONFIGS / f"{name}.json")
        total, largest = s.params("lm"), s.largest_layer()
        for gpus in (8, 16, 64):
            z2 = sum(P.model_states(total, total, 2, gpus, 2).values())
            z3 = sum(P.model_states(total, total, 3, gpus, 2, largest).values())
            assert z2 == pytest.approx(estimate_zero2_model_states_mem_needs(total, gpus, 1, cpu_offload=False)[1], rel=1e-6)
            assert z3 == pytest.approx(estimate_zero3_model_states_mem_needs(total, largest, gpus, 1, cpu_offload=False)[1],
                                       rel=1e-6)


def test_zero_paper_example_without_deepspeeds_fp32_gradients():
    """Rajbhandari et al. 2020, Fig. 1: 7.5B parameters, 64 GPUs: 120 GB (DDP) -> 1.9 GB (ZeRO-3); the
    planner adds DeepSpeed's fp32 gradient buffer (2 bytes per parameter and GPU over the paper's 16)."""
    psi = 7.5e9
    assert sum(P.model_states(psi, psi, 0, 64, 2).values()) / 1e9 == pytest.approx(120.0)
    assert sum(P.model_states(psi, psi, 3, 64, 2).values()) / 1e9 == pytest.approx(1.875 + 2 * psi / 64 / 1e9)


def test_sharding_checkpointing_and_lora_lower_the_estimate():
    base = P.PlanArgs(model=str(CONFIGS / "llama-3-8b.json"), gpus=8, zero=2)
    p2, p3 = P.plan(base), P.plan(P.PlanArgs(**{**base.__dict__, "zero": 3}))
    pc = P.plan(P.PlanArgs(**{**base.__dict__, "activation_checkpointing": True}))
    pl = P.plan(P.PlanArgs(**{**base.__dict__, "lora": True}))
    for stage in ("sft", "rm", "ppo"):
        assert p3["stages"][stage]["total"] < p2["stages"][stage]["total"]
        assert pc["stages"][stage]["activations"] < p2["stages"][stage]["activations"]
        assert pl["stages"][stage]["total"] < p2["stages"][stage]["total"]
    assert pl["loop"]["train_flops"] < p2["loop"]["train_flops"] < pc["loop"]["train_flops"]


def test_70b_full_training_does_not_fit_8_gpus_but_lora_does(capsys):
    model = str(CONFIGS / "llama-2-70b.json")
    full = P.main(["--model", model, "--gpus", "8", "--gpu_mem", "80", "--zero", "3", "--activation_checkpointing"])
    lora = P.main(["--model", model, "--gpus", "8", "--gpu_mem", "80", "--zero", "3", "--lora", "--lora_r", "2",
                   "--activation_checkpointing"])
    assert not full["stages"]["rm"]["fits"] and lora["stages"]["rm"]["fits"]
    out = capsys.readouterr().out
    assert "| rm |" in out and "NO" in out and "One SER loop" in out


def test_bad_configs_name_the_file_and_field(tmp_path):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 10}))
    with pytest.raises(ValueError, match=r"config.json: field 'intermediate_size'"):
        P.Shape.from_config(tmp_path)
    cfg.write_text(json.dumps({"num_local_experts": 8}))
    with pytest.raises(ValueError, match="mixture-of-experts"):
        P.Shape.from_config(cfg)
    with pytest.raises(FileNotFoundError, match="no model config"):
        P.Shape.from_config(tmp_path / "absent")
    with pytest.raises(ValueError, match="lora_targets"):
        P.plan(P.PlanArgs(model=str(CONFIGS / "llama-3-8b.json"), lora=True, lora_targets="q_proj,qkv"))
    with pytest.raises(SystemExit, match="--gpus 1 --zero 0"):
        P.main(["--model", str(CONFIGS / "llama-3-8b.json"), "--measure"])


def check_within(a: P.PlanArgs, tolerance=0.30):
    estimated = P.plan(a)["stages"]
    measured = P.measure(a)
    for stage, m in measured.items():
        error = estimated[stage]["total"] / m - 1
        assert abs(error) <= tolerance, f"{stage}: estimated {estimated[stage]['total']:.3e}, measured {m:.3e}"
    return measured


@pytest.mark.parametrize("lora", [False, True])
def test_estimate_within_30_percent_of_measured_tiny(tiny_model, lora):
    torch.set_num_threads(1)
    check_within(P.PlanArgs(model=str(tiny_model), gpus=1, dtype="float32", micro_batch=4, max_length=256,
                            overhead_gb=0.0, lora=lora))


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True])
def test_estimate_within_30_percent_of_measured_smollm2(smollm2, lora):
    measured = check_within(P.PlanArgs(model=str(smollm2), gpus=1, dtype="float32", micro_batch=1, max_length=128,
                                       overhead_gb=0.0, lora=lora))
    assert measured["rm"] > 134e6 * (4 if lora else 16)  # the measurement sees the weights (and Adam's states)


@pytest.mark.parametrize("flags, message", [
    ({"gpus": -8}, r"--gpus -8: a whole number, 1 or more"),
    ({"gpus": True}, r"--gpus True: a whole number"),
    ({"pool_pairs": 0}, r"--pool_pairs 0: a whole number"),
    ({"gpu_mem": -80.0}, r"--gpu_mem -80.0: a positive number"),
    ({"mfu": 1.5}, r"--mfu 1.5: a fraction of the peak"),
    ({"overhead_gb": -1.0}, r"--overhead_gb -1.0: 0 or more GB"),
])
def test_sizes_that_would_print_nonsense_are_refused(flags, message):
    with pytest.raises(ValueError, match=message):
        P.plan(P.PlanArgs(model=str(CONFIGS / "llama-3-8b.json"), **flags))


def test_a_config_with_zero_heads_is_named(tmp_path):
    config = json.loads((CONFIGS / "llama-3-8b.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_attention_heads": 0}))
    with pytest.raises(ValueError, match=r"config.json: field 'num_attention_heads' is 0; a model has at least 1"):
        P.plan(P.PlanArgs(model=str(tmp_path)))
    with pytest.raises(ValueError, match=r"--gpus 0: a whole number, 1 or more.*--mfu 0.0: a positive number"):
        P.plan(P.PlanArgs(model=str(CONFIGS / "llama-3-8b.json"), gpus=0, mfu=0.0))
