"""Stage 1: supervised fine-tuning of the base model on demonstrations (question -> preferred answer).

The reward model of SER starts from this model. The loss is on the answer tokens only; the question
is conditioning. Runs as `python sft.py ...`, `accelerate launch sft.py ...` or `deepspeed sft.py ...`.
"""

from dataclasses import dataclass, field

from datasets import Dataset
from tqdm.auto import tqdm
from transformers import set_seed
from trl import SFTConfig, SFTTrainer

from ser.cli import get_logger, parse, resolved_args, resume_from, setup_wandb
from ser.data import DataError, encode, load_records, subsample, write_json
from ser.flags import DataArguments, ModelArguments, default_of, hidden
from ser.modeling import (
    check_saved_weights,
    end_processes,
    fp32_master_weights,
    load_causal_lm,
    load_tokenizer,
    merge_lora,
    record_lora_base,
    zero_stage,
)

logger = get_logger("sft")


@dataclass
class SFTConfigSER(SFTConfig):
    """TRL's SFTConfig with the paper's sequence length and the loss on the answer only."""

    max_length: int | None = default_of(DataArguments, "max_length")
    completion_only_loss: bool | None = field(default=True, metadata={
        "help": "loss on the answer (and eos) only; the question is conditioning"})


@dataclass
class ScriptArguments(DataArguments):
    subset: str | None = default_of(DataArguments, "subset", "data/finetune")
    max_length: int = hidden(512)  # SFTConfigSER's --max_length
    seed: int = hidden(42)  # TrainingArguments' --seed
    model_name: str = field(kw_only=True, metadata={"help": "base model folder or hub id"})
    train_subset_size: int | None = field(default=None, metadata={"help": "use a seeded random sample of this many demonstrations"})


ARGUMENTS = (ScriptArguments, ModelArguments, SFTConfigSER)  # the release's SFT trains all weights


def build_dataset(records, tokenizer, max_length, progress=None):
    """input_ids = [bos] question+answer [eos]; completion_mask marks the answer (and eos) tokens."""
    rows, truncated = [], 0
    for r in tqdm(records, desc=progress, unit="example", disable=progress is None):
        enc = encode(tokenizer, r["question"], r["response_j"], max_length)
        n = len(enc["input_ids"])
        rows.append({"input_ids": enc["input_ids"],
                     "completion_mask": [0] * enc["prompt_length"] + [1] * (n - enc["prompt_length"])})
        truncated += enc["truncated"]
    return Dataset.from_list(rows), truncated


def main(script_args: ScriptArguments, model_args: ModelArguments, config: SFTConfigSER):
    setup_wandb(config.report_to)
    set_seed(config.seed)
    tokenizer = load_tokenizer(script_args.tokenizer_name or script_args.model_name)

    # 1. demonstrations: the preferred answer of each pair
    records = load_records(script_args.dataset_name, script_args.subset, script_args.load_from_json,
                           fields=("question", "response_j"))
    if not records:
        raise DataError(f"no demonstrations in {script_args.dataset_name} (--subset {script_args.subset})")
    records = subsample(records, script_args.train_subset_size, config.seed)
    bar = None if config.disable_tqdm or config.process_index != 0 else "tokenising"
    train_dataset, truncated = build_dataset(records, tokenizer, config.max_length, bar)
    logger.info(f"sft: {len(records)} demonstrations, {truncated} cut from the left to {config.max_length} tokens")

    # 2. model (trainable weights in fp32 master copies), trainer (loss on the answer only), train
    model = load_causal_lm(script_args.model_name, tokenizer, model_args.dtype)
    if model_args.use_lora:
        from peft import get_peft_model

        zero3 = zero_stage(config.deepspeed_plugin) == 3
        model = get_peft_model(model, model_args.lora_config("CAUSAL_LM"), autocast_adapter_dtype=not zero3)
    model = fp32_master_weights(model, bool(config.bf16 or config.fp16), zero_stage(config.deepspeed_plugin) > 0)
    trainer = SFTTrainer(model=model, args=config, train_dataset=train_dataset, processing_class=tokenizer)
    trainer.train(resume_from_checkpoint=resume_from(config.resume_from_checkpoint))

    # 3. save a model the next stages load with --model_name. With LoRA the adapter is saved to
    #    OUTPUT/adapter, then merged into the base read from disk (under ZeRO-3 every process holds only
    #    a shard of each weight: a merge of the trained module would merge shards).
    trainer.save_model(f"{config.output_dir}/adapter" if model_args.use_lora else config.output_dir)
    end_processes()  # what follows is the main process's alone, however long a merge takes
    if trainer.is_world_process_zero():
        check_saved_weights(f"{config.output_dir}/adapter" if model_args.use_lora else config.output_dir)
        if model_args.use_lora:
            record_lora_base(f"{config.output_dir}/adapter", script_args.model_name)
            merge_lora(f"{config.output_dir}/adapter", tokenizer, model_args.dtype).save_pretrained(config.output_dir)
        tokenizer.save_pretrained(config.output_dir)
        write_json(f"{config.output_dir}/run_args.json", resolved_args(script_args, model_args, config))
    return trainer


if __name__ == "__main__":
    main(*parse(ARGUMENTS))
