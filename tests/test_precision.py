"""Paper-scale correctness on CPU: fp32 master weights under --bf16 True, the paper's RM defaults,
and no dropout in PPO's forward passes."""

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import rm_training
from conftest import CPU
from ser.cli import parse
from ser.modeling import load_tokenizer

BF16 = [*CPU, "--bf16", "True"]  # the later flag wins: CPU autocast in bf16


@pytest.fixture(scope="module")
def bf16_sft(tiny_model, tmp_path_factory):
    """A small causal LM saved in bf16, as the seed's ZeRO-3 SFT command saves it."""
    out = tmp_path_factory.mktemp("bf16_sft")
    AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16).save_pretrained(out)
    load_tokenizer(str(tiny_model)).save_pretrained(out)
    return out


def train_rm(base, data, out, *flags):
    rm_training.main(*parse(rm_training.ARGUMENTS, [
        "--model_name", str(base), "--dataset_name", str(data), "--output_dir", str(out),
        "--learning_rate", "2e-5", "--max_steps", "20", "--per_device_train_batch_size", "8",
        "--train_subset_size", "160", "--eval_subset_size", "16", "--seed", "0", *BF16, *flags],
        counted=("--train_subset", "--eval_subset")))


def deltas(after: dict, before: dict) -> dict:
    return {k: after[k].float() - before[k].float() for k in after if k in before}


def relative_error(a: dict, ref: dict) -> float:
    num = sum((a[k] - ref[k]).pow(2).sum() for k in ref)
    return (num / sum(v.pow(2).sum() for v in ref.values())).sqrt().item()


@pytest.mark.slow  # two RM trainings: make test runs it, make test-fast does not
def test_full_rm_training_from_a_bf16_checkpoint_updates_like_fp32_masters(bf16_sft, synthetic, tmp_path):
    train_rm(bf16_sft, synthetic, tmp_path / "auto", "--use_lora", "False")  # --dtype auto: the checkpoint's bf16
    train_rm(bf16_sft, synthetic, tmp_path / "ref", "--use_lora", "False", "--dtype", "float32")  # fp32 reference
    start = {k.removeprefix("model."): v for k, v in load_file(bf16_sft / "model.safetensors").items()}
    got = load_file(tmp_path / "auto" / "model.safetensors")
    ref = load_file(tmp_path / "ref" / "model.safetensors")
    start = {("model." + k if "model." + k in got else k): v for k, v in start.items()}
    d_got, d_ref = deltas(got, start), deltas(ref, start)
    assert d_ref, "no common weights to compare"
    assert all(v.dtype == torch.float32 for v in got.values())  # trained weights are kept in fp32
    # (the new score head is drawn in the checkpoint dtype, so the runs start a little apart)
    assert relative_error(d_got, d_ref) < 0.1
    changed = sum((v != 0).sum().item() for v in d_got.values()) / sum(v.numel() for v in d_got.values())
    assert changed > 0.5  # in pure bf16 most of these small updates are rounded away (about a quarter survive)
    score_init = got["score.weight"] - d_got["score.weight"] if "score.weight" in start else None
    assert score_init is None or not torch.equal(got["score.weight"], score_init)


@pytest.mark.slow  # two RM trainings: make test runs it, make test-fast does not
def test_lora_rm_from_a_bf16_checkpoint_updates_adapter_and_head_like_fp32_masters(bf16_sft, synthetic, tmp_path):
    train_rm(bf16_sft, synthetic, tmp_path / "auto", "--use_lora", "True")
    train_rm(bf16_sft, synthetic, tmp_path / "ref", "--use_lora", "True", "--dtype", "float32")
    got = load_file(tmp_path / "auto" / "adapter_model.safetensors")
    ref = load_file(tmp_path / "ref" / "adapter_model.safetensors")
    assert got.keys() == ref.keys() and any("score" in k for k in got)
    for k in got:
        assert got[k].dtype == torch.float32, k  # adapter and score head: fp32 masters
    head = [k for k in got if "score" in k]
    # the head starts from the same seeded init in both runs: compare where training took it
    assert relative_error({k: got[k].float() for k in head}, {k: ref[k].float() for k in head}) < 1e-2
    lora_b = [k for k in got if "lora_B" in k]  # B starts at zero: its value is its update
    assert relative_error({k: got[k] for k in lora_b}, {k: ref[k] for k in lora_b}) < 5e-2


def test_rm_defaults_are_the_papers(tiny_model):
    _, model, config = parse(rm_training.ARGUMENTS, ["--model_name", "M", "--dataset_name", "D", "--output_dir", "o"])
    assert (config.learning_rate, config.max_length, config.num_train_epochs) == (2e-5, 512, 2.0)
    assert (model.use_lora, model.lora_r, model.lora_alpha, model.lora_dropout) == (True, 8, 32, 0.1)


def test_lora_dropout_survives_while_the_backbone_dropout_is_off(tiny_model):
    script, model_args, config = parse(rm_training.ARGUMENTS,
                                       ["--model_name", str(tiny_model), "--dataset_name", "D", "--output_dir", "o", *CPU])
    tok = load_tokenizer(str(tiny_model))
    model = rm_training.load_model(script, model_args, config, tok)
    lora = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Dropout) and "lora_dropout" in n]
    other = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Dropout) and "lora_dropout" not in n]
    assert lora and all(m.p == 0.1 for m in lora)
    assert all(m.p == 0 for m in other)


@pytest.mark.parametrize("use_peft", ["True", "False"])
def test_ppo_policy_trains_fp32_masters_without_dropout(bf16_sft, use_peft, monkeypatch):
    from ppo import ppo

    args, model_args = parse(ppo.ARGUMENTS, ["--model_name", str(bf16_sft), "--reward_model_name", "unused",
                                             "--dataset_name", "unused", "--use_peft", use_peft, "--bf16", "True",
                                             "--lora_dropout", "0.1", "--value_init", "zero"])
    tok = load_tokenizer(str(bf16_sft))
    rm = rm_training.AutoModelForSequenceClassification.from_pretrained(bf16_sft, num_labels=1)
    monkeypatch.setattr(ppo, "load_reward_model", lambda *a, **k: rm)  # the RM is not under test here
    model, reference, _ = ppo.build_models(args, model_args, tok)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    assert all(m.p == 0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    if reference is not None:
        assert next(reference.parameters()).dtype == torch.bfloat16  # frozen weights may stay bf16
