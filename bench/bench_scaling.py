"""Pool scoring as the pool grows: time per pair and peak memory of the filter stage at 1k, 10k, 100k pairs.

    python -m bench.bench_scaling [--sizes 1000 10000 100000] [--repeats 3]

The tiny model (ser.tiny, as an RM) scores pools whose question and response lengths are drawn (seeded,
with replacement) from those of the real HH-RLHF helpful test rows under the SmolLM2 tokenizer: only the
lengths are read, the texts are words of the synthetic task. Each run is `rm_loop_filter_by_self.py` in its
own process, as a user runs it; the sizes alternate (1k, 10k, 100k, 1k, ...) and each size's best run
counts. Time per pair is the scoring time from the filter's stats.json (model loading left out); peak
memory is the process's maximum resident set (getrusage). Writes bench/results/scaling.json and merges
`scoring_time_per_pair_growth_1k_to_100k` and `scoring_peak_rss_mb` into bench/results/summary.json.
"""

import json
import os
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.bench_scoring import SHARED, hh_pairs
from bench.summary import merge_into_summary, portable
from ser import tiny
from ser.cli import parse
from ser.data import encode, write_records
from ser.synthetic import corpus

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Args:
    sizes: list[int] = field(default_factory=lambda: [1000, 10_000, 100_000], metadata={"help": "pool sizes, pairs"})
    repeats: int = field(default=3, metadata={"help": "alternating runs of each size"})
    length_model: str = field(default=str(ROOT / "models" / "smollm2-135m-instruct"),
                              metadata={"help": "tokenizer whose HH-RLHF lengths the pools copy"})
    batch_size: int = field(default=32, metadata={"help": "the filter's --batch_size"})
    out: str = field(default=str(ROOT / "bench" / "results"), metadata={"help": "results folder"})


def hh_lengths(tokenizer_dir, n=2000):
    from ser.modeling import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    questions, responses = [], []
    for p in hh_pairs(n):
        questions.append(len(tok(p["question"])["input_ids"]))
        responses += [len(tok(p[s])["input_ids"]) for s in ("response_j", "response_k")]
    return questions, responses


def make_pool(path, n, lengths, tok, seed=0):
    """n pairs whose token lengths under the tiny tokenizer follow `lengths` (question, response)."""
    rng = random.Random(seed)
    words = " ".join(corpus(200)).split()
    sample = " ".join(words[:2000])
    per_word = len(tok(sample)["input_ids"]) / 2000

    def text(tokens):
        start = rng.randrange(len(words) - 1000)
        return " ".join(words[start:start + max(1, min(999, round(tokens / per_word)))])

    questions, responses = lengths
    write_records(path, [{"id": i, "question": text(rng.choice(questions)), "response_j": text(rng.choice(responses)),
                          "response_k": text(rng.choice(responses))} for i in range(n)])


def run_filter(pool, rm, out, batch_size):
    cmd = [sys.executable, str(ROOT / "rm_loop_filter_by_self.py"), "--dataset_name", str(pool), "--reward_model_name",
           str(rm), "--rm_next_loop_save_path", str(out / "selected.jsonl"), "--remaining_data_save_path",
           str(out / "remaining.jsonl"), "--batch_size", str(batch_size), "--max_length", "512"]
    env = {**os.environ, "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status:
        raise RuntimeError(f"the filter failed on {pool}:\n{output[-3000:]}")
    scoring = json.loads((out / "stats.json").read_text())["scoring"]
    return {"wall_seconds": time.perf_counter() - start, "scoring_seconds": scoring["seconds"],
            "peak_rss_mb": usage.ru_maxrss / 1024, "padding_share": scoring["padding_share"]}


def main(args: Args):
    if not (SHARED / "raw" / "hh_rlhf").is_dir():
        print(f"skipped: the HH-RLHF lengths are read from {SHARED / 'raw' / 'hh_rlhf'}, which is absent")
        return None
    if not (Path(args.length_model) / "config.json").is_file():
        print(f"skipped: {args.length_model} is missing (make base-model)")
        return None
    from transformers import AutoModelForSequenceClassification

    from ser.modeling import load_tokenizer

    lengths = hh_lengths(args.length_model)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        lm = tiny.build(tiny.Args(out=str(tmp / "tiny")))
        tok = load_tokenizer(str(lm))
        rm = AutoModelForSequenceClassification.from_pretrained(str(lm), num_labels=1)
        rm.config.pad_token_id = tok.pad_token_id
        rm.save_pretrained(tmp / "rm")
        tok.save_pretrained(tmp / "rm")
        pools = {}
        for n in args.sizes:
            pools[n] = tmp / f"pool-{n}.jsonl"
            make_pool(pools[n], n, lengths, tok)
        tokens = [len(encode(tok, r["question"], r["response_j"], 512)["input_ids"])
                  for r in map(json.loads, pools[args.sizes[0]].read_text().splitlines())]
        for r in range(args.repeats):
            for n in args.sizes:
                figures = run_filter(pools[n], tmp / "rm", tmp / f"out-{n}-{r}", args.batch_size)
                runs.append({"repeat": r, "pairs": n, **figures})
                print(f"run {r + 1}/{args.repeats} {n} pairs: scoring {figures['scoring_seconds']:.1f} s "
                      f"({1e3 * figures['scoring_seconds'] / n:.3f} ms a pair), peak RSS {figures['peak_rss_mb']:.0f} MB",
                      flush=True)
    best = {n: min((x for x in runs if x["pairs"] == n), key=lambda x: x["scoring_seconds"]) for n in args.sizes}
    per_pair = {n: best[n]["scoring_seconds"] / n for n in args.sizes}
    rss = {str(n): max(x["peak_rss_mb"] for x in runs if x["pairs"] == n) for n in args.sizes}
    small, large = min(args.sizes), max(args.sizes)
    result = {"config": portable({k: v for k, v in vars(args).items() if k != "out"}), "runs": runs,
              "mean_sequence_tokens": sum(tokens) / len(tokens),
              "seconds_per_pair": {str(n): v for n, v in per_pair.items()},
              "scoring_time_per_pair_growth_1k_to_100k": per_pair[large] / per_pair[small],
              "scoring_peak_rss_mb": rss}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scaling.json").write_text(json.dumps(result, indent=1) + "\n")
    merge_into_summary(out, {k: result[k] for k in ("scoring_time_per_pair_growth_1k_to_100k", "scoring_peak_rss_mb")})
    print(f"time per pair, {large} over {small}: {result['scoring_time_per_pair_growth_1k_to_100k']:.2f}x; "
          f"peak RSS MB: {rss}")
    return result


if __name__ == "__main__":
    main(parse([Args])[0])
