"""Compare two policies (SFT vs PPO) on held-out prompts.

    python ppo/evaluate.py --base_model runs/demo/sft --policy runs/demo/ppo/policy \\
        --reward_model_name runs/demo/ser/loop_2/rm --dataset_name runs/demo/data --gold synthetic

Both policies answer every prompt (plain sampling, same seed). Reported: the win rate of the policy
over the base judged by the RM (ties apart), mean RM scores, the KL of the policy to the base on its
own samples, response lengths and EOS rates; with `--gold synthetic`, the same judged by the
synthetic task's gold reward. Results go to --output (JSON) and stdout.
"""

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ppo import lm_logprobs, sample  # noqa: E402
from ser.cli import parse  # noqa: E402
from ser.data import load_records, write_json  # noqa: E402
from ser.modeling import THIS_PROCESS_ONLY, load_causal_lm, load_reward_model, load_tokenizer, score  # noqa: E402


@dataclass
class Args:
    base_model: str = field(metadata={"help": "the reference policy (the SFT model)"})
    policy: str = field(metadata={"help": "the policy to evaluate (ppo.py's output_dir/policy)"})
    reward_model_name: str = field(metadata={"help": "the RM that judges"})
    dataset_name: str = field(metadata={"help": "prompts: a data folder (with --subset) or a JSON/JSONL file"})
    subset: str = field(default="data/evaluation", metadata={"help": "held-out prompts inside --dataset_name"})
    n_prompts: int = field(default=200, metadata={"help": "prompts to answer (the first N distinct questions)"})
    samples_per_prompt: int = field(default=1, metadata={"help": "answers per prompt and policy"})
    max_new_tokens: int = field(default=64, metadata={"help": "response length cap"})
    max_prompt_length: int = field(default=256, metadata={"help": "prompt tokens kept (cut from the left)"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature"})
    batch_size: int = field(default=32, metadata={"help": "prompts per generation batch"})
    gold: str = field(default="none", metadata={"help": "synthetic: also judge with the synthetic task's gold reward",
                                                 "choices": ["none", "synthetic"]})
    output: str | None = field(default=None, metadata={"help": "results JSON; default: beside --policy"})
    seed: int = field(default=0, metadata={"help": "sampling seed"})
    device: str | None = field(default=None, metadata={"help": "where the models run; default: the accelerator, else cpu"})
    dtype: str = field(default="auto", metadata={"help": "weights dtype: auto, float32, bfloat16, float16"})


def answer(model, tokenizer, questions, args):
    """Sampled batches: (query, query_mask, responses, response_mask, has_eos) per batch of prompts."""
    out = []
    for i in range(0, len(questions), args.batch_size):
        qs = questions[i:i + args.batch_size]
        query, query_mask, responses, mask, has_eos = sample(model, tokenizer, qs, args.max_prompt_length,
                                                             args.max_new_tokens, args.temperature, True, args.device)
        out.append((query, query_mask, responses, mask, has_eos))
    return out


@torch.no_grad()
def seq_logprob(model, query, query_mask, responses, mask, temperature):
    lp = lm_logprobs(model, torch.cat([query, responses], 1), torch.cat([query_mask, mask], 1), query.shape[1],
                     responses, temperature)
    return (lp * mask).sum(1)


def main(args: Args):
    torch.manual_seed(args.seed)
    tokenizer = load_tokenizer(args.base_model)
    questions = list(dict.fromkeys(r["question"] for r in load_records(args.dataset_name, args.subset,
                                                                       fields=("question",))))[:args.n_prompts]
    questions = [q for q in questions for _ in range(args.samples_per_prompt)]
    args.device = args.device or (torch.accelerator.current_accelerator() or torch.device("cpu")).type
    base = load_causal_lm(args.base_model, tokenizer, args.dtype).eval().to(args.device)
    policy = load_causal_lm(args.policy, tokenizer, args.dtype).eval().to(args.device)
    rm = load_reward_model(args.reward_model_name, tokenizer, args.dtype).to(args.device)
    results, texts = {}, {}
    for name, model in (("base", base), ("policy", policy)):
        torch.manual_seed(args.seed)
        with torch.no_grad():
            batches = answer(model, tokenizer, questions, args)
        texts[name] = [t for b in batches for t in tokenizer.batch_decode(b[2], skip_special_tokens=True)]
        rewards, _ = score(rm, tokenizer, questions, texts[name], 1024, args.batch_size, THIS_PROCESS_ONLY)
        lengths = torch.cat([b[3].sum(1) for b in batches]).float().cpu()
        eos = torch.cat([b[4] for b in batches]).float().cpu()
        results[name] = {"rm_reward": sum(rewards) / len(rewards), "response_length": lengths.mean().item(),
                         "eos_rate": eos.mean().item(), "_rm": rewards, "_batches": batches}
        if args.gold == "synthetic":
            from ser.synthetic import gold_reward

            gold = [gold_reward(q, t) for q, t in zip(questions, texts[name])]
            results[name]["gold_reward"], results[name]["_gold"] = sum(gold) / len(gold), gold
    # KL(policy || base) on the policy's own samples: E[log pi(y|x) - log pi_base(y|x)]
    kls = [seq_logprob(policy, *b[:4], args.temperature) - seq_logprob(base, *b[:4], args.temperature)
           for b in results["policy"]["_batches"]]
    summary = {"prompts": len(questions) // args.samples_per_prompt, "samples": len(questions),
               "kl_to_base": torch.cat(kls).mean().item()}

    def rate(a, b):
        n = len(a)
        return {"win_rate": sum(x > y for x, y in zip(a, b)) / n, "tie_rate": sum(x == y for x, y in zip(a, b)) / n}

    judged = {"rm": rate(results["policy"]["_rm"], results["base"]["_rm"])}
    if args.gold == "synthetic":
        judged["gold"] = rate(results["policy"]["_gold"], results["base"]["_gold"])
    for name in ("base", "policy"):
        summary[name] = {k: v for k, v in results[name].items() if not k.startswith("_")}
    summary["judged_by"] = judged
    summary["examples"] = [{"question": q, "base": a, "policy": b}
                           for q, a, b in list(zip(questions, texts["base"], texts["policy"]))[:5]]
    out = Path(args.output) if args.output else Path(args.policy).parent / "eval_policy.json"
    write_json(out, summary)
    print(json.dumps({k: v for k, v in summary.items() if k != "examples"}, indent=1))
    return summary


if __name__ == "__main__":
    main(*parse([Args]))
