"""Generate the synthetic SER task (see ser/synthetic.py) in the folder layout the stages load.

    python data/make_synthetic.py --out data/generated/synthetic

writes OUT/data/{finetune,reward,unlabeled,reward_full,evaluation,rl}/*.jsonl and OUT/manifest.json:
  finetune     question + a reference response, for sft.py
  reward       the human-labelled seed (`labeled_fraction` of the pool), response_j preferred
  unlabeled    the rest of the pool, responses in random order, the human label in `gold_preferred`
  reward_full  every pool pair with its human label (the all-labels baseline)
  evaluation   held-out human-labelled pairs
  rl           prompts for PPO
"""

import random
from dataclasses import dataclass, field
from pathlib import Path

from ser.cli import parse
from ser.data import write_json, write_records
from ser.synthetic import GOLD_SEED, make_question, make_response, sample_preference


@dataclass
class Args:
    out: str = field(metadata={"help": "output folder"})
    n_pairs: int = field(default=1200, metadata={"help": "preference pairs in the SER pool (seed + unlabelled)"})
    labeled_fraction: float = field(default=0.15, metadata={"help": "share of the pool that keeps its human label"})
    n_eval: int = field(default=600, metadata={"help": "held-out human-labelled pairs"})
    n_sft: int = field(default=2000, metadata={"help": "SFT demonstrations"})
    n_rl: int = field(default=256, metadata={"help": "PPO prompts"})
    beta: float = field(default=1.0, metadata={"help": "labeller sharpness: P(a > b) = sigmoid(beta * gold gap)"})
    seed: int = field(default=0, metadata={"help": "random seed"})


def labelled_pair(rng, beta):
    q = make_question(rng)
    a, b = make_response(rng), make_response(rng)
    while b == a:
        b = make_response(rng)
    return q, a, b, sample_preference(rng, q, a, b, beta)


def main(args: Args):
    rng = random.Random(args.seed)
    root = Path(args.out) / "data"
    n_seed = round(args.n_pairs * args.labeled_fraction)
    pool = [labelled_pair(rng, args.beta) for _ in range(args.n_pairs)]
    oriented = [{"id": f"pool-{i}", "question": q, "response_j": a if a_wins else b, "response_k": b if a_wins else a}
                for i, (q, a, b, a_wins) in enumerate(pool)]
    # The pool keeps the generation order of the two responses (random) and hides the label in a field
    # that only statistics read.
    unlabeled = [{"id": f"pool-{i}", "question": q, "response_j": a, "response_k": b,
                  "gold_preferred": "j" if a_wins else "k"}
                 for i, (q, a, b, a_wins) in enumerate(pool)][n_seed:]
    evaluation = [{"id": f"eval-{i}", "question": q, "response_j": a if a_wins else b,
                   "response_k": b if a_wins else a}
                  for i, (q, a, b, a_wins) in enumerate(labelled_pair(rng, args.beta) for _ in range(args.n_eval))]
    finetune = [{"id": f"sft-{i}", "question": make_question(rng), "response_j": make_response(rng)}
                for i in range(args.n_sft)]
    rl = [{"id": f"rl-{i}", "question": make_question(rng)} for i in range(args.n_rl)]
    splits = {"finetune": finetune, "reward": oriented[:n_seed], "unlabeled": unlabeled,
              "reward_full": oriented, "evaluation": evaluation, "rl": rl}
    for name, records in splits.items():
        write_records(root / name / "train.jsonl", records)
    write_json(Path(args.out) / "manifest.json", {
        "dataset": "synthetic", "gold_seed": GOLD_SEED, "args": vars(args),
        "counts": {name: len(records) for name, records in splits.items()},
    })
    print(f"wrote {args.out}: " + ", ".join(f"{k} {len(v)}" for k, v in splits.items()))


if __name__ == "__main__":
    main(*parse([Args]))
