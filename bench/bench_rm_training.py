"""RM training: TRL's RewardTrainer with its defaults against rm_training.py's, on SmolLM2-135M LoRA.

    python -m bench.bench_rm_training [--pairs 128] [--repeats 3]

Both train the same LoRA RM (rm_training.load_model: r 8, score head trained) on the same real HH-RLHF
pairs (cap 512, questions cut from the left), for one epoch of the same number of steps, with the same
batch size, learning rate and bf16 autocast, activation checkpointing off in both:
* trl: `trl.RewardTrainer` with its default collator and random batches;
* ours: `rm_training.PairwiseRewardTrainer` with its defaults (length-grouped batches, each run as forwards
  of similar length).
The runs alternate (trl, ours, trl, ...) and each method's best counts. The padding share is, for trl, that
of one epoch of batches as its dataloader draws them, and for ours, that of what its forwards ran. Each finished run is saved to
bench/results/rm_training.partial.json, so a killed bench resumes with the next run. Writes
bench/results/rm_training.json and merges its keys into bench/results/summary.json.
"""

import json
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

import rm_training
from bench.bench_scoring import SHARED, hh_pairs
from bench.summary import merge_into_summary, portable
from ser.cli import parse
from ser.data import write_text
from ser.modeling import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]

METHODS = ("trl", "ours")


@dataclass
class Args:
    model: str = field(default=str(ROOT / "models" / "smollm2-135m-instruct"),
                       metadata={"help": "SFT model folder (a fresh score head is added; `make base-model`)"})
    pairs: int = field(default=128, metadata={"help": "HH-RLHF training pairs (one epoch)"})
    batch_size: int = field(default=8, metadata={"help": "pairs per step"})
    max_length: int = field(default=512, metadata={"help": "token cap"})
    repeats: int = field(default=3, metadata={"help": "alternating runs of each method"})
    bf16: bool = field(default=True, metadata={"help": "bf16 autocast (fp32 master weights)"})
    out: str = field(default=str(ROOT / "bench" / "results"), metadata={"help": "results folder"})


def trainer_for(method, args, dataset, tok, workdir):
    from trl import RewardConfig, RewardTrainer

    common = dict(output_dir=str(workdir), use_cpu=True, bf16=args.bf16, gradient_checkpointing=False,
                  per_device_train_batch_size=args.batch_size, num_train_epochs=1, learning_rate=2e-5,
                  max_length=args.max_length, seed=0, report_to="none", save_strategy="no", disable_tqdm=True,
                  logging_strategy="no")
    config = rm_training.RMConfig(**common) if method == "ours" else RewardConfig(**common)
    script, model_args = rm_training.ScriptArguments(model_name=args.model, dataset_name=[]), rm_training.ModelArguments()
    torch.manual_seed(0)
    model = rm_training.load_model(script, model_args, rm_training.RMConfig(**common), tok)
    if method == "ours":
        return rm_training.PairwiseRewardTrainer(model=model, args=config, train_dataset=dataset, processing_class=tok)
    return RewardTrainer(model=model, args=config, train_dataset=dataset.remove_columns("length"), processing_class=tok)


def padding_share(trainer):
    real = padded = 0
    for batch in trainer.get_train_dataloader():
        real, padded = real + batch["attention_mask"].sum().item(), padded + batch["attention_mask"].numel()
    return 1 - real / padded


def main(args: Args):
    if not (SHARED / "raw" / "hh_rlhf").is_dir():
        print(f"skipped: the real HH-RLHF rows are read from {SHARED / 'raw' / 'hh_rlhf'}, which is absent")
        return None
    if not (Path(args.model) / "config.json").is_file():
        print(f"skipped: {args.model} is missing (make base-model)")
        return None
    tok = load_tokenizer(args.model)
    dataset, _ = rm_training.tokenize_pairs(hh_pairs(args.pairs), tok, args.max_length)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    partial = out / "rm_training.partial.json"
    config = portable({**asdict(args), "pairs": len(dataset)})
    config.pop("out")
    saved = json.loads(partial.read_text()) if partial.is_file() else {}
    runs = saved["runs"] if saved.get("config") == config else []
    for r in range(args.repeats):
        for method in METHODS:
            if any(x["repeat"] == r and x["method"] == method for x in runs):
                continue
            with tempfile.TemporaryDirectory() as workdir:
                trainer = trainer_for(method, args, dataset, tok, workdir)
                share = padding_share(trainer) if method == "trl" else None
                t = time.perf_counter()
                result = trainer.train()
                seconds = time.perf_counter() - t
                if method == "ours":  # what its forwards ran, each batch split by length
                    share = 1 - trainer.tokens["real"] / trainer.tokens["padded"]
            runs.append({"repeat": r, "method": method, "seconds": seconds, "steps": result.global_step,
                         "train_loss": result.training_loss, "padding_share": share})
            print(f"run {r + 1}/{args.repeats} {method}: {seconds:.1f} s, {result.global_step} steps, "
                  f"padding {share:.1%}", flush=True)
            write_text(partial, json.dumps({"config": config, "runs": runs}, indent=1) + "\n")  # whole or not at all
    best = {m: min(x["seconds"] for x in runs if x["method"] == m) for m in METHODS}
    share = {m: next(x["padding_share"] for x in runs if x["method"] == m) for m in METHODS}
    result = {"config": config, "runs": runs, "best_seconds": best, "padding_share": share,
              "rm_train_speedup_vs_trl": best["trl"] / best["ours"], "rm_train_padding_share": share["ours"]}
    (out / "rm_training.json").write_text(json.dumps(result, indent=1) + "\n")
    merge_into_summary(out, {k: result[k] for k in ("rm_train_speedup_vs_trl", "rm_train_padding_share")})
    partial.unlink()
    print(f"{len(dataset)} HH-RLHF pairs, {Path(args.model).name} LoRA, batch {args.batch_size}, cap {args.max_length}, "
          f"best of {args.repeats} alternating runs: trl {best['trl']:.1f} s, ours {best['ours']:.1f} s "
          f"({result['rm_train_speedup_vs_trl']:.2f}x); padding trl {share['trl']:.1%}, ours {share['ours']:.1%}")
    return result


if __name__ == "__main__":
    main(parse([Args])[0])
