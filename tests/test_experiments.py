"""The study's runner and report: rows with the promised fields, resume by skipping, a report made
from results.json alone, and statistics that are right on known cases."""

import json
import random

import pytest

from experiments import report
from experiments import run as runner

FIELDS = {"setting", "variant", "seed", "loop", "accuracy", "tie_rate", "n_eval", "status", "selected",
          "pseudo_label_precision", "wall_s", "git_rev"}


def test_mcnemar_and_intervals_on_known_cases():
    assert report.mcnemar_exact(0, 0) == 1.0
    assert report.mcnemar_exact(5, 5) == 1.0
    assert report.mcnemar_exact(10, 0) == pytest.approx(2 / 2 ** 10)  # exact binomial, two-sided
    assert report.mcnemar_exact(2, 8) == pytest.approx(2 * (1 + 10 + 45) / 2 ** 10)
    rng = random.Random(0)
    lo, hi = report.bootstrap_ci([0.60, 0.62, 0.64, 0.66, 0.68], rng)
    assert 0.60 <= lo < 0.64 < hi <= 0.68
    # A beats B on 30 of 200 pairs and loses 10: the paired interval of +10 points excludes zero
    pairs = [(1, 0)] * 30 + [(0, 1)] * 10 + [(1, 1)] * 100 + [(0, 0)] * 60
    lo, hi = report.paired_bootstrap_ci({0: pairs, 1: pairs}, rng)
    assert 0 < lo < 0.10 < hi


@pytest.mark.slow
def test_quick_grid_rows_resume_and_report(tmp_path, capsys):
    args = runner.Args(grid="quick", seeds=[0], results=str(tmp_path / "results"), workdir=str(tmp_path / "work"))
    runner.main(args)
    rows = json.loads((tmp_path / "results" / "results.json").read_text())["rows"]
    assert {r["variant"] for r in rows} == {"seed", "full", "ser-paper"}
    for r in rows:
        assert FIELDS <= set(r), FIELDS - set(r)
    ser = sorted((r for r in rows if r["variant"] == "ser-paper"), key=lambda r: r["loop"])
    assert ser[0]["loop"] == 0 and ser[0]["accuracy"] == next(r for r in rows if r["variant"] == "seed")["accuracy"]
    assert all(len(r["correct"]) == r["n_eval"] for r in rows if r.get("accuracy") is not None)
    assert not (tmp_path / "work" / "synthetic-quick" / "seed0" / "ser-paper").exists()  # checkpoints dropped
    capsys.readouterr()

    runner.main(args)  # a rerun skips what results.json holds
    assert capsys.readouterr().out.count("in results.json, skipped") == 3
    assert json.loads((tmp_path / "results" / "results.json").read_text())["rows"] == rows

    text = (tmp_path / "results" / "REPORT.md").read_text()
    (tmp_path / "results" / "REPORT.md").unlink()
    assert report.write_report(tmp_path / "results") == text  # from results.json alone
    assert "| ser-paper | 1 |" in text and (tmp_path / "results" / "synthetic-quick-accuracy.png").is_file()
