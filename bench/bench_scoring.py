"""Scoring cost: file-order batches (the released filter) vs length-sorted batches (ser.modeling.score).

    python bench/bench_scoring.py [--pairs 1000]

Scores both responses of real HH-RLHF pairs (../shared/data) with a tiny Llama that uses the real
Llama tokenizer, both ways, side by side in one process, and prints the padding share of processed
tokens and the wall-time ratio. Machines here are noisy: read the ratio, not the seconds.
"""

import gzip
import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ser import tiny
from ser.cli import parse
from ser.data import encode, split_transcript
from ser.modeling import THIS_PROCESS_ONLY, load_reward_model, load_tokenizer, score

ROOT = Path(__file__).resolve().parents[1]

SHARED = ROOT.parent / "shared" / "data"


@dataclass
class Args:
    pairs: int = field(default=1000, metadata={"help": "HH-RLHF pairs to score (both sides)"})
    max_length: int = field(default=512, metadata={"help": "token cap"})
    file_order_batch: int = field(default=50, metadata={"help": "batch size of the released pipeline"})
    sorted_batch: int = field(default=50, metadata={"help": "batch size of the length-sorted scorer"})
    repeats: int = field(default=3, metadata={"help": "alternating repeats of each method"})


@torch.no_grad()
def file_order(model, tok, questions, responses, max_length, batch):
    """One side per run, batches in file order, padded to the longest in the batch."""
    real = padded = 0
    for i in range(0, len(questions), batch):
        seqs = [encode(tok, q, r, max_length)["input_ids"] for q, r in zip(questions[i:i + batch], responses[i:i + batch])]
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), tok.pad_token_id)
        for row, s in enumerate(seqs):
            ids[row, :len(s)] = torch.tensor(s)
        model(input_ids=ids, attention_mask=(ids != tok.pad_token_id).long())
        real, padded = real + sum(map(len, seqs)), padded + ids.numel()
    return 1 - real / padded


def main(args: Args):
    hh = sorted((SHARED / "raw" / "hh_rlhf").glob("helpful-*_test.jsonl.gz"))
    tok_dir = SHARED / "models" / "tinyllama-1.1b-chat-v1.0-tokenizer"
    if not hh or not tok_dir.is_dir():
        print(f"skipped: real HH-RLHF rows and the Llama tokenizer are read from {SHARED}, which is absent")
        return
    rows = []
    for path in hh:
        with gzip.open(path, "rt") as f:
            rows += [json.loads(line) for line in f]
    pairs = []
    for r in rows:
        (q, a), (_, b) = split_transcript(r["chosen"]), split_transcript(r["rejected"])
        if q and a and b:
            pairs.append((q, a, b))
        if len(pairs) == args.pairs:
            break
    with tempfile.TemporaryDirectory() as tmp:
        tiny.build(tiny.Args(out=tmp, tokenizer=str(tok_dir)))
        tok = load_tokenizer(tmp)
        model = load_reward_model(tmp, tok)  # a fresh score head: cost does not depend on the weights
    qs = [p[0] for p in pairs]
    times = {"file order": [], "length-sorted": []}
    for _ in range(args.repeats):  # alternate, so drift in machine load hits both
        t = time.perf_counter()
        pad_file = file_order(model, tok, qs, [p[1] for p in pairs], args.max_length, args.file_order_batch)
        file_order(model, tok, qs, [p[2] for p in pairs], args.max_length, args.file_order_batch)
        times["file order"].append(time.perf_counter() - t)
        t = time.perf_counter()
        _, stats = score(model, tok, qs * 2, [p[1] for p in pairs] + [p[2] for p in pairs], args.max_length,
                         args.sorted_batch, THIS_PROCESS_ONLY)
        times["length-sorted"].append(time.perf_counter() - t)
    best = {k: min(v) for k, v in times.items()}
    print(f"{len(pairs)} HH-RLHF pairs ({2 * len(pairs)} sequences), Llama tokenizer, cap {args.max_length}, "
          f"{stats['truncated']} sequences cut from the left")
    print(f"file order, batch {args.file_order_batch}:    padding share {100 * pad_file:5.1f} %  best {best['file order']:.2f} s")
    print(f"length-sorted, batch {args.sorted_batch}: padding share {100 * stats['padding_share']:5.1f} %  "
          f"best {best['length-sorted']:.2f} s")
    print(f"speed-up (file order / length-sorted, best of {args.repeats} alternating runs): "
          f"{best['file order'] / best['length-sorted']:.2f}x")


if __name__ == "__main__":
    main(*parse([Args]))
