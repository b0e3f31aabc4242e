"""Summarise a SER run: RUN/loops.json, a plot of held-out accuracy per loop, and the wandb log.

    python scripts/ser_report.py --run runs/demo/ser [--full_rm runs/demo/rm_full]

Reads what the stages wrote: loop_<t>/rm/eval_results.json and loop_<t>/stats.json.
"""

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ser.cli import parse, setup_wandb
from ser.data import write_json
from ser.selection import STOP


@dataclass
class Args:
    run: str = field(metadata={"help": "the run folder of scripts/ser_loop.sh"})
    full_rm: str | None = field(default=None, metadata={"help": "an RM trained on all human labels, for comparison"})
    report_to: str = field(default="wandb", metadata={"help": "wandb or none"})
    demo_dir: str | None = field(default=None, metadata={"help": "also write summary.json and report.md here"})
    policy_eval: str | None = field(default=None, metadata={"help": "ppo/evaluate.py output, for the demo report"})
    ppo_log: str | None = field(default=None, metadata={
        "help": "ppo.py's log.jsonl (run with --gold or --eval_reward_model): the demo report plots the proxy and "
                "the independent reward against KL"})


def read(path):
    """A stage's JSON output, or None when the stage has not written it; a corrupt file names itself."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SystemExit(f"error: {path}: not a readable JSON file ({e}); rerun the stage that writes it") from None


def wall_ms(run, t):
    return sum((read(p) or {}).get("ms", 0) for p in run.glob(f".wall.loop_{t}.*.json"))


def max_loops(run: Path) -> int | None:
    """RUN/config.json's MAX_LOOPS: loop folders beyond it are left over from a run with other settings."""
    config = read(run / "config.json")
    settings = config.get("settings") if isinstance(config, dict) else None
    try:
        return int(settings["MAX_LOOPS"])
    except (TypeError, KeyError, ValueError):
        return None


def collect(run: Path) -> dict:
    loops, t, cumulative, left_over = [], 0, 0, []
    limit = max_loops(run)
    while (run / f"loop_{t}").is_dir():
        if (limit is not None and t > limit) or (loops and loops[-1]["status"] == STOP):
            # left over from a run with other settings (FORCE=1 with a lower MAX_LOOPS, or one that stopped later)
            left_over = sorted(int(p.name[5:]) for p in run.glob("loop_*") if p.name[5:].isdigit() and int(p.name[5:]) >= t)
            print(f"ser_report: {run}: loop folders {left_over} lie beyond this run's last loop and are not reported")
            break
        loop = run / f"loop_{t}"
        stats, rm = read(loop / "stats.json"), read(loop / "rm" / "eval_results.json")
        if t > 0 and stats is None:
            break  # not run yet
        cumulative += stats["selected"] if stats else 0
        loops.append({
            "loop": t,
            "status": stats["status"] if stats else "seed",
            "selected": stats["selected"] if stats else 0,
            "selected_total": cumulative,
            "status1_eligible": stats["status1_eligible"] if stats else None,
            "status2_eligible": stats["status2_eligible"] if stats else None,
            "pseudo_label_precision": stats["pseudo_label_precision"] if stats else None,
            "accuracy": rm["accuracy"] if rm else None,
            "tie_rate": rm["tie_rate"] if rm else None,
            "margin": rm["margin"] if rm else None,
            "train_pairs": rm["train_pairs"] if rm else None,
            "wall_time_s": wall_ms(run, t) / 1000,
            "rm": str(loop / "rm") if rm else None,
        })
        t += 1
    trained = [lp for lp in loops if lp["rm"]]
    return {"loops": loops, "left_over_loops": left_over, "final_rm": trained[-1]["rm"] if trained else None,
            "final_accuracy": trained[-1]["accuracy"] if trained else None}


def plot(summary, path, full_accuracy=None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(lp["loop"], lp["accuracy"]) for lp in summary["loops"] if lp["accuracy"] is not None]
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
    ax.plot([p[0] for p in points], [100 * p[1] for p in points], marker="o", label="SER RM")
    if full_accuracy is not None:
        ax.axhline(100 * full_accuracy, color="gray", linestyle="--", label="all human labels")
    ax.set_xlabel("loop")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_xticks([p[0] for p in points])
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def log_wandb(summary, run: Path, report_to: str):
    if report_to != "wandb" or os.environ.get("WANDB_MODE") == "disabled":
        return
    setup_wandb("wandb")
    import wandb

    with wandb.init(name=run.name, dir=str(run), job_type="ser-loops", config={"run": str(run)}) as w:
        for lp in summary["loops"]:
            w.log({k: v for k, v in lp.items() if isinstance(v, (int, float)) and v is not None}, step=lp["loop"])


def main(args: Args):
    run = Path(args.run)
    if not (run / "loop_0").is_dir():
        raise SystemExit(f"error: {run}: not a SER run folder (no loop_0/); nothing was written")
    summary = collect(run)
    full = read(Path(args.full_rm) / "eval_results.json") if args.full_rm else None
    if full:
        summary["full_accuracy"] = full["accuracy"]
    write_json(run / "loops.json", summary)
    plot(summary, run / "accuracy.png", full["accuracy"] if full else None)
    log_wandb(summary, run, args.report_to)
    print(f"{'loop':>4} {'status':>8} {'selected':>8} {'precision':>9} {'accuracy':>8} {'wall s':>7}")
    for lp in summary["loops"]:
        prec = "-" if lp["pseudo_label_precision"] is None else f"{lp['pseudo_label_precision']:.3f}"
        acc = "-" if lp["accuracy"] is None else f"{100 * lp['accuracy']:.1f}"
        print(f"{lp['loop']:>4} {lp['status']:>8} {lp['selected']:>8} {prec:>9} {acc:>8} {lp['wall_time_s']:>7.1f}")
    print(f"wrote {run / 'loops.json'} and {run / 'accuracy.png'}")
    if args.demo_dir:
        write_demo_report(summary, run, Path(args.demo_dir), read(args.policy_eval) if args.policy_eval else None,
                          args.ppo_log)
    return summary


def plot_overoptimisation(log_path, path) -> str | None:
    """The RM reward PPO optimised and the independent rewards (gold, the evaluation RM) of each step's rollout
    against the step's KL to SFT (Gao et al.'s over-optimisation curve); a sentence of what it shows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(log_path).read_text().splitlines() if line.strip()]
    keys = [k for k in ("env/reward_mean", "gold/reward_mean", "eval/reward_mean") if any(k in r for r in rows)]
    names = {"env/reward_mean": "RM PPO optimised (proxy)", "gold/reward_mean": "gold reward",
             "eval/reward_mean": "independent RM"}
    fig, axes = plt.subplots(1, len(keys), figsize=(3.4 * len(keys), 3), dpi=120)
    for ax, key in zip(axes if len(keys) > 1 else [axes], keys):
        pts = [(r["objective/kl"], r[key], r["step"]) for r in rows if key in r]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], c=[p[2] for p in pts], cmap="viridis", s=10)
        ax.set(xlabel="KL to SFT (nats per response)", title=names[key])
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    if "gold/reward_mean" not in keys:
        return None
    first, last = rows[:10], rows[-10:]
    mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)  # noqa: E731
    return (f"Over PPO's first and last 10 steps, the proxy reward went {mean(first, 'env/reward_mean'):+.3f} -> "
            f"{mean(last, 'env/reward_mean'):+.3f} and the gold reward {mean(first, 'gold/reward_mean'):+.3f} -> "
            f"{mean(last, 'gold/reward_mean'):+.3f}, at KL {mean(first, 'objective/kl'):.1f} -> "
            f"{mean(last, 'objective/kl'):.1f} (each step's rollout).")


def write_demo_report(summary, run: Path, out: Path, policy_eval=None, ppo_log=None):
    loops = summary["loops"]
    demo = {"seed_accuracy": loops[0]["accuracy"], "ser_accuracy": summary["final_accuracy"],
            "full_accuracy": summary.get("full_accuracy"), "final_rm": summary["final_rm"],
            "loops": [{k: lp[k] for k in ("loop", "status", "selected", "pseudo_label_precision", "accuracy",
                                          "tie_rate", "wall_time_s")} for lp in loops]}
    if policy_eval:
        gold = policy_eval["judged_by"].get("gold", {})
        demo.update(sft_gold_reward=policy_eval["base"].get("gold_reward"),
                    ppo_gold_reward=policy_eval["policy"].get("gold_reward"),
                    ppo_win_rate_gold=gold.get("win_rate"), ppo_tie_rate_gold=gold.get("tie_rate"),
                    sft_rm_reward=policy_eval["base"]["policy_rm_reward"],
                    ppo_rm_reward=policy_eval["policy"]["policy_rm_reward"],
                    ppo_win_rate_rm=policy_eval["judged_by"]["policy_rm"]["win_rate"],
                    ppo_kl_to_sft=policy_eval["kl_to_base"])
    previous = json.loads((out / "summary.json").read_text()) if (out / "summary.json").is_file() else {}
    write_json(out / "summary.json", {**previous, **demo})
    (out / "accuracy.png").write_bytes((run / "accuracy.png").read_bytes())

    def pct(x):
        return "-" if x is None else f"{100 * x:.1f}"

    rows = ["| RM | status | self-labelled pairs | self-label precision | held-out accuracy (%) | ties (%) |",
            "|---|---|---|---|---|---|"]
    for lp in loops:
        name = "seed (15 % human labels)" if lp["loop"] == 0 else f"SER loop {lp['loop']}"
        rows.append(f"| {name} | {lp['status']} | {lp['selected']} | {pct(lp['pseudo_label_precision'])} | "
                    f"{pct(lp['accuracy'])} | {pct(lp['tie_rate'])} |")
    rows.append(f"| final SER RM | | {loops[-1]['selected_total']} | | {pct(demo['ser_accuracy'])} | |")
    rows.append(f"| all human labels | | | | {pct(demo['full_accuracy'])} | |")
    gap = None if demo["full_accuracy"] is None else 100 * (demo["full_accuracy"] - demo["seed_accuracy"])
    gain = 100 * (demo["ser_accuracy"] - demo["seed_accuracy"])
    verdict = [f"SER moved held-out accuracy by {gain:+.1f} points over the seed RM."]
    if gap:
        verdict.append(f"The all-label RM is {gap:+.1f} points over the seed RM; SER closed {100 * gain / gap:.0f} % "
                       "of that gap.")
    lines = ["# SER demo (synthetic task, tiny model, CPU)", "", *rows, "", *verdict,
             "Self-label precision is measured against the pool's hidden human labels, which are noisy.",
             "", "![accuracy per loop](accuracy.png)", ""]
    if policy_eval:
        ppo_rows = ["| policy | gold reward | reward of the RM PPO optimised | response tokens | EOS rate |",
                    "|---|---|---|---|---|"]
        for name, label in (("base", "SFT"), ("policy", "PPO (final SER RM)")):
            r = policy_eval[name]
            ppo_rows.append(f"| {label} | {r.get('gold_reward', float('nan')):+.3f} | {r['policy_rm_reward']:+.3f} | "
                            f"{r['response_length']:.1f} | {r['eos_rate']:.2f} |")
        rose = demo["ppo_gold_reward"] is not None and demo["ppo_gold_reward"] > demo["sft_gold_reward"]
        ppo_verdict = (f"PPO {'raised' if rose else 'did NOT raise'} the mean gold reward over SFT "
                       f"({demo['sft_gold_reward']:+.3f} -> {demo['ppo_gold_reward']:+.3f}); PPO wins "
                       f"{100 * demo['ppo_win_rate_gold']:.0f} % of {policy_eval['samples']} head-to-head samples by "
                       f"the gold reward ({100 * demo['ppo_tie_rate_gold']:.0f} % ties) and "
                       f"{100 * demo['ppo_win_rate_rm']:.0f} % by the RM it optimised (a circular judge); "
                       f"KL to SFT {demo['ppo_kl_to_sft']:.1f} nats.")
        lines += ["## PPO against the final SER RM", "", *ppo_rows, "", ppo_verdict, ""]
        if ppo_log and Path(ppo_log).is_file():
            curve = plot_overoptimisation(ppo_log, out / "overoptimisation.png")
            lines += [*([curve, ""] if curve else []), "![rewards against KL](overoptimisation.png)", ""]
            verdict += [curve] if curve else []
        rows, verdict = rows + [""] + ppo_rows, verdict + [ppo_verdict]
    (out / "report.md").write_text("\n".join(lines))
    print("\n".join(rows + verdict))


if __name__ == "__main__":
    main(*parse([Args]))
