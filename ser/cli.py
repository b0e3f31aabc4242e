"""Command-line conventions shared by the stage scripts.

The original release's commands are kept as written. Their flags date from older transformers/TRL
versions; `legacy_argv` maps them onto today's names before `HfArgumentParser` sees them, and every
flag that cannot be honoured is an error, never silently ignored.
"""

import dataclasses
import logging
import os
import sys
from pathlib import Path

import torch
from transformers import HfArgumentParser

# old flag -> new flag (same value)
RENAMED = {
    "--evaluation_strategy": "--eval_strategy",
    "--no_cuda": "--use_cpu",
    "--gradient_checkpointing": "--activation_checkpointing",  # deprecated alias in transformers 5
    "--seq_length": "--max_length",  # sft.py's old name for the one sequence length of every stage
    "--use_peft": "--use_lora",  # ppo.py's old name for the one LoRA flag
}
# flag -> {old value -> new value}
VALUE_MAP = {
    # transformers' own AdamW ("adamw_hf") was removed; torch's AdamW is the same update.
    "--optim": {"adamw_hf": "adamw_torch"},
}
# Flags whose values mean "the default" in old commands and are dropped.
DROP_IF = {
    "--label_names": {"[]", ""},  # a reward model has no label column; Trainer's default is right
    "--resume_from_checkpoint": {"False", "false", "None", "none", ""},
}
# Flags removed from transformers with no replacement.
REMOVED = {
    "--overwrite_output_dir": "outputs are written to --output_dir; checkpoints are resumed with --resume_from_checkpoint",
    "--logging_dir": "set the tensorboard/wandb directory through their environment variables",
    "--save_safetensors": "transformers always saves safetensors now",
}


def _split(argv):
    """Yield (flag, value or None) with `--flag=value` and `--flag value` both understood."""
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--") and "=" in arg:
            flag, value = arg.split("=", 1)
            yield flag, [value]
            i += 1
            continue
        values = []
        j = i + 1
        while j < len(argv) and not argv[j].startswith("--"):
            values.append(argv[j])
            j += 1
        yield arg, values
        i = j


def legacy_argv(argv: list[str], counted: tuple[str, ...] = ()) -> list[str]:
    """Rewrite legacy flags into today's.

    `counted` names flags that the seed repeats with a path and then a count
    (`--train_subset "data/reward" ... --train_subset 100000`): an integer value becomes
    `--<flag>_size N`, the other values are the subset folders.
    """
    pairs = list(_split(argv))
    datasets = [v for flag, values in pairs if flag == "--dataset_name" for v in values]
    out, gathered, given = [], {flag: [] for flag in counted}, {}

    def give(flag, values, spelt):  # a setting given under two spellings (old and new) must agree
        if flag in given and given[flag][0] != values and given[flag][1] != spelt:
            raise SystemExit(f"error: {given[flag][1]} {' '.join(given[flag][0])} and {spelt} {' '.join(values)} "
                             f"set {flag} to different values; give it once")
        given.setdefault(flag, (values, spelt))

    for spelt, values in pairs:
        if spelt in REMOVED:
            raise SystemExit(f"error: {spelt} no longer exists in transformers: {REMOVED[spelt]}")
        flag = RENAMED.get(spelt, spelt)
        if flag in DROP_IF and len(values) <= 1 and (values[0] if values else "") in DROP_IF[flag]:
            continue
        if flag in VALUE_MAP and len(values) == 1:
            values = [VALUE_MAP[flag].get(values[0], values[0])]
        if flag in gathered:
            for v in values:
                if v.isdigit():
                    if any(Path(d, v).exists() for d in ["", *datasets]):
                        raise SystemExit(f"error: {flag} {v}: both a folder ({v}) and a sample size; write {flag} "
                                         f"./{v} for the folder, or {flag}_size {v} for the size")
                    give(f"{flag}_size", [v], flag)
                    out += [f"{flag}_size", v]
                else:
                    gathered[flag].append(v)
            continue
        if flag in RENAMED.values() or flag in {f"{c}_size" for c in counted}:
            give(flag, values, spelt)
        out += [flag, *values]
    for flag, values in gathered.items():
        if values:
            out += [flag, *values]
    return out


def parse(dataclass_types, argv=None, counted=()):
    """Parse the command line into dataclasses; unknown flags are an error that names them."""
    # Long runs are watched through a redirected log (nohup ... > log): flush it line by line.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(line_buffering=True)
    argv = legacy_argv(list(sys.argv[1:] if argv is None else argv), counted)
    parser = HfArgumentParser(dataclass_types)
    if not torch.accelerator.is_available() and "--use_cpu" in parser._option_string_actions \
            and not any(a.startswith("--use_cpu") for a in argv):
        # No accelerator: run the same command on the CPU (where bf16 runs under CPU autocast) instead of
        # refusing it, saying so. On a machine with an accelerator this changes nothing.
        check_accelerator()
        argv += ["--use_cpu", "True"]
    *parsed, rest = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)} (see --help for the flags this script takes)")
    from ser.flags import DataArguments

    for config in parsed:  # a hidden shared field takes the value of the flag another dataclass declares
        if not isinstance(config, DataArguments):
            continue
        for f in dataclasses.fields(config):
            if not f.init:
                for other in parsed:
                    if other is not config and f.name in {g.name for g in dataclasses.fields(other) if g.init}:
                        setattr(config, f.name, getattr(other, f.name))
    for config in parsed:
        if getattr(config, "deepspeed", None) and getattr(config, "use_cpu", False):
            # DeepSpeed on the CPU: its communication layer must wrap the (gloo) process group that
            # accelerate set up, or ZeRO-3 sees a world of one while partitioning the model.
            import deepspeed

            _ = config.device  # initialises torch.distributed
            deepspeed.init_distributed(dist_backend="gloo")
    return parsed


REQUIRE_ACCELERATOR = "SER_REQUIRE_ACCELERATOR"


class _Stdout(logging.StreamHandler):
    """Writes each record to the current sys.stdout and flushes it (a redirected log fills line by line)."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, _):
        pass


def get_logger(stage: str):
    """The stage scripts' one logger: accelerate's, which logs on the main process only unless a call
    passes `main_process_only=False` (it needs the process state: an Accelerator, a PartialState or the
    Trainer's arguments exist first). Records are plain lines on stdout, under the `ser` logger."""
    from accelerate.logging import get_logger as accelerate_logger

    root = logging.getLogger("ser")
    if not root.handlers:
        handler = _Stdout()
        handler.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        root.propagate = False
    return accelerate_logger(f"ser.{stage}")


def check_accelerator() -> None:
    """Say so when no accelerator is visible and the run falls back to the CPU.

    That is right on a CPU machine. On a GPU job whose CUDA is broken it would train on the CPU for
    days: SER_REQUIRE_ACCELERATOR=1 makes it an error instead.
    """
    if torch.accelerator.is_available():
        return
    message = "no accelerator (CUDA, ROCm, XPU, MPS) is visible to torch, so this runs on the CPU"
    if os.environ.get(REQUIRE_ACCELERATOR, "").lower() not in ("", "0", "false", "no"):
        raise SystemExit(f"error: {message}, and {REQUIRE_ACCELERATOR} is set. Check the driver (nvidia-smi), "
                         "CUDA_VISIBLE_DEVICES and torch.cuda.is_available().")
    if os.environ.get("LOCAL_RANK", "0") == "0":
        print(f"warning: {message}. On a GPU machine this means the GPUs are not usable; set "
              f"{REQUIRE_ACCELERATOR}=1 to make it an error.", file=sys.stderr, flush=True)


def resolved_args(*configs) -> dict:
    """Every argument a stage ran with, defaults included, for a file beside its outputs."""
    import dataclasses

    out = {}
    for config in configs:
        values = config.to_dict() if hasattr(config, "to_dict") else dataclasses.asdict(config)
        out[type(config).__name__] = {k: v for k, v in values.items() if not k.startswith("_")}
    out["argv"] = sys.argv
    return out


def setup_wandb(report_to) -> None:
    """wandb runs offline unless a key is configured; the key is read from the environment only."""
    targets = [report_to] if isinstance(report_to, str) else list(report_to or [])
    if "wandb" not in targets and "all" not in targets:
        return
    os.environ.setdefault("WANDB_PROJECT", "ser")
    has_key = bool(os.environ.get("WANDB_API_KEY")) or "api.wandb.ai" in _netrc()
    if "WANDB_MODE" not in os.environ and not has_key:
        os.environ["WANDB_MODE"] = "offline"
        print("wandb: no API key configured, logging offline (sync later with `wandb sync`)", file=sys.stderr)


def _netrc() -> str:
    path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return path.read_text()
    except OSError:
        return ""


def resume_from(value):
    """`--resume_from_checkpoint True` resumes from the newest checkpoint in --output_dir; a path, from it."""
    return True if str(value).lower() == "true" else value
