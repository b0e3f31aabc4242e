"""The real-text study with frozen-trunk reward models: does SER raise RM accuracy on real text?

    python -m experiments.frozen --setting hh-rlhf-frozen          # every step below, resumable
    python -m experiments.frozen --setting ultrafeedback-frozen

Each step skips what an earlier call finished:
 1. data: data/prepare.py splits the dataset by conversation root; the held-out pairs (about 16 % of the
    questions) are the same for every seed. A validation split is carved from the rest, once.
 2. features: SmolLM2-135M-Instruct's last-token states of every sequence (`ser.data.encode`, 256 tokens,
    bf16 autocast) at the candidate layers, in one cache (ser/features.py), exactly what
    `rm_training.py --trunk frozen` and the filter's `--feature_cache` read.
 3. tuning, learning curve and pre-registration, then the SER grid and its controls (experiments/frozen_study.py).

Every RM here is `rm_training.py --trunk frozen`'s: a score head fitted by L-BFGS to the pairwise loss plus
an L2 penalty (`ser.features.train_head`), on the cache.
"""

from dataclasses import dataclass, field
from pathlib import Path

from ser.cli import parse

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
SMOLLM2 = ROOT / "models" / "smollm2-135m-instruct"

SETTINGS = {
    "hh-rlhf-frozen": dict(dataset="hh-rlhf", source=SHARED / "data" / "raw" / "hh_rlhf", eval_fraction=0.16),
    "ultrafeedback-frozen": dict(dataset="ultrafeedback", source=SHARED / "data" / "raw" / "ultrafeedback_binarized",
                                 eval_fraction=0.2),
}
LAYERS = [6, 12, 18, 24, 30]  # SmolLM2 has 30; the layer is chosen on the validation split
MAX_LENGTH = 256


@dataclass
class Args:
    setting: str = field(metadata={"help": "the dataset and its split", "choices": list(SETTINGS)})
    workdir: str = field(default="runs/frozen", metadata={"help": "data and the feature cache (not committed)"})
    results: str = field(default="experiments/results-frozen", metadata={"help": "results.json, REPORT.md, plots"})
    featurise_only: bool = field(default=False, metadata={"help": "stop after building the feature cache"})
    batch_size: int = field(default=16, metadata={"help": "sequences per featurising batch"})


def prepare(setting: str, work: Path) -> Path:
    """The prepared dataset (every non-held-out pair in data/reward_full), split once with seed 0."""
    import subprocess
    import sys

    data = work / "data"
    if not (data / "manifest.json").is_file():
        spec = SETTINGS[setting]  # prepare.py writes its --out whole or not at all
        subprocess.run([sys.executable, str(ROOT / "data" / "prepare.py"), "--dataset", spec["dataset"],
                        "--source", str(spec["source"]), "--out", str(data), "--labeled_fraction", "1.0",
                        "--eval_fraction", str(spec["eval_fraction"]), "--finetune_fraction", "0", "--rl_fraction", "0",
                        "--seed", "0"], check=True, cwd=ROOT)
    return data


def encoded(data: Path, tokenizer):
    """Token ids of both sides of the pool and of the held-out pairs, and their records."""
    from ser.data import encode, load_records

    out = {}
    for split in ("reward_full", "evaluation"):
        records = load_records(str(data), f"data/{split}")
        out[split] = (records, [encode(tokenizer, r["question"], r["response_j"], MAX_LENGTH)["input_ids"] for r in records],
                      [encode(tokenizer, r["question"], r["response_k"], MAX_LENGTH)["input_ids"] for r in records])
    return out


def featurise(args: Args):
    from ser import features
    from ser.modeling import load_tokenizer

    work = Path(args.workdir) / args.setting
    data = prepare(args.setting, work)
    tokenizer = load_tokenizer(str(SMOLLM2))
    splits = encoded(data, tokenizer)
    sequences = [s for _, j, k in splits.values() for s in j + k]
    stats = features.build_cache(work / "cache", SMOLLM2, tokenizer.pad_token_id, sequences, MAX_LENGTH, LAYERS,
                                 args.batch_size, "bfloat16", True, part_rows=1024)
    print(f"frozen: {args.setting}: {len(sequences)} sequences, {stats}", flush=True)
    return work, splits


def main(args: Args):
    if not (SMOLLM2 / "config.json").is_file():
        raise SystemExit(f"{SMOLLM2}: missing; run `make base-model` first")
    work, splits = featurise(args)
    if args.featurise_only:
        return
    from experiments import frozen_study

    frozen_study.run(args, work, splits)
    print(frozen_study.write_report(Path(args.results), args.setting))


if __name__ == "__main__":
    main(*parse([Args]))
