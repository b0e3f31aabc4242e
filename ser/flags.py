"""The model and data flags every stage shares, defined once, and the helpers a stage uses to change a
shared flag's default or to leave it out."""

from dataclasses import MISSING, dataclass, field


@dataclass
class ModelArguments:
    """The model flags of sft.py, rm_training.py and ppo/ppo.py, defined once. A script that needs other
    defaults subclasses this and overrides the field (the release trains the RM with LoRA, SFT without)."""

    dtype: str = field(default="auto", metadata={
        "help": "dtype the checkpoint loads in (auto: its own); trained weights are always fp32 master weights",
        "choices": ["auto", "float32", "bfloat16", "float16"]})
    use_lora: bool = field(default=False, metadata={"help": "train LoRA adapters instead of all weights (--use_peft)"})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank (the paper: 8; 2 for 70B)"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha"})
    lora_dropout: float = field(default=0.1, metadata={"help": "LoRA dropout"})

    def lora_config(self, task_type: str, **kwargs):
        from peft import LoraConfig

        return LoraConfig(task_type=task_type, r=self.lora_r, lora_alpha=self.lora_alpha,
                          lora_dropout=self.lora_dropout, **kwargs)


@dataclass
class DataArguments:
    """The data flags of every stage, defined once. A stage's ScriptArguments subclasses this; it redeclares a
    field only to change its default (`default_of`) or to leave out a flag it does not take (`hidden`), and
    adds its own flags after these (kw_only when they have no default). Where a TRL config of the same
    stage declares max_length or seed too (sft.py, rm_training.py), the config's flag is the one on the
    command line and `ser.cli.parse` copies its value into the hidden field here."""

    dataset_name: str = field(metadata={"help": "a data folder (with --subset), a JSON/JSONL file, or a hub id"})
    subset: str | None = field(default=None, metadata={"help": "the split's folder inside a --dataset_name folder"})
    load_from_json: bool = field(default=False, metadata={"help": "--dataset_name is a JSON/JSONL file"})
    tokenizer_name: str | None = field(default=None, metadata={"help": "tokenizer folder; default: the model's"})
    max_length: int = field(default=512, metadata={
        "help": "tokens per sequence ([bos] prompt response [eos]), questions cut from the left; one value for "
                "training, self-labelling and evaluation alike (the paper: 512; --seq_length is the old name; ppo.py "
                "takes the RM's own by default and refuses another)"})
    seed: int = field(default=0, metadata={"help": "random seed"})

    def __post_init__(self):
        for name in ("train_subset_size", "eval_subset_size"):  # a stage's sample sizes, where it has them
            value = getattr(self, name, None)
            if value is not None and value < 0:
                raise ValueError(f"--{name} {value}: a number of pairs, 0 or more (0 or absent: all of them)")


def default_of(cls, name: str, default=MISSING):
    """`cls`'s field `name` with another default (or its own) and `cls`'s help: a subclass's override, or the
    shared declaration in a config that must hold the flag itself."""
    meta = cls.__dataclass_fields__[name].metadata
    if default is MISSING:
        default = cls.__dataclass_fields__[name].default
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def hidden(default=None):
    """A shared field that a stage does not take on its command line (the parser skips init=False fields)."""
    return field(default=default, init=False)
