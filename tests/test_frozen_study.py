"""The frozen-trunk study's in-process loop is scripts/ser_loop.sh's: the same rows on the same cache."""

import json
import subprocess
import sys

import pytest

from conftest import CPU, ENV, ROOT
from experiments import frozen_study
from ser import features
from ser.cli import parse
from ser.data import load_records
from ser.modeling import load_tokenizer

pytestmark = pytest.mark.slow


VARIANTS = {  # driver settings, extra filter and RM flags, and the same settings for ser_run (one run a rule)
    "centred-monotone-share-newest-restart": (
        {"UNION": "0", "CONTINUE": "0"},
        ["--probability", "centred", "--monotone", "True", "--status1_min_pairs", "1", "--status1_min_share", "0.1"], [],
        dict(probability="centred", forward_only=True, union=False, continue_training=False,
             thresholds={"status1_min_pairs": 1, "status1_min_share": 0.1})),
    "agreement-without-seed": ({"KEEP_SEED": "0"}, ["--selection", "agreement", "--probability", "pairwise"], [],
                               dict(rule="agreement", keep_seed=False, probability="pairwise")),
    "released-sigmoid": ({}, ["--selection", "released"], [], dict(rule="released")),
    "ensemble": ({}, ["--selection", "ensemble", "--probability", "pairwise"], ["--bootstrap_heads", "3"],
                 dict(ensemble=3, bootstrap_seed=42, probability="pairwise")),  # rm_training's --seed: 42
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_study_loop_gives_the_driver_s_rows(sft_model, synthetic, tmp_path, variant):
    """scripts/ser_loop.sh and ser/loop.py's in-process `run` (through frozen_study.ser_run) on one cache: the
    same statuses, selections, self-label precisions and held-out accuracies (to 1e-9), over the three
    probability mappings, every registered rule, the monotone status, a floor as a share, and
    UNION/KEEP_SEED/CONTINUE 0 and 1."""
    env_extra, filter_extra, rm_extra, kwargs = VARIANTS[variant]
    cache, run, floor = tmp_path / "cache", tmp_path / "run", 40  # a small L2: three loops run
    common = ["--feature_cache", str(cache), "--dtype", "float32"]
    env = {**ENV, "DATA": str(synthetic), "SFT": str(sft_model), "RUN": str(run), "MAX_LOOPS": "3", "MAX_LENGTH": "96",
           "RM_ARGS": " ".join(["--trunk", "frozen", "--head_l2", "1e-5", "--center_rewards_coefficient",
                                str(frozen_study.CENTER), *common, *rm_extra, *CPU]),
           "FILTER_ARGS": " ".join([*common, "--status1_min_pairs", str(floor), "--status2_min_pairs", str(floor),
                                    *filter_extra]),
           "PY": sys.executable, "LAUNCH": sys.executable, **env_extra}
    proc = subprocess.run(["bash", "scripts/ser_loop.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    loops = json.loads((run / "loops.json").read_text())["loops"]

    tok = load_tokenizer(str(sft_model))
    layer = features.frozen_info(run / "loop_0" / "rm")["layer"]
    seed, pool, held = (frozen_study.feature_pairs(cache, tok, load_records(str(synthetic), f"data/{split}"), layer, 96)
                        for split in ("reward", "unlabeled", "evaluation"))
    rows, _ = frozen_study.ser_run(seed, pool, held, 1e-5, floor, **kwargs)
    assert len(rows) == len(loops) and len(rows) >= 3, (rows, loops)  # Loop 0 and at least two loops
    for ours, theirs in zip(rows, loops):
        assert ours["status"] == theirs["status"] and ours["selected"] == theirs["selected"], (ours, theirs)
        if theirs["accuracy"] is not None:
            assert ours["accuracy"] == pytest.approx(theirs["accuracy"], abs=1e-9)
        if theirs.get("pseudo_label_precision") is not None:
            assert ours["self_label_precision"] == pytest.approx(theirs["pseudo_label_precision"], abs=1e-6)  # a float32 mean


def test_the_study_runs_on_a_user_s_prepared_folder_and_trunk(sft_model, synthetic, tmp_path):
    """`python -m experiments.frozen --data DIR --trunk MODEL`: a folder that is not a built-in setting and the
    tiny SFT model as the trunk (its two layers are the candidates); featurising, tuning, the curve, the
    pre-registration, the grid and the report in one resumable command."""
    from experiments import frozen

    argv = ["--data", str(synthetic), "--trunk", str(sft_model), "--max_length", "96", "--seeds", "2", "--l2s", "0.1", "1.0",
            "--workdir", str(tmp_path / "work"), "--results", str(tmp_path / "results"), "--name", "mine"]
    (args,) = parse([frozen.Args], argv)
    state = frozen.main(args)
    assert state["tuning"]["layer"] in (1, 2) and json.loads((tmp_path / "work" / "mine" / "cache" / "meta.json")
                                                             .read_text())["layers"] == [1, 2]
    cells = {(r["variant"], r["seed"]) for r in state["rows"]}
    for variant in ("seed", "ser-paper", "full", "ser-centred", "ser-forward", "ser-ensemble", "oracle", "random"):
        assert {(variant, 0), (variant, 1)} <= cells, variant
    report = (tmp_path / "results" / "REPORT-mine.md").read_text()
    assert "ser-paper" in report and "full" in report
    again = frozen.main(parse([frozen.Args], argv)[0])  # resumed: nothing is run again
    assert again["rows"] == state["rows"]
    with pytest.raises(SystemExit, match="give --setting .* or --data"):
        parse([frozen.Args], ["--workdir", str(tmp_path)])


def test_the_equality_variants_cover_every_rule_and_mapping():
    """A new rule or mapping needs a driver-equality variant above."""
    from ser.selection import MAPPINGS, RULES

    def flag(flags, name, default):
        return flags[flags.index(name) + 1] if name in flags else default

    assert {flag(v[1], "--selection", "paper") for v in VARIANTS.values()} == set(RULES)
    assert {flag(v[1], "--probability", "sigmoid") for v in VARIANTS.values()} == set(MAPPINGS)
