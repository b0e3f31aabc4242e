"""scripts/merge_lora.py: a merged model computes what base plus adapter computed."""

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from scripts import merge_lora
from ser.modeling import load_reward_model, load_tokenizer
from ser.scoring import score


def make_adapter(base, task, out, dtype=torch.float32):
    """An adapter whose LoRA weights are random, not zero (init_lora_weights=False): merging must matter."""
    torch.manual_seed(0)
    tok = load_tokenizer(str(base))
    if task == "SEQ_CLS":
        model = AutoModelForSequenceClassification.from_pretrained(str(base), num_labels=1, dtype=dtype)
        model.config.pad_token_id = tok.pad_token_id
        config = LoraConfig(task_type=task, r=4, lora_alpha=8, init_lora_weights=False, modules_to_save=["score"],
                            target_modules=["q_proj", "v_proj"])
    else:
        model = AutoModelForCausalLM.from_pretrained(str(base), dtype=dtype)
        config = LoraConfig(task_type=task, r=4, lora_alpha=8, init_lora_weights=False,
                            target_modules=["q_proj", "v_proj"])
    model = get_peft_model(model, config).eval()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return model, tok


QUESTIONS = ["What is 2 + 3?", "Name a colour."]
ANSWERS = ["It is 5.", "Blue, like the sea."]


def test_a_merged_reward_model_scores_like_its_adapter(sft_model, tmp_path):
    _, tok = make_adapter(sft_model, "SEQ_CLS", tmp_path / "rm")
    adapter = load_reward_model(str(tmp_path / "rm"), tok)
    merge_lora.main(merge_lora.Args(adapter=str(tmp_path / "rm"), out=str(tmp_path / "merged")))
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    merged = load_reward_model(str(tmp_path / "merged"), tok)  # a full RM now, score head included
    a, _ = score(adapter, tok, QUESTIONS, ANSWERS, 64)
    b, _ = score(merged, tok, QUESTIONS, ANSWERS, 64)
    assert b == pytest.approx(a, abs=1e-5)
    fresh = AutoModelForSequenceClassification.from_pretrained(str(sft_model), num_labels=1)
    assert not torch.allclose(fresh.score.weight, merged.score.weight)  # the trained head, not a new one


def test_a_merged_causal_lm_gives_its_adapters_logits(sft_model, tmp_path):
    peft_model, tok = make_adapter(sft_model, "CAUSAL_LM", tmp_path / "lm")
    merge_lora.main(merge_lora.Args(adapter=str(tmp_path / "lm"), out=str(tmp_path / "merged")))
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    base = AutoModelForCausalLM.from_pretrained(str(sft_model)).eval()
    ids = tok(QUESTIONS[0] + " " + ANSWERS[0], return_tensors="pt").input_ids
    with torch.no_grad():
        want, got, plain = peft_model(ids).logits, merged(ids).logits, base(ids).logits
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(plain, want, atol=1e-3)  # the adapter changed the model


def test_what_is_not_an_adapter_is_refused(sft_model, tmp_path):
    with pytest.raises(SystemExit, match="not a LoRA adapter folder"):
        merge_lora.main(merge_lora.Args(adapter=str(sft_model), out=str(tmp_path / "merged")))
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "adapter_config.json").write_text(json.dumps({"task_type": "TOKEN_CLS",
                                                                     "base_model_name_or_path": str(sft_model)}))
    with pytest.raises(SystemExit, match="task_type 'TOKEN_CLS'"):
        merge_lora.main(merge_lora.Args(adapter=str(tmp_path / "odd"), out=str(tmp_path / "merged")))
    assert not (tmp_path / "merged").exists()


@pytest.mark.slow
@pytest.mark.real_model
def test_smollm2_merges_exactly_in_fp32(smollm2, tmp_path):
    peft_model, tok = make_adapter(smollm2, "CAUSAL_LM", tmp_path / "lm")
    merge_lora.main(merge_lora.Args(adapter=str(tmp_path / "lm"), out=str(tmp_path / "merged"), dtype="float32"))
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32).eval()
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        want, got = peft_model(ids).logits, merged(ids).logits
    assert (got - want).abs().max().item() < 1e-3 * want.abs().max().item()
    assert (got.argmax(-1) == want.argmax(-1)).all()


def test_an_out_folder_that_is_not_a_model_is_refused_not_wiped(sft_model, tmp_path):
    make_adapter(sft_model, "SEQ_CLS", tmp_path / "rm")
    run = tmp_path / "demo"
    (run / "ser").mkdir(parents=True)
    (run / "report.md").write_text("a run's results")
    with pytest.raises(SystemExit, match="not a model folder.*--replace True"):
        merge_lora.main(merge_lora.Args(adapter=str(tmp_path / "rm"), out=str(run)))
    assert (run / "report.md").read_text() == "a run's results" and (run / "ser").is_dir()


@pytest.mark.parametrize("config, message", [
    ("{not json", r"adapter_config.json: not valid JSON"),
    ('{"r": 8}', r"adapter_config.json: field 'base_model_name_or_path' is missing"),
    ('{"base_model_name_or_path": null}', r"adapter_config.json: field 'base_model_name_or_path' is None"),
    ('{"base_model_name_or_path": "/nonexistent/sft"}', r"the LoRA adapter's base model /nonexistent/sft .* is missing"),
])
def test_an_adapter_with_a_bad_config_is_named(tmp_path, config, message):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(config)
    with pytest.raises(SystemExit, match=message):
        merge_lora.main(merge_lora.Args(adapter=str(adapter), out=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()
