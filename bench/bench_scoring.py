"""Pool scoring: the released pipeline against ours, on SmolLM2-135M and real HH-RLHF pairs.

    python -m bench.bench_scoring [--pairs 500] [--repeats 3]

Three ways to score both responses of the same pairs with the same model under bf16 autocast:
* released: transformers' `pipeline("sentiment-analysis")` on the RM, batch 50, file order, one side per
  run, the text template tokenised with right truncation (as the released filter does);
* length-sorted: `ser.scoring.score_pairs` (both sides in one pass in batches of similar length, at most
  `--batch_size`, cut by `length_batches` with its default forward cost; questions cut from the left);
* shared prefix: `score_pairs(shared_prefix=True)` (each question run once, its KV cache reused; the same
  batching).
The runs alternate (released, length-sorted, shared prefix, released, ...) so that drift in machine load
hits all three, and each method's best run counts. Each finished run is saved to
bench/results/scoring.partial.json, so a killed bench resumes with the next run. Writes
bench/results/scoring.json and merges its keys into bench/results/summary.json.
"""

import gzip
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from bench.summary import merge_into_summary, portable
from ser.cli import parse
from ser.data import encode, format_text, split_transcript, write_text
from ser.modeling import THIS_PROCESS_ONLY, load_tokenizer
from ser.scoring import score_pairs

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
METHODS = ("released", "length-sorted", "shared prefix")


@dataclass
class Args:
    model: str = field(default=str(ROOT / "models" / "smollm2-135m-instruct"),
                       metadata={"help": "model folder scored as an RM (a fresh one-output head; `make base-model`)"})
    pairs: int = field(default=500, metadata={"help": "HH-RLHF pairs (both sides scored)"})
    max_length: int = field(default=512, metadata={"help": "token cap"})
    released_batch: int = field(default=50, metadata={"help": "the released pipeline's batch size"})
    batch_size: int = field(default=32, metadata={"help": "our batch size (pairs for shared prefix, else sequences)"})
    repeats: int = field(default=3, metadata={"help": "alternating runs of each method"})
    dtype: str = field(default="bfloat16", metadata={"help": "autocast dtype (float32: none)"})
    out: str = field(default=str(ROOT / "bench" / "results"), metadata={"help": "results folder"})


def hh_pairs(n):
    files = sorted((SHARED / "raw" / "hh_rlhf").glob("helpful-*_test.jsonl.gz"))
    pairs = []
    for path in files:
        with gzip.open(path, "rt") as f:
            for line in f:
                r = json.loads(line)
                (q, a), (_, b) = split_transcript(r["chosen"]), split_transcript(r["rejected"])
                if q and a and b and a != b:
                    pairs.append({"question": q, "response_j": a, "response_k": b})
                if len(pairs) == n:
                    return pairs
    return pairs


def released(pipe, tok, pairs, max_length, batch):
    """Both sides, one pipeline call per side over the file-ordered texts; returns the padding share."""
    real = padded = 0
    for side in ("response_j", "response_k"):
        texts = [format_text(p["question"], p[side]) for p in pairs]
        pipe(texts, batch_size=batch, truncation=True, max_length=max_length, function_to_apply="none")
        for i in range(0, len(texts), batch):  # what the pipeline's batches held, for the padding share
            lengths = [len(x) for x in tok(texts[i:i + batch], truncation=True, max_length=max_length)["input_ids"]]
            real, padded = real + sum(lengths), padded + max(lengths) * len(lengths)
    return {"padding_share": 1 - real / padded}


def main(args: Args):
    if not (SHARED / "raw" / "hh_rlhf").is_dir():
        print(f"skipped: the real HH-RLHF rows are read from {SHARED / 'raw' / 'hh_rlhf'}, which is absent")
        return None
    if not (Path(args.model) / "config.json").is_file():
        print(f"skipped: {args.model} is missing (make base-model)")
        return None
    from transformers import AutoModelForSequenceClassification, pipeline

    pairs = hh_pairs(args.pairs)
    tok = load_tokenizer(args.model)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=1, dtype=torch.float32).eval()
    model.config.pad_token_id = tok.pad_token_id
    pipe = pipeline("sentiment-analysis", model=model, tokenizer=tok, device=torch.device("cpu"))
    autocast = torch.autocast("cpu", dtype=getattr(torch, args.dtype), enabled=args.dtype != "float32")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    partial = out / "scoring.partial.json"
    config = portable({**asdict(args), "pairs": len(pairs)})
    config.pop("out")
    saved = json.loads(partial.read_text()) if partial.is_file() else {}
    runs = saved["runs"] if saved.get("config") == config else []
    stats = saved.get("stats", {}) if runs else {}
    for r in range(args.repeats):
        for method in METHODS:
            if any(x["repeat"] == r and x["method"] == method for x in runs):
                continue
            t = time.perf_counter()
            with torch.no_grad(), autocast:
                if method == "released":
                    stats[method] = released(pipe, tok, pairs, args.max_length, args.released_batch)
                else:
                    stats[method] = score_pairs(model, tok, pairs, args.max_length, args.batch_size, THIS_PROCESS_ONLY,
                                                shared_prefix=method == "shared prefix")[2]
            runs.append({"repeat": r, "method": method, "seconds": time.perf_counter() - t})
            print(f"run {r + 1}/{args.repeats} {method}: {runs[-1]['seconds']:.1f} s", flush=True)
            write_text(partial, json.dumps({"config": config, "runs": runs, "stats": stats}, indent=1) + "\n")  # whole or not at all
    best = {m: min(x["seconds"] for x in runs if x["method"] == m) for m in METHODS}
    ours = min(("length-sorted", "shared prefix"), key=best.get)
    tokens = sum(len(encode(tok, p["question"], p[s], args.max_length)["input_ids"])
                 for p in pairs for s in ("response_j", "response_k"))
    result = {
        "config": config, "runs": runs, "best_seconds": best, "tokens": tokens,
        "padding_share": {m: stats[m]["padding_share"] for m in METHODS},
        "scoring_speedup_vs_original": best["released"] / best[ours], "ours": ours,
        "speedup_length_sorted": best["released"] / best["length-sorted"],
        "speedup_shared_prefix": best["released"] / best["shared prefix"],
        "scoring_padding_share": stats[ours]["padding_share"],
        "scoring_shared_prefix_token_saving": stats["shared prefix"]["shared_prefix_token_saving"],
    }
    (out / "scoring.json").write_text(json.dumps(result, indent=1) + "\n")
    merge_into_summary(out, {k: result[k] for k in ("scoring_speedup_vs_original", "scoring_padding_share",
                                                    "scoring_shared_prefix_token_saving")})
    partial.unlink()
    print(f"{len(pairs)} HH-RLHF pairs, {Path(args.model).name}, {args.dtype} autocast, cap {args.max_length}, "
          f"best of {args.repeats} alternating runs: " + ", ".join(f"{m} {s:.1f} s" for m, s in best.items()))
    print(f"speed-up over the released pipeline: length-sorted {result['speedup_length_sorted']:.2f}x, shared prefix "
          f"{result['speedup_shared_prefix']:.2f}x; padding share released {result['padding_share']['released']:.1%}, "
          f"ours {result['scoring_padding_share']:.1%}; shared-prefix token saving "
          f"{result['scoring_shared_prefix_token_saving']:.1%}")
    return result


if __name__ == "__main__":
    main(parse([Args])[0])
