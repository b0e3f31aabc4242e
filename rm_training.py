"""Stage 2 (and every SER retraining): train a pairwise reward model.

The RM is a `num_labels=1` sequence-classification head on the SFT backbone (Loop 0), or a previous
RM that training continues from (Loop t+1). Several data sources train together: the SER union of
all loops' self-labelled pairs, plus the human seed. The loss is Bradley-Terry,
-log sigmoid(r_j - r_k), or the paper's hinge, max(0, margin - (r_j - r_k)).

Evaluation scores the held-out human pairs and reports strict accuracy (a tie is not a win), the
tie rate and the mean margin; the final figures go to OUTPUT_DIR/eval_results.json.
"""

import json
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from datasets import Dataset
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForSequenceClassification, TrainerCallback, set_seed
from transformers.modeling_outputs import SequenceClassifierOutputWithPast
from trl import RewardConfig, RewardTrainer
from trl.trainer.utils import disable_dropout_in_model

from ser.cli import get_logger, parse, resolved_args, resume_from, setup_wandb
from ser.data import DataError, encode, load_records, subsample, write_json, write_records
from ser.flags import DataArguments, default_of, hidden
from ser.flags import ModelArguments as BaseModelArguments
from ser.modeling import (
    check_saved_weights,
    end_processes,
    fit_embeddings,
    fp32_master_weights,
    is_lora_dir,
    load_reward_model,
    load_tokenizer,
    lora_base,
    record_lora_base,
    zero_stage,
)
from ser.scoring import FORWARD_COST, length_batches, pair_loss, pair_metrics, score_ids

logger = get_logger("rm_training")


@dataclass
class RMConfig(RewardConfig):
    """TRL's RewardConfig with the paper's defaults where it states them, the release's where it does not."""

    learning_rate: float = field(default=2e-5, metadata={"help": "learning rate (the paper: 2e-5; TRL: 1e-4)"})
    num_train_epochs: float = field(default=2.0, metadata={
        "help": "epochs (the release: 2 for the seed RM, 5 per loop; the loop driver sets SEED_EPOCHS/LOOP_EPOCHS)"})
    max_length: int | None = default_of(DataArguments, "max_length")  # TRL: 1024
    train_sampling_strategy: str = field(default="group_by_length", metadata={
        "help": "group_by_length: random batches of pairs of similar length (TRL: random, which pads more)",
        "choices": ["random", "sequential", "group_by_length", "batch_rebalance"]})
    forward_cost: float = field(default=FORWARD_COST, metadata={
        "help": "run a batch as several forwards of similar length where each saves more padded tokens than "
                "this (a forward's fixed cost, in tokens); inf: one padded forward per batch, as TRL"})


@dataclass
class ScriptArguments(DataArguments):
    dataset_name: list[str] = field(metadata={"help": "data folders (with --train_subset), JSON/JSONL files, or hub ids"})
    subset: str | None = hidden()  # two splits instead: --train_subset and --eval_subset
    max_length: int = hidden(512)  # RMConfig's --max_length
    seed: int = hidden(42)  # TrainingArguments' --seed
    model_name: str = field(kw_only=True, metadata={
        "help": "SFT model (a new score head is added) or a previous RM to continue"})
    train_subset: list[str] = field(default_factory=lambda: ["data/reward"],
                                    metadata={"help": "folders of training pairs inside each --dataset_name folder"})
    train_subset_size: int | None = field(default=None, metadata={
        "help": "use a seeded random sample of this many training pairs, from all sources together"})
    eval_subset: str = field(default="data/evaluation",
                             metadata={"help": "held-out pairs: a folder inside the first --dataset_name, or a file"})
    eval_subset_size: int | None = field(default=None, metadata={"help": "use a seeded random sample of this many held-out pairs"})
    eval_first_step: bool = field(default=False, metadata={"help": "also evaluate after the first optimiser step"})
    loss: str = field(default="bt", metadata={"help": "bt (Bradley-Terry, released code) or hinge (the paper)",
                                               "choices": ["bt", "hinge"]})
    hinge_margin: float = field(default=1.0, metadata={"help": "margin of the hinge loss"})
    trunk: str = field(default="full", metadata={
        "help": "full: train as configured (LoRA or all weights); frozen: the score head alone, on the trunk's "
                "cached last-token features (--feature_cache), fitted to convergence by L-BFGS", "choices": ["full", "frozen"]})
    feature_cache: str | None = field(default=None, metadata={
        "help": "--trunk frozen: the feature cache folder (built here for what it lacks); default: the one a frozen "
                "--model_name records"})
    feature_layer: int = field(default=-1, metadata={
        "help": "--trunk frozen: the trunk layer whose last-token state the head reads (-1: the last); the saved RM "
                "is the trunk truncated after it"})
    shared_prefix: bool = field(default=False, metadata={
        "help": "--trunk frozen: featurise each pair's question once for both responses (the same features)"})
    head_l2: float = field(default=1e-3, metadata={"help": "--trunk frozen: L2 penalty of the head, l2/2 |w|^2"})
    head_optimizer: str = field(default="lbfgs", metadata={
        "help": "--trunk frozen: lbfgs (full batch, to convergence) or adamw (as the paper trains RMs: "
                "--num_train_epochs passes in minibatches of --per_device_train_batch_size, --head_lr with a linear "
                "schedule after --warmup_steps; a retraining then continues its head, which differs from a restart)",
        "choices": ["lbfgs", "adamw"]})
    head_lr: float = field(default=1e-3, metadata={"help": "--head_optimizer adamw: the head's peak learning rate"})
    head_steps: int | None = field(default=None, metadata={
        "help": "--head_optimizer adamw: exactly this many optimiser steps instead of the epochs' (a matched-steps "
                "control)"})
    bootstrap_heads: int = field(default=0, metadata={
        "help": "--trunk frozen: also fit this many heads on bootstrap resamples of the pairs and save them beside "
                "the RM, the members of the filter's --selection ensemble"})


@dataclass
class ModelArguments(BaseModelArguments):
    use_lora: bool = field(default=True, metadata={"help": "train LoRA adapters plus the score head (the release: on)"})


ARGUMENTS = (ScriptArguments, ModelArguments, RMConfig)


class LengthBatchedForward:
    """Calls `model` on a right-padded batch as forwards of sequences of similar length (`length_batches`),
    each cut to its own longest, and returns the logits in batch order: one padded forward's rewards with
    fewer padded tokens. The loss's backward runs through all of them at once (under DDP each forward
    prepares the same gradient reduction). Every process runs as many forwards as the one that needs the
    most (one-token dummies, joined to the graph with weight 0): DDP broadcasts buffers in every forward
    and ZeRO-3 gathers each layer's weights in every forward and backward, in step across processes."""

    def __init__(self, model, forward_cost, tokens, accelerator):
        self.model, self.forward_cost, self.tokens, self.accelerator = model, forward_cost, tokens, accelerator

    def __call__(self, input_ids, attention_mask, **kwargs):
        lengths = attention_mask.sum(-1)
        width = int(lengths.max())
        if int(attention_mask[:, :width].sum()) != int(lengths.sum()):
            raise ValueError("forwards of similar length need right-padded batches (TRL's DataCollatorForPreference pads right)")
        runs = [sorted(run) for run in length_batches(lengths.tolist(), len(lengths), self.forward_cost)]
        most = len(runs)  # agreed before any forward: DDP's forwards are collectives too (buffer broadcasts)
        if self.accelerator.num_processes > 1:
            most = int(self.accelerator.gather(torch.tensor([most], device=input_ids.device)).max())
        logits, rows = [], []
        for run in runs:
            index = torch.tensor(run, device=input_ids.device)
            w = int(lengths[index].max())
            out = self.model(input_ids=input_ids[index, :w], attention_mask=attention_mask[index, :w], **kwargs)
            logits.append(out.logits)
            rows += run
            if self.model.training:
                self.tokens["padded"] += len(run) * w
        if self.model.training:
            self.tokens["real"] += int(lengths.sum())
        logits = torch.cat(logits)[torch.tensor(rows, device=input_ids.device).argsort()]  # back in batch order
        for _ in range(most - len(runs)):
            dummy = self.model(input_ids=input_ids[:1, :1], attention_mask=attention_mask[:1, :1], **kwargs)
            logits = logits + 0 * dummy.logits.sum()
        return SequenceClassifierOutputWithPast(logits=logits)


class PairwiseRewardTrainer(RewardTrainer):
    """TRL's RewardTrainer with the hinge loss as an option, forwards of similar length, and pairwise
    evaluation on held-out pairs."""

    def __init__(self, *args, loss_type="bt", hinge_margin=1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_type, self.hinge_margin = loss_type, hinge_margin
        self.tokens = {"real": 0, "padded": 0}  # of the batches trained on by this process

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        self._signature_columns = [*self._signature_columns, "length"]  # kept for the length-grouped sampler

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        forward_cost = getattr(self.args, "forward_cost", math.inf)  # RMConfig's; one forward with TRL's RewardConfig
        model = LengthBatchedForward(model, forward_cost, self.tokens, self.accelerator)
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if self.loss_type == "hinge":
            r_j, r_k = outputs.logits.squeeze(-1).chunk(2)
            loss = pair_loss(r_j, r_k, "hinge", self.hinge_margin).mean()
            if self.args.center_rewards_coefficient is not None:
                loss = loss + self.args.center_rewards_coefficient * ((r_j + r_k) ** 2).mean()
        return (loss, outputs) if return_outputs else loss

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        start = time.perf_counter()
        pairs = self.eval_dataset if eval_dataset is None else eval_dataset  # tokenised once, by tokenize_pairs
        if "chosen_ids" not in pairs.column_names:
            raise ValueError("evaluate() takes pairs tokenised by tokenize_pairs (chosen_ids/rejected_ids)")
        sequences = list(pairs["chosen_ids"]) + list(pairs["rejected_ids"])
        rewards, stats = score_ids(self.model, self.processing_class, sequences, self.args.per_device_eval_batch_size,
                                   progress=None if self.args.disable_tqdm else "evaluating")
        r_j, r_k = rewards[:len(pairs)], rewards[len(pairs):]
        self.eval_rewards = (r_j, r_k)  # the last evaluation's rewards, pair by pair
        loss = pair_loss(torch.tensor(r_j), torch.tensor(r_k), self.loss_type, self.hinge_margin)  # the trained loss
        metrics = {**pair_metrics(r_j, r_k), "loss": loss.mean().item(),
                   "padding_share": stats["padding_share"], "sequences_per_second": stats["sequences_per_second"],
                   "model_tflops": stats["model_tflops"],
                   "runtime": time.perf_counter() - start}
        metrics = {f"{metric_key_prefix}_{k}": v for k, v in metrics.items()}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics


class EvalAfterFirstStep(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 1:
            control.should_evaluate = True


def tokenize_pairs(records, tokenizer, max_length, progress=None):
    """chosen_ids/rejected_ids with questions cut from the left, and the longer side's length; the count
    of cut sequences."""
    rows, truncated = [], 0
    for r in tqdm(records, desc=progress, unit="pair", disable=progress is None):
        j = encode(tokenizer, r["question"], r["response_j"], max_length)
        k = encode(tokenizer, r["question"], r["response_k"], max_length)
        rows.append({"chosen_ids": j["input_ids"], "rejected_ids": k["input_ids"],
                     "length": max(len(j["input_ids"]), len(k["input_ids"]))})  # a batch pads both sides to one width
        truncated += j["truncated"] + k["truncated"]
    return Dataset.from_list(rows), truncated


def train_frozen(script_args, model_args, config, tokenizer, train_records, eval_records, train_dataset, eval_dataset,
                 truncated, eval_truncated):
    """--trunk frozen: the score head alone on the trunk's cached features (ser/features.py). Loop 0 starts
    from --model_name's trunk; a retraining from a frozen RM keeps its trunk and layer and warm-starts its head."""
    from transformers import AutoConfig

    from ser import features
    from ser.modeling import check_replaceable, process_state

    state = process_state()
    check_replaceable(config.output_dir)  # before any featurising: save_whole would refuse it at the end
    info = features.frozen_info(script_args.model_name)
    if info:
        features.check_trunk(info, script_args.model_name)
    trunk = info["trunk"] if info else script_args.model_name
    n_layers = AutoConfig.from_pretrained(trunk).num_hidden_layers
    layer = info["layer"] if info else features.layer_index(script_args.feature_layer, n_layers)
    cache = script_args.feature_cache or (info or {}).get("feature_cache")
    if not cache:
        raise ValueError("--trunk frozen needs --feature_cache FOLDER (where the trunk's features are kept)")
    chosen, rejected = list(train_dataset["chosen_ids"]), list(train_dataset["rejected_ids"])
    eval_j, eval_k = list(eval_dataset["chosen_ids"]), list(eval_dataset["rejected_ids"])
    built = features.build_cache(cache, trunk, tokenizer.pad_token_id, chosen + rejected + eval_j + eval_k,
                                 config.max_length, [layer], config.per_device_eval_batch_size, model_args.dtype,
                                 bool(config.bf16), state, progress=None if config.disable_tqdm else "featurising",
                                 shared_prefix=script_args.shared_prefix)
    end_processes()  # the head is fitted and saved by the main process alone
    if not state.is_main_process:
        return None
    clear_output(Path(config.output_dir), lora=False)
    start = time.perf_counter()
    w0 = features.head_weight(script_args.model_name) if info else None
    f_j, f_k = features.load_features(cache, chosen, layer), features.load_features(cache, rejected, layer)
    fit = dict(l2=script_args.head_l2, loss=script_args.loss, margin=script_args.hinge_margin,
               center=config.center_rewards_coefficient or 0.0)
    steps = None
    if script_args.head_optimizer == "adamw":
        w, steps = features.train_head_steps(f_j, f_k, w0, epochs=config.num_train_epochs, lr=script_args.head_lr,
                                             batch_size=config.per_device_train_batch_size,
                                             warmup=config.warmup_steps or 0, seed=config.seed,
                                             steps=script_args.head_steps, **fit)
    else:
        w = features.train_head(f_j, f_k, w0, **fit)
    w = features.save_frozen_rm(config.output_dir, trunk, layer, w, tokenizer, cache, config.max_length, model_args.dtype)
    if script_args.bootstrap_heads:
        features.save_bootstrap_heads(config.output_dir, features.bootstrap_heads(
            f_j, f_k, script_args.bootstrap_heads, config.seed, **fit))
    r_j = (features.load_features(cache, eval_j, layer) @ w).tolist()  # with the head as saved
    r_k = (features.load_features(cache, eval_k, layer) @ w).tolist()
    loss = pair_loss(torch.tensor(r_j), torch.tensor(r_k), script_args.loss, script_args.hinge_margin).mean().item()
    results = {**pair_metrics(r_j, r_k), "loss": loss, "train_pairs": len(train_records), "train_truncated": truncated,
               "eval_truncated": eval_truncated, "loss_type": script_args.loss, "model_name": script_args.model_name,
               "max_length": config.max_length, "trunk": "frozen", "feature_layer": layer, "head_l2": script_args.head_l2,
               "bootstrap_heads": script_args.bootstrap_heads, "head_optimizer": script_args.head_optimizer,
               "head_steps_run": steps,
               "center_rewards_coefficient": config.center_rewards_coefficient,
               "use_lora": False, "train_seconds": time.perf_counter() - start, "featurising": built,
               "train_sources": dict(Counter(r.get("_source", "hub") for r in train_records))}
    write_records(Path(config.output_dir) / "eval_scores.jsonl",
                  [{"id": r.get("id", i), "reward_j": a, "reward_k": b}
                   for i, (r, a, b) in enumerate(zip(eval_records, r_j, r_k))])
    write_json(Path(config.output_dir) / "run_args.json", resolved_args(script_args, model_args, config))
    write_json(Path(config.output_dir) / "eval_results.json", results)  # written last: marks the stage done
    logger.info(f"rm_training: frozen trunk, layer {layer}: held-out " +
                json.dumps({k: results[k] for k in ("accuracy", "tie_rate", "margin", "pairs")}))
    return results


def clear_output(out: Path, lora: bool) -> None:
    stale = ["eval_results.json", *(["model.safetensors", "model.safetensors.index.json"] if lora else
                                    ["adapter_config.json", "adapter_model.safetensors"])]
    for name in stale:
        (out / name).unlink(missing_ok=True)
    if lora:
        for shard in out.glob("model-*-of-*.safetensors"):
            shard.unlink()


def eval_source(script_args):
    """--eval_subset: a folder inside the first --dataset_name folder, else a file or folder path."""
    for name in script_args.dataset_name:
        if Path(name).is_dir() and (Path(name) / script_args.eval_subset).exists():
            return name, script_args.eval_subset
    if Path(script_args.eval_subset).exists():
        return script_args.eval_subset, None
    raise DataError(f"--eval_subset {script_args.eval_subset}: not found in any --dataset_name folder, "
                    "nor as a file or folder")


def load_model(script_args, model_args, config, tokenizer):
    """A previous RM (full or LoRA) continues training; an SFT model gets a fresh score head.

    Trainable weights end in fp32 (see `fp32_master_weights`). LoRA is applied here, not by the trainer:
    TRL's `disable_dropout` would also zero the LoRA dropout (0.1 in the paper), so the backbone's
    dropout is switched off first and the adapter's is left as configured.
    """
    path = script_args.model_name
    deepspeed = zero_stage(config.deepspeed_plugin) > 0  # from --deepspeed or from accelerate's config file
    mixed = bool(config.bf16 or config.fp16)
    if is_lora_dir(path):
        logger.info(f"rm_training: continuing the LoRA reward model in {path}")
        model = load_reward_model(path, tokenizer, model_args.dtype, trainable=True)
        return fp32_master_weights(model, mixed, deepspeed)
    is_rm = any(a.endswith("ForSequenceClassification") for a in AutoConfig.from_pretrained(path).architectures or [])
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=model_args.dtype)
    model = fit_embeddings(model, tokenizer)
    logger.info(f"rm_training: {'continuing the reward model' if is_rm else 'new score head on'} {path}"
                + (f" (LoRA r {model_args.lora_r}, alpha {model_args.lora_alpha}, dropout {model_args.lora_dropout})"
                   if model_args.use_lora else " (all weights trained)"))
    if config.disable_dropout:
        disable_dropout_in_model(model)
    if model_args.use_lora:
        from peft import get_peft_model

        # PEFT adds the new score head to modules_to_save for SEQ_CLS; naming it keeps that explicit.
        peft_config = model_args.lora_config("SEQ_CLS", modules_to_save=["score"])
        zero3 = zero_stage(config.deepspeed_plugin) == 3
        # ZeRO-3 needs one dtype across parameters: keep the adapter in the base dtype there (as TRL does).
        model = get_peft_model(model, peft_config, autocast_adapter_dtype=not zero3)
    return fp32_master_weights(model, mixed, deepspeed)


def main(script_args: ScriptArguments, model_args: ModelArguments, config: RMConfig):
    setup_wandb(config.report_to)
    if Path(script_args.model_name).is_dir():  # a LoRA adapter records its base by this path
        script_args.model_name = str(Path(script_args.model_name).resolve())

    # 1. data: the union of every source's training pairs, and the held-out human pairs
    tokenizer = load_tokenizer(script_args.tokenizer_name or script_args.model_name)
    train_records = []
    for name in script_args.dataset_name:
        subsets = [None] if Path(name).is_file() else script_args.train_subset
        for subset in subsets:
            train_records += load_records(name, subset, script_args.load_from_json)
    if not train_records:
        raise DataError(f"no training pairs in {' '.join(script_args.dataset_name)} (--train_subset "
                        f"{' '.join(script_args.train_subset)})")
    same = sum(r["response_j"].strip() == r["response_k"].strip() for r in train_records)
    if same == len(train_records):
        raise DataError(f"every training pair in {' '.join(script_args.dataset_name)} has two identical responses: "
                        "there is no preference to learn (the loss would stay at ln 2)")
    if same:
        logger.warning(f"rm_training: warning: {same} of {len(train_records)} training pairs have two identical responses")
    train_records = subsample(train_records, script_args.train_subset_size, config.seed)
    eval_records = subsample(load_records(*eval_source(script_args)), script_args.eval_subset_size, config.seed)
    bar = None if config.disable_tqdm or config.process_index != 0 else "tokenising"
    train_dataset, truncated = tokenize_pairs(train_records, tokenizer, config.max_length, bar)
    eval_dataset, eval_truncated = tokenize_pairs(eval_records, tokenizer, config.max_length, bar)
    logger.info(f"rm_training: {len(train_records)} training pairs ({truncated} sequences cut from the left), "
                f"{len(eval_records)} held-out pairs ({eval_truncated} cut)")

    if script_args.trunk == "frozen":
        return train_frozen(script_args, model_args, config, tokenizer, train_records, eval_records,
                            train_dataset, eval_dataset, truncated, eval_truncated)

    # 2. model and trainer; the folder loses its done marker before the first new write, and the files of the
    #    other format (a LoRA adapter beside full weights, or full weights beside an adapter), which every later
    #    stage would otherwise load in place of what this run saves
    if config.process_index == 0:
        clear_output(Path(config.output_dir), model_args.use_lora)
    set_seed(config.seed)  # the score head is initialised at load time
    model = load_model(script_args, model_args, config, tokenizer)
    config.disable_dropout = False  # done in load_model, without touching the LoRA dropout
    trainer = PairwiseRewardTrainer(
        model=model, args=config, train_dataset=train_dataset, eval_dataset=eval_dataset,
        processing_class=tokenizer, loss_type=script_args.loss,
        hinge_margin=script_args.hinge_margin,
        callbacks=[EvalAfterFirstStep()] if script_args.eval_first_step else None,
    )

    # 3. train, evaluate, save
    trainer.train(resume_from_checkpoint=resume_from(config.resume_from_checkpoint))
    metrics = trainer.evaluate()
    trainer.save_model(config.output_dir)
    end_processes()  # what follows is the main process's alone
    if trainer.is_world_process_zero():
        check_saved_weights(config.output_dir)
        tokenizer.save_pretrained(config.output_dir)
        if is_lora_dir(config.output_dir):  # its base: the SFT model, or the base of the RM it continued
            base = lora_base(script_args.model_name) if is_lora_dir(script_args.model_name) else script_args.model_name
            record_lora_base(config.output_dir, base)
        results = {k.removeprefix("eval_"): v for k, v in metrics.items()}
        padded = trainer.tokens["padded"]
        results.update(train_pairs=len(train_records), train_truncated=truncated, eval_truncated=eval_truncated,
                       train_padding_share=1 - trainer.tokens["real"] / padded if padded else None,
                       loss_type=script_args.loss, model_name=script_args.model_name, max_length=config.max_length,
                       num_train_epochs=config.num_train_epochs, use_lora=model_args.use_lora,
                       train_sources=dict(Counter(r.get("_source", "hub") for r in train_records)))
        r_j, r_k = trainer.eval_rewards
        write_records(Path(config.output_dir) / "eval_scores.jsonl",  # per pair, for paired tests and calibration
                      [{"id": r.get("id", i), "reward_j": a, "reward_k": b}
                       for i, (r, a, b) in enumerate(zip(eval_records, r_j, r_k))])
        write_json(Path(config.output_dir) / "run_args.json", resolved_args(script_args, model_args, config))
        write_json(Path(config.output_dir) / "eval_results.json", results)  # written last: marks the stage done
        logger.info("rm_training: held-out " + json.dumps({k: results[k] for k in ("accuracy", "tie_rate", "margin", "pairs")}))


if __name__ == "__main__":
    main(*parse(ARGUMENTS, counted=("--train_subset", "--eval_subset")))
