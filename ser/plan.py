"""Capacity planner: memory per GPU for each stage and time per SER loop, from a model config alone.

    python -m ser.plan --model scripts/cluster/configs/llama-3-8b.json --gpus 8 --gpu_mem 80 \
        --pool_pairs 136000 --mean_tokens 300 --lora --zero 3

It reads `config.json` (a file, or a folder holding one); no weights are loaded. Llama-style decoders
(Llama, Mistral, Qwen2, SmolLM): embedding, L x [RMSNorm, attention with grouped KV heads, RMSNorm,
SwiGLU MLP], final RMSNorm, an LM head (SFT, PPO policy) or a one-output score head (the RM).

Memory per GPU, in bytes (Psi: parameters, Psi_t: trained ones, N: GPUs, b: bytes of the compute dtype)
  model states, DeepSpeed's own accounting (its `estimate_zero{2,3}_model_states_mem_needs`):
    trained parameter: 16-bit weight 2 + 16-bit grad 2 + fp32 grad 4 + fp32 master 4 + Adam m, v 8 = 20;
      ZeRO-1 shards the last 16, ZeRO-2 all but the weight; ZeRO-3 counts 18 in all, sharded, and
      gathers the largest layer (+ 4 x its parameters).
    frozen parameter: b, sharded by ZeRO-3.
    No DeepSpeed (plain DDP, --zero 0) as this project trains: fp32 master weight 4 + fp32 grad 4 + Adam 8
      = 16 per trained parameter; frozen ones stay in the checkpoint dtype (b).
  activations saved for backward, per token (HF's Llama code with SDPA attention; GQA's K and V are
  repeated to all heads before attention, as HF does):
    per layer  2 RMSNorms x (4h + 2hb) + (5h + 4I) b    [norm: fp32 input, normalised, weighted output;
               attention: q, k, v after RoPE, output, o_proj input; MLP: gate, up, silu, product]
    with activation checkpointing: h b per layer, plus one layer's full set while it is recomputed
    backward working set: one layer's full set
    LM head: V (b + 12)  [logits, fp32 logits, log-softmax; fp32 gradient in backward]; score head: ~0
  tokens: micro batch x max_length (RM: 2 sequences per pair; PPO: prompt + response).
  inference (pool scoring): weights + one layer's working set (3h + 3I) b per token, no KV cache.
  PPO: policy (+ value head), reference (the adapter switched off under LoRA, else a frozen copy),
    RM (frozen), generation KV cache 2 L kv_dim b per token, and the update's activations.
  peak: weights + optimiser + gradients + activations; without DeepSpeed the gradients appear in backward
    while the activations are freed, so max(gradients + AdamW's two fp32 temporaries of the largest
    tensor, activations) in place of their sum.
  Plus --overhead_gb per GPU (CUDA context, NCCL buffers, allocator fragmentation).

Time per SER loop (FLOPs / (GPUs x peak x MFU)), with Psi' the matmul parameters (no embedding):
  forward 2 Psi' + 2 L s h per token (causal attention); training x3 (full), x2 (LoRA: no weight
  gradients of the frozen base), +1 forward with activation checkpointing.
  loop = score the pool (2 sequences per pair) + train the RM on --train_pairs for --epochs.

`--measure` runs each stage's forward/backward/AdamW step (one process, random weights from the config)
on `--device` and prints the measured peak next to the estimate: peak RSS above the pre-model baseline
on CPU (`/proc/self/status` VmHWM, reset through /proc/self/clear_refs), `torch.cuda.max_memory_allocated`
on CUDA.
"""

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from transformers import HfArgumentParser

GB = 1e9
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
STAGES = ("sft", "rm", "score", "ppo")


@dataclass
class PlanArgs:
    model: str = field(metadata={"help": "a model's config.json, or a folder holding one (no weights are read)"})
    gpus: int = field(default=8, metadata={"help": "GPUs in all (nodes x GPUs per node)"})
    gpu_mem: float = field(default=80.0, metadata={"help": "memory per GPU, GB"})
    pool_pairs: int = field(default=136_000, metadata={"help": "unlabelled pairs scored every loop"})
    mean_tokens: float = field(default=300.0, metadata={"help": "mean tokens of one sequence (question + response)"})
    train_pairs: int | None = field(default=None, metadata={
        "help": "pairs the RM trains on per loop (default: the whole pool, the upper bound)"})
    lora: bool = field(default=False, metadata={"help": "LoRA in SFT, RM and PPO (the RM's default in this project)"})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank"})
    lora_targets: str = field(default="q_proj,v_proj", metadata={"help": "LoRA target modules (PEFT's Llama default)"})
    zero: int = field(default=0, metadata={"help": "DeepSpeed ZeRO stage; 0: no DeepSpeed (DDP)",
                                           "choices": [0, 1, 2, 3]})
    activation_checkpointing: bool = field(default=False, metadata={"help": "recompute each layer in backward"})
    dtype: str = field(default="bfloat16", metadata={"help": "compute dtype", "choices": list(DTYPE_BYTES)})
    micro_batch: int = field(default=1, metadata={"help": "per-GPU micro batch: sequences (SFT, scoring x8), pairs (RM)"})
    max_length: int = field(default=512, metadata={"help": "longest sequence (memory is planned for full batches)"})
    epochs: float = field(default=5, metadata={"help": "RM epochs per loop (the driver's LOOP_EPOCHS)"})
    ppo_batch: int = field(default=8, metadata={"help": "PPO prompts generated at once per GPU"})
    ppo_prompt: int = field(default=256, metadata={"help": "PPO prompt tokens"})
    ppo_response: int = field(default=128, metadata={"help": "PPO response tokens"})
    mfu: float = field(default=0.4, metadata={"help": "model FLOPs utilisation assumed for the time estimate"})
    gpu_tflops: float = field(default=312.0, metadata={"help": "peak dense TFLOP/s per GPU in the dtype (A100: 312)"})
    overhead_gb: float = field(default=2.0, metadata={"help": "per-GPU memory outside tensors (CUDA context, buffers)"})
    measure: bool = field(default=False, metadata={"help": "also run each stage's step here and print measured peaks"})
    device: str = field(default="cpu", metadata={"help": "device of --measure"})
    json_out: str | None = field(default=None, metadata={"help": "also write the plan (and measurements) as JSON"})


@dataclass
class Shape:
    """What the planner reads from a Llama-style config."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool

    @classmethod
    def from_config(cls, path) -> "Shape":
        path = Path(path)
        file = path / "config.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"{file}: no model config (pass a config.json or a folder holding one)")
        cfg = json.loads(file.read_text())
        if cfg.get("num_local_experts") or cfg.get("num_experts"):
            raise ValueError(f"{file}: mixture-of-experts configs are not planned (field 'num_local_experts')")
        for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
            if not isinstance(cfg.get(key), int) or isinstance(cfg.get(key), bool):
                raise ValueError(f"{file}: field '{key}' missing or not an integer; the planner reads Llama-style "
                                 f"decoder configs")
            if cfg[key] < 1:
                raise ValueError(f"{file}: field '{key}' is {cfg[key]}; a model has at least 1")
        heads = cfg["num_attention_heads"]
        return cls(hidden=cfg["hidden_size"], intermediate=cfg["intermediate_size"],
                   layers=cfg["num_hidden_layers"], heads=heads,
                   kv_heads=cfg.get("num_key_value_heads") or heads,
                   head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads, vocab=cfg["vocab_size"],
                   tied=bool(cfg.get("tie_word_embeddings", False)))

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear module of one layer."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_dim, self.intermediate
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def layer_params(self) -> int:
        return sum(a * b for a, b in self.linears().values()) + 2 * self.hidden

    def params(self, head: str) -> int:
        """All parameters with an LM head ('lm') or the RM's one-output score head ('score')."""
        embed = self.vocab * self.hidden
        top = (0 if self.tied else embed) if head == "lm" else self.hidden
        return embed + self.layers * self.layer_params() + self.hidden + top

    def matmul_params(self, head: str) -> int:
        """Parameters that cost 2 FLOPs per token in a forward pass (the embedding lookup does not)."""
        return self.layers * self.layer_params() + (self.vocab * self.hidden if head == "lm" else self.hidden)

    def lora_params(self, r: int, targets: list[str], head: str) -> int:
        """Trained parameters of a PEFT LoRA on `targets` (+ the score head, trained in full for the RM)."""
        unknown = set(targets) - set(self.linears())
        if unknown:
            raise ValueError(f"--lora_targets: {sorted(unknown)} not among {sorted(self.linears())}")
        per_layer = sum(r * (self.linears()[t][0] + self.linears()[t][1]) for t in targets)
        return self.layers * per_layer + (self.hidden if head == "score" else 0)

    def largest_layer(self) -> int:
        return max(self.vocab * self.hidden, self.layer_params())


def model_states(total: int, trained: int, zero: int, n: int, dtype_bytes: int, largest: int = 0) -> dict:
    """Bytes per GPU of weights, gradients and optimiser states (see the module docstring)."""
    frozen = total - trained
    if zero == 0:
        return {"weights": 4 * trained + dtype_bytes * frozen, "grads": 4 * trained, "optim": 8 * trained}
    if zero == 1:
        return {"weights": 2 * trained + dtype_bytes * frozen, "grads": 2 * trained + 4 * trained / n,
                "optim": 12 * trained / n}
    if zero == 2:
        return {"weights": 2 * trained + dtype_bytes * frozen, "grads": 6 * trained / n, "optim": 12 * trained / n}
    return {"weights": (2 * trained + dtype_bytes * frozen) / n + 4 * largest, "grads": 4 * trained / n,
            "optim": 12 * trained / n}


def layer_activation_bytes(s: Shape, b: int, trained: set[str] | None) -> float:
    """Bytes one decoder layer saves for backward, per token. `trained`: the linear modules with trained
    weights (None: all weights train). A frozen linear keeps no input; a norm keeps its fp32 input and, when
    what it feeds trains, its normalised and weighted outputs."""
    h, kv, i = s.hidden, s.kv_dim, s.intermediate
    full = trained is None
    trained = set(s.linears()) if full else trained

    def norm(feeds):
        return 4 * h + (2 if full or trained & feeds else 1) * h * b

    attention = (2 * h + 2 * kv + (h if "o_proj" in trained else 0)) * b  # q, k, v after RoPE, output; o_proj input
    mlp = (3 * i + (i if "down_proj" in trained else 0)) * b  # gate, silu(gate), up; down_proj input
    return norm({"q_proj", "k_proj", "v_proj"}) + attention + norm({"gate_proj", "up_proj"}) + mlp


def training_activations(s: Shape, tokens: int, b: int, head: str, checkpointing: bool,
                         trained: set[str] | None = None) -> float:
    """Peak activation bytes of a training step: the saved activations of every layer (or, with activation
    checkpointing, each layer's input and one layer recomputed), the final norm, and for an LM head the
    fp32 log-softmax plus its gradients in backward (and the returned logits when they are 16-bit)."""
    layer = layer_activation_bytes(s, b, trained)
    per_token = (s.layers * s.hidden * b + layer) if checkpointing else s.layers * layer
    per_token += 4 * s.hidden + 2 * s.hidden * b
    if head == "lm":
        per_token += s.vocab * (12 + (b if b < 4 else 0))
    return tokens * per_token


def inference_activations(s: Shape, tokens: int, b: int) -> float:
    return tokens * (3 * s.hidden + 3 * s.intermediate) * b


def forward_flops(s: Shape, tokens: float, seq: float, head: str) -> float:
    return tokens * (2 * s.matmul_params(head) + 2 * s.layers * seq * s.hidden)


COUNTS = ("gpus", "pool_pairs", "train_pairs", "lora_r", "micro_batch", "max_length", "ppo_batch", "ppo_prompt",
          "ppo_response")
AMOUNTS = ("gpu_mem", "mean_tokens", "epochs", "mfu", "gpu_tflops")


def check(a: PlanArgs) -> None:
    """Refuse sizes that would print a plan of negative memory or zero time, naming each flag."""
    problems = []
    for name in COUNTS:
        v = getattr(a, name)
        if v is None and name == "train_pairs":
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            problems.append(f"--{name} {v!r}: a whole number, 1 or more")
    for name in AMOUNTS:
        v = getattr(a, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < math.inf:
            problems.append(f"--{name} {v!r}: a positive number")
    if isinstance(a.mfu, (int, float)) and a.mfu > 1:
        problems.append(f"--mfu {a.mfu}: a fraction of the peak, at most 1")
    if isinstance(a.overhead_gb, bool) or not isinstance(a.overhead_gb, (int, float)) or not 0 <= a.overhead_gb < math.inf:
        problems.append(f"--overhead_gb {a.overhead_gb!r}: 0 or more GB")
    if problems:
        raise ValueError("ser.plan: " + "; ".join(problems))


def plan(a: PlanArgs) -> dict:
    check(a)
    s = Shape.from_config(a.model)
    b = DTYPE_BYTES[a.dtype]
    targets = [t for t in a.lora_targets.split(",") if t]
    n = a.gpus

    lora_set = set(targets) if a.lora else None

    def trained(head):
        return s.lora_params(a.lora_r, targets, head) if a.lora else s.params(head)

    def states(head):
        return model_states(s.params(head), trained(head), a.zero, n, b, s.largest_layer())

    def frozen_copy(head):
        return s.params(head) * b / (n if a.zero == 3 else 1)

    stages = {}
    sft = states("lm")
    sft["activations"] = training_activations(s, a.micro_batch * a.max_length, b, "lm", a.activation_checkpointing,
                                             lora_set)
    stages["sft"] = sft
    rm = states("score")
    rm["activations"] = training_activations(s, 2 * a.micro_batch * a.max_length, b, "score",
                                             a.activation_checkpointing, lora_set)
    stages["rm"] = rm
    stages["score"] = {"weights": frozen_copy("score"), "grads": 0, "optim": 0,
                       "activations": inference_activations(s, 8 * a.micro_batch * a.max_length, b)}
    ppo = states("lm")
    ppo_len = a.ppo_prompt + a.ppo_response
    ppo["weights"] += (0 if a.lora else frozen_copy("lm")) + frozen_copy("score")  # reference + RM
    kv_cache = 2 * s.layers * s.kv_dim * b * a.ppo_batch * ppo_len
    ppo["activations"] = max(kv_cache, training_activations(s, a.micro_batch * ppo_len, b, "lm",
                                                            a.activation_checkpointing, lora_set))
    stages["ppo"] = ppo
    largest_trained = 0 if a.lora else max(s.vocab, s.intermediate) * s.hidden
    for st in stages.values():
        # Without DeepSpeed, gradients are created during backward as the activations are freed (and set to
        # None after each step), and torch's AdamW makes two temporaries of a tensor's size as it updates it:
        # the peak holds the larger of the two phases. DeepSpeed keeps gradient buffers and fuses its Adam.
        step = st["grads"] + (8 * largest_trained if st["optim"] else 0)
        live = max(step, st["activations"]) if a.zero == 0 else st["grads"] + st["activations"]
        st["total"] = st["weights"] + st["optim"] + live + a.overhead_gb * GB
        st["fits"] = st["total"] <= a.gpu_mem * GB

    train_pairs = a.pool_pairs if a.train_pairs is None else a.train_pairs
    fwd = forward_flops(s, 2 * a.pool_pairs * a.mean_tokens, a.mean_tokens, "score")
    per_fwd = forward_flops(s, 2 * train_pairs * a.mean_tokens * a.epochs, a.mean_tokens, "score")
    train = per_fwd * ((2 if a.lora else 3) + (1 if a.activation_checkpointing else 0))
    rate = a.gpus * a.gpu_tflops * 1e12 * a.mfu
    loop = {"score_flops": fwd, "train_flops": train, "score_hours": fwd / rate / 3600,
            "train_hours": train / rate / 3600, "loop_hours": (fwd + train) / rate / 3600}
    return {"args": asdict(a), "shape": asdict(s), "params": {"lm": s.params("lm"), "score": s.params("score"),
            "trained_lm": trained("lm"), "trained_score": trained("score")}, "stages": stages, "loop": loop}


def table(p: dict) -> str:
    a = p["args"]
    setup = (f"{a['gpus']} GPU(s) x {a['gpu_mem']:g} GB, ZeRO-{a['zero']}" if a["zero"] else
             f"{a['gpus']} GPU(s) x {a['gpu_mem']:g} GB, DDP") + (", LoRA" if a["lora"] else ", full") + \
        (", activation checkpointing" if a["activation_checkpointing"] else "") + f", {a['dtype']}"
    lines = [f"{Path(a['model']).stem}: {p['params']['lm'] / 1e9:.2f}B parameters (RM {p['params']['score'] / 1e9:.2f}B); "
             f"{setup}; micro batch {a['micro_batch']} x {a['max_length']} tokens", "",
             "| stage | weights | grads | optimiser | activations | total per GPU (GB) | fits |",
             "|---|---:|---:|---:|---:|---:|---|"]
    def gb(x):
        return f"{x / GB:.1f}" if x >= GB else f"{x / GB:.2f}"

    for name, st in p["stages"].items():
        lines.append(f"| {name} | {gb(st['weights'])} | {gb(st['grads'])} | {gb(st['optim'])} | "
                     f"{gb(st['activations'])} | {gb(st['total'])} | {'yes' if st['fits'] else 'NO'} |")
    lp = p["loop"]
    lines += ["", f"One SER loop: score {a['pool_pairs']:,} pairs ({lp['score_flops']:.2e} FLOPs, "
              f"{lp['score_hours']:.2f} h) + train the RM ({lp['train_flops']:.2e} FLOPs, {lp['train_hours']:.2f} h) "
              f"= {lp['loop_hours']:.2f} h at {a['mfu']:.0%} MFU of {a['gpu_tflops']:g} TFLOP/s per GPU."]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- measurement


def measure_stage(stage: str, a: PlanArgs) -> int:
    """Peak bytes of live tensors while `stage`'s step runs twice from random weights, model creation
    included: `torch.cuda.max_memory_allocated` on CUDA; on CPU the running sum of the allocations and
    frees that torch's profiler records (RSS would also count the C allocator's free lists)."""
    import torch
    from transformers import AutoConfig

    dtype = getattr(torch, a.dtype)
    config = AutoConfig.from_pretrained(a.model if Path(a.model).is_dir() else str(Path(a.model).parent))
    config.num_labels, config.use_cache = 1, False
    config.pad_token_id = config.pad_token_id if config.pad_token_id is not None else 0
    rows = {"sft": a.micro_batch, "rm": 2 * a.micro_batch, "score": 8 * a.micro_batch}[stage]
    torch.manual_seed(0)
    ids = torch.randint(3, config.vocab_size, (rows, a.max_length))
    if a.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(a.device)
        base = torch.cuda.memory_allocated(a.device)
        _run_stage(stage, a, config, dtype, ids)
        return torch.cuda.max_memory_allocated(a.device) - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        _run_stage(stage, a, config, dtype, ids)
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and str(e.device_type()).endswith("CPU"))
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def _run_stage(stage, a: PlanArgs, config, dtype, ids):
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from ser.flags import ModelArguments

    ids = ids.to(a.device)
    cls = AutoModelForCausalLM if stage == "sft" else AutoModelForSequenceClassification
    model = cls.from_config(config, dtype=dtype).to(a.device)
    if stage == "score":
        model.eval()
        with torch.no_grad():
            for _ in range(2):
                model(input_ids=ids).logits.sum().item()
        return
    if a.lora:
        from peft import get_peft_model

        margs = ModelArguments(lora_r=a.lora_r, lora_dropout=0.0)
        task, extra = ("CAUSAL_LM", {}) if stage == "sft" else ("SEQ_CLS", {"modules_to_save": ["score"]})
        model = get_peft_model(model, margs.lora_config(task, target_modules=a.lora_targets.split(","), **extra))
    for p in model.parameters():  # fp32 master weights for what trains (ser.modeling.fp32_master_weights)
        if p.requires_grad:
            p.data = p.data.float()
    if a.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    half = ids.shape[0] // 2
    for _ in range(2):
        with torch.autocast(a.device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32):
            if stage == "sft":
                loss = model(input_ids=ids, labels=ids).loss
            else:
                r = model(input_ids=ids).logits[:, 0]
                loss = -torch.nn.functional.logsigmoid(r[:half] - r[half:]).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def measure(a: PlanArgs, stages=("sft", "rm", "score")) -> dict:
    return {stage: measure_stage(stage, a) for stage in stages}


def compare(p: dict, measured: dict) -> str:
    lines = ["| stage | estimated (GB) | measured (GB) | error |", "|---|---:|---:|---:|"]
    for stage, m in measured.items():
        est = p["stages"][stage]["total"] - p["args"]["overhead_gb"] * GB
        lines.append(f"| {stage} | {est / GB:.3f} | {m / GB:.3f} | {est / m - 1:+.1%} |")
    return "\n".join(lines)


def main(argv=None):
    (a,) = HfArgumentParser(PlanArgs).parse_args_into_dataclasses(args=argv)
    if a.measure and (a.gpus != 1 or a.zero != 0):
        raise SystemExit("--measure runs one process: pass --gpus 1 --zero 0")
    p = plan(a)
    print(table(p))
    if a.measure:
        p["measured"] = measure(a)
        print(f"\nMeasured on {a.device} (one process, {a.dtype}; estimates without --overhead_gb):\n")
        print(compare(p, p["measured"]))
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(p, indent=1) + "\n")
    return p


if __name__ == "__main__":
    main()
