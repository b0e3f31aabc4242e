"""An LLM judge of two systems' answers: a 5-point additive rubric per answer, compared per question.

    export OPENAI_API_KEY=...            # or the key of any OpenAI-compatible server (vLLM, TGI)
    python ppo/judge.py --answers_a runs/demo/ppo/answers.jsonl --answers_b runs/demo/sft-answers.jsonl \\
        --names PPO SFT --model gpt-4o --base_url https://api.openai.com/v1 --output runs/demo/judge.json

This is how the paper's policy results were judged (GPT-4; win/tie/lose against SFT and against PPO
with the all-label RM). Each answer is graded alone with the rubric in --rubric (a text file with
{question} and {answer}; the default is ser/judge_rubric.txt), and the reply must end with a line
"Score: N", N in 0-5. Anything else is counted as unparseable, never guessed. Per question, A wins
when its score is higher; questions where either score is missing are left out and counted.
Reported: win/tie/lose rates with 95 % bootstrap intervals (questions resampled) and a markdown table.

Requests go through the `openai` client: at most --concurrency at once, each with --timeout seconds,
retried by the client (--max_retries) with exponential backoff and jitter on 408, 409, 429, 5xx and
timeouts. A request that still fails is counted and reported. Every reply is cached in --cache (JSONL,
keyed on model, prompt and answer): a re-run asks nothing twice. The base URL, model and key come from
flags and the environment (OPENAI_BASE_URL, SER_JUDGE_MODEL, the variable named by --api_key_env).

`ppo/evaluate.py --llm_judge_model M` runs this as one more judge of policy against base.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

from ser.cli import parse
from ser.data import load_records, write_json
from ser.judge import JudgeArgs, judge_pair


@dataclass
class Args:
    answers_a: str = field(metadata={"help": "system A's answers: JSONL with `question` and `response`"})
    answers_b: str = field(metadata={"help": "system B's answers, for the same questions in the same order"})
    names: list[str] = field(default_factory=lambda: ["A", "B"], metadata={"help": "the two systems' names"})
    output: str | None = field(default=None, metadata={"help": "results JSON (the table goes beside it as .md)"})
    seed: int = field(default=0, metadata={"help": "bootstrap seed"})


def main(args: Args, judge: JudgeArgs) -> dict:
    a, b = (load_records(path, fields=("question", "response")) for path in (args.answers_a, args.answers_b))
    if len(a) != len(b):
        raise SystemExit(f"{args.answers_a} has {len(a)} answers and {args.answers_b} {len(b)}: the same questions, "
                         "in the same order, are needed")
    for ra, rb in zip(a, b):
        if ra["question"] != rb["question"]:
            raise SystemExit(f"{args.answers_a}:{ra['_line']} and {args.answers_b}:{rb['_line']}: different questions")
    if len(args.names) != 2:
        raise SystemExit("--names takes two names")
    if args.output and Path(args.output).suffix == ".md":
        raise SystemExit(f"--output {args.output}: the results JSON (its table is written beside it as .md)")
    result = judge_pair([r["question"] for r in a], [r["response"] for r in a], [r["response"] for r in b], judge,
                        tuple(args.names), args.seed)
    if args.output:
        write_json(args.output, result)
        Path(args.output).with_suffix(".md").write_text(result["table"], encoding="utf-8")
    print(result["table"] + json.dumps({k: result["counts"][k] for k in result["names"]}))
    return result


if __name__ == "__main__":
    main(*parse([Args, JudgeArgs]))
