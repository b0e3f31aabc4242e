"""The frozen-trunk study's in-process loop is scripts/ser_loop.sh's: the same rows on the same cache."""

import json
import subprocess
import sys

import pytest
from test_ser_loop import ENV

from conftest import CPU, ROOT
from experiments import frozen_study
from ser import features
from ser.data import load_records
from ser.modeling import load_tokenizer

pytestmark = pytest.mark.slow


def test_the_study_loop_gives_the_driver_s_rows(sft_model, synthetic, tmp_path):
    cache, run, floor = tmp_path / "cache", tmp_path / "run", 40  # a small L2 and pairwise p: three loops run
    common = ["--feature_cache", str(cache), "--dtype", "float32"]
    env = {**ENV, "DATA": str(synthetic), "SFT": str(sft_model), "RUN": str(run), "MAX_LOOPS": "3", "MAX_LENGTH": "96",
           "RM_ARGS": " ".join(["--trunk", "frozen", "--head_l2", "1e-5", "--center_rewards_coefficient",
                                str(frozen_study.CENTER), *common, *CPU]),
           "FILTER_ARGS": " ".join([*common, "--status1_min_pairs", str(floor), "--status2_min_pairs", str(floor),
                                    "--probability", "pairwise"]),
           "PY": sys.executable, "LAUNCH": sys.executable}
    proc = subprocess.run(["bash", "scripts/ser_loop.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    loops = json.loads((run / "loops.json").read_text())["loops"]

    tok = load_tokenizer(str(sft_model))
    layer = features.frozen_info(run / "loop_0" / "rm")["layer"]
    seed, pool, held = (frozen_study.feature_pairs(cache, tok, load_records(str(synthetic), f"data/{split}"), layer, 96)
                        for split in ("reward", "unlabeled", "evaluation"))
    rows, _ = frozen_study.ser_run(seed, pool, held, 1e-5, floor, probability="pairwise")
    assert len(rows) == len(loops) and len(rows) >= 3, (rows, loops)  # Loop 0 and at least two loops
    for ours, theirs in zip(rows, loops):
        assert ours["status"] == theirs["status"] and ours["selected"] == theirs["selected"], (ours, theirs)
        if theirs["accuracy"] is not None:
            assert ours["accuracy"] == pytest.approx(theirs["accuracy"], abs=1e-9)
        if theirs.get("pseudo_label_precision") is not None:
            assert ours["self_label_precision"] == pytest.approx(theirs["pseudo_label_precision"], abs=1e-6)  # a float32 mean
