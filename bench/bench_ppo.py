"""Where a PPO step's time goes: generation, RM scoring, the policy/reference/value passes, the update.

    python -m bench.bench_ppo [--steps 6] [--model FOLDER]

Runs ppo/ppo.py (one process) on the synthetic task with the tiny model as policy, against an RM
trained here for one epoch, and reads the per-step figures it writes to OUTPUT/log.jsonl. Reports the
median over the steps after the first (which pays one-off costs): tokens per second (prompt and
response tokens of the batch over the step's wall time) and the share of the step spent generating.
Writes bench/results/ppo.json and merges `ppo_tokens_per_s` and `ppo_generation_share` into
bench/results/summary.json.
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from bench.summary import merge_into_summary
from ser import tiny
from ser.cli import parse

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("generation", "scoring", "policy_reference_value", "update")


@dataclass
class Args:
    steps: int = field(default=6, metadata={"help": "PPO steps (the first is left out of the medians)"})
    batch_size: int = field(default=16, metadata={"help": "prompts per step"})
    response_tokens: int = field(default=48, metadata={"help": "max new tokens per response"})
    model: str | None = field(default=None, metadata={"help": "policy folder (default: a tiny model built here)"})
    out: str = field(default=str(ROOT / "bench" / "results"), metadata={"help": "results folder"})


def run(cmd):
    env = {**os.environ, "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false",
           "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    proc = subprocess.run([sys.executable, *cmd], cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed:\n{proc.stderr[-3000:]}")


def main(args: Args):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        run(["data/make_synthetic.py", "--out", str(tmp / "data"), "--n_pairs", "400", "--n_eval", "100",
             "--n_sft", "64", "--n_rl", "64", "--seed", "0"])
        policy = args.model or str(tiny.build(tiny.Args(out=str(tmp / "base"))))
        run(["rm_training.py", "--model_name", policy, "--dataset_name", str(tmp / "data"), "--output_dir",
             str(tmp / "rm"), "--use_lora", "False", "--num_train_epochs", "1", "--per_device_train_batch_size", "16",
             "--learning_rate", "2e-3", "--use_cpu", "True", "--bf16", "False", "--report_to", "none",
             "--save_strategy", "no", "--disable_tqdm", "True"])
        run(["ppo/ppo.py", "--model_name", policy, "--reward_model_name", str(tmp / "rm"), "--dataset_name",
             str(tmp / "data"), "--output_dir", str(tmp / "ppo"), "--steps", str(args.steps), "--batch_size",
             str(args.batch_size), "--mini_batch_size", "4", "--gradient_accumulation_steps", "1",
             "--output_max_length", str(args.response_tokens), "--save_freq", "0"])
        rows = [json.loads(line) for line in (tmp / "ppo" / "log.jsonl").read_text().splitlines()]
    later = rows[1:] or rows
    result = {
        "policy": args.model or "tiny (2 x 64)", "steps": len(rows), "batch_size": args.batch_size,
        "response_tokens": args.response_tokens,
        "ppo_tokens_per_s": statistics.median(r["perf/tokens_per_second"] for r in later),
        "ppo_generation_share": statistics.median(r["perf/generation_share"] for r in later),
        "seconds_per_phase": {p: statistics.median(r[f"perf/seconds_{p}"] for r in later) for p in PHASES},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ppo.json").write_text(json.dumps(result, indent=1) + "\n")
    merge_into_summary(out, {k: result[k] for k in ("ppo_tokens_per_s", "ppo_generation_share")})
    total = sum(result["seconds_per_phase"].values())
    print(f"PPO on {result['policy']}, {args.batch_size} prompts x {args.response_tokens} new tokens, median of "
          f"{len(later)} steps: {result['ppo_tokens_per_s']:.0f} tokens/s; "
          + ", ".join(f"{p} {s / total:.0%}" for p, s in result["seconds_per_phase"].items()))
    return result


if __name__ == "__main__":
    main(parse([Args])[0])
