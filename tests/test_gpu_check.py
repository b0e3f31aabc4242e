"""`make gpu-check` in its CPU dry mode: the script a user runs on a GPU node cannot rot unnoticed."""

import json
import subprocess
import sys

import pytest

from conftest import ENV, ROOT

pytestmark = [pytest.mark.slow, pytest.mark.two_process]


def gpu_check(out, *flags):
    return subprocess.run([sys.executable, "scripts/gpu_check.py", "--dry_run", "True", "--out", str(out), *flags],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)


def test_the_dry_run_passes_every_check_it_can_run_on_a_cpu(tmp_path):
    proc = gpu_check(tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    status = {c["check"]: c["status"] for c in summary["checks"]}
    assert status == {"environment": "PASS", "scorers": "PASS", "gpu_vs_cpu": "SKIP", "logprobs": "PASS",
                      "lora_rm_defaults": "PASS", "zero3_sft": "PASS", "zero3_rm": "PASS", "zero3_ppo": "PASS",
                      "filter_partition": "PASS"}, proc.stdout[-4000:]
    for name in status:  # one line per check
        assert sum(line.split(" ")[1:2] == [name] for line in proc.stdout.splitlines()) == 1, name
    checks = {c["check"]: c for c in summary["checks"]}
    assert checks["scorers"]["fp32_max_difference"] <= 1e-4 and checks["filter_partition"]["selected"] > 0
    assert checks["zero3_ppo"]["mfu"] > 0


def test_a_planted_empty_saved_tensor_fails_the_check(tmp_path):
    proc = gpu_check(tmp_path, "--only", "zero3_sft", "--plant", "empty_saved_tensor")
    assert proc.returncode == 1, proc.stdout[-3000:]
    assert "FAIL zero3_sft" in proc.stdout and "with no elements" in proc.stdout, proc.stdout[-3000:]


def test_without_a_gpu_the_check_stops_after_the_environment_and_says_what_to_run(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible: the check would run")
    config = tmp_path / "config"
    config.mkdir()
    (config / "config.json").write_text("{}")
    proc = subprocess.run([sys.executable, "scripts/gpu_check.py", "--config", str(config), "--out", str(tmp_path / "o")],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "FAIL environment" in proc.stdout and "--dry_run True" in proc.stdout, proc.stdout
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert [c["check"] for c in summary["checks"]] == ["environment"]
