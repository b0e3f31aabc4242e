"""A tiny Llama-architecture model and its tokenizer, built offline (for the demo, tests and benchmarks).

The trained tokenizer is a byte-level BPE learnt on the synthetic task's text plus any --corpus files
(JSON/JSONL pairs); or a tokenizer folder is reused, with pad != eos fixed by `load_tokenizer`.
"""

from dataclasses import dataclass, field
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from ser.data import format_text, load_records
from ser.modeling import load_tokenizer, save_whole
from ser.synthetic import corpus as synthetic_corpus

SPECIALS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}


@dataclass
class Args:
    out: str = field(metadata={"help": "output folder for the model and tokenizer"})
    tokenizer: str = field(default="trained", metadata={"help": "'trained' (BPE learnt here) or a tokenizer folder"})
    corpus: list[str] = field(default_factory=list, metadata={"help": "extra JSON/JSONL pair files to train the BPE on"})
    vocab_size: int = field(default=512, metadata={"help": "BPE vocabulary size (trained tokenizer only)"})
    hidden_size: int = field(default=64, metadata={"help": "model width"})
    num_layers: int = field(default=2, metadata={"help": "transformer blocks"})
    num_heads: int = field(default=4, metadata={"help": "attention heads"})
    max_position_embeddings: int = field(default=1024, metadata={"help": "longest sequence"})
    seed: int = field(default=0, metadata={"help": "initialisation seed"})


def train_tokenizer(texts, vocab_size):
    tok = Tokenizer(models.BPE(unk_token=SPECIALS["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIALS)


def build(args: Args) -> Path:
    out = Path(args.out)
    if args.tokenizer == "trained":
        texts = synthetic_corpus()
        for path in args.corpus:
            texts += [format_text(r["question"], r["response_j"]) for r in load_records(path)]
        tokenizer = train_tokenizer(texts, args.vocab_size)
    else:
        tokenizer = load_tokenizer(args.tokenizer)  # also fixes pad == eos
    tokenizer.padding_side = "right"
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=args.hidden_size, intermediate_size=2 * args.hidden_size,
        num_hidden_layers=args.num_layers, num_attention_heads=args.num_heads,
        num_key_value_heads=args.num_heads, max_position_embeddings=args.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    save_whole(out, model, tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"wrote {out}: Llama {args.num_layers}x{args.hidden_size}, {n_params:,} parameters, vocab {len(tokenizer)}")
    return out
