"""Throughput at the paper's scale on one GPU: pool scoring, RM training (LoRA r 8) and a PPO step, on a model
built from a named config with random weights (throughput needs no trained weights).

    python -m bench.bench_gpu                                    # on the GPU node (make gpu-bench): the 8B and 135M shapes
    python -m bench.bench_gpu --dry_run True                     # on a CPU, 135M shape, small sizes (the tests run this)

Pairs are synthetic token ids whose lengths follow HH-RLHF's (bench/hh_lengths.json: prompt and response
lengths of 1,000 helpful test pairs, under a Llama tokenizer; lengths only, no text), capped at --max_length
with the prompt cut from the left as ser.data.encode cuts it. Each measurement alternates its methods and
keeps each method's best of --repeats runs:
* scoring, pairs/s and MFU: the released pipeline's method (one side per run, file order, batch 50), ours
  (`ser.scoring.score_ids`: both sides, batches of similar length) and our shared-prefix scorer
  (`score_pairs_shared`: the prompt run once per pair);
* RM training, LoRA r 8 on the attention and MLP projections, the pairwise loss: tokens/s, MFU and peak memory
  of one epoch-slice of optimiser steps in random batches padded to their longest (TRL RewardTrainer's default
  collator and sampler) against length-grouped batches (rm_training.py's), each with and without activation
  checkpointing;
* PPO, one step at the paper's shape (batch 8 prompts x --ppo_processes, 128 new tokens, 4 epochs of
  minibatch 1): HF generate's share of the step, and tokens/s of generation and of the update.
MFU = model FLOPs / seconds / the device's dense bf16 peak; model FLOPs count 2 N a token forward, and for
LoRA training 2 N more backward (activations only; the frozen weights get no gradient), plus 2 N with
activation checkpointing; attention's quadratic part is left out (small at these lengths), so MFU errs low.
Writes OUT/gpu.json (device, versions, per config every run and the best of each method).
"""

import json
import platform
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

import torch

from ser.cli import parse
from ser.data import write_json
from ser.modeling import whole_numel
from ser.scoring import length_batches, score_ids, score_pairs_shared

ROOT = Path(__file__).resolve().parents[1]
LENGTHS = Path(__file__).resolve().parent / "hh_lengths.json"
CONFIGS = {  # the shapes of the paper's 8B RM and of the 135M model every CPU figure uses
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                      rms_norm_eps=1e-5, tie_word_embeddings=False),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0,
                         rms_norm_eps=1e-5, tie_word_embeddings=True),
}
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0}  # dense, by device name


@dataclass
class Args:
    configs: list[str] = field(default_factory=lambda: ["llama3-8b", "smollm2-135m"], metadata={
        "help": f"model shapes, measured one after the other: {', '.join(CONFIGS)}"})
    dry_run: bool = field(default=False, metadata={"help": "on the CPU: the 135M shape, few pairs, 1 repeat"})
    pairs: int = field(default=512, metadata={"help": "pairs scored per scoring run"})
    train_pairs: int = field(default=128, metadata={"help": "pairs per RM-training run"})
    train_batch: int = field(default=8, metadata={"help": "pairs per RM-training step"})
    max_length: int = field(default=512, metadata={"help": "token cap per sequence"})
    repeats: int = field(default=3, metadata={"help": "alternating runs per method (the best counts)"})
    ppo_batch: int = field(default=8, metadata={"help": "prompts per PPO step (the paper's 8 per process)"})
    ppo_processes: int = field(default=8, metadata={"help": "the paper's processes: a step here generates batch x these"})
    new_tokens: int = field(default=128, metadata={"help": "PPO response length (the paper's --output_max_length)"})
    ppo_epochs: int = field(default=4, metadata={"help": "PPO epochs over the step's samples, minibatch 1 (the paper's)"})
    out: str = field(default=str(ROOT / "bench" / "results"), metadata={"help": "results folder (gpu.json)"})
    seed: int = field(default=0, metadata={"help": "weights and data seed"})

    def __post_init__(self):
        unknown = [c for c in self.configs if c not in CONFIGS]
        if unknown:
            raise SystemExit(f"--configs {' '.join(unknown)}: unknown; known: {', '.join(CONFIGS)}")
        if self.dry_run:
            self.configs, self.pairs, self.train_pairs, self.train_batch, self.repeats = ["smollm2-135m"], 8, 8, 4, 1
            self.max_length, self.ppo_batch, self.ppo_processes, self.new_tokens, self.ppo_epochs = 256, 2, 1, 4, 1


class Ids:
    """What the scorers read of a tokenizer."""
    pad_token_id, eos_token_id = 0, 2


def synthetic_pairs(n: int, vocab: int, max_length: int, seed: int) -> list[tuple[list[int], list[int]]]:
    """n pairs (prompt + response_j, prompt + response_k) of random ids, lengths drawn from HH-RLHF's, the
    prompt cut from the left to fit, each sequence ending in eos."""
    lengths = json.loads(LENGTHS.read_text())["pairs"]
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in torch.randint(len(lengths), (n,), generator=g).tolist():
        q, a, b = lengths[i]
        a, b = min(a, max_length // 2), min(b, max_length // 2)
        q = max(1, min(q, max_length - max(a, b) - 1))
        prompt = torch.randint(3, vocab, (q,), generator=g).tolist()
        out.append(tuple(prompt + torch.randint(3, vocab, (r,), generator=g).tolist() + [Ids.eos_token_id] for r in (a, b)))
    return out


def build(config: str, kind: str, device, seed: int):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, LlamaConfig

    cfg = LlamaConfig(**CONFIGS[config], num_labels=1, pad_token_id=Ids.pad_token_id, eos_token_id=Ids.eos_token_id)
    torch.manual_seed(seed)
    cls = AutoModelForSequenceClassification if kind == "rm" else AutoModelForCausalLM
    with torch.device(device):
        model = cls.from_config(cfg, dtype=torch.bfloat16)
    return model.eval()


def peak_tflops(device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def padded_batch(rows, device):
    """Right-padded ids and their attention mask."""
    width = max(map(len, rows))
    ids = torch.tensor([r + [Ids.pad_token_id] * (width - len(r)) for r in rows], device=device)
    mask = (torch.arange(width, device=device)[None] < torch.tensor([len(r) for r in rows], device=device)[:, None]).long()
    return ids, mask


def file_order(model, sequences, batch: int, device) -> dict:
    """The released filter's scoring: sequences in file order, `batch` at a time, padded to the batch's longest."""
    real = padded = 0
    for i in range(0, len(sequences), batch):
        rows = sequences[i:i + batch]
        ids, mask = padded_batch(rows, device)
        model(input_ids=ids, attention_mask=mask, use_cache=False)
        real, padded = real + sum(map(len, rows)), padded + ids.numel()
    return {"tokens": real, "padded_tokens": padded}


def scoring(args, config: str, device, peak) -> dict:
    model = build(config, "rm", device, args.seed)
    n_params = sum(whole_numel(p) for p in model.parameters())
    pairs = synthetic_pairs(args.pairs, CONFIGS[config]["vocab_size"], args.max_length, args.seed)
    sides = [j for j, _ in pairs] + [k for _, k in pairs]  # released: one side per run, file order
    runs = []
    with torch.no_grad():
        file_order(model, sides[:8], 8, device)  # warm-up: kernels chosen, memory pools grown
        for r in range(args.repeats):
            for method in ("released", "ours", "shared prefix"):
                sync(device)
                t = time.perf_counter()
                if method == "released":
                    j, k = (file_order(model, [pair[i] for pair in pairs], 50, device) for i in (0, 1))
                    stats = {key: j[key] + k[key] for key in j}
                elif method == "ours":
                    stats = score_ids(model, Ids, sides, batch_size=32)[1]
                else:
                    stats = score_pairs_shared(model, Ids, dict(enumerate(pairs)), batch_size=32)[2]
                sync(device)
                seconds = time.perf_counter() - t
                flops = 2 * n_params * stats.get("padded_tokens", stats.get("tokens", 0))
                runs.append({"repeat": r, "method": method, "seconds": seconds, "pairs_per_second": len(pairs) / seconds,
                             "model_tflops": flops / seconds / 1e12,
                             "mfu": flops / seconds / 1e12 / peak if peak else None})
                print(f"scoring {method} run {r + 1}: {seconds:.2f} s, {len(pairs) / seconds:.1f} pairs/s", flush=True)
    del model
    return summarise(runs, "pairs_per_second", baseline="released")


def training(args, config: str, device, peak) -> dict:
    from peft import LoraConfig, get_peft_model

    pairs = synthetic_pairs(args.train_pairs, CONFIGS[config]["vocab_size"], args.max_length, args.seed + 1)
    runs = []
    for r in range(args.repeats):
        for method in ("trl", "ours"):
            for checkpointing in (False, True):
                model = build(config, "rm", device, args.seed)
                if checkpointing:
                    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                model = get_peft_model(model, LoraConfig(r=8, lora_alpha=32, lora_dropout=0.1, task_type="SEQ_CLS",
                                                         target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                                         "up_proj", "down_proj"]))
                model.train()
                n_params = sum(whole_numel(p) for p in model.parameters())
                opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-5)
                batches = train_batches(pairs, args.train_batch, method, args.seed + r)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                sync(device)
                t, real, padded = time.perf_counter(), 0, 0
                for batch in batches:
                    seqs = [j for j, _ in batch] + [k for _, k in batch]
                    groups = [list(range(len(seqs)))] if method == "trl" else length_batches(list(map(len, seqs)), len(seqs))
                    rewards = [None] * len(seqs)
                    for group in groups:  # trl: both sides in one forward; ours: forwards of similar length
                        rows = [seqs[i] for i in group]
                        ids, mask = padded_batch(rows, device)
                        for i, value in zip(group, model(input_ids=ids, attention_mask=mask).logits[:, 0].float()):
                            rewards[i] = value
                        real, padded = real + sum(map(len, rows)), padded + ids.numel()
                    scores = torch.stack(rewards)
                    loss = -torch.nn.functional.logsigmoid(scores[:len(batch)] - scores[len(batch):]).mean()
                    loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                sync(device)
                seconds = time.perf_counter() - t
                flops = (6 if checkpointing else 4) * n_params * padded
                runs.append({"repeat": r, "method": f"{method}{' +checkpointing' if checkpointing else ''}",
                             "seconds": seconds, "tokens_per_second": real / seconds, "padding_share": 1 - real / padded,
                             "model_tflops": flops / seconds / 1e12, "mfu": flops / seconds / 1e12 / peak if peak else None,
                             "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None})
                print(f"training {runs[-1]['method']} run {r + 1}: {seconds:.2f} s, {real / seconds:.0f} tokens/s", flush=True)
                del model, opt
    return summarise(runs, "tokens_per_second", baseline="trl")


def train_batches(pairs, size: int, method: str, seed: int):
    """trl: random batches (its sampler); ours: batches of pairs of similar length, in random order."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(pairs), generator=g).tolist()
    if method == "ours":
        order = sorted(order, key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
    batches = [[pairs[i] for i in order[s:s + size]] for s in range(0, len(order), size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()] if method == "ours" else batches


def ppo_step(args, config: str, device, peak) -> dict:
    """One PPO step's two phases at the paper's shape, timed apart: HF generate of every prompt's response
    (sampling, exactly --new_tokens each), then the update's forward and backward passes over them (--ppo_epochs,
    minibatch 1, every parameter trained; no optimiser step). Scoring the samples is the scoring bench's work."""
    policy = build(config, "lm", device, args.seed)
    n_params = sum(whole_numel(p) for p in policy.parameters())
    prompts = [j[:max(1, len(j) - 64)][-256:] for j, _ in synthetic_pairs(args.ppo_batch * args.ppo_processes,
                                                                          CONFIGS[config]["vocab_size"], 512, args.seed + 2)]
    runs = []
    for r in range(args.repeats):
        sync(device)
        t = time.perf_counter()
        responses = []
        with torch.no_grad():
            for s in range(0, len(prompts), args.ppo_batch):
                rows = prompts[s:s + args.ppo_batch]
                width = max(map(len, rows))
                ids = torch.tensor([[Ids.pad_token_id] * (width - len(x)) + x for x in rows], device=device)
                mask = (ids != Ids.pad_token_id).long()
                out = policy.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.new_tokens,
                                      min_new_tokens=args.new_tokens, do_sample=True, pad_token_id=Ids.pad_token_id)
                responses += out.tolist()
        sync(device)
        generation = time.perf_counter() - t
        generated = len(prompts) * args.new_tokens
        t = time.perf_counter()
        policy.train()
        tokens = 0
        for _ in range(args.ppo_epochs):  # minibatch 1: a forward and backward per sample
            for seq in responses:
                ids = torch.tensor([seq], device=device)
                policy(input_ids=ids).logits[:, -args.new_tokens:].float().logsumexp(-1).mean().backward()
                tokens += len(seq)
        policy.zero_grad(set_to_none=True)
        policy.eval()
        sync(device)
        update = time.perf_counter() - t
        runs.append({"repeat": r, "method": "hf-generate", "seconds": generation + update,
                     "generation_share": generation / (generation + update), "generated_tokens_per_second": generated / generation,
                     "update_tokens_per_second": tokens / update,
                     "update_mfu": 6 * n_params * tokens / update / 1e12 / peak if peak else None})
        print(f"ppo run {r + 1}: generation {generation:.1f} s ({generated / generation:.0f} tokens/s), update {update:.1f} s",
              flush=True)
    del policy
    return summarise(runs, "generated_tokens_per_second")


def summarise(runs, key: str, baseline: str | None = None) -> dict:
    best = {}
    for x in runs:
        if x["method"] not in best or x[key] > best[x["method"]][key]:
            best[x["method"]] = x
    out = {"runs": runs, "best": best}
    if baseline:
        out["speedup_vs_" + baseline] = {m: b[key] / best[baseline][key] for m, b in best.items()}
    return out


def main(args: Args):
    device = torch.device("cpu" if args.dry_run else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_gpu: no CUDA device is visible; --dry_run True runs the CPU rehearsal")
    peak = peak_tflops(device)
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
              "peak_bf16_tflops": peak, "dry_run": args.dry_run,
              "versions": {p: metadata.version(p) for p in ("torch", "transformers", "peft") if _has(p)},
              "args": {k: v for k, v in asdict(args).items() if k != "out"}}
    for config in args.configs:
        result[config] = {"shape": CONFIGS[config]}
        for name, fn in (("scoring", scoring), ("rm_training", training), ("ppo", ppo_step)):
            t = time.perf_counter()
            result[config][name] = fn(args, config, device, peak)
            result[config][name]["wall_seconds"] = time.perf_counter() - t
            if device.type == "cuda":
                torch.cuda.empty_cache()
    out = Path(args.out) / ("gpu-dry-run.json" if args.dry_run else "gpu.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, result)
    print(f"bench_gpu: {out}")
    return result


def _has(package: str) -> bool:
    try:
        metadata.version(package)
        return True
    except metadata.PackageNotFoundError:
        return False


if __name__ == "__main__":
    main(*parse([Args]))
