"""PPO's reward model reads exactly the token ids that training-time `encode` gives.

A policy is prompted with `prompt_ids` and writes response tokens; the RM must then see
`[bos] prompt response [eos]` as `encode(question, response)` builds it for training, whatever the
tokenizer. Decoding the response and putting it back into the template does not give that with a
byte-level BPE ("Answer:  Bring", two spaces).
"""

import pytest
import torch

from conftest import shared_path
from ser.data import encode, format_text, prompt_ids
from ser.modeling import load_tokenizer
from ser.rollout import response_texts, reward_inputs, sample

QUESTION = "We are going to the beach tomorrow.\n\nWhat should we pack?"
RESPONSES = ["Bring hat, kite.", " Bring hat, kite.", "\nBring hat, kite.", "\n\n1. a hat\n2. a kite", "Hat."]


class ScriptedPolicy:
    """Stands in for a policy: `generate` appends the given response tokens to each prompt row."""

    def __init__(self, responses, pad):
        self.responses, self.pad = responses, pad

    def generate(self, input_ids, attention_mask=None, **_):
        width = max(map(len, self.responses))
        rows = [r + [self.pad] * (width - len(r)) for r in self.responses]
        return torch.cat([input_ids, torch.tensor(rows)], 1)


@pytest.fixture(params=["demo-bpe", "smollm2", "llama-sentencepiece"])
def tokenizer(request, tiny_model):
    if request.param == "demo-bpe":
        return load_tokenizer(str(tiny_model))
    if request.param == "smollm2":
        return load_tokenizer(str(request.getfixturevalue("smollm2")))
    return load_tokenizer(str(shared_path("data", "models", "tinyllama-1.1b-chat-v1.0-tokenizer")))


@pytest.mark.parametrize("max_length", [512, 24])
def test_rm_in_ppo_reads_the_ids_of_training(tokenizer, max_length):
    encoded = [encode(tokenizer, QUESTION, r, max_length) for r in RESPONSES]
    full = [encode(tokenizer, QUESTION, r, 10_000) for r in RESPONSES]
    # what the policy writes for each response: the ids after the prompt, then its EOS
    written = [e["input_ids"][e["prompt_length"]:-1] + [tokenizer.eos_token_id] for e in full]
    policy = ScriptedPolicy(written, tokenizer.pad_token_id)
    rollout = sample(policy, tokenizer, [QUESTION] * len(RESPONSES), 10_000, 64, 1.0, True, "cpu")
    head = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    for e, row in zip(full, rollout.query.tolist()):  # the policy's prompt is exactly training's prompt
        assert [t for t in row if t != tokenizer.pad_token_id] == head + prompt_ids(tokenizer, QUESTION)
        assert e["input_ids"][:e["prompt_length"]] == head + prompt_ids(tokenizer, QUESTION)
    assert reward_inputs(tokenizer, rollout, max_length) == [e["input_ids"] for e in encoded]
    assert response_texts(tokenizer, rollout) == RESPONSES


def test_decoding_and_retemplating_changes_the_ids(smollm2):
    """The defect the ids path removes, on a byte-level BPE."""
    tok = load_tokenizer(str(smollm2))
    e = encode(tok, QUESTION, RESPONSES[0], 512)
    decoded = tok.decode(e["input_ids"][e["prompt_length"]:-1])
    assert decoded == " " + RESPONSES[0]  # the space after "Answer:" is the response's first character
    retemplated = tok(format_text(QUESTION, decoded), add_special_tokens=False)["input_ids"]
    assert len(retemplated) == len(e["input_ids"]) - 1  # one more token than encode's body ("  Bring")
    assert retemplated != e["input_ids"][1:-1]
