"""Where pool scoring's time goes: torch's profiler over our two scorers on the bench's pairs and model.

    python -m bench.profile_scoring [--pairs 200]

Runs `score_pairs` plain (length-sorted) and with `shared_prefix`, each once to warm up and once under
`torch.profiler`, on SmolLM2-135M with bf16 autocast, and writes the top operators by self CPU time, the
forward calls and the positions each ran to bench/results/scoring_profile.md.
"""

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench.bench_scoring import SHARED, hh_pairs
from ser.cli import parse
from ser.modeling import THIS_PROCESS_ONLY, load_tokenizer
from ser.scoring import score_pairs

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Args:
    model: str = field(default=str(ROOT / "models" / "smollm2-135m-instruct"), metadata={"help": "model folder"})
    pairs: int = field(default=200, metadata={"help": "HH-RLHF pairs"})
    batch_size: int = field(default=32, metadata={"help": "batch size"})
    top: int = field(default=8, metadata={"help": "operators listed per scorer"})
    out: str = field(default=str(ROOT / "bench" / "results" / "scoring_profile.md"), metadata={"help": "report"})


def main(args: Args):
    if not (SHARED / "raw" / "hh_rlhf").is_dir() or not (Path(args.model) / "config.json").is_file():
        print("skipped: needs the HH-RLHF rows in ../shared/data and the SmolLM2 folder (make base-model)")
        return
    from transformers import AutoModelForSequenceClassification

    pairs = hh_pairs(args.pairs)
    tok = load_tokenizer(args.model)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=1, dtype=torch.float32).eval()
    model.config.pad_token_id = tok.pad_token_id
    calls = []
    model.register_forward_hook(lambda m, inp, kw, out: calls.append(kw["input_ids"].numel()), with_kwargs=True)
    lines = [f"# Where scoring's time goes ({len(pairs)} HH-RLHF pairs, {Path(args.model).name}, bf16 autocast, "
             f"batch {args.batch_size})", ""]
    for name, shared in (("length-sorted", False), ("shared prefix", True)):
        def run():
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                return score_pairs(model, tok, pairs, 512, args.batch_size, THIS_PROCESS_ONLY, shared_prefix=shared)[2]
        run()
        calls.clear()
        start = time.perf_counter()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            stats = run()
        seconds = time.perf_counter() - start
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top, max_name_column_width=40)
        lines += [f"## {name}: {seconds:.1f} s under the profiler, {len(calls)} forward calls, "
                  f"{sum(calls):,} positions run (padding share {stats['padding_share']:.1%})", "", "```",
                  table.strip(), "```", ""]
        print(lines[-5], flush=True)
    Path(args.out).write_text("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main(parse([Args])[0])
