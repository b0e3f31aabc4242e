"""A whole SER run (Loop 0 and 3 loops) with frozen-trunk RMs against LoRA RMs: SmolLM2, the same HH pool.

    python -m bench.bench_frozen     # needs `make base-model` and the HH-RLHF sample in ../shared/data

Timings, side by side in one invocation, on a small HH-RLHF pool (the frozen study's split, a seeded
sample of --seed_pairs labelled pairs, --pool_pairs unlabelled ones and --eval_pairs held-out ones):
  lora          scripts/ser_loop.sh with LoRA RMs (the driver's default), MAX_LENGTH tokens;
  frozen        the same driver with `--trunk frozen --feature_cache` (featurising included, one forward
                per sequence);
  frozen_again  the same driver into another RUN on the built cache (what another seed or variant costs);
  in_process    experiments/frozen_study.py's loop on the same cache (no process starts);
  frozen_shared_prefix  `frozen` with --shared_prefix (each pair's question featurised once for both answers);
  lora_bf16, frozen_bf16  `lora` and `frozen` as README launches them (RM_ARGS="--bf16 True"; the frozen trunk in
                its own dtype, bf16 for SmolLM2): the others compute in float32 throughout.
And featurising alone, in this process: the task's sequences (both sides of every seed, pool and held-out
pair) into a new cache, plainly and with shared prefixes, at each of --featurise_lengths (sequences/s, tokens
saved). The same thresholds, epochs and floors everywhere. Writes bench/results/frozen.json and merges the
ratios `frozen_ser_run_speedup_first` (lora / frozen), `frozen_ser_run_speedup_first_bf16` (lora_bf16 /
frozen_bf16), `frozen_ser_run_speedup_cached` (lora / in_process) and the shared-prefix featurising speedups into
summary.json. `--only featurising` runs the featurising part alone.
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

from bench.summary import merge_into_summary
from ser.cli import parse
from ser.data import load_records, write_records

ROOT = Path(__file__).resolve().parents[1]
SMOLLM2 = ROOT / "models" / "smollm2-135m-instruct"
HEAD_L2 = 1e-3  # rm_training.py's --head_l2 default; the centring term is the study's (frozen_study.CENTER)


@dataclass
class Args:
    seed_pairs: int = field(default=60, metadata={"help": "human-labelled seed pairs"})
    pool_pairs: int = field(default=300, metadata={"help": "unlabelled pool pairs"})
    eval_pairs: int = field(default=100, metadata={"help": "held-out pairs"})
    max_length: int = field(default=128, metadata={"help": "tokens per sequence (MAX_LENGTH)"})
    floor: int = field(default=15, metadata={"help": "status count floors (a twentieth of the pool)"})
    workdir: str = field(default="runs/frozen", metadata={"help": "where the frozen study keeps the prepared HH data"})
    out: str = field(default=str(ROOT / "bench" / "results"), metadata={"help": "results folder"})
    featurise_lengths: list[int] = field(default_factory=lambda: [128, 256], metadata={
        "help": "max_length of the featurising timings (the left cut of a long pair's question differs by side, "
                "so a longer window shares more)"})
    seed_epochs: int = field(default=1, metadata={"help": "SEED_EPOCHS of every driver run"})
    loop_epochs: int = field(default=1, metadata={"help": "LOOP_EPOCHS of every driver run"})
    only: str | None = field(default=None, metadata={
        "help": "featurising: time featurising alone; first_run: the LoRA and the frozen first run alone, as README "
                "launches them (--bf16 True), at --seed_epochs and --loop_epochs (a frozen head's L-BFGS fit takes "
                "no epochs; LoRA's cost grows with them)", "choices": ["featurising", "first_run"]})


def small_task(args: Args, folder: Path) -> None:
    """A prepared folder: seed (response_j preferred), pool (random order, label in gold_preferred), held-out."""
    from experiments import frozen

    data = frozen.prepare("hh-rlhf-frozen", Path(args.workdir) / "hh-rlhf-frozen")
    pool = load_records(str(data), "data/reward_full")
    held = load_records(str(data), "data/evaluation")
    rng = random.Random(0)
    rng.shuffle(pool)
    seed, rest = pool[:args.seed_pairs], pool[args.seed_pairs:args.seed_pairs + args.pool_pairs]
    unlabeled = []
    for r in rest:
        swap = rng.random() < 0.5
        unlabeled.append({"question": r["question"], "response_j": r["response_k" if swap else "response_j"],
                          "response_k": r["response_j" if swap else "response_k"], "gold_preferred": "k" if swap else "j"})
    write_records(folder / "data" / "reward" / "train.jsonl", seed)
    write_records(folder / "data" / "unlabeled" / "train.jsonl", unlabeled)
    write_records(folder / "data" / "evaluation" / "test.jsonl", held[:args.eval_pairs])


def driver(args: Args, data: Path, run: Path, rm_args: list[str], filter_args: list[str], bf16: bool = False) -> dict:
    env = {**os.environ, "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false",
           "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}", "DATA": str(data), "SFT": str(SMOLLM2),
           "RUN": str(run), "MAX_LOOPS": "3", "MAX_LENGTH": str(args.max_length),
           "SEED_EPOCHS": str(args.seed_epochs), "LOOP_EPOCHS": str(args.loop_epochs), "PY": sys.executable, "LAUNCH": sys.executable,
           "RM_ARGS": " ".join(["--use_cpu", "True", "--bf16", str(bf16), "--per_device_train_batch_size", "8", *rm_args]),
           "FILTER_ARGS": " ".join(["--status1_min_pairs", str(args.floor), "--status2_min_pairs", str(args.floor),
                                    "--probability", "pairwise", *filter_args])}
    start = time.perf_counter()
    proc = subprocess.run(["bash", "scripts/ser_loop.sh"], cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"the driver failed ({run}):\n{proc.stderr[-3000:]}")
    loops = json.loads((run / "loops.json").read_text())["loops"]
    return {"seconds": seconds, "loops": len(loops) - 1, "final_accuracy": loops[-1]["accuracy"]
            if loops[-1]["accuracy"] is not None else loops[-2]["accuracy"],
            "statuses": [lp["status"] for lp in loops]}


def in_process(args: Args, data: Path, run: Path, cache: Path) -> dict:
    """The frozen run once more, in this process, on the cache the driver built (experiments/frozen_study.py)."""
    from experiments import frozen_study as fs
    from ser import features
    from ser.modeling import load_tokenizer

    tok = load_tokenizer(str(SMOLLM2))
    layer = features.frozen_info(run / "loop_0" / "rm")["layer"]
    seed, pool, held = (fs.feature_pairs(cache, tok, load_records(str(data), f"data/{split}"), layer, args.max_length)
                        for split in ("reward", "unlabeled", "evaluation"))
    start = time.perf_counter()
    rows, _ = fs.ser_run(seed, pool, held, HEAD_L2, args.floor, probability="pairwise")
    return {"seconds": time.perf_counter() - start, "loops": len(rows) - 1,
            "final_accuracy": [r for r in rows if r.get("accuracy") is not None][-1]["accuracy"]}


def featurising(args: Args, data: Path, tmp: Path) -> dict:
    """Sequences per second of building a cache of the task's sequences, plain and with shared prefixes, side
    by side at each length (the driver's settings: float32 weights, batches of 16, no autocast)."""
    from ser import features
    from ser.data import encode
    from ser.modeling import load_tokenizer, process_state
    from ser.scoring import prefix_groups, shared_prefix

    tok = load_tokenizer(str(SMOLLM2))
    records = [r for split in ("reward", "unlabeled", "evaluation") for r in load_records(str(data), f"data/{split}")]
    out = {}
    for length in args.featurise_lengths:
        seqs = [encode(tok, r["question"], r[side], length)["input_ids"] for r in records
                for side in ("response_j", "response_k")]
        groups = prefix_groups(seqs)
        saved = sum((len(g) - 1) * shared_prefix([seqs[i] for i in g]) for g in groups)
        row = {"sequences": len(seqs), "tokens": sum(map(len, seqs)), "shared_prefix_token_saving":
               saved / sum(map(len, seqs))}
        for name, shared in (("plain", False), ("shared_prefix", True)):
            start = time.perf_counter()
            features.build_cache(tmp / f"cache-{length}-{name}", SMOLLM2, tok.pad_token_id, seqs, length, [-1], 16,
                                 "float32", False, process_state(), progress=None, shared_prefix=shared)
            seconds = time.perf_counter() - start
            row[name] = {"seconds": seconds, "sequences_per_second": len(seqs) / seconds}
        row["speedup"] = row["plain"]["seconds"] / row["shared_prefix"]["seconds"]
        out[str(length)] = row
        print(f"bench_frozen: featurising at {length} tokens: {json.dumps(row)}", flush=True)
    return out


def readme_runs(args: Args, data: Path, tmp: Path, frozen_head: list[str]) -> dict:
    """LoRA and the frozen first run as README launches them (RM_ARGS="--bf16 True"): LoRA under bf16 autocast,
    the frozen trunk in its own dtype (bf16 for SmolLM2) with bf16 autocast, featurising included."""
    bf16_cache = ["--feature_cache", str(tmp / "cache-bf16")]
    # LoRA at 1e-3: at the paper's 2e-5 one epoch on 60 pairs leaves every reward near equal, and loop 1 stops
    return {"lora_bf16": driver(args, data, tmp / "lora_bf16", ["--learning_rate", "1e-3"], [], bf16=True),
            "frozen_bf16": driver(args, data, tmp / "frozen_bf16", [*frozen_head, *bf16_cache], bf16_cache, bf16=True)}


def config(args: Args) -> dict:
    return {k: v for k, v in vars(args).items() if k != "out"}


def update_report(out: Path, parts: dict, summary: dict) -> dict:
    """frozen.json's parts replaced (the others kept: each `--only` run writes its own), and the figures merged
    into summary.json. Returns the report."""
    report = json.loads((out / "frozen.json").read_text()) if (out / "frozen.json").is_file() else {}
    report.update(parts)
    (out / "frozen.json").write_text(json.dumps(report, indent=1) + "\n")
    merge_into_summary(out, summary)
    return report


def main(args: Args):
    if not (SMOLLM2 / "config.json").is_file():
        raise SystemExit(f"{SMOLLM2}: missing; run `make base-model` first")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    frozen_head = ["--trunk", "frozen", "--head_l2", str(HEAD_L2), "--center_rewards_coefficient", "0.01"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data, cache = tmp / "data", tmp / "cache"
        small_task(args, data)
        if args.only == "first_run":
            runs = readme_runs(args, data, tmp, frozen_head)
            ratio = runs["lora_bf16"]["seconds"] / runs["frozen_bf16"]["seconds"]
            epochs = f"epochs_{args.seed_epochs}_{args.loop_epochs}"
            update_report(out, {f"first_run_{epochs}": {"config": config(args), **runs, "speedup": ratio}},
                          {f"frozen_ser_run_speedup_first_bf16_{epochs}": round(ratio, 1)})
            print(json.dumps(runs, indent=1), f"\nfrozen first run over LoRA: {ratio:.1f}x")
            return
        feat = featurising(args, data, tmp)
        speedups = {f"featurising_shared_prefix_speedup_{n}": round(r["speedup"], 2) for n, r in feat.items()}
        if args.only == "featurising":
            update_report(out, {"featurising": {"config": {"featurise_lengths": args.featurise_lengths}, **feat}}, speedups)
            return
        frozen_flags = ["--feature_cache", str(cache), "--dtype", "float32"]
        frozen_rm = [*frozen_head, *frozen_flags]
        results = {"lora": driver(args, data, tmp / "lora", ["--learning_rate", "1e-3"], [])}
        results["frozen"] = driver(args, data, tmp / "frozen", frozen_rm, frozen_flags)
        results["frozen_again"] = driver(args, data, tmp / "frozen_again", frozen_rm, frozen_flags)
        results["in_process"] = in_process(args, data, tmp / "frozen", cache)
        shared_cache = ["--feature_cache", str(tmp / "cache-shared"), "--dtype", "float32", "--shared_prefix", "True"]
        results["frozen_shared_prefix"] = driver(args, data, tmp / "frozen_shared", [*frozen_rm, *shared_cache],
                                                 shared_cache)
        results.update(readme_runs(args, data, tmp, frozen_head))
    if len({r["loops"] for r in results.values()}) > 1:
        print(f"bench_frozen: warning: the runs ran {[r['loops'] for r in results.values()]} loops: unequal work")
    lora = results["lora"]["seconds"]
    ratios = {"frozen_ser_run_speedup_first": lora / results["frozen"]["seconds"],
              "frozen_ser_run_speedup_driver_cached": lora / results["frozen_again"]["seconds"],
              "frozen_ser_run_speedup_cached": lora / results["in_process"]["seconds"],
              "frozen_ser_run_speedup_first_shared_prefix": lora / results["frozen_shared_prefix"]["seconds"],
              "frozen_ser_run_speedup_first_bf16": results["lora_bf16"]["seconds"] / results["frozen_bf16"]["seconds"],
              "lora_bf16_over_fp32": lora / results["lora_bf16"]["seconds"]}
    report = update_report(out, {"config": config(args), "model": "SmolLM2-135M-Instruct", "cpu_threads": os.cpu_count(),
                                 **results, **ratios,
                                 "featurising": {"config": {"featurise_lengths": args.featurise_lengths}, **feat}},
                           {**{k: round(v, 1) for k, v in ratios.items()}, **speedups})
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main(parse([Args])[0])
