"""scripts/ser_report.py: loops.json, the demo's summary.json and report.md from what the stages wrote."""

import json

from scripts import ser_report
from ser.data import write_json


def fake_run(root):
    run = root / "ser"
    write_json(run / "loop_0" / "rm" / "eval_results.json", {"accuracy": 0.6, "tie_rate": 0.0, "margin": 0.1,
                                                            "train_pairs": 10})
    for t, (status, selected, acc) in enumerate([("status1", 40, 0.65), ("status2", 5, 0.66)], start=1):
        write_json(run / f"loop_{t}" / "stats.json", {"status": status, "selected": selected, "status1_eligible": 40,
                                                       "status2_eligible": 50, "pseudo_label_precision": 0.8})
        write_json(run / f"loop_{t}" / "rm" / "eval_results.json", {"accuracy": acc, "tie_rate": 0.01, "margin": 0.2,
                                                                   "train_pairs": 10 + selected})
    write_json(run / "loop_3" / "stats.json", {"status": "stop", "selected": 0, "status1_eligible": 1,
                                               "status2_eligible": 2, "pseudo_label_precision": None})
    write_json(run / ".wall.loop_1.filter.json", {"stage": "loop_1.filter", "ms": 1500})
    write_json(run / ".wall.loop_1.train.json", {"stage": "loop_1.train", "ms": 2500})
    write_json(root / "full" / "eval_results.json", {"accuracy": 0.7})
    write_json(root / "eval_policy.json", {
        "samples": 64, "kl_to_base": 3.0,
        "base": {"policy_rm_reward": 0.1, "gold_reward": 0.2, "response_length": 9, "eos_rate": 1.0},
        "policy": {"policy_rm_reward": 1.0, "gold_reward": 0.5, "response_length": 12, "eos_rate": 0.9},
        "judged_by": {"policy_rm": {"win_rate": 0.8, "tie_rate": 0.0}, "gold": {"win_rate": 0.6, "tie_rate": 0.1}}})
    return run


def test_loops_summary_and_report(tmp_path):
    run = fake_run(tmp_path)
    ser_report.main(ser_report.Args(run=str(run), full_rm=str(tmp_path / "full"), report_to="none",
                                    demo_dir=str(tmp_path), policy_eval=str(tmp_path / "eval_policy.json")))
    loops = json.loads((run / "loops.json").read_text())
    assert [lp["status"] for lp in loops["loops"]] == ["seed", "status1", "status2", "stop"]
    assert [lp["selected_total"] for lp in loops["loops"]] == [0, 40, 45, 45]
    assert loops["loops"][1]["wall_time_s"] == 4.0
    assert loops["final_rm"].endswith("loop_2/rm") and loops["final_accuracy"] == 0.66
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["seed_accuracy"] == 0.6 and summary["ser_accuracy"] == 0.66 and summary["full_accuracy"] == 0.7
    assert [lp["accuracy"] for lp in summary["loops"]] == [0.6, 0.65, 0.66, None]
    assert {"status", "selected", "pseudo_label_precision", "accuracy"} <= set(summary["loops"][1])
    assert summary["sft_gold_reward"] == 0.2 and summary["ppo_gold_reward"] == 0.5
    assert summary["ppo_win_rate_gold"] == 0.6
    report = (tmp_path / "report.md").read_text()
    assert "SER closed 60 % of that gap" in report  # (66 - 60) / (70 - 60)
    assert "PPO raised the mean gold reward over SFT (+0.200 -> +0.500)" in report
    assert (tmp_path / "accuracy.png").stat().st_size > 1000


def test_loops_beyond_max_loops_or_a_stop_are_not_reported(tmp_path):
    """FORCE=1 with a lower MAX_LOOPS leaves loop folders of the earlier run: the report ends at MAX_LOOPS."""
    run = fake_run(tmp_path)
    write_json(run / "config.json", {"settings": {"MAX_LOOPS": "1"}})
    loops = ser_report.collect(run)
    assert [lp["loop"] for lp in loops["loops"]] == [0, 1] and loops["left_over_loops"] == [2, 3]
    assert loops["final_rm"].endswith("loop_1/rm")
    write_json(run / "loop_4" / "stats.json", {"status": "status1", "selected": 3, "status1_eligible": 3,
                                               "status2_eligible": 3, "pseudo_label_precision": None})
    write_json(run / "config.json", {"settings": {"MAX_LOOPS": "9"}})
    loops = ser_report.collect(run)  # loop_3 said Stop: loop_4 is another run's
    assert loops["loops"][-1]["status"] == "stop" and loops["left_over_loops"] == [4]
