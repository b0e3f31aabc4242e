"""Compare two policies (SFT vs PPO) on held-out prompts.

    python ppo/evaluate.py --base_model runs/demo/sft --policy runs/demo/ppo/policy \\
        --reward_model_name runs/demo/ser/loop_2/rm --dataset_name runs/demo/data --gold synthetic

Both policies answer the same prompts (plain sampling, same seed). Reported: mean rewards, the KL of
the policy to the base on its own samples, response lengths, EOS rates, and win rates of the policy
over the base (ties apart) by each judge:
  * `policy_rm`: the RM that PPO optimised. This judge is circular (the policy was trained to please
    it), so it measures how far PPO got on its own objective, not whether answers got better;
  * `judge_rm`: an independent RM given by --judge_reward_model (for example the all-label RM);
  * `gold`: with --gold synthetic, the synthetic task's hidden gold reward;
  * `llm`: with --llm_judge_model, an LLM judge (ser/judge.py: the paper's 5-point additive rubric per
    answer, through any OpenAI-compatible API; win/tie/lose with bootstrap intervals).
Results go to --output (JSON) and stdout; both systems' answers go beside it (OUTPUT.base.jsonl,
OUTPUT.policy.jsonl), in the form ppo/judge.py compares against any other system's.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ser.cli import check_accelerator, parse
from ser.data import load_records, subsample, write_json, write_records
from ser.flags import DataArguments, default_of
from ser.modeling import THIS_PROCESS_ONLY, load_causal_lm, load_reward_model, load_tokenizer, process_state
from ser.rollout import lm_logprobs, response_texts, reward_inputs, sample
from ser.scoring import score_ids


@dataclass
class Args(DataArguments):
    subset: str | None = default_of(DataArguments, "subset", "data/evaluation")
    base_model: str = field(kw_only=True, metadata={"help": "the reference policy (the SFT model)"})
    policy: str = field(kw_only=True, metadata={"help": "the policy to evaluate (ppo.py's output_dir/policy)"})
    reward_model_name: str = field(kw_only=True, metadata={
        "help": "the RM PPO optimised (its win rate is labelled circular)"})
    n_prompts: int = field(default=200, metadata={"help": "prompts to answer: a seeded random sample of N distinct questions"})
    judge_reward_model: str | None = field(default=None, metadata={
        "help": "an independent RM that judges too (e.g. the all-label RM); it must share the tokenizer"})
    samples_per_prompt: int = field(default=1, metadata={"help": "answers per prompt and policy"})
    max_new_tokens: int = field(default=64, metadata={"help": "response length cap"})
    max_prompt_length: int = field(default=256, metadata={"help": "prompt tokens kept (cut from the left)"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature"})
    batch_size: int = field(default=32, metadata={"help": "prompts per generation batch"})
    gold: str = field(default="none", metadata={"help": "synthetic: also judge with the synthetic task's gold reward",
                                                 "choices": ["none", "synthetic"]})
    output: str | None = field(default=None, metadata={"help": "results JSON; default: beside --policy"})
    device: str | None = field(default=None, metadata={"help": "where the models run; default: the accelerator, else cpu"})
    dtype: str = field(default="auto", metadata={"help": "weights dtype: auto, float32, bfloat16, float16"})
    llm_judge_model: str | None = field(default=None, metadata={"help": "also judge with this LLM (OpenAI-compatible API; "
                                                                        "key in $OPENAI_API_KEY)"})
    llm_judge_base_url: str | None = field(default=None, metadata={"help": "the LLM judge's API; default: $OPENAI_BASE_URL"})
    llm_judge_cache: str | None = field(default=None, metadata={"help": "the LLM judge's reply cache; default: beside --output"})


def answer(model, tokenizer, questions, args):
    """Sampled `Rollout`s, one per batch of prompts."""
    starts = tqdm(range(0, len(questions), args.batch_size), desc="generating", unit="batch")
    return [sample(model, tokenizer, questions[i:i + args.batch_size], args.max_prompt_length, args.max_new_tokens,
                   args.temperature, True, args.device) for i in starts]


@torch.no_grad()
def seq_logprob(model, rollout, temperature):
    lp = lm_logprobs(model, torch.cat([rollout.query, rollout.responses], 1),
                     torch.cat([rollout.query_mask, rollout.response_mask], 1), rollout.query.shape[1],
                     rollout.responses, temperature)
    return (lp * rollout.response_mask).sum(1)


@torch.no_grad()
def rm_rewards(rm, tokenizer, rollouts, args):
    """The RM's reward of each sampled response, read from its ids (as in PPO)."""
    sequences = [s for r in rollouts for s in reward_inputs(tokenizer, r, args.max_length)]
    return score_ids(rm, tokenizer, sequences, args.batch_size, THIS_PROCESS_ONLY)[0]


def main(args: Args):
    for name in ("n_prompts", "samples_per_prompt", "batch_size", "max_new_tokens"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name} {getattr(args, name)}: at least 1; nothing was written")
    torch.manual_seed(args.seed)
    if not args.device:
        check_accelerator()
    state = process_state()
    if state.num_processes > 1:  # each would answer every prompt, all on the first GPU
        raise SystemExit(f"ppo/evaluate.py runs in one process ({state.num_processes} were launched): "
                         "python ppo/evaluate.py ... (--device picks the GPU)")
    tokenizer = load_tokenizer(args.tokenizer_name or args.base_model)
    distinct = list(dict.fromkeys(r["question"] for r in load_records(args.dataset_name, args.subset,
                                                                      args.load_from_json, fields=("question",))))
    if not distinct:
        raise ValueError(f"{args.dataset_name} (--subset {args.subset}): no prompts to evaluate on; nothing was written")
    distinct = subsample(distinct, args.n_prompts, args.seed)
    questions = [q for q in distinct for _ in range(args.samples_per_prompt)]
    args.device = args.device or str(state.device)
    base = load_causal_lm(args.base_model, tokenizer, args.dtype).eval().to(args.device)
    policy = load_causal_lm(args.policy, tokenizer, args.dtype).eval().to(args.device)
    judges = {"policy_rm": load_reward_model(args.reward_model_name, tokenizer, args.dtype).to(args.device)}
    if args.judge_reward_model:
        judges["judge_rm"] = load_reward_model(args.judge_reward_model, tokenizer, args.dtype).to(args.device)
    results, texts = {}, {}
    for name, model in (("base", base), ("policy", policy)):
        torch.manual_seed(args.seed)
        with torch.no_grad():
            rollouts = answer(model, tokenizer, questions, args)
        texts[name] = [t for r in rollouts for t in response_texts(tokenizer, r)]
        lengths = torch.cat([r.response_mask.sum(1) for r in rollouts]).float().cpu()
        eos = torch.cat([r.has_eos for r in rollouts]).float().cpu()
        results[name] = {"response_length": lengths.mean().item(), "eos_rate": eos.mean().item(),
                         "_rollouts": rollouts}
        for judge, rm in judges.items():
            rewards = rm_rewards(rm, tokenizer, rollouts, args)
            results[name][f"{judge}_reward"], results[name][f"_{judge}"] = sum(rewards) / len(rewards), rewards
        if args.gold == "synthetic":
            from ser.synthetic import gold_reward

            gold = [gold_reward(q, t) for q, t in zip(questions, texts[name])]
            results[name]["gold_reward"], results[name]["_gold"] = sum(gold) / len(gold), gold
    # KL(policy || base) on the policy's own samples: E[log pi(y|x) - log pi_base(y|x)]
    kls = [seq_logprob(policy, r, args.temperature) - seq_logprob(base, r, args.temperature)
           for r in results["policy"]["_rollouts"]]
    summary = {"prompts": len(questions) // args.samples_per_prompt, "samples": len(questions),
               "kl_to_base": torch.cat(kls).mean().item()}

    def rate(a, b):
        n = len(a)
        return {"win_rate": sum(x > y for x, y in zip(a, b)) / n, "tie_rate": sum(x == y for x, y in zip(a, b)) / n}

    judged = {judge: rate(results["policy"][f"_{judge}"], results["base"][f"_{judge}"]) for judge in judges}
    judged["policy_rm"]["note"] = "circular: the RM that PPO optimised"
    if args.gold == "synthetic":
        judged["gold"] = rate(results["policy"]["_gold"], results["base"]["_gold"])
    for name in ("base", "policy"):
        summary[name] = {k: v for k, v in results[name].items() if not k.startswith("_")}
    summary["judged_by"] = judged
    summary["examples"] = [{"question": q, "base": a, "policy": b}
                           for q, a, b in list(zip(questions, texts["base"], texts["policy"]))[:5]]
    out = Path(args.output) if args.output else Path(args.policy).parent / "eval_policy.json"
    if args.llm_judge_model:
        from ser.judge import JudgeArgs, judge_pair

        cache = args.llm_judge_cache or str(out.with_suffix(".judge_cache.jsonl"))
        llm = judge_pair(questions, texts["policy"], texts["base"], JudgeArgs(
            model=args.llm_judge_model, base_url=args.llm_judge_base_url, cache=cache), ("policy", "base"), args.seed)
        judged["llm"] = {k: v for k, v in llm.items() if k not in ("scores", "table")}
    for name in ("base", "policy"):
        write_records(out.with_suffix(f".{name}.jsonl"), [{"question": q, "response": t} for q, t in zip(questions, texts[name])])
    write_json(out, summary)
    print(json.dumps({k: v for k, v in summary.items() if k != "examples"}, indent=1))
    return summary


if __name__ == "__main__":
    main(*parse([Args]))
