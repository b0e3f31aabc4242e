"""Merge a LoRA adapter into its base model and save an ordinary model folder.

    python scripts/merge_lora.py --adapter runs/demo/ser/loop_3/rm --out runs/demo/rm-merged

A reward-model adapter (task SEQ_CLS, saved by rm_training.py with its trained `score` head) becomes a
sequence-classification model with that head; a causal-LM adapter (SFT, policy) becomes a causal LM.
The base is the one the adapter records (a path relative to the adapter resolves against it). The
tokenizer is the adapter folder's when it has one, else the base's. The output is written whole or
not at all, in --dtype, and loads with `from_pretrained` and as any stage's --model_name or
--reward_model_name.
"""

from dataclasses import dataclass, field
from pathlib import Path

from ser.cli import parse
from ser.modeling import is_lora_dir, load_tokenizer, lora_base, merge_lora, save_whole


@dataclass
class Args:
    adapter: str = field(metadata={"help": "a LoRA adapter folder (adapter_config.json and its weights)"})
    out: str = field(metadata={"help": "the merged model's folder"})
    dtype: str = field(default="auto", metadata={"help": "weights dtype of the merged model: auto (the base's), "
                                                          "bfloat16, float16, float32"})
    replace: bool = field(default=False, metadata={
        "help": "replace --out even when it is not a model folder (a model folder is always replaced, by rename)"})


def main(args: Args) -> Path:
    if not is_lora_dir(args.adapter):
        raise SystemExit(f"--adapter {args.adapter}: not a LoRA adapter folder (no adapter_config.json)")
    try:
        base = lora_base(args.adapter)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"--adapter {e}") from None
    has_tokenizer = (Path(args.adapter) / "tokenizer_config.json").is_file()
    tokenizer = load_tokenizer(args.adapter if has_tokenizer else base)
    try:
        merged = merge_lora(args.adapter, tokenizer, args.dtype)
    except ValueError as e:
        raise SystemExit(f"--adapter {e}") from e
    merged.name_or_path = args.out
    try:
        out = save_whole(args.out, merged, tokenizer, replace=args.replace)
    except FileExistsError as e:
        raise SystemExit(f"--out {e}; --replace True replaces it") from None
    print(f"merge_lora: {args.adapter} merged into {base}: wrote {out}")
    return out


if __name__ == "__main__":
    main(*parse([Args]))
