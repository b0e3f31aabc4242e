"""The GPU bench's CPU rehearsal (bench/bench_gpu.py --dry_run True): every measurement runs and is written."""

import json
import subprocess
import sys

import pytest

from conftest import ENV, ROOT


@pytest.mark.slow
def test_the_gpu_bench_rehearses_on_the_cpu(tmp_path):
    subprocess.run([sys.executable, "-m", "bench.bench_gpu", "--dry_run", "True", "--out", str(tmp_path)],
                   cwd=ROOT, env=ENV, check=True, capture_output=True, text=True, timeout=600)
    result = json.loads((tmp_path / "gpu-dry-run.json").read_text())
    shape = result["smollm2-135m"]
    assert set(shape["scoring"]["best"]) == {"released", "ours", "shared prefix"}
    assert all(b["pairs_per_second"] > 0 for b in shape["scoring"]["best"].values())
    assert set(shape["rm_training"]["best"]) == {"trl", "trl +checkpointing", "ours", "ours +checkpointing"}
    ours, trl = shape["rm_training"]["best"]["ours"], shape["rm_training"]["best"]["trl"]
    assert ours["padding_share"] < trl["padding_share"]  # length-grouped forwards pad less than random batches
    assert shape["rm_training"]["speedup_vs_trl"]["trl"] == 1.0
    assert 0 < shape["ppo"]["best"]["hf-generate"]["generation_share"] < 1
    assert result["versions"]["torch"] and result["dry_run"] is True and result["peak_bf16_tflops"] is None


def test_the_gpu_bench_refuses_an_unknown_shape():
    from bench.bench_gpu import Args

    with pytest.raises(SystemExit, match="unknown; known: llama3-8b"):
        Args(configs=["llama3-70b"])
