"""Check a GPU node before a multi-day SER job: `make gpu-check` (a few minutes on one GPU, offline).

    python scripts/gpu_check.py --config models/smollm2-135m-instruct      # on the GPU node
    python scripts/gpu_check.py --dry_run True                             # on a CPU (the tests run this)

Without --model, the model is built from --config's `config.json` and tokenizer with random weights: the
shapes, kernels and ZeRO-3 sharding are real, the quality is not. The stages run as the README launches
them (`accelerate launch --config_file scripts/cluster/zero3.yaml`, one process per visible GPU). Each check
prints one line (PASS, FAIL or SKIP) and OUT/summary.json holds them all; the exit status is 1 when any
check failed. `--dry_run True` runs the same checks on the CPU with a small model whose tensors ZeRO-3
still partitions (hidden 384), 2 processes over gloo, and skips what needs a GPU.
`--plant empty_saved_tensor` empties one tensor of the SFT checkpoint after it is written, to show that the
checks catch what a broken ZeRO-3 save writes.
"""

import datetime
import json
import os
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import torch

from ser.cli import parse

ROOT = Path(__file__).resolve().parents[1]
CHECKS = ("environment", "scorers", "gpu_vs_cpu", "logprobs", "lora_rm_defaults", "zero3_sft", "zero3_rm", "zero3_ppo",
          "filter_partition")
PACKAGES = ("torch", "transformers", "trl", "peft", "accelerate", "deepspeed", "datasets", "tokenizers")


@dataclass
class Args:
    out: str = field(default="runs/gpu-check", metadata={"help": "folder for the check's runs and summary.json"})
    config: str = field(default="models/smollm2-135m-instruct", metadata={
        "help": "a folder with config.json and the tokenizer; the model is built from it with random weights"})
    model: str | None = field(default=None, metadata={"help": "a model folder with trained weights, instead of --config"})
    dry_run: bool = field(default=False, metadata={"help": "on the CPU: a small model, 2 gloo processes, GPU checks skipped"})
    pairs: int = field(default=64, metadata={"help": "pairs scored by the scorer checks"})
    only: list[str] = field(default_factory=list, metadata={"help": f"run these checks only: {', '.join(CHECKS)}"})
    plant: str | None = field(default=None, metadata={
        "help": "plant a defect to see a check fail: empty_saved_tensor", "choices": ["empty_saved_tensor"]})
    seed: int = field(default=0, metadata={"help": "random seed of the weights and data"})


class Check:
    """The context of every check: paths, device, model folders built once."""

    def __init__(self, args: Args):
        self.args, self.out = args, Path(args.out).resolve()
        self.device = "cpu" if args.dry_run else "cuda"
        self.processes = 2 if args.dry_run else max(torch.cuda.device_count(), 1)
        self.max_length = 96 if args.dry_run else 256
        self.env = {**os.environ, "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false",
                    "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
        if not args.dry_run:
            self.env["SER_REQUIRE_ACCELERATOR"] = "1"  # a stage that falls back to the CPU is a failure here
        self.data = self.out / "data"
        self._base = None

    def base(self) -> Path:
        """The causal LM every stage starts from: --model, or random weights from --config (bf16 on disk)."""
        if self._base:
            return self._base
        if self.args.model:
            self._base = Path(self.args.model).resolve()
            return self._base
        from transformers import AutoConfig, AutoModelForCausalLM

        from ser import tiny
        from ser.modeling import load_tokenizer, save_whole

        out = self.out / "base"
        if self.args.dry_run:
            tiny.build(tiny.Args(out=str(out), hidden_size=384, num_heads=6, seed=self.args.seed))
        else:
            torch.manual_seed(self.args.seed)
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(self.args.config), dtype=torch.bfloat16)
            save_whole(out, model, load_tokenizer(self.args.config))
        model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.bfloat16)
        model.save_pretrained(str(out))
        self._base = out
        return out

    def make_data(self):
        """The synthetic task (the model's tokenizer reads any text): pool, seed, held-out pairs, prompts."""
        if not (self.data / "manifest.json").exists():
            self.run("data", "data/make_synthetic.py", "--out", self.data, "--n_pairs", max(4 * self.args.pairs, 200),
                     "--n_eval", self.args.pairs, "--n_sft", 128, "--n_rl", 32, "--seed", self.args.seed, recipe=False)

    def run(self, name, *cmd, recipe=True) -> dict:
        """A stage as the README launches it; its log is kept in OUT/NAME.log."""
        head = ["accelerate", "launch", "--config_file", "scripts/cluster/zero3.yaml", "--num_processes",
                str(self.processes), "--main_process_port", "0"] if recipe else [sys.executable]
        log = self.out / f"{name}.log"
        start = time.perf_counter()
        proc = subprocess.run([*head, *map(str, cmd)], cwd=ROOT, env=self.env, capture_output=True, text=True)
        log.write_text(proc.stdout + proc.stderr)
        if proc.returncode:
            raise RuntimeError(f"{name} exited {proc.returncode}; see {log}: " + (proc.stderr or proc.stdout)[-600:])
        return {"seconds": round(time.perf_counter() - start, 1)}

    def stage_flags(self):
        return ["--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "True", "--bf16", "True"]


# ----------------------------------------------------------------------------- the checks


def environment(c: Check) -> dict:
    pins = dict(line.split("==") for line in (ROOT / "requirements.txt").read_text().splitlines() if "==" in line)
    versions, missing = {}, []
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            missing.append(name)
    if missing:
        raise RuntimeError(f"not installed: {', '.join(missing)}")
    differ = {n: f"{v} (pinned {pins[n]})" for n, v in versions.items() if n in pins and v.split("+")[0] != pins[n]}
    detail = {"versions": versions, "differ_from_pins": differ, "python": sys.version.split()[0]}
    if not c.args.dry_run:
        if not torch.cuda.is_available():
            raise RuntimeError("torch sees no CUDA device: check nvidia-smi, CUDA_VISIBLE_DEVICES and the torch build")
        detail.update(gpus=torch.cuda.device_count(), device=torch.cuda.get_device_name(0), cuda=torch.version.cuda,
                      bf16=torch.cuda.is_bf16_supported())
    return detail


def _rm_and_pairs(c: Check, dtype=torch.float32, device=None):
    from transformers import AutoModelForSequenceClassification

    from ser.data import encode, load_records
    from ser.modeling import fit_embeddings, load_tokenizer

    c.make_data()
    tok = load_tokenizer(str(c.base()))
    torch.manual_seed(c.args.seed)
    rm = AutoModelForSequenceClassification.from_pretrained(str(c.base()), num_labels=1, dtype=dtype)
    rm = fit_embeddings(rm, tok).to(device or c.device).eval()
    records = load_records(str(c.data), "data/unlabeled")[:c.args.pairs]
    pairs = {i: (encode(tok, r["question"], r["response_j"], c.max_length)["input_ids"],
                 encode(tok, r["question"], r["response_k"], c.max_length)["input_ids"]) for i, r in enumerate(records)}
    return rm, tok, pairs


def _plain_and_shared(rm, tok, pairs, autocast=False):
    from ser.modeling import THIS_PROCESS_ONLY
    from ser.scoring import score_ids, score_pairs_shared

    device = next(rm.parameters()).device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        sequences = [p[0] for p in pairs.values()] + [p[1] for p in pairs.values()]
        plain, stats = score_ids(rm, tok, sequences, 16, THIS_PROCESS_ONLY)
        s_j, s_k, _ = score_pairs_shared(rm, tok, pairs, 16)
    n = len(pairs)
    return torch.tensor(plain[:n]), torch.tensor(plain[n:]), torch.tensor(s_j), torch.tensor(s_k), stats


def scorers(c: Check) -> dict:
    rm, tok, pairs = _rm_and_pairs(c)
    p_j, p_k, s_j, s_k, stats = _plain_and_shared(rm, tok, pairs)
    fp32 = max((p_j - s_j).abs().max().item(), (p_k - s_k).abs().max().item())
    b_j, b_k, bs_j, bs_k, _ = _plain_and_shared(rm, tok, pairs, autocast=True)
    detail = {"fp32_max_difference": fp32, "pairs": len(pairs), "pairs_per_second_fp32": stats["sequences_per_second"] / 2,
              "bf16_max_drift_from_fp32": (b_j - p_j).abs().max().item(),
              "bf16_order_flips_vs_fp32": int(((b_j > b_k) != (p_j > p_k)).sum()),
              "bf16_shared_vs_plain_order_flips": int(((bs_j > bs_k) != (b_j > b_k)).sum())}
    if fp32 > 1e-4:
        raise RuntimeError(f"fp32 plain and shared-prefix scores differ by {fp32:.2e} (> 1e-4): {detail}")
    if not all(torch.isfinite(t).all() for t in (b_j, b_k, bs_j, bs_k)):
        raise RuntimeError(f"non-finite bf16 scores: {detail}")
    return detail


def gpu_vs_cpu(c: Check) -> dict:
    if c.args.dry_run:
        return {"skip": "dry run: no GPU"}
    rm, tok, pairs = _rm_and_pairs(c)
    g_j, g_k, *_ = _plain_and_shared(rm, tok, pairs)
    c_j, c_k, *_ = _plain_and_shared(rm.to("cpu"), tok, pairs)
    diff = max((g_j - c_j).abs().max().item(), (g_k - c_k).abs().max().item())
    if diff > 1e-3:
        raise RuntimeError(f"fp32 scores on the GPU and the CPU differ by {diff:.2e} (> 1e-3)")
    return {"fp32_max_difference": diff}


def logprobs(c: Check) -> dict:
    from transformers import AutoModelForCausalLM

    from ser.data import load_records
    from ser.modeling import load_tokenizer
    from ser.rollout import lm_logprobs, sample

    c.make_data()
    tok = load_tokenizer(str(c.base()))
    lm = AutoModelForCausalLM.from_pretrained(str(c.base()), dtype=torch.float32).to(c.device).eval()
    questions = [r["question"] for r in load_records(str(c.data), "data/rl", fields=("question",))][:8]
    torch.manual_seed(c.args.seed)
    with torch.no_grad():
        ro = sample(lm, tok, questions, 64, 16, 1.0, True, c.device)
        qr, mask = torch.cat([ro.query, ro.responses], 1), torch.cat([ro.query_mask, ro.response_mask], 1)
        batched = lm_logprobs(lm, qr, mask, ro.query.shape[1], ro.responses, 1.0)
        worst = 0.0
        for i in range(len(questions)):  # each alone, its left padding removed
            start = int((~ro.query_mask[i].bool()).sum())
            alone = lm_logprobs(lm, qr[i:i + 1, start:], mask[i:i + 1, start:], ro.query.shape[1] - start,
                                ro.responses[i:i + 1], 1.0)
            m = ro.response_mask[i].bool()
            worst = max(worst, (alone[0][m] - batched[i][m]).abs().max().item())
        with torch.autocast(c.device, dtype=torch.bfloat16):
            ro16 = sample(lm, tok, questions, 64, 16, 1.0, True, c.device)
            lp16 = lm_logprobs(lm, torch.cat([ro16.query, ro16.responses], 1),
                               torch.cat([ro16.query_mask, ro16.response_mask], 1), ro16.query.shape[1], ro16.responses, 1.0)
    if worst > 1e-3:
        raise RuntimeError(f"left-padded batch logprobs differ from one-at-a-time logprobs by {worst:.2e} (> 1e-3)")
    if not torch.isfinite(lp16).all():
        raise RuntimeError("bf16 sampling gave non-finite logprobs")
    return {"fp32_max_difference": worst, "bf16_logprobs_finite": True}


def lora_rm_defaults(c: Check) -> dict:
    """The LoRA RM with the driver's defaults: LoRA on, activation checkpointing on (TRL's default), bf16."""
    c.make_data()
    out = c.out / "lora_rm"
    detail = c.run("lora_rm_defaults", "rm_training.py", "--model_name", c.base(), "--dataset_name", c.data,
                   "--output_dir", out, "--max_length", c.max_length, "--num_train_epochs", 1,
                   "--per_device_train_batch_size", 4, *c.stage_flags(), recipe=False)
    results = json.loads((out / "eval_results.json").read_text())
    if not results["loss"] == results["loss"]:
        raise RuntimeError(f"held-out loss is NaN: {results}")
    return {**detail, "accuracy": results["accuracy"], "loss": results["loss"],
            "eval_sequences_per_second": results["sequences_per_second"]}


def _reloads(folder, kind):
    from transformers import AutoModelForCausalLM

    from ser.modeling import check_saved_weights, load_reward_model, load_tokenizer

    check_saved_weights(folder)
    if kind == "rm":
        load_reward_model(str(folder), load_tokenizer(str(folder)))
    else:
        AutoModelForCausalLM.from_pretrained(str(folder))


def zero3_sft(c: Check) -> dict:
    c.make_data()
    out = c.out / "sft"
    detail = c.run("zero3_sft", "sft.py", "--model_name", c.base(), "--dataset_name", c.data, "--output_dir", out,
                   "--max_length", c.max_length, "--num_train_epochs", 1, "--per_device_train_batch_size", 4,
                   "--gradient_accumulation_steps", 2, *c.stage_flags())
    if c.args.plant == "empty_saved_tensor":
        from safetensors.torch import load_file, save_file

        weights = load_file(out / "model.safetensors")
        weights[next(iter(weights))] = torch.empty(0, dtype=torch.bfloat16)
        save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    _reloads(out, "lm")
    return detail


def zero3_rm(c: Check) -> dict:
    c.make_data()
    out = c.out / "rm"
    detail = c.run("zero3_rm", "rm_training.py", "--model_name", c.base(), "--dataset_name", c.data,
                   "--output_dir", out, "--use_lora", "False", "--max_length", c.max_length, "--num_train_epochs", 1,
                   "--per_device_train_batch_size", 4, *c.stage_flags())
    _reloads(out, "rm")
    return detail


def zero3_ppo(c: Check) -> dict:
    rm = c.out / "rm"
    if not (rm / "eval_results.json").exists():
        zero3_rm(c)
    out = c.out / "ppo"
    detail = c.run("zero3_ppo", "ppo/ppo.py", "--model_name", c.base(), "--reward_model_name", rm,
                   "--dataset_name", c.data, "--output_dir", out, "--steps", 2, "--batch_size", 4,
                   "--mini_batch_size", 2, "--gradient_accumulation_steps", 2, "--ppo_epochs", 1,
                   "--output_max_length", 16, "--save_freq", 0, *([] if not c.args.dry_run else ["--peak_tflops", 1]))
    _reloads(out / "policy", "lm")
    last = json.loads((out / "log.jsonl").read_text().splitlines()[-1])
    if not last.get("perf/model_tflops"):
        raise RuntimeError(f"PPO logged {last.get('perf/model_tflops')} model TFLOP/s: its parameter count is wrong")
    return {**detail, "tokens_per_second": last["perf/tokens_per_second"], "mfu": last.get("perf/mfu")}


def filter_partition(c: Check) -> dict:
    rm = c.out / "rm"
    if not (rm / "eval_results.json").exists():
        zero3_rm(c)
    selected = {}
    for shared in (False, True):
        out = c.out / f"filter_shared_{shared}"
        c.run(f"filter_shared_{shared}", "rm_loop_filter_by_self.py", "--dataset_name", c.data,
              "--reward_model_name", rm, "--rm_next_loop_save_path", out / "selected.jsonl",
              "--remaining_data_save_path", out / "remaining.jsonl", "--max_length", c.max_length,
              "--shared_prefix", shared, "--dtype", "float32", "--probability", "pairwise",
              "--pairwise_easy_gap", 0.05, "--status1_min_pairs", 1, "--status2_min_pairs", 1, recipe=False)
        selected[shared] = [json.loads(line)["id"] for line in (out / "selected.jsonl").read_text().splitlines()]
        stats = json.loads((out / "stats.json").read_text())
    if not selected[False]:
        raise RuntimeError("no pair was selected: there is no partition to compare")
    if selected[False] != selected[True]:
        raise RuntimeError(f"the scorers select different pairs: {len(selected[False])} plain, {len(selected[True])} shared")
    return {"selected": len(selected[False]), "pairs_per_second": stats["scoring"].get("pairs_per_second")}


def main(args: Args):
    unknown = set(args.only) - set(CHECKS)
    if unknown:
        raise SystemExit(f"--only {' '.join(sorted(unknown))}: unknown checks; the checks are {', '.join(CHECKS)}")
    if not args.dry_run and not args.model and not (Path(args.config) / "config.json").is_file():
        raise SystemExit(f"--config {args.config}: no config.json there (a model folder, or its config and tokenizer)")
    import transformers

    transformers.logging.set_verbosity_error()  # the stages' own logs are in OUT/*.log
    c = Check(args)
    c.out.mkdir(parents=True, exist_ok=True)
    results = []
    for name in args.only or CHECKS:
        start = time.perf_counter()
        try:
            detail = globals()[name](c)
            status = "SKIP" if "skip" in detail else "PASS"
        except Exception as e:  # a failed check is reported and the others still run
            detail, status = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}, "FAIL"
        row = {"check": name, "status": status, "seconds": round(time.perf_counter() - start, 1), **detail}
        results.append(row)
        shown = {k: v for k, v in detail.items() if k not in ("traceback", "versions")}
        print(f"{status} {name} ({row['seconds']} s) {json.dumps(shown, default=str)[:400]}", flush=True)
        if name == "environment" and status == "FAIL" and not args.dry_run and not torch.cuda.is_available():
            print("gpu-check: no CUDA device, so the other checks are not run (they would take minutes to say "
                  "the same); on a CPU, run the same checks with --dry_run True", flush=True)
            break
    summary = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
               "device": results[0].get("device", "cpu") if results else None, "dry_run": args.dry_run,
               "model": args.model or f"random weights from {args.config}" if not args.dry_run else "tiny (hidden 384)",
               "failed": sum(r["status"] == "FAIL" for r in results), "checks": results}
    (c.out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    print(f"gpu-check: {summary['failed']} failed of {len(results)}; {c.out / 'summary.json'}")
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(main(*parse([Args])))
