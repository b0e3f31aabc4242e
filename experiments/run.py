"""Run a grid of SER experiments and write one row per (setting, variant, seed, loop).

    python -m experiments.run --grid synthetic               # the full synthetic grid (5 seeds)
    python -m experiments.run --grid hh-rlhf-smollm2         # SmolLM2 + LoRA RM on HH-RLHF rows
    python -m experiments.run --grid quick --results experiments/results-quick   # CI-sized smoke test

(run from the repository's root).

Every SER run (and every seed RM: the driver with no loop) is scripts/ser_loop.sh, run as a user runs it
with the variant's settings as environment variables; the rows are read back from the files it writes.
This module runs stage scripts itself only for what the driver does not do: the data, the SFT model, the
all-label RM, PPO and its evaluation. Checkpoints go to --workdir
(not committed); the rows go to RESULTS/results.json, rewritten atomically after every run. A rerun
skips every (setting, variant, seed) already in results.json, so an interrupted grid resumes where
it stopped. RESULTS/REPORT.md and the plots are then regenerated from results.json alone
(experiments/report.py).
"""

import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from experiments.report import write_report
from ser import tiny
from ser.cli import parse
from ser.data import read_records, subsample, write_json, write_records
from ser.run_config import git_revision
from ser.selection import STOP
from ser.stats import calibration, confidence_bin

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


@dataclass
class Args:
    grid: str = field(metadata={"help": "one of GRIDS: synthetic, synthetic-ppo, synthetic-ppo-tune(2), hh-rlhf-smollm2, quick",
                                "choices": ["synthetic", "synthetic-ppo", "synthetic-ppo-tune", "synthetic-ppo-tune2",
                                            "hh-rlhf-smollm2", "quick"]})
    seeds: list[int] = field(default_factory=list, metadata={"help": "data/model seeds; default: the grid's"})
    variants: list[str] = field(default_factory=list, metadata={"help": "run only these variants; default: all"})
    results: str = field(default="experiments/results", metadata={"help": "folder of results.json, REPORT.md, plots"})
    workdir: str = field(default="runs/experiments", metadata={"help": "checkpoints and intermediate files"})
    keep_checkpoints: bool = field(default=False, metadata={"help": "keep the RMs of finished runs in --workdir"})
    backfill_prompt_stats: bool = field(default=False, metadata={
        "help": "only add per-prompt gold gains and win rates to PPO rows made before rows recorded them, then report"})


# ----------------------------------------------------------------------------- variants

BASE = dict(kind="ser", fraction=0.15, loss="bt", probability="sigmoid", selection="paper", keep_seed=True,
            continue_from_previous=True, union=True)


def variant(**kw):
    return {**BASE, **kw}


# What each variant changes against `ser-paper`: the paper's loop (union of every loop's self-labels plus
# the human seed, each RM continuing from the previous one, one status per loop, p = sigmoid(r), BT loss).
SYNTHETIC_VARIANTS = {
    "seed": variant(kind="seed"),
    "full": variant(kind="full"),
    "ser-paper": variant(),
    "ser-released": variant(selection="released"),
    "ser-pairwise": variant(probability="pairwise"),
    "ser-hinge": variant(loss="hinge"),
    "ser-no-human-seed": variant(keep_seed=False),
    "ser-from-scratch": variant(continue_from_previous=False),
    "ser-continue": variant(union=False, keep_seed=False),  # continue on the newest self-labels only
    "seed@0.05": variant(kind="seed", fraction=0.05),
    "ser-paper@0.05": variant(fraction=0.05),
    "seed@0.30": variant(kind="seed", fraction=0.30),
    "ser-paper@0.30": variant(fraction=0.30),
}

# The grids ran with random RM batches, each one padded forward (rm_training.py's defaults then); pinned so
# that a resumed or extended grid keeps the protocol of the rows already in results.json.
RANDOM_BATCHES = ["--train_sampling_strategy", "random", "--forward_cost", "inf"]

# The demo's task and tiny model; the RM settings are the demo's (a 100k-parameter model trained from
# scratch needs all weights, lr 1e-3 and 8 epochs), fixed before any grid ran.
SYNTHETIC = dict(
    setting="synthetic", seeds=[0, 1, 2, 3, 4], variants=SYNTHETIC_VARIANTS, max_loops=3,
    data=dict(n_pairs=1200, n_eval=600, n_sft=2000, n_rl=256),
    sft=["--num_train_epochs", "2", "--per_device_train_batch_size", "32", "--learning_rate", "3e-3"],
    rm=["--use_lora", "False", "--per_device_train_batch_size", "16", "--per_device_eval_batch_size", "64",
        "--learning_rate", "1e-3", *RANDOM_BATCHES],
    seed_epochs=8, loop_epochs=8, max_length=512,
    filter=["--status1_min_pairs", "100", "--status2_min_pairs", "100"],
)

QUICK = {**SYNTHETIC, "setting": "synthetic-quick", "seeds": [0, 1],
         "variants": {k: SYNTHETIC_VARIANTS[k] for k in ("seed", "full", "ser-paper")},
         "data": dict(n_pairs=400, n_eval=200, n_sft=600, n_rl=16), "seed_epochs": 4, "loop_epochs": 4,
         "filter": ["--status1_min_pairs", "30", "--status2_min_pairs", "30"]}

# SmolLM2-135M-Instruct with a LoRA RM (r 8, alpha 32, dropout 0.1) on HH-RLHF helpful rows. Sizes are set
# by the compute of 2 CPU cores; lr 1e-4 (TRL's LoRA default) and 256 tokens were chosen before any run.
# The instruct model is the RM's starting point (it is already instruction-tuned; no SFT stage is run).
HH = dict(
    setting="hh-rlhf-smollm2", seeds=[0, 1],
    variants={k: SYNTHETIC_VARIANTS[k] for k in ("seed", "ser-paper", "full")}, max_loops=3,
    data=dict(pool=600, evaluation=500),
    rm=["--use_lora", "True", "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "16",
        "--learning_rate", "1e-4", "--bf16", "True", *RANDOM_BATCHES],
    seed_epochs=2, loop_epochs=2, max_length=256,
    filter=["--status1_min_pairs", "60", "--status2_min_pairs", "60", "--batch_size", "16"],
)

# Downstream: PPO of the SFT policy against the seed, ser-paper and all-label RMs of the synthetic grid
# (the demo's PPO settings), judged by the hidden gold reward against SFT. Each RM under PPO's old defaults
# (raw rewards, Ziegler et al.'s KL horizon of 10000 samples, KL target 6), under `target6` (rewards normalised on
# SFT samples, a horizon of a tenth of the run, KL target 6), under `kl3` (the same with KL target 3), under
# today's defaults (`new`: `kl3` with a step's PPO epochs stopped early on KL), and for SER the ensemble of its
# loops' RMs (mean - std of their scores) at `kl3` and at today's defaults (`ensemble-new`). The rows named
# ppo:seed, ppo:ser-paper and ppo:full (3 seeds) were run before the configurations existed, with the old
# defaults. Two pre-registered rounds chose today's defaults: KL target 3 among `target6`, `kl3`, `early` and
# `budget` on seeds 5-9 (grid synthetic-ppo-tune, experiments/results/PREREGISTRATION-ppo-defaults.md, where
# `target6` is called `new`), then early stopping (`kl3-early` against `kl3`) on seeds 10-14 (grid
# synthetic-ppo-tune2, PREREGISTRATION-ppo-round2.md, confirmed on seeds 0-4 and 15-19). Each configuration
# names the flags it ran with, so it reruns as it ran.
OFF = ["--early_stopping", "False"]  # early stopping became a default after these configurations ran
PPO_CONFIGS = {"old": ["--normalize_reward", "none", "--kl_horizon", "10000", "--kl_target", "6", *OFF],
               "target6": ["--kl_target", "6", *OFF], "kl3": ["--kl_target", "3", *OFF], "new": [],
               "ensemble": ["--reward_ensemble", "mean_minus_std", "--kl_target", "3", *OFF],
               "ensemble-new": ["--reward_ensemble", "mean_minus_std"],
               "early": ["--early_stopping", "True", "--kl_target", "6"],
               "budget": ["--kl_budget", "12", "--save_freq", "10", "--kl_target", "6", *OFF],
               "kl3-early": ["--early_stopping", "True", "--kl_target", "3"]}
PPO_KINDS = ("seed", "ser-paper", "full")
SYNTHETIC_PPO = {**SYNTHETIC, "setting": "synthetic-ppo", "seeds": [0, 1, 2, 3, 4],
                 "variants": {**{f"ppo:{k}@{c}": SYNTHETIC_VARIANTS[k] for k in PPO_KINDS for c in ("old", "target6", "kl3", "new")},
                              **{f"ppo:ser-paper@{c}": SYNTHETIC_VARIANTS["ser-paper"] for c in ("ensemble", "ensemble-new")}},
                 "ppo": ["--steps", "80", "--batch_size", "32", "--mini_batch_size", "8", "--gradient_accumulation_steps",
                         "1", "--ppo_epochs", "4", "--learning_rate", "3e-3", "--init_kl_coef", "0.1",
                         "--output_max_length", "24", "--save_freq", "0"]}
# the tuning set of the KL choice (run with --results experiments/results-ppo-tune); its `new` rows ran when the
# default target was 6, and are `target6` today
SYNTHETIC_PPO_TUNE = {**SYNTHETIC_PPO, "seeds": [5, 6, 7, 8, 9],
                      "variants": {f"ppo:{k}@{c}": SYNTHETIC_VARIANTS[k] for k in PPO_KINDS
                                   for c in ("target6", "kl3", "early", "budget")}}
# the second round's tuning set (PREREGISTRATION-ppo-round2.md; run with --results experiments/results-ppo-tune2)
SYNTHETIC_PPO_TUNE2 = {**SYNTHETIC_PPO, "seeds": [10, 11, 12, 13, 14],
                       "variants": {f"ppo:{k}@{c}": SYNTHETIC_VARIANTS[k] for k in PPO_KINDS for c in ("kl3", "kl3-early")}}

GRIDS = {"synthetic": SYNTHETIC, "synthetic-ppo": SYNTHETIC_PPO, "synthetic-ppo-tune": SYNTHETIC_PPO_TUNE,
         "synthetic-ppo-tune2": SYNTHETIC_PPO_TUNE2, "quick": QUICK, "hh-rlhf-smollm2": HH}
CPU = ["--use_cpu", "True", "--bf16", "False", "--gradient_checkpointing", "False", "--report_to", "none",
       "--disable_tqdm", "True", "--save_strategy", "no"]


# ----------------------------------------------------------------------------- data and models per seed


def stage(script: str, *args) -> None:
    """Run one stage script in its own process, from the repository's root, as the loop driver does."""
    cmd = [sys.executable, str(ROOT / script), *map(str, args)]
    env = {**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "disabled"), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env)
    if proc.returncode:
        raise SystemExit(f"experiments: {script} exited with {proc.returncode}: {' '.join(cmd)}")


def prepare_synthetic(grid, seed, fraction, work: Path):
    data = work / f"data@{fraction}"
    if not (data / "manifest.json").is_file():
        sizes = [a for k, v in grid["data"].items() for a in (f"--{k}", v)]
        stage("data/make_synthetic.py", "--out", data, "--labeled_fraction", fraction, "--seed", seed, *sizes)
    base = work / "base"
    if not (base / "config.json").is_file():
        tiny.build(tiny.Args(out=str(base), seed=seed))
    sft_dir = work / "sft"
    if not (sft_dir / "run_args.json").is_file():  # sft.py writes it last
        stage("sft.py", "--model_name", base, "--dataset_name", data, "--output_dir", sft_dir, "--seed", seed,
              *grid["sft"], *CPU)
    return data, sft_dir


def prepare_hh(grid, seed, fraction, work: Path):
    """Prepared HH-RLHF (the three helpful subsets), split by conversation root with this seed; the pool
    and the held-out pairs cut to the grid's sizes (a seeded sample of each)."""
    data = work / f"data@{fraction}"
    if not (data / "manifest.json").is_file():
        tmp = work / f"prepared@{fraction}"
        shutil.rmtree(tmp, ignore_errors=True)
        stage("data/prepare.py", "--dataset", "hh-rlhf", "--source", SHARED / "data" / "raw" / "hh_rlhf", "--out", tmp,
              "--labeled_fraction", fraction, "--eval_fraction", 0.12, "--finetune_fraction", 0.0,
              "--rl_fraction", 0.0, "--seed", seed)
        pool = read_records(tmp / "data" / "reward_full" / "train.jsonl")
        keep = {r["id"] for r in subsample(pool, grid["data"]["pool"], seed)}
        for split in ("reward", "unlabeled", "reward_full"):
            rows = [r for r in read_records(tmp / "data" / split / "train.jsonl") if r["id"] in keep]
            write_records(data / "data" / split / "train.jsonl", rows)
        evaluation = subsample(read_records(tmp / "data" / "evaluation" / "train.jsonl"),
                               grid["data"]["evaluation"], seed)
        write_records(data / "data" / "evaluation" / "train.jsonl", evaluation)
        write_json(data / "manifest.json", {**json.loads((tmp / "manifest.json").read_text()),
                                            "cut_to": grid["data"]})
        shutil.rmtree(tmp)
    model = ROOT / "models" / "smollm2-135m-instruct"
    stage("scripts/get_base_model.py", "--out", model, "--cache", ROOT / "models" / ".downloads")
    return data, model


# ----------------------------------------------------------------------------- one run


def train_rm(grid, out: Path, init, sources, epochs, loss, seed, train_subset="data/reward", eval_data=None,
             tokenizer=None):
    if (out / "eval_results.json").is_file():
        return json.loads((out / "eval_results.json").read_text())
    shutil.rmtree(out, ignore_errors=True)
    stage("rm_training.py", "--model_name", init, "--dataset_name", *sources, "--train_subset", train_subset,
          "--eval_subset", eval_data, "--output_dir", out, "--num_train_epochs", epochs,
          "--max_length", grid["max_length"], "--loss", loss, "--seed", seed,
          *(["--tokenizer_name", tokenizer] if tokenizer else []), *CPU, *grid["rm"])  # the later flag wins
    return json.loads((out / "eval_results.json").read_text())


def eval_row(rm_dir: Path) -> dict:
    """Accuracy, ties and calibration on the held-out pairs, from the RM's per-pair scores."""
    res = json.loads((rm_dir / "eval_results.json").read_text())
    scores = read_records(rm_dir / "eval_scores.jsonl")
    diffs = [r["reward_j"] - r["reward_k"] for r in scores]
    ece, reliability = calibration(diffs)
    return {"accuracy": res["accuracy"], "tie_rate": res["tie_rate"], "n_eval": res["pairs"],
            "correct": "".join("1" if d > 0 else "0" for d in diffs), "ece": ece, "reliability": reliability}


def selection_row(loop_dir: Path, seed_scores: dict, gold_fn) -> dict:
    """What the loop selected: precision against the hidden human labels by confidence, against the gold
    reward (synthetic), and how much of it the seed RM already preferred."""
    stats = json.loads((loop_dir / "stats.json").read_text())
    selected = read_records(loop_dir / "selected.jsonl")
    bins = [[0, 0] for _ in range(10)]
    gold_hits = seed_hits = seed_n = 0
    for s in selected:
        _, b = confidence_bin(s["reward_j"] - s["reward_k"])
        if "gold_preferred" in s:
            bins[b][0] += 1
            bins[b][1] += s["gold_preferred"] == "j"
        if gold_fn:
            gold_hits += gold_fn(s["question"], s["response_j"]) > gold_fn(s["question"], s["response_k"])
        r0 = seed_scores.get(s["id"])
        if r0:
            seed_n += 1
            seed_hits += r0[s["response_j"]] > r0[s["response_k"]]
    return {"status": stats["status"], "selected": stats["selected"],
            "pseudo_label_precision": stats["pseudo_label_precision"],
            "gold_precision": gold_hits / len(selected) if gold_fn and selected else None,
            "seed_rm_agreement": seed_hits / seed_n if seed_n else None,
            "precision_by_confidence": [{"pairs": m, "precision": c / m if m else None} for m, c in bins]}


def driver_env(grid, spec, seed, data: Path, start_model: Path, run: Path, max_loops: int) -> dict:
    """The settings of scripts/ser_loop.sh for one variant, as environment variables."""
    rm_args = [*CPU, *grid["rm"], "--loss", spec["loss"], "--seed", str(seed)]
    filter_args = [*grid["filter"], "--probability", spec["probability"], "--selection", spec["selection"]]
    return {**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "disabled"), "TOKENIZERS_PARALLELISM": "false",
            "DATA": str(data), "SFT": str(start_model), "RUN": str(run), "MAX_LOOPS": str(max_loops),
            "KEEP_SEED": str(int(spec["keep_seed"])), "CONTINUE": str(int(spec["continue_from_previous"])),
            "UNION": str(int(spec["union"])), "MAX_LENGTH": str(grid["max_length"]),
            "SEED_EPOCHS": str(grid["seed_epochs"]), "LOOP_EPOCHS": str(grid["loop_epochs"]),
            "RM_ARGS": shlex.join(rm_args), "FILTER_ARGS": shlex.join(filter_args),
            "PY": sys.executable, "LAUNCH": sys.executable}


def ser_loop(env: dict) -> None:
    """scripts/ser_loop.sh, as a user runs it; it skips what a previous, interrupted call finished."""
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "ser_loop.sh")], cwd=ROOT, env=env)
    if proc.returncode:
        raise SystemExit(f"experiments: scripts/ser_loop.sh exited with {proc.returncode} (RUN={env['RUN']})")


def wall_s(run: Path, t: int) -> float:
    return sum(json.loads(p.read_text())["ms"] for p in run.glob(f".wall.loop_{t}.*.json")) / 1000


def run_variant(grid, name, spec, seed, work: Path, data: Path, start_model: Path, seed_rms: dict):
    """Rows for one (variant, seed), read from the files of scripts/ser_loop.sh: Loop 0, then each loop until
    Stop or max_loops. Loop 0's RM is trained once per seed, fraction and loss (the driver with no loop) and
    copied into each SER run, whose driver then skips Loop 0."""
    setting = grid["setting"]
    gold_fn = None
    if setting.startswith("synthetic"):
        from ser.synthetic import gold_reward as gold_fn
    base_row = {"setting": setting, "variant": name, "seed": seed, "fraction": spec["fraction"]}
    if spec["kind"] == "full":
        t0 = time.perf_counter()
        out = work / "full"
        train_rm(grid, out, start_model, [data], grid["seed_epochs"], spec["loss"], seed, "data/reward_full",
                 data / "data" / "evaluation")
        return [{**base_row, "loop": 0, **eval_row(out), "status": "full", "selected": 0,
                 "pseudo_label_precision": None, "wall_s": time.perf_counter() - t0}]
    seed_run = work / f"seed-rm@{spec['fraction']}-{spec['loss']}"
    ser_loop(driver_env(grid, variant(fraction=spec["fraction"], loss=spec["loss"]), seed, data, start_model, seed_run,
                        max_loops=0))
    seed_rms[(spec["fraction"], spec["loss"])] = seed_run / "loop_0" / "rm"
    rows = [{**base_row, "loop": 0, **eval_row(seed_run / "loop_0" / "rm"), "status": "seed", "selected": 0,
             "pseudo_label_precision": None, "wall_s": wall_s(seed_run, 0)}]
    if spec["kind"] == "seed":
        return rows
    run = work / name
    if not (run / "loop_0" / "rm" / "eval_results.json").is_file():
        shutil.rmtree(run / "loop_0", ignore_errors=True)
        shutil.copytree(seed_run / "loop_0", run / "loop_0")
    ser_loop(driver_env(grid, spec, seed, data, start_model, run, grid["max_loops"]))
    # RM_0's scores of the whole pool: did the seed RM already prefer what later loops select?
    seed_scores = {r["id"]: {r["response_j"]: r["reward_j"], r["response_k"]: r["reward_k"]}
                   for r in read_records(run / "loop_1" / "scored.jsonl")}
    selected = 0
    for t in range(1, grid["max_loops"] + 1):
        loop = run / f"loop_{t}"
        if not (loop / "stats.json").is_file():
            break
        sel = selection_row(loop, seed_scores, gold_fn)
        if sel["status"] == STOP:
            rows.append({**base_row, "loop": t, "accuracy": None, "tie_rate": None, "n_eval": None, **sel,
                         "wall_s": wall_s(run, t)})
            break
        selected += sel["selected"]
        rows.append({**base_row, "loop": t, **eval_row(loop / "rm"), **sel, "selected_total": selected,
                     "wall_s": wall_s(run, t)})
    return rows


def prompt_stats(out: Path, row: dict) -> dict:
    """Per held-out prompt, PPO's gold reward minus SFT's (means over each prompt's samples) and PPO's gold win
    rate against SFT (its i-th sample against SFT's i-th, ties apart), from the samples ppo/evaluate.py wrote
    (OUT/eval_policy.{base,policy}.jsonl), scored by the synthetic task's gold reward as evaluate.py scores them.
    Every seed answers the same prompts, so the report's intervals can count both seeds and prompts. Refused
    unless the samples reproduce the row's mean gold rewards and win rate."""
    from ser.synthetic import gold_reward

    samples = {name: read_records(out / f"eval_policy.{name}.jsonl") for name in ("base", "policy")}
    gold = {name: [gold_reward(r["question"], r["response"]) for r in rs] for name, rs in samples.items()}
    questions = [r["question"] for r in samples["base"]]
    if questions != [r["question"] for r in samples["policy"]]:
        raise ValueError(f"{out}: PPO's and SFT's samples answer different prompts")
    wins = [a > b for a, b in zip(gold["policy"], gold["base"])]
    for name, got, want in (("SFT's mean gold reward", gold["base"], "sft_gold_reward"),
                            ("PPO's mean gold reward", gold["policy"], "ppo_gold_reward"),
                            ("PPO's gold win rate", wins, "gold_win_rate")):
        if abs(sum(got) / len(got) - row[want]) > 1e-9:
            raise ValueError(f"{out}: the samples' {name} ({sum(got) / len(got)}) is not the run's ({row[want]})")
    by_prompt = {}
    for q, a, b, w in zip(questions, gold["policy"], gold["base"], wins):
        by_prompt.setdefault(q, []).append((a - b, w))
    prompts = sorted(by_prompt.items())
    return {"gold_gain_by_prompt": {q: sum(d for d, _ in v) / len(v) for q, v in prompts},
            "gold_win_by_prompt": {q: sum(w for _, w in v) / len(v) for q, v in prompts}}


def run_ppo(grid, name, spec, seed, work: Path, data: Path, sft_dir: Path, seed_rms: dict):
    """PPO against the RM of one variant, then the policy against SFT by the gold reward (one row)."""
    rm_variant, _, config = name.removeprefix("ppo:").partition("@")
    rm_grid = {**grid, "setting": "synthetic"}
    t0 = time.perf_counter()
    rows = run_variant(rm_grid, rm_variant, spec, seed, work / "ppo-rms", data, sft_dir, seed_rms)
    final = max((r for r in rows if r.get("accuracy") is not None), key=lambda r: r["loop"])
    if rm_variant == "full":
        rm_dir = work / "ppo-rms" / "full"
    elif final["loop"] == 0:  # a seed RM, or a SER run that stopped before its first retraining
        rm_dir = seed_rms[(spec["fraction"], spec["loss"])]
    else:
        rm_dir = work / "ppo-rms" / rm_variant / f"loop_{final['loop']}" / "rm"
    members = [rm_dir]
    if config.startswith("ensemble"):  # every loop's RM, Loop 0's included
        members = [work / "ppo-rms" / rm_variant / f"loop_{t}" / "rm" for t in range(final["loop"] + 1)]
    out = work / name.replace(":", "-")
    shutil.rmtree(out, ignore_errors=True)
    stage("ppo/ppo.py", "--model_name", sft_dir, "--reward_model_name", *members, "--dataset_name", data,
          "--output_dir", out, "--seed", seed, "--gold", "synthetic", *grid["ppo"], *PPO_CONFIGS.get(config, []))
    steps = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if line.strip()]
    full_rm = work / "ppo-rms" / "full"
    if not (full_rm / "eval_results.json").is_file():
        run_variant(rm_grid, "full", SYNTHETIC_VARIANTS["full"], seed, work / "ppo-rms", data, sft_dir, seed_rms)
    stage("ppo/evaluate.py", "--base_model", sft_dir, "--policy", out / "policy", "--reward_model_name", rm_dir,
          "--judge_reward_model", full_rm, "--dataset_name", data, "--gold", "synthetic",
          "--samples_per_prompt", 16, "--seed", seed, "--output", out / "eval_policy.json")
    summary = json.loads((out / "eval_policy.json").read_text())
    judged = summary["judged_by"]
    row = {"setting": grid["setting"], "variant": name, "seed": seed, "fraction": spec["fraction"], "loop": final["loop"],
           "rm_accuracy": final["accuracy"], "accuracy": None, "tie_rate": None, "n_eval": summary["samples"],
           "status": "ppo", "selected": None, "pseudo_label_precision": None,
           "sft_gold_reward": summary["base"]["gold_reward"], "ppo_gold_reward": summary["policy"]["gold_reward"],
           "gold_win_rate": judged["gold"]["win_rate"], "gold_tie_rate": judged["gold"]["tie_rate"],
           "full_rm_win_rate": judged["judge_rm"]["win_rate"], "policy_rm_win_rate": judged["policy_rm"]["win_rate"],
           "kl_to_sft": summary["kl_to_base"], "ppo_config": config or "old", "ensemble_members": len(members),
           "step_kl_median": statistics.median(r["objective/kl"] for r in steps),
           "gold_by_step": [r.get("gold/reward_mean") for r in steps], "kl_by_step": [r["objective/kl"] for r in steps],
           "proxy_by_step": [r["env/reward_mean"] for r in steps]}
    return [{**row, **prompt_stats(out, row), "wall_s": time.perf_counter() - t0}]


# ----------------------------------------------------------------------------- the grid


def edit_rows(path: Path, edit) -> list:
    """results.json's rows replaced by `edit(rows)`, under a lock: grids of other settings may be writing to the
    same file at the same time. Returns every row."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(".results.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        rows = edit(json.loads(path.read_text())["rows"] if path.is_file() else [])
        write_json(path, {"rows": rows})
    return rows


def save_rows(path: Path, new: list, key: tuple) -> list:
    """Replace the rows of run `key` (setting, variant, seed) in results.json by `new`."""
    return edit_rows(path, lambda rows: [r for r in rows if (r["setting"], r["variant"], r["seed"]) != key] + new)


def backfill_prompt_stats(path: Path, workdir: Path) -> None:
    """Add the per-prompt gold gains and win rates to the PPO rows made before rows recorded them, from the
    samples their runs left in --workdir. A row's folder is the one its variant names; a `target6` row may have
    run as `new` (the name of those defaults then). `prompt_stats` checks the samples against the row's mean
    gold rewards and win rate, so only a folder holding that row's run is used. Rows whose run left no such
    folder are counted and keep intervals over seeds alone in the report."""
    counts = {"filled": 0, "had": 0, "no_folder": 0}

    def fill(rows):
        for r in rows:
            if r["status"] != "ppo" or r["setting"] != "synthetic-ppo":
                continue
            if "gold_win_by_prompt" in r:
                counts["had"] += 1
                continue
            work = workdir / r["setting"] / f"seed{r['seed']}"
            folder = r["variant"].replace(":", "-")
            candidates = [folder] + ([folder.replace("@target6", "@new")] if folder.endswith("@target6") else [])
            for name in candidates:
                if (work / name / "eval_policy.policy.jsonl").is_file():
                    try:
                        r.update(prompt_stats(work / name, r))
                    except ValueError as e:
                        print(f"experiments: {r['variant']} seed {r['seed']}: {name} is another run ({e})")
                        continue
                    counts["filled"] += 1
                    break
            else:
                counts["no_folder"] += 1
                print(f"experiments: {r['variant']} seed {r['seed']}: no run folder reproduces its gold rewards")
        return rows

    edit_rows(path, fill)
    print(f"experiments: per-prompt gold gains and win rates: {counts['filled']} rows filled, {counts['had']} had them, "
          f"{counts['no_folder']} without a run folder (their intervals stay over seeds)")


def main(args: Args):
    grid = GRIDS[args.grid]
    revision = git_revision(ROOT) or "unknown"
    results_dir = Path(args.results)
    path = results_dir / "results.json"
    rows = json.loads(path.read_text())["rows"] if path.is_file() else []
    done = {(r["setting"], r["variant"], r["seed"]) for r in rows}
    seeds = args.seeds or grid["seeds"]
    names = args.variants or list(grid["variants"])
    unknown = [n for n in names if n not in grid["variants"]]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; this grid has {list(grid['variants'])}")
    prepare_fn = prepare_hh if grid["setting"].startswith("hh") else prepare_synthetic
    if args.backfill_prompt_stats:
        backfill_prompt_stats(path, Path(args.workdir))
        seeds = []  # nothing runs: the report is redone from the rows
    for seed in seeds:
        work = Path(args.workdir) / grid["setting"] / f"seed{seed}"
        seed_rms = {}
        for name in names:
            if (grid["setting"], name, seed) in done:
                print(f"experiments: {grid['setting']} {name} seed {seed}: in results.json, skipped", flush=True)
                continue
            spec = grid["variants"][name]
            print(f"experiments: {grid['setting']} {name} seed {seed}", flush=True)
            data, start_model = prepare_fn(grid, seed, spec["fraction"], work)
            runner = run_ppo if grid["setting"] == "synthetic-ppo" else run_variant
            new = [{**r, "git_rev": revision} for r in runner(grid, name, spec, seed, work, data, start_model, seed_rms)]
            save_rows(path, new, (grid["setting"], name, seed))  # after every run: an interruption loses at most it
            if not args.keep_checkpoints and spec["kind"] == "ser":
                shutil.rmtree(work / name, ignore_errors=True)
    # docs/results.md shows the committed study only, not a smoke test's folder
    write_report(results_dir, ROOT / "docs" / "results.md"
                 if results_dir.resolve() == (ROOT / "experiments" / "results").resolve() else None)


if __name__ == "__main__":
    main(*parse([Args]))
