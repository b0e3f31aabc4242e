"""The LLM judge: a 5-point additive rubric per answer through any OpenAI-compatible chat API, and a
per-question comparison of two systems (ppo/judge.py is its command line; ppo/evaluate.py calls it).

Each answer is graded alone with the rubric (a text file with {question} and {answer}); the reply must
end with a line "Score: N", N in 0-5, and anything else is counted as unparseable, never guessed.
Requests go through the `openai` client: at most `concurrency` at once, each with `timeout` seconds,
retried by the client (`max_retries`) with exponential backoff and jitter on 408, 409, 429, 5xx and
timeouts; a request that still fails is counted and reported. Replies are cached on disk, keyed on
model and prompt, so a re-run asks nothing twice.
"""

import hashlib
import json
import os
import random
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from ser.stats import bootstrap_ci

RUBRIC = Path(__file__).with_name("judge_rubric.txt")
SCORE = re.compile(r"^\s*Score:\s*([0-5])\s*$")


@dataclass
class JudgeArgs:
    model: str | None = field(default=None, metadata={"help": "the judge model; default: $SER_JUDGE_MODEL"})
    base_url: str | None = field(default=None, metadata={"help": "an OpenAI-compatible API; default: $OPENAI_BASE_URL, "
                                                                 "else OpenAI's"})
    api_key_env: str = field(default="OPENAI_API_KEY", metadata={"help": "the environment variable holding the key"})
    rubric: str = field(default=str(RUBRIC), metadata={"help": "the grading prompt: a text file with {question} and {answer}"})
    cache: str = field(default="judge_cache.jsonl", metadata={"help": "replies already received (JSONL); re-runs reuse them"})
    concurrency: int = field(default=8, metadata={"help": "requests in flight at most"})
    timeout: float = field(default=60.0, metadata={"help": "seconds per request"})
    max_retries: int = field(default=4, metadata={"help": "retries per request (backoff with jitter), then it is counted failed"})
    max_tokens: int = field(default=256, metadata={"help": "reply length cap"})
    temperature: float = field(default=0.0, metadata={"help": "judge sampling temperature"})


class Cache:
    """Append-only JSONL of replies, keyed on (model, prompt). A torn last line (a killed run) is ignored
    and said; every other line must parse."""

    def __init__(self, path):
        self.path, self.lock, self.replies, self.torn = Path(path), threading.Lock(), {}, 0
        if self.path.is_file():
            lines = self.path.read_bytes().split(b"\n")
            for n, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    if n == len(lines):  # the last line, with no newline after it: a write cut short. It is cut
                        self.torn += 1  # off, so the next append starts on a line of its own
                        with open(self.path, "r+b") as f:
                            f.truncate(sum(len(x) + 1 for x in lines[:-1]))
                        continue
                    raise ValueError(f"{self.path}:{n}: not a JSON line ({e}); the judge cache is corrupt") from e
                if not (isinstance(row, dict) and isinstance(row.get("key"), str) and isinstance(row.get("reply"), str)):
                    raise ValueError(f"{self.path}:{n}: expected {{\"key\": str, \"reply\": str}}, got {line[:200]!r}; "
                                     "the judge cache is corrupt")
                self.replies[row["key"]] = row["reply"]

    @staticmethod
    def key(model, prompt) -> str:
        return hashlib.sha256(json.dumps([model, prompt]).encode()).hexdigest()

    def get(self, key):
        return self.replies.get(key)

    def put(self, key, reply) -> None:
        with self.lock:
            self.replies[key] = reply
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"key": key, "reply": reply}, ensure_ascii=False) + "\n")
                f.flush()
                os.fsync(f.fileno())


def parse_score(reply: str | None) -> int | None:
    """The score on the reply's last non-empty line, "Score: N" with N in 0-5; None for anything else."""
    if not reply:
        return None
    lines = [line for line in reply.strip().splitlines() if line.strip()]
    match = SCORE.match(lines[-1]) if lines else None
    return int(match.group(1)) if match else None


def client_for(args: JudgeArgs):
    from openai import OpenAI

    key = os.environ.get(args.api_key_env)
    if not key:
        raise SystemExit(f"the judge needs an API key in ${args.api_key_env} (a local server may take any value)")
    return OpenAI(api_key=key, base_url=args.base_url or os.environ.get("OPENAI_BASE_URL") or None,
                  timeout=args.timeout, max_retries=args.max_retries)


def grade(questions, answers, args: JudgeArgs, desc="judging") -> tuple[list[int | None], dict]:
    """A rubric score (or None) per answer, and counts: requests made, cached, unparseable, failed."""
    model = args.model or os.environ.get("SER_JUDGE_MODEL")
    if not model:
        raise SystemExit("the judge model: --model or $SER_JUDGE_MODEL")
    template = Path(args.rubric).read_text(encoding="utf-8")
    if "{question}" not in template or "{answer}" not in template:
        raise SystemExit(f"--rubric {args.rubric}: the prompt must contain {{question}} and {{answer}}")
    cache = Cache(args.cache)
    prompts = [template.replace("{question}", q).replace("{answer}", a) for q, a in zip(questions, answers)]
    keys = [Cache.key(model, p) for p in prompts]
    counts = {"answers": len(prompts), "requests": 0, "cached": 0, "unparseable": 0, "failed": 0,
              "cache_torn_lines": cache.torn}
    errors = []
    todo = sorted({k: p for k, p in zip(keys, prompts) if cache.get(k) is None}.items())
    counts["cached"] = sum(cache.get(k) is not None for k in keys)
    client = client_for(args) if todo else None

    def ask(item):
        key, prompt = item
        try:
            response = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                                      max_tokens=args.max_tokens, temperature=args.temperature)
            reply = response.choices[0].message.content
        except Exception as e:  # the client has retried what can be retried; this one is counted failed
            return key, None, f"{type(e).__name__}: {e}"
        if reply is None:  # no content (a refusal, a filtered reply): failed, not cached, asked again on a re-run
            return key, None, f"no content in the reply (finish_reason {response.choices[0].finish_reason!r})"
        cache.put(key, reply)
        return key, reply, None

    with ThreadPoolExecutor(max_workers=max(1, args.concurrency)) as pool:
        for key, reply, error in tqdm(pool.map(ask, todo), total=len(todo), desc=desc, unit="answer",
                                      disable=not todo):
            counts["requests"] += 1
            if error:
                counts["failed"] += 1
                errors.append(error)
    scores = []
    for key in keys:
        reply = cache.get(key)
        score = parse_score(reply)
        if reply is not None and score is None:
            counts["unparseable"] += 1
        scores.append(score)
    if errors:
        counts["first_errors"] = errors[:3]
    return scores, counts


def compare(a_scores, b_scores, rng=None) -> dict:
    """Win/tie/lose of A against B per question (both scored), with 95 % bootstrap intervals."""
    rng = rng or random.Random(0)
    both = [(a, b) for a, b in zip(a_scores, b_scores) if a is not None and b is not None]
    out = {"questions": len(a_scores), "compared": len(both), "left_out": len(a_scores) - len(both)}
    for name, test in (("win", lambda a, b: a > b), ("tie", lambda a, b: a == b), ("lose", lambda a, b: a < b)):
        flags = [float(test(a, b)) for a, b in both]
        out[f"{name}_rate"] = sum(flags) / len(flags) if flags else None
        out[f"{name}_ci"] = bootstrap_ci(flags, rng)
    out["mean_score_a"] = sum(a for a, _ in both) / len(both) if both else None
    out["mean_score_b"] = sum(b for _, b in both) / len(both) if both else None
    return out


def table(result: dict, names, counts_a: dict, counts_b: dict) -> str:
    def cell(rate, ci):
        if rate is None:
            return "n/a"
        return f"{100 * rate:.1f} %" + (f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else "")

    a, b = names
    return "\n".join([
        f"| {a} vs {b} | {a} wins | tie | {b} wins | compared | left out | unparseable | failed |",
        "|---|---|---|---|---|---|---|---|",
        f"| LLM judge | {cell(result['win_rate'], result['win_ci'])} | {cell(result['tie_rate'], result['tie_ci'])} | "
        f"{cell(result['lose_rate'], result['lose_ci'])} | {result['compared']} | {result['left_out']} | "
        f"{counts_a['unparseable'] + counts_b['unparseable']} | {counts_a['failed'] + counts_b['failed']} |",
    ]) + "\n"


def judge_pair(questions, answers_a, answers_b, args: JudgeArgs, names=("A", "B"), seed=0) -> dict:
    """Grade both systems' answers and compare them; what evaluate.py calls."""
    scores_a, counts_a = grade(questions, answers_a, args, f"judging {names[0]}")
    scores_b, counts_b = grade(questions, answers_b, args, f"judging {names[1]}")
    result = compare(scores_a, scores_b, random.Random(seed))
    return {**result, "names": list(names), "counts": {names[0]: counts_a, names[1]: counts_b},
            "scores": {names[0]: scores_a, names[1]: scores_b}, "table": table(result, names, counts_a, counts_b)}
