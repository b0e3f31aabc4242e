"""Stage 3: PPO of the SFT policy against the (SER) reward model.

A compact PPO for language models on accelerate, in the spirit of "The N implementation details of
RLHF with PPO" (Huang et al., 2024). Each step:

  rollout   sample `batch_size` prompts per process, generate, truncate each response after its EOS;
  score     the RM (or each RM of an ensemble, combined by --reward_ensemble) reads the sampled ids
            themselves ([bos] prompt response [eos], built by the same function as its training pairs) at
            the final eos; normalised by the RM's mean and std on SFT samples measured before the first
            update (--normalize_reward sft, the default); minus --reward_baseline; optional penalty when
            the response has no EOS; an independent RM or the gold reward are logged beside it;
  reward    per token: -kl_coef * (log pi - log pi_ref), plus the score on the last response token;
  advantage GAE (gamma, lam) on the critic's values, whitened;
  update    `ppo_epochs` passes of clipped policy and value losses over minibatches of
            `mini_batch_size`, `gradient_accumulation_steps` minibatches per optimiser step;
  control   adaptive KL coefficient (Ziegler et al. 2019) with a horizon scaled to the run, early stop of
            the epochs on KL, a hard KL budget; the checkpoint kept is the last or the best by an
            independent score (--keep best).

Memory-light default: LoRA on the policy, a value head on the same backbone, and the reference
policy = the policy with its adapter disabled: one copy of the base weights serves all three.
`--critic separate` trains a separate critic initialised from the RM instead.

A checkpoint (every --save_freq steps) holds the weights, optimiser, scheduler, every process's
RNG states, the KL controller and the data position; --resume_from_checkpoint continues exactly.
"""

import contextlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from accelerate import Accelerator
from accelerate.utils import gather, set_seed
from transformers import get_scheduler
from trl.trainer.utils import disable_dropout_in_model, entropy_from_logits

from ser import features
from ser.cli import check_accelerator, get_logger, parse, resolved_args, setup_wandb
from ser.data import check_writable, load_records, write_json
from ser.flags import DataArguments, default_of
from ser.flags import ModelArguments as BaseModelArguments
from ser.modeling import (
    THIS_PROCESS_ONLY,
    check_saved_weights,
    fp32_master_weights,
    held_weights,
    inference_engine,
    load_causal_lm,
    load_reward_model,
    load_tokenizer,
    merge_lora,
    partitioned_at_load,
    record_lora_base,
    save_whole,
    whole_numel,
    whole_weights,
    zero_stage,
)
from ser.rollout import lm_logprobs, logprobs_of, position_ids_of, reward_inputs, sample
from ser.scoring import score_ids

logger = get_logger("ppo")


@dataclass
class ScriptArguments(DataArguments):
    subset: str | None = default_of(DataArguments, "subset", "data/rl")
    model_name: str = field(kw_only=True, metadata={"help": "the SFT model: the initial policy and the reference"})
    reward_model_name: list[str] = field(kw_only=True, metadata={
        "help": "the reward model (rm_training.py output); several form an ensemble (--reward_ensemble), e.g. the "
                "SER loops' RMs"})
    output_dir: str = field(default="runs/ppo", metadata={"help": "checkpoints and the final policy"})
    log_with: str | None = field(default=None, metadata={"help": "wandb, or none"})
    # optimisation
    learning_rate: float = field(default=1.4e-5, metadata={"help": "learning rate"})
    lr_scheduler_type: str = field(default="constant", metadata={"help": "constant or linear decay to 0"})
    adafactor: bool = field(default=False, metadata={"help": "Adafactor instead of AdamW"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm"})
    steps: int = field(default=20000, metadata={"help": "PPO steps (rollout + update of batch_size prompts per process)"})
    batch_size: int = field(default=8, metadata={"help": "prompts per PPO step and process"})
    mini_batch_size: int = field(default=1, metadata={"help": "samples per forward/backward pass in the update"})
    gradient_accumulation_steps: int = field(default=8, metadata={"help": "minibatches per optimiser step"})
    ppo_epochs: int = field(default=4, metadata={"help": "passes over each batch"})
    forward_batch_size: int = field(default=16, metadata={"help": "samples per no-grad forward in the rollout"})
    # generation
    output_max_length: int = field(default=128, metadata={"help": "max new tokens per response"})
    max_prompt_length: int = field(default=256, metadata={"help": "prompt tokens kept (cut from the left)"})
    max_length: int | None = default_of(DataArguments, "max_length", None)  # None: the RM's own (resolve_max_length)
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (also applied to logprobs)"})
    batched_gen: bool = field(default=True, metadata={"help": "generate the batch at once (else one prompt at a time)"})
    gather_for_generation: bool = field(default=False, metadata={
        "help": "under ZeRO-3, gather the whole policy once per rollout (each GPU then holds all of it; for "
                "policies that fit) instead of gathering every layer for every new token"})
    # reward
    reward_transform: str = field(default="raw", metadata={"help": "raw RM score, or sigmoid (the original script)",
                                                            "choices": ["raw", "sigmoid"]})
    reward_baseline: float = field(default=0.0, metadata={"help": "subtracted from every score"})
    reward_norm: bool = field(default=False, metadata={"help": "the old flag: True is --normalize_reward running"})
    normalize_reward: str = field(default="sft", metadata={
        "help": "sft: scores minus the RM's mean, over its std, on the SFT policy's samples of the run's prompts, "
                "measured once before PPO (a self-trained RM's growing margins then do not push harder); running: "
                "by running mean and std; none", "choices": ["sft", "running", "none"]})
    normalize_samples: int = field(default=256, metadata={"help": "--normalize_reward sft: SFT samples measured"})
    reward_ensemble: str = field(default="mean", metadata={
        "help": "several RMs: mean, min (the most pessimistic member) or mean_minus_std (mean - coef * std; Coste et "
                "al. 2024) of their scores", "choices": ["mean", "min", "mean_minus_std"]})
    ensemble_std_coef: float = field(default=1.0, metadata={"help": "--reward_ensemble mean_minus_std: the coef"})
    bootstrap_heads: bool = field(default=False, metadata={
        "help": "each RM joins the ensemble as the K heads it was saved with (rm_training.py --trunk frozen "
                "--bootstrap_heads K), all scored in one pass of its trunk"})
    eval_reward_model: str | None = field(default=None, metadata={
        "help": "an independent RM (e.g. the all-label RM) whose score of every rollout is logged beside the proxy's "
                "(eval/reward_mean); the summary names the checkpoint where it was highest"})
    gold: str = field(default="none", metadata={"help": "synthetic: also log the synthetic task's gold reward",
                                                 "choices": ["none", "synthetic"]})
    keep: str = field(default="last", metadata={
        "help": "the policy saved: last, or best (the checkpoint with the highest independent score: --gold, else "
                "--eval_reward_model)", "choices": ["last", "best"]})
    missing_eos_penalty: float | None = field(default=None, metadata={"help": "subtracted when a response has no EOS"})
    # PPO
    init_kl_coef: float = field(default=0.2, metadata={"help": "initial KL penalty coefficient"})
    adap_kl_ctrl: bool = field(default=True, metadata={"help": "adapt the KL coefficient toward --kl_target"})
    kl_target: float = field(default=3.0, metadata={
        "help": "target KL (nats per sequence) of the adaptive controller; 3, not TRL's 6: chosen among 4 KL settings "
                "on held-out seeds of the synthetic-ppo grid (experiments/results/PREREGISTRATION-ppo-defaults.md)"})
    kl_horizon: int | None = field(default=None, metadata={
        "help": "horizon of the adaptive KL controller, in samples; default: a tenth of the run's samples (at least "
                "one step's), so the coefficient can move by up to e^2 over the run (Ziegler et al.'s 10000 moves it "
                "by at most 0.064 %% a step at batch 32)"})
    kl_budget: float | None = field(default=None, metadata={
        "help": "a hard KL budget (nats per sequence): a step past it ends the run, and the policy saved is the last "
                "checkpoint within it"})
    target_kl: float = field(default=0.1, metadata={"help": "with --early_stopping: stop the epochs when KL > 1.5x this"})
    early_stopping: bool = field(default=True, metadata={
        "help": "stop a step's PPO epochs once their approximate KL passes 1.5x --target_kl; on by default, chosen on "
                "held-out seeds (experiments/results/PREREGISTRATION-ppo-round2.md)"})
    gamma: float = field(default=1.0, metadata={"help": "discount"})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda"})
    cliprange: float = field(default=0.2, metadata={"help": "policy ratio clip"})
    cliprange_value: float = field(default=0.2, metadata={"help": "value clip"})
    vf_coef: float = field(default=0.1, metadata={"help": "value loss weight"})
    # models
    critic: str = field(default="shared", metadata={"help": "shared: value head on the policy backbone; separate: "
                                                             "a critic model copied from the RM",
                                                     "choices": ["shared", "separate"]})
    value_init: str = field(default="rm", metadata={"help": "value head init: rm (the RM's score head) or zero",
                                                     "choices": ["rm", "zero"]})
    bf16: bool | None = field(default=None, metadata={
        "help": "bf16 mixed precision; default: the launcher's (mixed_precision of an accelerate config file)"})
    rm_dtype: str = field(default="auto", metadata={"help": "RM weights dtype"})
    # bookkeeping
    peak_tflops: float | None = field(default=None, metadata={
        "help": "peak TFLOP/s of one device, for MFU; default: the listed peak of this GPU/TPU in the compute dtype"})
    save_freq: int = field(default=200, metadata={"help": "checkpoint every this many steps (0: only at the end)"})
    save_total_limit: int | None = field(default=2, metadata={
        "help": "keep this many newest checkpoints (each holds optimiser state); None keeps all"})
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": "a checkpoint folder to continue from"})
    local_rank: int = field(default=-1, metadata={"help": "set by the deepspeed launcher"})
    deepspeed: str | None = field(default=None, metadata={
        "help": "not taken here: `accelerate launch --config_file scripts/cluster/zero3.yaml ppo/ppo.py ...`"})


@dataclass
class ModelArguments(BaseModelArguments):
    use_lora: bool = field(default=True, metadata={
        "help": "LoRA policy, the reference being the adapter switched off (--use_peft is the old name)"})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout (switched off in PPO's passes anyway)"})


ARGUMENTS = (ScriptArguments, ModelArguments)


# ----------------------------------------------------------------------------- models


class PolicyAndValue(nn.Module):
    """The policy (a causal LM, LoRA by default) and its critic, as one module for accelerate."""

    def __init__(self, policy, value_head=None, critic=None):
        super().__init__()
        self.policy, self.value_head, self.critic = policy, value_head, critic

    def forward(self, input_ids, attention_mask, position_ids):
        out = self.policy(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          output_hidden_states=self.critic is None, use_cache=False)
        if self.critic is None:  # value head on the policy's last hidden state
            hidden = out.hidden_states[-1]  # bf16 beside an fp32 head when no autocast runs
            values = self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1)
        else:  # the critic's score head applied at every position
            hidden = self.critic(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                 output_hidden_states=True).hidden_states[-1]
            values = self.critic.score(hidden).squeeze(-1)
        return out.logits, values


def build_models(args, model_args, tokenizer, deepspeed_plugin=None):
    """Policy and critic with fp32 trainable weights (bf16 is for compute, under autocast) and no dropout:
    dropout would make the logprobs of the update differ from the rollout's (a detail TRL also keeps).

    Under ZeRO-3 every model is partitioned over the processes as it loads, so no process or GPU holds one
    whole: the policy and critic are trained as one DeepSpeed engine, the reference and the RM become
    inference engines in `main`. A LoRA RM then scores unmerged (merging needs its whole weights)."""
    deepspeed, zero3 = deepspeed_plugin is not None, zero_stage(deepspeed_plugin) == 3

    def loading():
        return partitioned_at_load(deepspeed_plugin) if zero3 else contextlib.nullcontext()

    with loading():
        policy = load_causal_lm(args.model_name, tokenizer, model_args.dtype)
        reference = None
        if model_args.use_lora:
            from peft import get_peft_model

            policy = get_peft_model(policy, model_args.lora_config("CAUSAL_LM"))
        else:  # a frozen copy of the SFT model is the reference
            reference = load_causal_lm(args.model_name, tokenizer, model_args.dtype).eval().requires_grad_(False)
        disable_dropout_in_model(policy)  # the LoRA dropout too
        policy = fp32_master_weights(policy, args.bf16, deepspeed)
        rms = [load_scoring_rm(path, tokenizer, args.rm_dtype, zero3, args.bootstrap_heads)
               for path in args.reward_model_name]
        rm = rms[0]  # the first RM initialises the critic
    if args.critic == "separate":
        # Value-model initialised from the RM (its backbone and score head), trained alongside the policy.
        # A LoRA RM is merged into a plain model first, from whole weights (each process, once).
        lora_rm = hasattr(rm, "merge_and_unload")
        with whole_weights() if lora_rm else loading():
            critic = load_reward_model(args.reward_model_name[0], tokenizer)
            if lora_rm:
                critic = critic.merge_and_unload()
        critic.requires_grad_(True).train()
        disable_dropout_in_model(critic)
        critic = fp32_master_weights(critic, args.bf16, deepspeed)
        return one_dtype_with_partitions(PolicyAndValue(policy, critic=critic)), reference, rms
    hidden = policy.config.get_text_config().hidden_size
    value_head = nn.Linear(hidden, 1, bias=False)  # fp32
    with torch.no_grad():
        if args.value_init == "rm":
            # The RM's head on the SFT backbone is a fair first guess of the return (the detail "initialise
            # the value head from the RM"); a zero head predicts nothing.
            with whole_parameters(score_head(rm).weight) as heads:
                head = heads.float().mean(0, keepdim=True)  # the mean of an RM's bootstrap heads (--bootstrap_heads)
                if head.shape != value_head.weight.shape:
                    raise ValueError(f"--value_init rm: the RM's score head has shape {tuple(head.shape)}, the "
                                     f"policy's value head needs {tuple(value_head.weight.shape)} (hidden size {hidden}): "
                                     "the RM was not trained on this policy's backbone. Use --value_init zero or "
                                     "--critic separate.")
                value_head.weight.copy_(head)
        else:
            value_head.weight.zero_()
    return one_dtype_with_partitions(PolicyAndValue(policy, value_head=value_head)), reference, rms


def load_scoring_rm(path, tokenizer, dtype, zero3, bootstrap_heads=False):
    """An RM for scoring only: no gradients; a LoRA RM merged, except under ZeRO-3 (merging needs whole weights).
    With `bootstrap_heads`, its score head is replaced by its K bootstrap heads: one score per head (under ZeRO-3
    the new layer is made whole in every process, and the RM's inference engine partitions it with the rest)."""
    rm = load_reward_model(path, tokenizer, dtype)
    if hasattr(rm, "merge_and_unload") and not zero3:
        rm = rm.merge_and_unload()
    if bootstrap_heads:
        heads = features.load_bootstrap_heads(path)
        rm.score = nn.Linear(heads.shape[1], len(heads), bias=False, dtype=rm.score.weight.dtype,
                             device=rm.score.weight.device)
        with torch.no_grad():
            rm.score.weight.copy_(heads)
    return rm.eval().requires_grad_(False)


def rm_max_length(path) -> int | None:
    """The length an RM was trained at, from its eval_results.json (None when it does not say)."""
    try:
        return json.loads((Path(path) / "eval_results.json").read_text()).get("max_length")
    except (OSError, ValueError, AttributeError):
        return None


def resolve_max_length(args) -> int:
    """--max_length is the RMs' training length: taken from them when not given, refused when it differs."""
    known = {p: n for p in args.reward_model_name + ([args.eval_reward_model] if args.eval_reward_model else [])
             if (n := rm_max_length(p)) is not None}
    lengths = set(known.values())
    if args.max_length is None:
        if len(lengths) > 1:
            raise ValueError(f"the RMs were trained at different lengths ({known}); give --max_length")
        return lengths.pop() if lengths else DataArguments.__dataclass_fields__["max_length"].default
    for path, n in known.items():
        if n != args.max_length:
            raise ValueError(f"--max_length {args.max_length}: {path} was trained at {n} tokens (its "
                             "eval_results.json); drop --max_length to use it, or score with the length the RM knows")
    return args.max_length


def kl_horizon(args, num_processes: int) -> int:
    """The adaptive controller's horizon in samples (default: a tenth of the run's), with a warning when it
    cannot move the coefficient by 10 % within the run."""
    samples, per_step = args.steps * args.batch_size * num_processes, args.batch_size * num_processes
    horizon = args.kl_horizon or max(per_step, samples // 10)  # at most 20 % a step
    reach = math.exp(0.2 * samples / horizon)  # the coefficient's largest change over the run
    if args.adap_kl_ctrl and reach < 1.1:
        logger.warning(f"ppo: warning: --kl_horizon {horizon} against {samples} samples in the run: the adaptive KL "
                       f"coefficient can change by at most {100 * (reach - 1):.2f} % over the whole run (at most "
                       f"{100 * 0.2 * args.batch_size * num_processes / horizon:.3f} % a step), so it is in effect fixed "
                       f"at {args.init_kl_coef}; leave --kl_horizon unset (a tenth of the run) or set --adap_kl_ctrl False")
    return horizon


def ensemble_scores(member_scores: list, how: str, std_coef: float = 1.0) -> torch.Tensor:
    """One score per sample from the members' [members][samples] scores."""
    stacked = torch.stack([torch.as_tensor(m, dtype=torch.float32) for m in member_scores])
    if how == "min":
        return stacked.min(0).values
    if how == "mean_minus_std" and len(stacked) > 1:
        return stacked.mean(0) - std_coef * stacked.std(0)
    return stacked.mean(0)


def one_dtype_with_partitions(model):
    """The weights added after a ZeRO-3 load (a value head, LoRA matrices, a merged critic) in the dtype of
    the partitioned ones. DeepSpeed casts a model loaded whole to its 16-bit dtype; one partitioned at load
    it leaves as it is, and its optimizer needs one dtype (it keeps fp32 masters of 16-bit weights)."""
    dtypes = {p.dtype for p in model.parameters() if hasattr(p, "ds_id")}
    if len(dtypes) == 1:
        dtype = dtypes.pop()
        for p in model.parameters():
            if not hasattr(p, "ds_id") and p.dtype != dtype:
                p.data = p.data.to(dtype)
    return model


def score_head(rm) -> nn.Linear:
    """The RM's score head: a plain model's `score`, or the trained copy a LoRA RM keeps of it."""
    head = rm.get_submodule("base_model.model.score") if hasattr(rm, "peft_config") else rm.score
    if hasattr(head, "modules_to_save"):
        head = head.modules_to_save["default"]
    return head


@contextlib.contextmanager
def whole_parameters(param):
    """`param` whole in every process for the block, also when ZeRO-3 has partitioned it."""
    if not hasattr(param, "ds_id"):
        yield param
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters([param]):
        yield param


# ----------------------------------------------------------------------------- PPO pieces


class AdaptiveKLController:
    """Ziegler et al. 2019: kl_coef *= 1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon."""

    def __init__(self, init, target, horizon, adaptive):
        self.value, self.target, self.horizon, self.adaptive = init, target, horizon, adaptive

    def update(self, current_kl, n_samples):
        if self.adaptive:
            error = min(max(current_kl / self.target - 1, -0.2), 0.2)
            self.value *= 1 + error * n_samples / self.horizon


class RunningMoments:
    """Running mean/std of scores across steps and processes (Chan et al. parallel update)."""

    def __init__(self):
        self.mean, self.var, self.count = 0.0, 1.0, 1e-24

    def update(self, xs):
        n, mean, var = xs.numel(), xs.mean().item(), xs.var(unbiased=False).item()
        delta, total = mean - self.mean, self.count + n
        self.var = (self.var * self.count + var * n + delta ** 2 * self.count * n / total) / total
        self.mean, self.count = self.mean + delta * n / total, total

    @property
    def std(self):
        return math.sqrt(self.var * self.count / max(self.count - 1, 1))


@dataclass
class TrainState:
    """Everything beyond model/optimiser/scheduler/RNG that a resume needs. Kept as JSON
    (trainer_state.json), not pickled: resuming must not unpickle anything it need not."""

    step: int = 0
    data_epoch: int = 0
    data_position: int = 0
    kl_coef: float = 0.0
    reward_mean: float = 0.0
    reward_var: float = 1.0
    reward_count: float = 1e-24
    norm_mean: float | None = None  # --normalize_reward sft: the SFT samples' statistics
    norm_std: float | None = None
    checkpoints: list = field(default_factory=list)  # each checkpoint's step, proxy and independent scores
    stopped: str | None = None  # why the run ended before --steps

    def state_dict(self):
        return asdict(self)

    @classmethod
    def read(cls, checkpoint) -> "TrainState":
        path = Path(checkpoint) / "trainer_state.json"
        try:
            saved = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not a readable PPO checkpoint state ({e})") from None
        return cls(**{k: saved[k] for k in asdict(cls()) if k in saved})


def masked_mean(x, mask):
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(x, mask, shift_mean=True):
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    return out if shift_mean else out + mean


def gae(rewards, values, mask, gamma, lam):
    """Generalised advantage estimation over response tokens; padding after EOS contributes nothing."""
    T = rewards.shape[1]
    advantages, last = torch.zeros_like(rewards), torch.zeros_like(rewards[:, 0])
    values, rewards = values * mask, rewards * mask
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last * (mask[:, t + 1] if t + 1 < T else 0)
        advantages[:, t] = last
    return advantages * mask, (advantages + values) * mask


# ----------------------------------------------------------------------------- the run


def prompt_batches(n, args, state, world, rank):
    """This process's prompt indices for the current step; a seeded permutation per data epoch."""
    per_step = args.batch_size * world
    while True:
        g = torch.Generator().manual_seed(args.seed * 100003 + state.data_epoch)
        order = torch.randperm(n, generator=g).tolist()
        if state.data_position + per_step <= n:
            chunk = order[state.data_position:state.data_position + per_step]
            state.data_position += per_step
            return chunk[rank::world]
        state.data_epoch, state.data_position = state.data_epoch + 1, 0
        if per_step > n:
            raise ValueError(f"batch_size x processes = {per_step} exceeds the {n} prompts")


def clock() -> float:
    """Seconds, after the device has finished what was queued (so phases are timed, not launched)."""
    if torch.accelerator.is_available():
        torch.accelerator.synchronize()
    return time.perf_counter()


def forward(model, query_responses, attention_mask, context_length):
    """Policy logits and critic values at the positions that predict the response tokens."""
    logits, values = model(query_responses, attention_mask, position_ids_of(attention_mask))
    logits = logits[:, context_length - 1:-1]
    values = values[:, context_length - 1:-1]
    return logits, values


def process_group_kwargs() -> dict:
    """Without an accelerator, launched processes still form one group: gloo under DeepSpeed,
    accelerate's CPU mode otherwise. On GPUs accelerate's defaults stand."""
    if torch.accelerator.is_available():
        return {}
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        from accelerate.utils import InitProcessGroupKwargs

        return {"kwargs_handlers": [InitProcessGroupKwargs(backend="gloo")]}
    return {"cpu": True}


def check_args(args) -> int:
    """Refuse, before any work, what cannot run as asked; settle the flags that imply others. Returns the
    minibatches of a PPO epoch."""
    if args.deepspeed:
        # (a DeepSpeed JSON of the Trainer's, like sft/deepspeed_config.json, is full of "auto" entries that only
        # the Trainer fills in; accelerate's config file gives DeepSpeed without them)
        raise ValueError(f"--deepspeed {args.deepspeed}: ppo.py takes DeepSpeed from accelerate: `accelerate launch "
                         "--config_file scripts/cluster/zero3.yaml ppo/ppo.py ...` (or `--use_deepspeed --zero_stage 2`)")
    launcher_accumulation = os.environ.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS")
    if launcher_accumulation not in (None, "auto", str(args.gradient_accumulation_steps)):
        raise ValueError(f"the launcher sets gradient_accumulation_steps {launcher_accumulation} (accelerate's "
                         f"--gradient_accumulation_steps or its config file's deepspeed_config), ppo.py's "
                         f"--gradient_accumulation_steps is {args.gradient_accumulation_steps}: drop the launcher's, "
                         "or give both the same value")
    if args.log_with in ("none", ""):
        args.log_with = None
    if args.reward_norm:  # the old flag
        args.normalize_reward = "running"
    if args.bootstrap_heads:
        for path in args.reward_model_name:
            features.load_bootstrap_heads(path)  # refuses an RM saved without them, naming it
    if args.keep == "best" and args.gold == "none" and not args.eval_reward_model:
        raise ValueError("--keep best: needs an independent score to choose by (--gold or --eval_reward_model)")
    args.max_length = resolve_max_length(args)
    if args.batch_size % args.mini_batch_size:
        raise ValueError(f"--batch_size {args.batch_size} is not a multiple of --mini_batch_size {args.mini_batch_size}")
    minibatches = args.batch_size // args.mini_batch_size
    if minibatches % args.gradient_accumulation_steps:
        # Otherwise the last optimiser step of an epoch would carry gradients into the next epoch or step.
        raise ValueError(f"--batch_size {args.batch_size} / --mini_batch_size {args.mini_batch_size} = {minibatches} "
                         f"minibatches per PPO epoch is not a multiple of --gradient_accumulation_steps "
                         f"{args.gradient_accumulation_steps}: choose sizes where it is (e.g. accumulation "
                         f"{math.gcd(minibatches, args.gradient_accumulation_steps)})")
    check_writable(Path(args.output_dir) / "run_args.json")  # not first at step --save_freq
    return minibatches


def open_accelerator(args) -> Accelerator:
    if args.log_with:
        setup_wandb(args.log_with)
    check_accelerator()
    precision = None if args.bf16 is None else "bf16" if args.bf16 else "no"  # None: the launcher's
    accelerator = Accelerator(gradient_accumulation_steps=args.gradient_accumulation_steps,
                              mixed_precision=precision, log_with=args.log_with, **process_group_kwargs())
    if accelerator.mixed_precision not in ("bf16", "no"):
        raise ValueError(f"ppo.py runs in bf16 or fp32; the launcher asks for {accelerator.mixed_precision}")
    args.bf16 = accelerator.mixed_precision == "bf16"
    set_seed(args.seed, device_specific=True)
    return accelerator


@dataclass
class Run:
    """What a step works with: the trained policy-and-value engine, its optimiser and scheduler, the frozen
    reference and RMs (DeepSpeed inference engines under ZeRO-3), and the figures MFU needs."""

    model: object
    unwrapped: object
    optimizer: object
    scheduler: object
    reference: object
    rms: list
    eval_rm: object
    zero3: bool
    n_params: int
    n_trainable: int


def setup(args, model_args, accelerator, tokenizer, minibatches) -> Run:
    """The models, the optimiser and the scheduler, prepared by accelerate (and DeepSpeed when launched so)."""
    plugin = accelerator.state.deepspeed_plugin
    zero3 = zero_stage(plugin) == 3
    model, reference, rms = build_models(args, model_args, tokenizer, plugin)
    eval_rm = None
    if args.eval_reward_model:
        with partitioned_at_load(plugin) if zero3 else contextlib.nullcontext():
            eval_rm = load_scoring_rm(args.eval_reward_model, tokenizer, args.rm_dtype, zero3)
    params = [p for p in model.parameters() if p.requires_grad]
    # whole sizes: ZeRO-3 leaves each process a shape-(0,) tensor in place of every partitioned weight
    n_trainable = sum(whole_numel(p) for p in params)
    n_params = sum(whole_numel(p) for p in model.policy.parameters())  # for the FLOPs of a step (MFU)
    if args.adafactor:
        from transformers.optimization import Adafactor

        optimizer = Adafactor(params, lr=args.learning_rate, scale_parameter=False, relative_step=False)
    else:
        optimizer = torch.optim.AdamW(params, lr=args.learning_rate, eps=1e-5)
    updates_per_step = args.ppo_epochs * minibatches // args.gradient_accumulation_steps
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=0,
                              num_training_steps=args.steps * updates_per_step * accelerator.num_processes)
    if plugin is not None:  # no dataloader to infer it from
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = args.mini_batch_size
        # DeepSpeed clips inside its step (accelerator.clip_grad_norm_ does nothing there): --max_grad_norm goes
        # into its config, unless the config file set its own
        if plugin.zero_stage == 3:  # the final policy is gathered from the shards (save_policy)
            plugin.deepspeed_config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
        clipping = plugin.deepspeed_config.get("gradient_clipping", "auto")
        if clipping in ("auto", None):
            plugin.deepspeed_config["gradient_clipping"] = args.max_grad_norm
        elif float(clipping) != args.max_grad_norm:
            raise ValueError(f"the DeepSpeed config clips gradients at {clipping}, --max_grad_norm is {args.max_grad_norm}: "
                             "give both the same value")
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    if zero3:  # the RMs and the reference stay partitioned: every process runs the same forward passes on them
        rms = [inference_engine(rm, accelerator) for rm in rms]
        eval_rm = None if eval_rm is None else inference_engine(eval_rm, accelerator)
        reference = None if reference is None else inference_engine(reference, accelerator)
    else:
        for part in (*rms, eval_rm, reference):
            if part is not None:
                part.to(accelerator.device)
    for name, part in (("policy and value", model), ("reference", reference), ("reward model", rms[0])):
        if part is not None:
            held, whole = held_weights(part)
            logger.info(f"ppo: process {accelerator.process_index} holds {held:,} of the {whole:,} weights of the {name}",
                        main_process_only=False)
    return Run(model, accelerator.unwrap_model(model), optimizer, scheduler, reference, rms, eval_rm, zero3, n_params,
               n_trainable)


def shaped(scores, has_eos, state, moments, args):
    """The score PPO optimises: normalised by the SFT samples' statistics (or running ones), minus the
    baseline, minus the missing-EOS penalty."""
    if args.normalize_reward == "sft":  # the SFT samples' mean and std, measured once
        scores = (scores - state.norm_mean) / state.norm_std
    scores = scores - args.reward_baseline
    if args.missing_eos_penalty is not None:
        scores = scores - args.missing_eos_penalty * (~has_eos).float()  # detail: penalise a missing EOS
    if args.normalize_reward == "running":
        moments.update(gather(scores))
        scores = (scores - moments.mean) / (moments.std + 1e-8)
    return scores


def watched_scores(run, tokenizer, rollout, questions, inputs, accelerator, args) -> dict:
    """Scores PPO does not optimise, of the step's samples: over-optimisation shows as the proxy rising while
    they fall. An independent RM's (--eval_reward_model) and the synthetic task's gold reward (--gold)."""
    out = {}
    if run.eval_rm is not None:
        with torch.no_grad(), accelerator.autocast():
            independent = score_ids(run.eval_rm, tokenizer, inputs, len(questions), THIS_PROCESS_ONLY,
                                    in_step_with=accelerator.state if run.zero3 else None)[0]
        out["eval/reward_mean"] = gather(torch.tensor(independent, device=accelerator.device)).mean().item()
    if args.gold == "synthetic":
        from ser.rollout import response_texts
        from ser.synthetic import gold_reward

        gold = [gold_reward(q, t) for q, t in zip(questions, response_texts(tokenizer, rollout))]
        out["gold/reward_mean"] = gather(torch.tensor(gold, dtype=torch.float32, device=accelerator.device)).mean().item()
    return out


def advantages_of(run, batch, scores, kl_coef, accelerator, args):
    """Logprobs of the policy and the reference, the critic's values, per-token rewards (the KL penalty, and the
    score on the last response token), GAE advantages (whitened) and returns; and the per-token KL."""
    query_responses, attention_mask, context, responses, response_mask = batch
    run.model.eval()
    old_logprobs, ref_logprobs, old_values = [], [], []
    with torch.no_grad(), accelerator.autocast():
        for i in range(0, len(responses), args.forward_batch_size):
            sl = slice(i, i + args.forward_batch_size)
            logits, values = forward(run.model, query_responses[sl], attention_mask[sl], context)
            old_logprobs.append(logprobs_of(logits.float(), responses[sl], args.temperature))
            old_values.append(values.float())
            ref_args = (query_responses[sl], attention_mask[sl], context, responses[sl], args.temperature)
            if run.reference is None:
                with run.unwrapped.policy.disable_adapter():  # the reference = the adapter switched off
                    ref_logprobs.append(lm_logprobs(run.unwrapped.policy, *ref_args))
            else:
                ref_logprobs.append(lm_logprobs(run.reference, *ref_args))
    old_logprobs, ref_logprobs, old_values = map(torch.cat, (old_logprobs, ref_logprobs, old_values))
    mask = response_mask.float()
    kl = (old_logprobs - ref_logprobs) * mask  # per-token KL estimate (k1)
    rewards = -kl_coef * kl
    last = (response_mask.sum(1) - 1).clamp(min=0)
    rewards[torch.arange(len(last), device=accelerator.device), last] += scores  # detail: the score on the last token
    advantages, returns = gae(rewards, old_values, mask, args.gamma, args.lam)
    advantages = masked_whiten(advantages, mask)  # detail: advantage whitening
    return old_logprobs, old_values, advantages, returns, mask, kl


def ppo_epochs(run, batch, old, accelerator, args, step: int) -> tuple[dict, bool]:
    """`--ppo_epochs` passes of clipped policy and value losses over minibatches; the statistics of each
    minibatch, and whether the epochs stopped early on KL (--early_stopping)."""
    query_responses, attention_mask, context, responses, _ = batch
    old_logprobs, old_values, advantages, returns, mask = old
    device = accelerator.device
    run.model.train()
    stats = {"pg_loss": [], "vf_loss": [], "clipfrac": [], "vf_clipfrac": [], "approxkl": [], "entropy": []}
    for _ in range(args.ppo_epochs):
        order = torch.randperm(len(responses)).tolist()
        for start in range(0, len(order), args.mini_batch_size):
            idx = torch.tensor(order[start:start + args.mini_batch_size], device=device)
            with accelerator.accumulate(run.model), accelerator.autocast():
                logits, values = forward(run.model, query_responses[idx], attention_mask[idx], context)
                logits, values = logits.float(), values.float()
                m = mask[idx]
                new_logprobs = logprobs_of(logits, responses[idx], args.temperature)
                ratio = torch.exp(new_logprobs - old_logprobs[idx])
                pg_losses = torch.max(-advantages[idx] * ratio,
                                      -advantages[idx] * ratio.clamp(1 - args.cliprange, 1 + args.cliprange))
                pg_loss = masked_mean(pg_losses, m)
                v_clipped = old_values[idx] + (values - old_values[idx]).clamp(-args.cliprange_value, args.cliprange_value)
                vf_unclipped, vf_clipped = (values - returns[idx]) ** 2, (v_clipped - returns[idx]) ** 2
                vf_loss = 0.5 * masked_mean(torch.max(vf_unclipped, vf_clipped), m)
                loss = pg_loss + args.vf_coef * vf_loss
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"step {step}: non-finite PPO loss (policy {pg_loss.item()}, "
                                             f"value {vf_loss.item()})")
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm:
                    accelerator.clip_grad_norm_(run.model.parameters(), args.max_grad_norm)
                run.optimizer.step()
                run.scheduler.step()
                run.optimizer.zero_grad()
            with torch.no_grad():
                entropy = entropy_from_logits(logits / args.temperature)
                stats["pg_loss"].append(pg_loss.item())
                stats["vf_loss"].append(vf_loss.item())
                stats["clipfrac"].append(masked_mean(((ratio - 1).abs() > args.cliprange).float(), m).item())
                stats["vf_clipfrac"].append(masked_mean((vf_clipped > vf_unclipped).float(), m).item())
                stats["approxkl"].append(0.5 * masked_mean((new_logprobs - old_logprobs[idx]) ** 2, m).item())
                stats["entropy"].append(masked_mean(entropy, m).item())
            if args.early_stopping and accelerator.sync_gradients:
                approxkl = gather(torch.tensor(stats["approxkl"][-1], device=device)).mean().item()
                if approxkl > 1.5 * args.target_kl:
                    return stats, True
    return stats, False


def step_log(run, state, kl_ctl, stats, stopped_early, figures, times, peak_tflops, accelerator, args) -> dict:
    """The step's figures, averaged over every process, with its phases' wall times and MFU."""
    scores, raw_scores, members, seq_kl, attention_mask, response_mask, has_eos, watched = figures
    device = accelerator.device
    t0, t_generated, t_scored, t_forwarded, t_updated = times
    seconds = t_updated - t0
    phases = {"generation": t_generated - t0, "scoring": t_scored - t_generated,
              "policy_reference_value": t_forwarded - t_scored, "update": t_updated - t_forwarded}
    n_tokens = gather(attention_mask.sum()).sum().item()
    # model FLOPs of the step: generation + policy/reference/critic forwards (2N per token each) and the
    # updates (6N per token per epoch); an estimate that ignores attention and the RM.
    tflops = run.n_params * n_tokens * (2 * 3 + 6 * args.ppo_epochs) / seconds / 1e12
    means = {k: gather(torch.tensor([sum(v) / len(v)], device=device)).mean().item() for k, v in stats.items() if v}
    all_scores, all_raw = gather(scores), gather(raw_scores)
    log = {"objective/kl": seq_kl, "objective/kl_coef": kl_ctl.value, **watched,
           "env/reward_mean": all_raw.mean().item(), "env/reward_std": all_raw.std().item(),
           "env/score_mean": all_scores.mean().item(),  # after transform, normalisation, baseline, EOS penalty
           **{f"ppo/{k}": v for k, v in means.items()},
           "ppo/early_stopped": float(stopped_early), "ppo/learning_rate": run.scheduler.get_last_lr()[0],
           "env/response_length": gather(response_mask.sum(1).float()).mean().item(),
           "env/eos_rate": gather(has_eos.float()).mean().item(),
           "perf/tokens_per_second": n_tokens / seconds, "perf/step_seconds": seconds,
           "perf/model_tflops": tflops, "perf/generation_share": phases["generation"] / seconds,
           **{f"perf/seconds_{k}": v for k, v in phases.items()}}
    if len(members) > 1:  # the ensemble's disagreement
        log["env/ensemble_spread"] = gather(torch.tensor(members, device=device).std(0)).mean().item()
    if peak_tflops:
        log["perf/mfu"] = tflops / (peak_tflops * accelerator.num_processes)
    for key in ("ppo/pg_loss", "ppo/vf_loss", "objective/kl"):
        if key in log and not math.isfinite(log[key]):
            raise FloatingPointError(f"step {state.step}: {key} is {log[key]}")
    accelerator.log(log, step=state.step)
    if accelerator.is_main_process:  # the same figures without a tracker, one JSON line per step
        with open(Path(args.output_dir) / "log.jsonl", "a") as f:
            f.write(json.dumps({"step": state.step, **log}) + "\n")
    logger.info(f"ppo step {state.step}: reward {log['env/reward_mean']:+.3f} kl {seq_kl:.3f} "
                f"kl_coef {kl_ctl.value:.4f} len {log['env/response_length']:.1f} "
                f"eos {log['env/eos_rate']:.2f} {log['perf/tokens_per_second']:.0f} tok/s "
                f"(generation {100 * log['perf/generation_share']:.0f} %)"
                + (f" mfu {100 * log['perf/mfu']:.2f}%" if "perf/mfu" in log else "")
                + "".join(f" {k.split('/')[0]} {v:+.3f}" for k, v in watched.items()))
    return log


def main(args: ScriptArguments, model_args: ModelArguments):
    # 0. the run's settings, the processes, the data
    minibatches = check_args(args)
    accelerator = open_accelerator(args)
    tokenizer = load_tokenizer(args.tokenizer_name or args.model_name)
    prompts = [r["question"] for r in load_records(args.dataset_name, args.subset, args.load_from_json,
                                                   fields=("question",))]

    # 1. models, optimiser, scheduler; the KL controller, the reward statistics, a resumed state
    run = setup(args, model_args, accelerator, tokenizer, minibatches)
    kl_ctl = AdaptiveKLController(args.init_kl_coef, args.kl_target, kl_horizon(args, accelerator.num_processes),
                                  args.adap_kl_ctrl)
    moments, state = RunningMoments(), TrainState(kl_coef=kl_ctl.value)
    if args.resume_from_checkpoint:
        # weights, optimiser, scheduler and RNG states (accelerate loads these with weights_only=True);
        # the counters, the KL coefficient and the reward moments from JSON
        state = TrainState.read(args.resume_from_checkpoint)
        accelerator.load_state(args.resume_from_checkpoint)
        kl_ctl.value = state.kl_coef
        moments.mean, moments.var, moments.count = state.reward_mean, state.reward_var, state.reward_count
        logger.info(f"ppo: resumed at step {state.step} from {args.resume_from_checkpoint}")
    logger.info(f"ppo: {accelerator.num_processes} process(es), {accelerator.distributed_type}, "
                f"{len(prompts)} prompts, {run.n_trainable:,} trainable parameters, gradient accumulation "
                f"{accelerator.gradient_accumulation_steps}, {accelerator.mixed_precision} precision")
    peak_tflops = args.peak_tflops or device_peak_tflops(accelerator)
    if not peak_tflops:
        logger.info(f"ppo: MFU is not logged: the peak FLOP/s of {accelerator.device} is not known (--peak_tflops sets it)")
    if args.log_with:
        accelerator.init_trackers(os.environ.get("WANDB_PROJECT", "ser"), config={**asdict(args), **asdict(model_args)})
    rollout_of, rm_scores = samplers(run, tokenizer, accelerator, args)
    measured = None
    if args.normalize_reward == "sft" and state.norm_std is None:  # measured once, before the first update
        state.norm_mean, state.norm_std, sft_scores = sft_reward_statistics(prompts, args, accelerator, rollout_of,
                                                                            rm_scores)
        measured = len(sft_scores)
        logger.info(f"ppo: reward normalisation on {measured} SFT samples: mean {state.norm_mean:+.4f}, "
                    f"std {state.norm_std:.4f}")
    if accelerator.is_main_process:
        write_json(Path(args.output_dir) / "run_args.json", {
            **resolved_args(args, model_args), "kl_horizon": kl_ctl.horizon,
            "reward_normalisation": {"how": args.normalize_reward, "mean": state.norm_mean, "std": state.norm_std,
                                     "samples": measured}})

    log = {}
    while state.step < args.steps:
        # 2. rollout: this process's prompts, sampled responses cut after their EOS
        t0 = clock()
        questions = [prompts[i] for i in prompt_batches(len(prompts), args, state, accelerator.num_processes,
                                                        accelerator.process_index)]
        rollout = rollout_of(questions)
        query, query_mask, responses, response_mask, has_eos = rollout[:5]
        batch = (torch.cat([query, responses], 1), torch.cat([query_mask, response_mask], 1), query.shape[1], responses,
                 response_mask)
        t_generated = clock()

        # 3. score: the RMs read the sampled ids, assembled as their training pairs were, at the final eos
        with torch.no_grad(), accelerator.autocast():
            scores, members, inputs = rm_scores(rollout, len(questions))
        if not torch.isfinite(scores).all():
            raise FloatingPointError(f"step {state.step}: the reward model returned non-finite scores {members}")
        raw_scores = scores.clone()  # logged as env/reward_mean whatever the shaping below
        watched = watched_scores(run, tokenizer, rollout, questions, inputs, accelerator, args)
        t_scored = clock()
        scores = shaped(scores, has_eos, state, moments, args)

        # 4. logprobs of policy and reference, values, per-token rewards, advantages
        *old, kl = advantages_of(run, batch, scores, kl_ctl.value, accelerator, args)
        t_forwarded = clock()

        # 5. PPO epochs over minibatches
        stats, stopped_early = ppo_epochs(run, batch, old, accelerator, args, state.step)

        # 6. KL control, logging, checkpoint
        seq_kl = gather(kl.sum(1)).mean().item()
        kl_ctl.update(seq_kl, args.batch_size * accelerator.num_processes)
        state.step += 1
        state.kl_coef = kl_ctl.value
        state.reward_mean, state.reward_var, state.reward_count = moments.mean, moments.var, moments.count
        figures = (scores, raw_scores, members, seq_kl, batch[1], response_mask, has_eos, watched)
        log = step_log(run, state, kl_ctl, stats, stopped_early, figures,
                       (t0, t_generated, t_scored, t_forwarded, clock()), peak_tflops, accelerator, args)
        if args.kl_budget is not None and seq_kl > args.kl_budget:  # past the budget: this policy is not kept
            state.stopped = f"step {state.step}: KL {seq_kl:.3f} > --kl_budget {args.kl_budget}"
            logger.info(f"ppo: {state.stopped}; the run ends, the policy kept is the last checkpoint within the budget")
            break
        if args.save_freq and state.step % args.save_freq == 0:
            checkpoint(accelerator, args, state, log)

    # 7. the policy kept: the last one, the best checkpoint by the independent score, or the last checkpoint within
    #    the KL budget
    finish(run, state, log, tokenizer, accelerator, args, model_args)
    return log  # the last step's figures


def samplers(run, tokenizer, accelerator, args):
    """rollout_of(questions): the policy's samples; rm_scores(rollout, n): every RM's score of them and the
    ensemble's (after --reward_transform), with the RM inputs."""
    # ZeRO-3 gathers each layer's weights from every process during a forward pass, so during generation it
    # does so for every new token, and all processes keep generating until the last one is done (synced_gpus),
    # or a finished one would leave the others waiting. With --gather_for_generation the whole policy is
    # gathered once per rollout instead: much faster, but each process then holds all of its weights. The
    # processes still generate in step: DeepSpeed's forward hooks talk to the other processes even then, and a
    # process whose batch ended early would meet another's gather with its next collective.
    def gathered():
        if not (run.zero3 and args.gather_for_generation):
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(run.unwrapped.policy.parameters()))
    synced = run.zero3 and accelerator.num_processes > 1

    def rollout_of(questions):
        policy = run.unwrapped.policy
        policy.eval()
        with torch.no_grad(), accelerator.autocast(), gathered():
            return sample(policy, tokenizer, questions, args.max_prompt_length, args.output_max_length,
                          args.temperature, args.batched_gen, accelerator.device, synced_gpus=synced)

    def rm_scores(rollout, n):
        inputs = reward_inputs(tokenizer, rollout, args.max_length)
        members = [list(head) for m in run.rms for head in zip(*score_ids(  # one member per head of each RM
            m, tokenizer, inputs, n, THIS_PROCESS_ONLY, in_step_with=accelerator.state if run.zero3 else None,
            heads=True)[0])]
        combined = ensemble_scores(members, args.reward_ensemble, args.ensemble_std_coef).to(accelerator.device)
        if args.reward_transform == "sigmoid":
            combined = torch.sigmoid(combined)
        return combined, members, inputs

    return rollout_of, rm_scores


def finish(run, state, log, tokenizer, accelerator, args, model_args) -> None:
    """The last checkpoint; the policy kept (--keep, or the last within --kl_budget) saved as a plain causal LM;
    summary.json, which names the checkpoints and the best one by the independent score."""
    if not state.stopped and not (args.save_freq and state.step % args.save_freq == 0):
        checkpoint(accelerator, args, state, log)
    kept = choose_checkpoint(state, args)
    if state.stopped and kept is None:
        logger.warning("ppo: warning: the KL budget was passed before the first checkpoint; the policy saved is the one "
                       "past the budget (a smaller --save_freq keeps one to roll back to)")
    if kept is not None and kept["step"] != state.step:
        accelerator.load_state(str(Path(args.output_dir) / f"checkpoint-{kept['step']}"))
    save_policy(accelerator, run.model, tokenizer, args, model_args)
    if accelerator.is_main_process:
        write_json(Path(args.output_dir) / "summary.json", {
            "steps_run": state.step, "stopped": state.stopped, "keep": args.keep,
            "kept_checkpoint": kept["step"] if kept else None, "checkpoints": state.checkpoints,
            "best_checkpoint": (best_checkpoint(state.checkpoints) or {}).get("step"),
            "reward_normalisation": {"how": args.normalize_reward, "mean": state.norm_mean, "std": state.norm_std}})
    accelerator.wait_for_everyone()  # no process closes the group while the main one still writes
    accelerator.end_training()


INDEPENDENT = ("gold/reward_mean", "eval/reward_mean")  # the scores a checkpoint is chosen by, in this order


def checkpoint(accelerator, args, state, log) -> None:
    """A checkpoint, and what the summary chooses by: the step's proxy, independent scores and KL."""
    state.checkpoints.append({"step": state.step, "proxy_reward": log.get("env/reward_mean"), "kl": log.get("objective/kl"),
                              **{k: log[k] for k in INDEPENDENT if k in log}})
    best = best_checkpoint(state.checkpoints)
    save_checkpoint(accelerator, args, state, keep={best["step"]} if best and args.keep == "best" else set())


def best_checkpoint(checkpoints) -> dict | None:
    """The checkpoint with the highest independent score (gold, else the evaluation RM); None without one."""
    for key in INDEPENDENT:
        scored = [c for c in checkpoints if c.get(key) is not None]
        if scored:
            return max(scored, key=lambda c: c[key])
    return None


def choose_checkpoint(state, args) -> dict | None:
    """The checkpoint whose policy is saved: --keep best's, else the last (within the KL budget)."""
    if args.keep == "best":
        return best_checkpoint(state.checkpoints)
    return state.checkpoints[-1] if state.checkpoints else None


def sft_reward_statistics(prompts, args, accelerator, rollout_of, rm_scores):
    """The RM's mean and std on the SFT policy's samples (`rollout_of`, before any update) of a seeded sample
    of --normalize_samples of the run's prompts, split over the processes; and the gathered scores."""
    world, rank = accelerator.num_processes, accelerator.process_index
    n = min(args.normalize_samples, len(prompts))
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(args.seed + 7919)).tolist()[:n]
    mine = order[rank::world]
    scores = []
    devices = [accelerator.device] if torch.device(accelerator.device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # the run samples what it would have sampled without this
        for i in range(0, max(len(order[0::world]), 1), args.batch_size):  # as many batches on every process
            batch = [prompts[j] for j in mine[i:i + args.batch_size]] or [prompts[order[0]]]  # (ZeRO-3: in step)
            with torch.no_grad(), accelerator.autocast():
                combined = rm_scores(rollout_of(batch), len(batch))[0]
            scores.append(combined[:len(mine[i:i + args.batch_size])])
    everything = gather(torch.cat(scores).float())
    std = everything.std().item() if len(everything) > 1 else 1.0
    return everything.mean().item(), std if std > 1e-8 else 1.0, everything


# Lightning's table misses the plain "NVIDIA H200" name and lists the H200 at its sparse rates. Its arithmetic is
# the H100 SXM's: dense bf16 989.4 TFLOP/s by NVIDIA's datasheets.
H200_DENSE_TFLOPS = {torch.bfloat16: 989.4, torch.float16: 989.4, torch.float32: 66.9}


def device_peak_tflops(accelerator) -> float | None:
    """The device's theoretical dense peak TFLOP/s in the compute dtype (Lightning's table of GPUs and TPUs);
    None on a CPU or an unlisted device."""
    from lightning_fabric.utilities.throughput import get_available_flops

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision, torch.float32)
    if accelerator.device.type == "cuda" and "h200" in torch.cuda.get_device_name(accelerator.device).lower():
        return H200_DENSE_TFLOPS[dtype]
    flops = get_available_flops(accelerator.device, dtype) if accelerator.device.type in ("cuda", "xla") else None
    return flops / 1e12 if flops else None


def save_checkpoint(accelerator, args, state, keep=frozenset()):
    """Written to a temporary folder and renamed: a checkpoint is whole or absent."""
    import tempfile

    from accelerate.utils import broadcast_object_list

    final = Path(args.output_dir) / f"checkpoint-{state.step}"
    tmp = [None]  # a fresh name (mkdtemp: no planted link is followed), chosen by the main process for all
    if accelerator.is_main_process:
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        for stale in Path(args.output_dir).glob(".checkpoint-*.tmp"):  # left by a killed save
            shutil.rmtree(stale, ignore_errors=True)
        tmp = [tempfile.mkdtemp(dir=args.output_dir, prefix=f".checkpoint-{state.step}.", suffix=".tmp")]
    tmp = Path(broadcast_object_list(tmp)[0] if accelerator.num_processes > 1 else tmp[0])
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "trainer_state.json").write_text(json.dumps({**state.state_dict(), "args": asdict(args)}, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        if args.save_total_limit:  # older checkpoints go only once the new one is whole
            older = sorted(Path(args.output_dir).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
            for old in older[:-args.save_total_limit]:
                if int(old.name.split("-")[1]) not in keep:  # the best so far stays for --keep best
                    shutil.rmtree(old)
    accelerator.wait_for_everyone()


def save_policy(accelerator, model, tokenizer, args, model_args):
    """The final policy as a plain causal LM (LoRA merged), loadable as --model_name.

    Its weights are gathered first: under ZeRO-3 each process holds a shard of every weight, and every
    process takes part in the gathering. A LoRA adapter is saved to OUTPUT/adapter and merged into the
    base read from disk, as sft.py does."""
    state = accelerator.get_state_dict(model)  # whole on the main process, also under ZeRO-3
    if accelerator.is_main_process:
        policy = accelerator.unwrap_model(model).policy
        weights = {k.removeprefix("policy."): v for k, v in state.items() if k.startswith("policy.")}
        out = Path(args.output_dir) / "policy"
        if hasattr(policy, "peft_config"):
            adapter = Path(args.output_dir) / "adapter"
            policy.save_pretrained(adapter, state_dict=weights)
            check_saved_weights(adapter)
            record_lora_base(adapter, args.model_name)
            save_whole(out, merge_lora(adapter, tokenizer, model_args.dtype), tokenizer)
        else:
            save_whole(out, policy, tokenizer, state_dict=weights)
        logger.info(f"ppo: wrote the policy to {out}")
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(*parse(ARGUMENTS))
