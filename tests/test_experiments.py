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


def _ppo_samples(folder, base, policy):
    """eval_policy.{base,policy}.jsonl as ppo/evaluate.py writes them, and the run's figures: mean gold rewards
    and PPO's gold win rate (its i-th sample against SFT's i-th)."""
    from ser.data import write_records
    from ser.synthetic import gold_reward

    for name, samples in (("base", base), ("policy", policy)):
        write_records(folder / f"eval_policy.{name}.jsonl", [{"question": q, "response": a} for q, a in samples])
    gold = {name: [gold_reward(q, a) for q, a in samples] for name, samples in (("base", base), ("policy", policy))}
    return {"sft_gold_reward": sum(gold["base"]) / len(base), "ppo_gold_reward": sum(gold["policy"]) / len(policy),
            "gold_win_rate": sum(a > b for a, b in zip(gold["policy"], gold["base"])) / len(base)}


KITCHEN, BEACH = "I am going to the kitchen tomorrow. What do I need?", "Pack a bag for a day at the beach."


def test_prompt_stats_are_per_prompt_gold_gains_and_win_rates_checked_against_the_run(tmp_path):
    from ser.synthetic import gold_reward

    base = [(KITCHEN, "Bring lamp."), (KITCHEN, "."), (BEACH, "Bring bucket."), (BEACH, "Bring drum.")]
    policy = [(KITCHEN, "Bring lamp, rope."), (KITCHEN, "Bring camera."), (BEACH, "."), (BEACH, "Bring bucket.")]
    run = _ppo_samples(tmp_path, base, policy)
    stats = runner.prompt_stats(tmp_path, run)
    assert list(stats["gold_gain_by_prompt"]) == list(stats["gold_win_by_prompt"]) == sorted([KITCHEN, BEACH])
    for q in (KITCHEN, BEACH):
        golds = lambda xs: [gold_reward(q, a) for qq, a in xs if qq == q]  # noqa: E731
        assert stats["gold_gain_by_prompt"][q] == pytest.approx(sum(golds(policy)) / 2 - sum(golds(base)) / 2)
        assert stats["gold_win_by_prompt"][q] == sum(a > b for a, b in zip(golds(policy), golds(base))) / 2
    for figure in ("ppo_gold_reward", "gold_win_rate"):  # samples of another run than the row's
        with pytest.raises(ValueError, match="is not the run's"):
            runner.prompt_stats(tmp_path, {**run, figure: run[figure] + 0.01})


def _ppo_row(variant, seed, by_prompt=None, fell=False):
    row = {"setting": "synthetic-ppo", "variant": variant, "seed": seed, "status": "ppo", "n_eval": 4,
           "rm_accuracy": 0.6, "sft_gold_reward": 0.5, "ppo_gold_reward": 0.4 if fell else 0.5 + 0.1 * (seed + 1),
           "gold_win_rate": 0.55, "full_rm_win_rate": 0.6, "kl_to_sft": 3.0, "step_kl_median": 2.5,
           "ppo_config": variant.partition("@")[2]}
    if by_prompt is not None:
        row["gold_gain_by_prompt"], row["gold_win_by_prompt"] = by_prompt
    return row


def test_ppo_report_counts_seeds_and_prompts_where_rows_have_per_prompt_figures():
    from ser.stats import crossed

    gains, wins = [[0.1, 0.3], [0.2, 0.2], [0.5, 0.1]], [[0.5, 0.75], [0.25, 0.5], [1.0, 0.5]]
    rows = [_ppo_row("ppo:seed@new", s, ({"a": gains[s][0], "b": gains[s][1]}, {"a": wins[s][0], "b": wins[s][1]}))
            for s in range(3)]
    rows += [_ppo_row("ppo:full@new", s) for s in range(3)]
    lines, summary = report.ppo_report("synthetic-ppo", rows, random.Random(0))
    seed_line = next(line for line in lines if line.startswith("| seed@new "))
    lo, hi = crossed(gains)["ci"]
    assert f"[{lo:+.3f}, {hi:+.3f}]" in seed_line and "*seeds*" not in seed_line
    assert report.fmt_ci(crossed(wins)["ci"]) in seed_line
    assert next(line for line in lines if line.startswith("| full@new ")).count("*seeds*") == 2
    assert summary["ppo:seed@new"]["gold_gain_ci"] == summary["ppo:seed@new"]["gold_win_rate_ci"] == "seeds x prompts"
    assert summary["ppo:full@new"]["gold_gain_ci"] == summary["ppo:full@new"]["gold_win_rate_ci"] == "seeds"
    # rows with different prompts cannot be crossed: seeds only
    rows[0]["gold_gain_by_prompt"] = {"a": 0.1, "c": 0.3}
    assert report.prompt_table(rows[:3]) is None
    assert report.prompt_table(rows[:3], "gold_win_by_prompt") is not None


def test_ppo_choice_reads_each_candidates_kl_target_from_the_grid():
    candidates = {c for round_ in report.PPO_ROUNDS for c in round_["candidates"]}
    assert {c: report.kl_target(c) for c in candidates} == {"target6": 6.0, "kl3": 3.0, "early": 6.0, "budget": 6.0,
                                                            "kl3-early": 3.0}
    rows = [{**_ppo_row(f"ppo:seed@{c}", s), "step_kl_median": kl} for c, kl in (("kl3", 2.0), ("target6", 13.0))
            for s in range(2)]
    assert report.ppo_choice(rows) == []  # seeds 0 and 1 are no round's tuning seeds
    rows = [{**r, "seed": r["seed"] + 5} for r in rows]
    lines = report.ppo_choice(rows)
    assert "| target6 | 2 | 2 | +0.150 | 13.00 | no |" in lines  # 13 > 2 x 6: not eligible
    assert "Chosen: `kl3`." in lines


def test_second_round_breaks_a_tie_on_the_weakest_rm_kind():
    # both candidates raise gold in every cell; kl3-early has the higher mean gain (its full-RM cells are large)
    # and the lower weakest kind, so the round-2 rule picks kl3 where a mean would pick kl3-early
    gains = {"kl3": {"seed": 0.2, "full": 0.3}, "kl3-early": {"seed": 0.1, "full": 0.9}}
    rows = [{**_ppo_row(f"ppo:{k}@{c}", s), "ppo_gold_reward": 0.5 + g} for c, by_kind in gains.items()
            for k, g in by_kind.items() for s in (10, 11)]
    lines = report.ppo_choice(rows)
    assert lines[0].startswith("The choice of PREREGISTRATION-ppo-round2.md")
    assert "| kl3 | 4 | 4 | +0.200 | 2.50 | yes |" in lines and "| kl3-early | 4 | 4 | +0.100 | 2.50 | yes |" in lines
    assert "Chosen: `kl3`." in lines
    assert not any("PREREGISTRATION-ppo-defaults" in line for line in lines)  # one candidate of round 1 only


def test_confirmation_pools_seeds_0_to_4_with_15_to_19():
    rows = [_ppo_row("ppo:seed@new", s, fell=s in (3, 4)) for s in (0, 1, 2, 3, 4)]
    rows += [_ppo_row("ppo:full@new", s) for s in (0, 1, 2, 3, 4)] + [_ppo_row("ppo:seed@old", 15, fell=True)]
    assert report.ppo_confirmation(rows) == []  # no confirmation seed of round 2 yet
    rows += [_ppo_row(f"ppo:{k}@new", s) for k in ("seed", "full") for s in (15, 16, 17, 18, 19)]
    lines = report.ppo_confirmation(rows)
    assert "| seed | 10 | 8 of 10 | 3 of 5 | 5 of 5 | yes |" in lines  # the @old row of seed 15 is not counted
    assert "| full | 10 | 10 of 10 | 5 of 5 | 5 of 5 | yes |" in lines
    rows[-6]["ppo_gold_reward"] = 0.0  # one more fall against the seed RM: 7 of 10
    assert "| seed | 10 | 7 of 10 | 3 of 5 | 4 of 5 | no |" in report.ppo_confirmation(rows)
    assert "2.50 (target 3; within 2x)" in report.ppo_confirmation(rows)[-2]


def test_backfill_fills_rows_from_the_folder_that_reproduces_them(tmp_path):
    work = tmp_path / "runs" / "synthetic-ppo" / "seed0"
    samples = {"ppo-seed@new": ([(KITCHEN, "Bring lamp.")] * 2, [(KITCHEN, "Bring lamp, rope.")] * 2),
               "ppo-full@old": ([(BEACH, "Bring drum.")] * 2, [(BEACH, "Bring bucket.")] * 2)}
    rows = []
    for folder, (base, policy) in samples.items():
        (work / folder).mkdir(parents=True)
        variant = "ppo:" + folder.removeprefix("ppo-").replace("@new", "@target6")  # a target6 row that ran as new
        rows.append({**_ppo_row(variant, 0), **_ppo_samples(work / folder, base, policy)})
    rows.append(_ppo_row("ppo:ser-paper@old", 0))  # its run folder is gone
    rows.append({**_ppo_row("ppo:full@old", 1), "sft_gold_reward": 9.0})  # seed1 has no folder either
    rows.append(_ppo_row("ppo:seed@new", 0))  # its folder holds the target6 run, whose gold rewards differ
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"rows": rows}))
    runner.backfill_prompt_stats(path, tmp_path / "runs")
    filled = json.loads(path.read_text())["rows"]
    assert [r["variant"] for r in filled] == [r["variant"] for r in rows]  # in place, order kept
    assert [("gold_gain_by_prompt" in r) for r in filled] == [True, True, False, False, False]
    assert [("gold_win_by_prompt" in r) for r in filled] == [True, True, False, False, False]
    assert filled[0]["gold_gain_by_prompt"] == pytest.approx({KITCHEN: filled[0]["ppo_gold_reward"]
                                                              - filled[0]["sft_gold_reward"]})
    gain = filled[0]["ppo_gold_reward"] - filled[0]["sft_gold_reward"]  # each side's two samples are alike
    assert gain != 0 and filled[0]["gold_win_by_prompt"] == {KITCHEN: float(gain > 0)}
