"""Tokenizer and model loading, checkpoints and their checks (flags: ser/flags.py; scoring: ser/scoring.py)."""

import contextlib
import json
import math
import os
from pathlib import Path
from types import SimpleNamespace

import torch
from accelerate import PartialState
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from ser.data import write_json


def load_tokenizer(name: str):
    """Load a tokenizer and make sure pad != eos.

    A sequence-classification head reads the last token that is not `pad_token_id`; with pad == eos
    the appended eos would be taken for padding and the reward read one token early.
    """
    tok = AutoTokenizer.from_pretrained(name)
    if tok.eos_token_id is None:
        raise ValueError(f"tokenizer '{name}' has no eos token; the reward is read at the eos token")
    if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
        # an existing token keeps the embedding as it is: unk, else a reserved one (Llama 3 has 250 of them)
        reserved = [t.content for _, t in sorted(tok.added_tokens_decoder.items())
                    if "finetune_right_pad" in t.content or "reserved_special_token" in t.content]
        if tok.unk_token_id is not None and tok.unk_token_id != tok.eos_token_id:
            tok.pad_token = tok.unk_token
        elif reserved:
            tok.pad_token = reserved[0]
        else:
            tok.add_special_tokens({"pad_token": "<pad>"})
    tok.padding_side = "right"
    return tok


# Pass as `state` to score only on this process (each process scoring its own samples, as PPO does).
THIS_PROCESS_ONLY = SimpleNamespace(process_index=0, num_processes=1)


def process_state(**group_kwargs) -> PartialState:
    """This process's place among the launched ones. Without an accelerator the processes form a CPU
    (gloo) group, as the Trainer does with --use_cpu; on GPUs nothing changes. `group_kwargs` (e.g. a
    `timeout`) go to `init_process_group` when this call creates the group."""
    return PartialState(cpu=not torch.accelerator.is_available(), **group_kwargs)


def end_processes():
    """Every process waits for the others, then closes the process group. A rank that leaves while the
    main process still writes, with its group open, can abort in the group's teardown at interpreter
    exit ("terminate called without an active exception")."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def fit_embeddings(model, tokenizer):
    """Room for every token of the tokenizer (a pad token added to a Llama one), and its pad id.

    The row count is the embedding's `num_embeddings`, not its weight's shape: under ZeRO-3's zero.Init
    the weight is a shape-(0,) shard and every load would resize. New rows are padded to a multiple of
    64, which tensor cores and ZeRO's partitions both like."""
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


def load_causal_lm(name: str, tokenizer, dtype: str = "auto"):
    model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
    return fit_embeddings(model, tokenizer)


def zero_stage(deepspeed_plugin) -> int:
    """The ZeRO stage a run trains under; 0 without DeepSpeed. DeepSpeed comes from `--deepspeed CONFIG`
    or from accelerate's plugin (`accelerate launch --config_file scripts/cluster/zero3.yaml`, where
    `TrainingArguments.deepspeed` is None): both leave the plugin in `TrainingArguments.deepspeed_plugin`
    and in accelerate's state."""
    return 0 if deepspeed_plugin is None else int(deepspeed_plugin.zero_stage)


def is_partitioned(model) -> bool:
    """Whether ZeRO-3 has partitioned any of `model`'s weights (at load, under zero.Init, or when prepared)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


def fp32_master_weights(model, mixed_precision: bool, deepspeed: bool = False):
    """Trainable weights in fp32, whatever dtype the checkpoint came in.

    AdamW steps on bf16 weights lose most small updates (at lr 2e-5, 20 steps changed a quarter of a
    tiny model's bf16 weights against four fifths in fp32). So the weights being trained are fp32
    master weights and bf16 is for compute, under autocast (--bf16 True). Frozen weights (a LoRA base,
    the reference policy) may stay bf16. Without mixed precision the whole model computes in fp32.

    Under DeepSpeed with mixed precision the engine owns dtypes: it casts every parameter to the 16-bit
    dtype and keeps fp32 masters in its optimizer (ZeRO-3 needs one dtype across a module's parameters,
    so an fp32 adapter beside a bf16 base fails there). Without mixed precision DeepSpeed casts nothing:
    a model still whole becomes fp32 here; one already partitioned at load (zero.Init) keeps its dtype.
    """
    if deepspeed and mixed_precision:
        return model
    if deepspeed or not mixed_precision:
        return model if is_partitioned(model) else model.float()
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    return model


def is_lora_dir(path) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def check_model_path(path) -> None:
    """A local model path exists, holds a config, and its safetensors files are whole (a hub id passes)."""
    folder = Path(path)
    local = folder.exists() or str(path).startswith(("/", ".", "~")) or str(path).count("/") > 1
    if not local:
        return
    if not folder.is_dir():
        raise FileNotFoundError(f"{path}: no such model folder")
    if not (folder / "config.json").is_file() and not (folder / "adapter_config.json").is_file():
        raise ValueError(f"{path}: not a saved model: no config.json (nor adapter_config.json) in the folder")
    for weights in sorted(folder.glob("*.safetensors")):
        size = weights.stat().st_size
        with open(weights, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            try:
                header = json.loads(f.read(n)) if 0 < n <= size - 8 else None
            except (json.JSONDecodeError, UnicodeDecodeError):
                header = None
        if not isinstance(header, dict):
            raise ValueError(f"{weights}: not a readable safetensors file ({size} bytes): the save was interrupted "
                             "or the copy is incomplete")
        end = max([v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"], default=0)
        if size < 8 + n + end:
            raise ValueError(f"{weights}: truncated ({size} bytes; its header describes {8 + n + end}): the save "
                             "was interrupted or the copy is incomplete")


def check_reward_model(path) -> None:
    """A sequence-classification checkpoint whose `score` weight was saved (or a LoRA adapter that saved it)."""
    check_model_path(path)
    folder = Path(path)
    expected = ("expected a reward model saved by rm_training.py: a *ForSequenceClassification checkpoint with a "
                "trained `score` head, or a LoRA adapter that saved it (modules_to_save)")
    if is_lora_dir(folder):
        config = json.loads((folder / "adapter_config.json").read_text())
        weights = folder / "adapter_model.safetensors"
        keys = _safetensors_keys(weights) if weights.is_file() else []
        if config.get("task_type") != "SEQ_CLS" or not any(".score." in k or k.endswith("score.weight") for k in keys):
            raise ValueError(f"{path}: a LoRA adapter of task {config.get('task_type')!r} without a saved score head; "
                             + expected)
        return
    if not (folder / "config.json").is_file():
        return  # a hub id: from_pretrained says what is wrong with it
    architectures = json.loads((folder / "config.json").read_text()).get("architectures") or []
    keys = [k for f in folder.glob("*.safetensors") for k in _safetensors_keys(f)]
    if not any(a.endswith("ForSequenceClassification") for a in architectures) or \
            (keys and not any(k == "score.weight" or k.endswith(".score.weight") for k in keys)):
        raise ValueError(f"{path}: architectures {architectures} with {'a' if 'score.weight' in keys else 'no'} "
                         f"score weight; " + expected)


def _safetensors_keys(path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return list(f.keys())


def check_saved_weights(folder) -> None:
    """Refuse a saved model holding a tensor with no elements: what a save of ZeRO-3 shards writes when the
    weights were not gathered first (each shard is shape (0,) outside DeepSpeed). Reads headers only."""
    from safetensors import safe_open

    for path in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            empty = [(k, f.get_slice(k).get_shape()) for k in f.keys() if math.prod(f.get_slice(k).get_shape()) == 0]
        if empty:
            key, shape = empty[0]
            raise ValueError(f"{path}: {len(empty)} tensor(s) with no elements, e.g. {key} of shape {tuple(shape)}: "
                             "ZeRO-3 partitioned weights were saved without being gathered")


def is_model_folder(path) -> bool:
    """A saved model: a config.json naming a model type, beside safetensors weights."""
    folder = Path(path)
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "model_type" in config and any(folder.glob("*.safetensors"))


def check_replaceable(out) -> None:
    """`save_whole`'s refusal, for a stage to make before any work: `out` is absent, empty or a model folder."""
    out = Path(out)
    if out.exists() and not is_model_folder(out) and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out}: exists and is not a model folder (no config.json with a model_type beside "
                              "*.safetensors); choose another output folder, or remove it yourself")


def save_whole(out, model, tokenizer, state_dict=None, replace: bool = False) -> Path:
    """save_pretrained of a model and its tokenizer into a temporary folder, then renamed: whole or absent.
    `state_dict`: the weights to write (e.g. gathered from ZeRO-3 shards) instead of the module's own.

    An existing `out` is replaced only when it is a model folder (or `replace`): a run folder named by
    mistake is refused, not deleted. The old folder is renamed aside before the new one takes its place and
    removed last, so nothing is deleted before the new model is whole."""
    import shutil
    import tempfile

    out = Path(out)
    if not replace:
        check_replaceable(out)
    from ser.data import umask_mode

    out.parent.mkdir(parents=True, exist_ok=True)  # fresh temporary names (mkdtemp): no planted link is followed
    tmp, aside = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")), None
    try:
        model.save_pretrained(tmp, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
        check_saved_weights(tmp)
        os.chmod(tmp, umask_mode(0o777))
        if out.exists() or out.is_symlink():
            aside = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".old"))
            os.replace(out, aside / out.name)
        try:
            os.replace(tmp, out)
        except BaseException:
            if aside:
                os.replace(aside / out.name, out)  # the old model back in its place
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing half-written is left behind
        if aside:
            shutil.rmtree(aside, ignore_errors=True)
    return out


def model_identity(path) -> dict:
    """What tells a saved model's content apart, for a resume: each weight or config file's size and
    modification time, the hash of the small ones (configs, a LoRA adapter), and a LoRA adapter's base's
    identity. A model retrained into the same folder differs; reading it costs no pass over large weights."""
    import hashlib

    folder = Path(path)
    if not folder.is_dir():
        return {"name": str(path)}  # a hub id
    files = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix in (".safetensors", ".json", ".bin", ".model", ".txt"):
            stat = p.stat()
            files[p.name] = [stat.st_size, stat.st_mtime_ns]
            if stat.st_size < 64 << 20:
                files[p.name].append(hashlib.sha256(p.read_bytes()).hexdigest()[:16])
    identity = {"files": files}
    if is_lora_dir(folder):
        identity["base"] = model_identity(lora_base(folder))
    return identity


def lora_base(adapter) -> str:
    """The base model of a LoRA adapter. A relative record ("../../sft") is relative to the adapter's folder."""
    path = Path(adapter) / "adapter_config.json"
    try:
        base = json.loads(path.read_text())["base_model_name_or_path"]
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    except (KeyError, TypeError):
        raise ValueError(f"{path}: field 'base_model_name_or_path' is missing") from None
    if not isinstance(base, str) or not base:
        raise ValueError(f"{path}: field 'base_model_name_or_path' is {base!r}, expected the base model's folder")
    if base.startswith(("../", "./", "/")):
        resolved = (Path(adapter) / base).resolve()
        if not resolved.is_dir():
            raise FileNotFoundError(f"{adapter}: the LoRA adapter's base model {base} (that is, {resolved}) is missing; "
                                    "a run folder moves whole, with the base it was trained on")
        return str(resolved)
    return base


def record_lora_base(adapter, base) -> None:
    """Write the adapter's base into its adapter_config.json: relative to the adapter when the base lies in
    the same run (RUN/sft for RUN/loop_t/rm), so the run folder can move; else absolute (or a hub id)."""
    config_path = Path(adapter) / "adapter_config.json"
    config = json.loads(config_path.read_text())
    if Path(base).is_dir():
        adapter, base = Path(adapter).resolve(), Path(base).resolve()
        run = adapter.parent.parent
        base = os.path.relpath(base, adapter) if base.is_relative_to(run) else str(base)
    config["base_model_name_or_path"] = str(base)
    write_json(config_path, config)


def merge_lora(adapter, tokenizer, dtype: str = "auto"):
    """A LoRA adapter merged into its base, both read from disk: a reward model (task SEQ_CLS, with its
    trained score head) or a causal LM. Reading from disk, not from the trained module, is what makes it
    right under ZeRO-3, where each process holds a shard of every weight."""
    from peft import PeftModel

    task = json.loads((Path(adapter) / "adapter_config.json").read_text()).get("task_type")
    if task not in ("SEQ_CLS", "CAUSAL_LM"):
        raise ValueError(f"{adapter}: a LoRA adapter of task_type {task!r}; expected SEQ_CLS (a reward model) or CAUSAL_LM")
    with whole_weights():  # in this one process, also inside a ZeRO-3 run
        if task == "SEQ_CLS":  # refuses an adapter without its trained score head
            model = load_reward_model(str(adapter), tokenizer, dtype)
        else:
            model = PeftModel.from_pretrained(load_causal_lm(lora_base(adapter), tokenizer, dtype), str(adapter))
        return model.merge_and_unload()


@contextlib.contextmanager
def whole_weights():
    """`from_pretrained` loads whole weights, also inside a ZeRO-3 run, where transformers would otherwise
    partition them at load time (zero.Init: a collective of all processes, and a shape-(0,) tensor on
    each). For what one process uses alone (a merge, a frozen scorer) or copies from before preparing."""
    from transformers.integrations import deepspeed as hf_deepspeed

    active = hf_deepspeed._hf_deepspeed_config_weak_ref  # transformers keeps the ZeRO-3 switch here
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = active


def load_reward_model(path: str, tokenizer, dtype: str = "auto", trainable: bool = False):
    """Load a reward model saved by rm_training.py: a full model, or a LoRA adapter with its score head.

    This one call is how every stage (filter, PPO, evaluation) reloads an RM. It refuses anything that is
    not one: a causal LM (an SFT folder given by mistake) would get a freshly drawn, random score head
    and every reward would be noise.
    """
    check_reward_model(path)
    if is_lora_dir(path):
        from peft import PeftModel

        base = lora_base(path)
        model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1, dtype=dtype)
        model = fit_embeddings(model, tokenizer)
        model = PeftModel.from_pretrained(model, path, is_trainable=trainable)
        model.peft_config["default"].base_model_name_or_path = base  # resolved: PEFT reads it from the cwd
    else:
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=dtype)
        model = fit_embeddings(model, tokenizer)
    if not trainable:
        model.eval()
    return model


def zero3_accelerator():
    """The Accelerator of a run launched with DeepSpeed ZeRO-3 (`accelerate launch --config_file
    scripts/cluster/zero3.yaml`, or `--use_deepspeed --zero_stage 3`); None otherwise."""
    from accelerate import Accelerator
    from accelerate.utils import parse_flag_from_env

    if not parse_flag_from_env("ACCELERATE_USE_DEEPSPEED"):
        return None
    accelerator = Accelerator()  # (`cpu=True` would drop the DeepSpeed plugin; DeepSpeed runs on CPUs too)
    plugin = accelerator.state.deepspeed_plugin
    return accelerator if plugin is not None and plugin.zero_stage == 3 else None


def partitioned_at_load(deepspeed_plugin):
    """A context in which `from_pretrained` partitions each weight over the processes as it is read
    (zero.Init: the main process reads the checkpoint, one module at a time is gathered to copy it in), so
    no process, and no GPU, ever holds the model whole. Loaded whole instead, DeepSpeed would move the whole
    model onto every GPU before partitioning it. All processes must load together."""
    return deepspeed_plugin.zero3_init_context_manager(enable=True)


def inference_engine(model, accelerator):
    """A frozen model (an RM, the reference policy) partitioned over the processes for inference (TRL's
    `prepare_deepspeed`). Every process must then run the same number of forward passes."""
    from trl.models.utils import prepare_deepspeed

    config = accelerator.state.deepspeed_plugin.deepspeed_config  # no training: the batch fields need only be consistent
    for key, value in {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                       "train_batch_size": accelerator.num_processes, "gradient_clipping": 0.0}.items():
        if config.get(key) in (None, "auto"):
            config[key] = value
    return prepare_deepspeed(model, accelerator)


def load_scorer(path: str, tokenizer, dtype: str, device):
    """The RM ready to score on `device`; under DeepSpeed ZeRO-3, partitioned at load and wrapped for
    inference: the path for RMs too large for one GPU."""
    accelerator = zero3_accelerator()
    if accelerator is None:
        return load_reward_model(path, tokenizer, dtype).to(device)
    with partitioned_at_load(accelerator.state.deepspeed_plugin):
        model = load_reward_model(path, tokenizer, dtype)
    return inference_engine(model, accelerator)


def whole_numel(param) -> int:
    """A weight's elements, also when ZeRO-3 has left this process a shape-(0,) tensor in its place."""
    return param.ds_numel if hasattr(param, "ds_numel") else param.numel()


def held_weights(model) -> tuple[int, int]:
    """(elements of `model`'s weights this process holds, elements of the whole model): under ZeRO-3 a
    partitioned weight's share lives in its `ds_tensor`."""
    params = list(model.parameters())
    held = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params)
    return held, sum(whole_numel(p) for p in params)
