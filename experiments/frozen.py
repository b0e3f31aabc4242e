"""The real-text study with frozen-trunk reward models: does SER raise RM accuracy on real text? On your data
and your trunk, before a long LoRA run:

    python -m experiments.frozen --data PREPARED_DIR --trunk SFT_MODEL --results OUT   # any data/prepare.py folder
    python -m experiments.frozen --setting hh-rlhf-frozen          # the built-in settings: shortcuts for both
    python -m experiments.frozen --setting ultrafeedback-frozen

Each step skips what an earlier call finished:
 1. data: the prepared folder's data/reward_full (every pool pair with its human label) and data/evaluation
    (the held-out pairs, the same for every seed). A built-in setting prepares its folder first (data/prepare.py,
    split by conversation root). A validation split is carved from the pool, once.
 2. features: the trunk's last-token states of every sequence (`ser.data.encode`, --max_length tokens, bf16
    autocast) at the candidate layers (--layers; default five evenly spaced up to the last, from the trunk's
    config), in one cache (ser/features.py), exactly what `rm_training.py --trunk frozen` and the filter's
    `--feature_cache` read.
 3. tuning, learning curve and pre-registration, then the SER grid and its controls (experiments/frozen_study.py,
    every SER run through ser/loop.py), and the report: seed, SER variants, all labels, with intervals.

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
MAX_LENGTH = 256


@dataclass
class Args:
    setting: str | None = field(default=None, metadata={
        "help": "a built-in setting (the data prepared from ../shared, SmolLM2 as the trunk)", "choices": list(SETTINGS)})
    data: str | None = field(default=None, metadata={
        "help": "a folder data/prepare.py (or data/make_synthetic.py) wrote: its data/reward_full and data/evaluation"})
    trunk: str | None = field(default=None, metadata={
        "help": "any causal LM folder, e.g. your SFT model; default: SmolLM2-135M-Instruct (make base-model)"})
    name: str | None = field(default=None, metadata={"help": "the results' name; default: the setting or the data folder's"})
    layers: list[int] | None = field(default=None, metadata={
        "help": "trunk layers to choose from on the validation split; default: five evenly spaced up to the last"})
    max_length: int = field(default=MAX_LENGTH, metadata={"help": "tokens per sequence"})
    seeds: int = field(default=20, metadata={"help": "seeds per cell (labelled-seed draws)"})
    l2s: list[float] | None = field(default=None, metadata={
        "help": "the head's L2 grid tuned on the validation split; default 1e-4 1e-3 1e-2 1e-1 1"})
    workdir: str = field(default="runs/frozen", metadata={"help": "data and the feature cache (not committed)"})
    results: str = field(default="experiments/results-frozen", metadata={"help": "results JSON, REPORT, plots"})
    featurise_only: bool = field(default=False, metadata={"help": "stop after building the feature cache"})
    batch_size: int = field(default=16, metadata={"help": "sequences per featurising batch"})
    dtype: str = field(default="bfloat16", metadata={
        "help": "the trunk's dtype while featurising: bfloat16 (with bf16 autocast; the committed studies') or float32 "
                "(slower; features then do not depend on which sequences share a batch)", "choices": ["bfloat16", "float32"]})
    shared_prefix: bool = field(default=False, metadata={
        "help": "featurise each pair's question once for both responses (the same features up to rounding)"})

    def __post_init__(self):
        if bool(self.setting) == bool(self.data):
            raise SystemExit("experiments.frozen: give --setting (a built-in one) or --data (a prepared folder), one of them")
        self.name = self.name or self.setting or Path(self.data).resolve().name
        if self.seeds < 2:
            raise SystemExit(f"--seeds {self.seeds}: at least 2 (the intervals are over seeds)")


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


def encoded(data: Path, tokenizer, max_length: int = MAX_LENGTH):
    """Token ids of both sides of the pool and of the held-out pairs, and their records."""
    from ser.data import encode, load_records

    out = {}
    for split in ("reward_full", "evaluation"):
        records = load_records(str(data), f"data/{split}")
        out[split] = (records, [encode(tokenizer, r["question"], r["response_j"], max_length)["input_ids"] for r in records],
                      [encode(tokenizer, r["question"], r["response_k"], max_length)["input_ids"] for r in records])
    return out


def default_layers(trunk: Path) -> list[int]:
    """Five layers evenly spaced up to the trunk's last (SmolLM2's 30: 6, 12, 18, 24, 30)."""
    from transformers import AutoConfig

    n = AutoConfig.from_pretrained(str(trunk)).get_text_config().num_hidden_layers
    return sorted({max(1, round(n * k / 5)) for k in range(1, 6)})


def featurise(args: Args):
    from ser import features
    from ser.modeling import load_tokenizer

    trunk = Path(args.trunk) if args.trunk else SMOLLM2
    if not (trunk / "config.json").is_file():
        raise SystemExit(f"{trunk}: no config.json" + ("; run `make base-model` first" if trunk == SMOLLM2 else ""))
    work = Path(args.workdir) / args.name
    data = prepare(args.setting, work) if args.setting else Path(args.data)
    for split in ("reward_full", "evaluation"):
        if not (data / "data" / split).is_dir():
            raise SystemExit(f"--data {data}: no data/{split} (a folder data/prepare.py writes has it)")
    tokenizer = load_tokenizer(str(trunk))
    splits = encoded(data, tokenizer, args.max_length)
    sequences = [s for _, j, k in splits.values() for s in j + k]
    stats = features.build_cache(work / "cache", trunk, tokenizer.pad_token_id, sequences, args.max_length,
                                 args.layers or default_layers(trunk), args.batch_size, args.dtype,
                                 args.dtype == "bfloat16", part_rows=1024, shared_prefix=args.shared_prefix)
    print(f"frozen: {args.name}: {len(sequences)} sequences, {stats}", flush=True)
    return work, splits, data


def main(args: Args):
    work, splits, data = featurise(args)
    if args.featurise_only:
        return None
    from experiments import frozen_study

    state = frozen_study.run(args, work, splits, seeds=list(range(args.seeds)), data=data)
    print(frozen_study.write_report(Path(args.results), args.name))
    return state


if __name__ == "__main__":
    main(*parse([Args]))
