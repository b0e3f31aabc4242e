"""Sampling from a policy and reading it back: what PPO and the policy evaluation share.

Details from "The N implementation details of RLHF with PPO" are named where they are implemented.
"""

from typing import NamedTuple

import torch
from trl.trainer.utils import selective_log_softmax

from ser.data import join_ids, prompt_ids


class Rollout(NamedTuple):
    """A batch of sampled responses. `query` is left-padded; `responses` are cut after their first EOS."""

    query: torch.Tensor            # (B, P) prompt ids, padded on the left
    query_mask: torch.Tensor       # (B, P) 1 on prompt tokens
    responses: torch.Tensor        # (B, R) sampled ids, pad after the first EOS
    response_mask: torch.Tensor    # (B, R) 1 on kept tokens (the EOS included)
    has_eos: torch.Tensor          # (B,) the response ended with an EOS
    prompts: list                  # B lists of the prompt's ids, uncut (what the RM reads)


def position_ids_of(attention_mask):
    return (attention_mask.cumsum(1) - 1).clamp(min=0)  # detail: positions under left padding


def logprobs_of(logits, tokens, temperature):
    # Detail: sample and score with the same temperature, or the ratio is off from step one.
    # (TRL's selective_log_softmax: no full log-softmax tensor over the vocabulary is kept.)
    return selective_log_softmax(logits, tokens, temperature=temperature)


def lm_logprobs(lm, query_responses, attention_mask, context_length, responses, temperature):
    """Logprobs of the response tokens under a plain causal LM (the reference; a policy in evaluation)."""
    logits = lm(input_ids=query_responses, attention_mask=attention_mask,
                position_ids=position_ids_of(attention_mask)).logits
    return logprobs_of(logits[:, context_length - 1:-1].float(), responses, temperature)


def truncate_after_eos(responses, eos_id, pad_id):
    """Keep each response up to and including its first EOS; mask 1 on kept tokens."""
    is_eos = responses == eos_id
    after = torch.cumsum(is_eos.int(), dim=1) - is_eos.int() > 0  # strictly after the first eos
    mask = (~after).long()
    return responses.masked_fill(after, pad_id), mask, is_eos.any(dim=1)


def model_prompt(tokenizer, prompt: list[int], max_prompt_length: int) -> list[int]:
    """What a policy is prompted with: `[bos] prompt ids`, cut from the left to `max_prompt_length` tokens."""
    head = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    if max_prompt_length <= len(head):
        raise ValueError(f"max_prompt_length {max_prompt_length} leaves no room for the prompt")
    return head + prompt[-(max_prompt_length - len(head)):]


def sample(policy, tokenizer, questions, max_prompt_length, max_new_tokens, temperature, batched, device,
           **sampling) -> Rollout:
    """Left-padded prompts (`[bos] prompt_ids`, cut from the left) and sampled responses.

    By default plain sampling at `temperature`: no top-k/top-p, so the logprobs scored later are those
    of the sampling distribution (PPO needs that). `sampling` overrides it for data generation (top_k,
    top_p, logits_processor, ...: any `generate` argument)."""
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    prompts = [prompt_ids(tokenizer, q) for q in questions]  # the same boundary as training's `encode`
    enc = [model_prompt(tokenizer, p, max_prompt_length) for p in prompts]
    width = max(map(len, enc))
    query = torch.tensor([[pad] * (width - len(e)) + e for e in enc], device=device)  # detail: pad on the left
    query_mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in enc], device=device)
    gen = {"max_new_tokens": max_new_tokens, "do_sample": True, "top_k": 0, "top_p": 1.0, "temperature": temperature,
           "pad_token_id": pad, "eos_token_id": eos, **sampling}
    if batched:
        out = policy.generate(input_ids=query, attention_mask=query_mask, **gen)[:, width:]
    else:
        rows = [policy.generate(input_ids=query[i:i + 1, width - len(e):], **gen)[0, len(e):] for i, e in enumerate(enc)]
        out = torch.full((len(rows), max(len(r) for r in rows)), pad, device=device)
        for i, r in enumerate(rows):
            out[i, :len(r)] = r
    responses, response_mask, has_eos = truncate_after_eos(out, eos, pad)
    return Rollout(query, query_mask, responses, response_mask, has_eos, prompts)


def reward_inputs(tokenizer, rollout: Rollout, max_length: int) -> list[list[int]]:
    """The RM's input for each sampled response: the ids themselves, never decoded and re-tokenised.

    `[bos] prompt response [eos]` through `join_ids`, as `encode` builds training pairs: the response's
    own EOS is replaced by the one `join_ids` appends, and a response without EOS gets it too (as the
    same text would in training). Decoding and re-templating instead would give the RM text it never
    saw (with a byte-level BPE, "Answer:  Bring" with two spaces).
    """
    out = []
    for prompt, ids, mask in zip(rollout.prompts, rollout.responses.tolist(), rollout.response_mask.tolist()):
        kept = [t for t, m in zip(ids, mask) if m]
        if kept and kept[-1] == tokenizer.eos_token_id:
            kept = kept[:-1]
        out.append(join_ids(tokenizer, prompt, kept, max_length)["input_ids"])
    return out


def response_texts(tokenizer, rollout: Rollout) -> list[str]:
    """The responses as text in the template's sense (for judges that read text, and for people).

    Decoded after their prompt, because some tokenizers (SentencePiece) drop a leading space when a
    response is decoded alone; the template's space after "Answer:" is then taken off.
    """
    texts = []
    for prompt, ids, mask in zip(rollout.prompts, rollout.responses.tolist(), rollout.response_mask.tolist()):
        kept = [t for t, m in zip(ids, mask) if m]
        before = tokenizer.decode(prompt, skip_special_tokens=True)
        whole = tokenizer.decode(prompt + kept, skip_special_tokens=True)
        text = whole[len(before):] if whole.startswith(before) else tokenizer.decode(kept, skip_special_tokens=True)
        texts.append(text[1:] if text.startswith(" ") else text)
    return texts
