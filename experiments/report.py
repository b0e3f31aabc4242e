"""REPORT.md and the plots, generated from results.json alone (no figure is typed by hand).

    python -m experiments.report --results experiments/results

Statistics:
* per variant, the final RM's held-out accuracy over seeds: mean, std, and a 95 % bootstrap interval
  (seeds resampled);
* SER against its own seed RM, which is scored on the very same held-out pairs: the mean paired
  difference with a 95 % paired bootstrap interval (seeds, then pairs within each seed, resampled),
  and an exact McNemar test on the pairs that the two RMs classify differently, pooled over seeds;
* per loop: accuracy, selection, self-label precision (against the hidden human labels, and against
  the gold reward on the synthetic task), the share of selected pairs the seed RM already preferred,
  and calibration (expected calibration error over 10 confidence bins).
"""

import json
import math
import os
import random
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from ser.cli import parse
from ser.selection import STOP
from ser.stats import bootstrap_ci, crossed, mean_std, paired_bootstrap_ci


@dataclass
class Args:
    results: str = field(default="experiments/results", metadata={"help": "folder holding results.json"})
    doc: str | None = field(default=None, metadata={"help": "also refresh the generated block of this file (docs/results.md)"})


# ----------------------------------------------------------------------------- statistics


def mcnemar_exact(b, c):
    """Two-sided exact McNemar p-value: b pairs only A got right, c pairs only B got right."""
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


# ----------------------------------------------------------------------------- tables


def fmt(x, pct=True, sign=False):
    if x is None:
        return "–"
    v = 100 * x if pct else x
    return f"{v:+.1f}" if sign else f"{v:.1f}"


def fmt_ci(ci, sign=False):
    return "–" if ci is None else f"[{fmt(ci[0], sign=sign)}, {fmt(ci[1], sign=sign)}]"


def final_rows(rows):
    """The last evaluated row of each (variant, seed): the RM a run ends with."""
    out = {}
    for r in sorted(rows, key=lambda r: r["loop"]):
        if r.get("accuracy") is not None:
            out[(r["variant"], r["seed"])] = r
    return out


def setting_report(setting, rows, rng, plots):
    by_key = final_rows(rows)
    seed_of = {(r["variant"], r["seed"]): r for r in rows if r["loop"] == 0}
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    seeds = sorted({r["seed"] for r in rows})
    lines = [f"## Setting `{setting}`", "", f"Seeds: {', '.join(map(str, seeds))}. Accuracy is strict (a tie is "
             f"not a win), in %, on {rows[0]['n_eval']} held-out human pairs per seed.", "",
             "| variant | seeds | final accuracy, mean ± std | 95 % CI (seeds) | vs its seed RM: mean Δ | "
             "95 % CI (paired bootstrap) | McNemar p (pooled) | loops run |",
             "|---|---|---|---|---|---|---|---|"]
    summary = {}
    for v in variants:
        finals = [by_key[(v, s)] for s in seeds if (v, s) in by_key]
        accs = [r["accuracy"] for r in finals]
        m, sd = mean_std(accs)
        ci = bootstrap_ci(accs, rng)
        delta = dci = p = None
        if finals and finals[0]["loop"] > 0 or any(r["variant"] == v and r["loop"] > 0 for r in rows):
            paired, b, c, deltas = {}, 0, 0, []
            for r in finals:
                base = seed_of.get((v, r["seed"]))
                if not base:
                    continue
                pairs = [(int(x), int(y)) for x, y in zip(r["correct"], base["correct"])]
                paired[r["seed"]] = pairs
                b += sum(x > y for x, y in pairs)
                c += sum(y > x for x, y in pairs)
                deltas.append(r["accuracy"] - base["accuracy"])
            delta = mean_std(deltas)[0]
            dci = paired_bootstrap_ci(paired, rng)
            p = mcnemar_exact(b, c)
        loops = [max(r["loop"] for r in rows if r["variant"] == v and r["seed"] == s) for s in seeds
                 if any(r["variant"] == v and r["seed"] == s for r in rows)]
        summary[v] = {"mean": m, "std": sd, "ci": ci, "delta": delta, "delta_ci": dci, "p": p, "n": len(accs)}
        lines.append(f"| {v} | {len(accs)} | {fmt(m)} ± {fmt(sd)} | {fmt_ci(ci)} | {fmt(delta, sign=True)} | "
                     f"{fmt_ci(dci, sign=True)} | {'–' if p is None else f'{p:.3g}'} | "
                     f"{'–' if not loops else f'{min(loops)}–{max(loops)}' if min(loops) != max(loops) else loops[0]} |")
    lines += ["", "Loops that reach Stop count as run; the final RM is the last one trained.", ""]
    lines += loop_table(rows, "ser-paper") if "ser-paper" in variants else []
    lines += analysis(setting, rows, summary, seeds)
    if plots:
        lines += plot_setting(setting, rows, variants, seeds, plots)
    return lines, summary


def loop_table(rows, variant):
    sel = [r for r in rows if r["variant"] == variant]
    loops = sorted({r["loop"] for r in sel})
    lines = [f"Per loop, `{variant}` (mean over seeds; – where no seed reached the loop):", "",
             "| loop | seeds | statuses | selected | accuracy | self-label precision (human) | "
             "precision (gold reward) | seed RM already preferred | ECE |", "|---|---|---|---|---|---|---|---|---|"]
    for t in loops:
        rs = [r for r in sel if r["loop"] == t]
        statuses = ", ".join(f"{k} {v}" for k, v in sorted(_count(r["status"] for r in rs).items()))
        trained = [r for r in rs if r.get("accuracy") is not None]
        n = len(trained)
        fewer = f" ({n} seed{'s' if n != 1 else ''})" if trained and n < len(rs) else ""  # a mean over fewer seeds says so
        lines.append(
            f"| {t} | {len(rs)} | {statuses} | {fmt(mean_std([r['selected'] for r in rs])[0], pct=False)} | "
            f"{fmt(mean_std([r['accuracy'] for r in trained])[0])}{fewer} | "
            f"{fmt(mean_std([r.get('pseudo_label_precision') for r in rs])[0])} | "
            f"{fmt(mean_std([r.get('gold_precision') for r in rs])[0])} | "
            f"{fmt(mean_std([r.get('seed_rm_agreement') for r in rs])[0])} | "
            f"{fmt(mean_std([r.get('ece') for r in trained])[0])}{fewer} |")
    return lines + [""]


def _count(xs):
    out = {}
    for x in xs:
        out[x] = out.get(x, 0) + 1
    return out


def analysis(setting, rows, summary, seeds):
    """Sentences built from the numbers above; nothing here is typed by hand."""
    out = ["### What the numbers say", ""]
    ser = {v: s for v, s in summary.items() if v.startswith("ser-") and s["delta"] is not None}
    if not ser:
        return out + ["No SER variant has finished yet.", ""]
    helped = [v for v, s in ser.items() if s["delta_ci"] and s["delta_ci"][0] > 0]
    hurt = [v for v, s in ser.items() if s["delta_ci"] and s["delta_ci"][1] < 0]
    unclear = [v for v in ser if v not in helped and v not in hurt]
    out.append(f"* SER variants whose paired 95 % interval against their seed RM lies above zero: "
               f"{', '.join(helped) or 'none'}; below zero: {', '.join(hurt) or 'none'}; "
               f"containing zero: {', '.join(unclear) or 'none'}.")
    if "ser-paper" in ser and "full" in summary and "seed" in summary and summary["full"]["mean"] is not None:
        gap = summary["full"]["mean"] - summary["seed"]["mean"]
        gain = ser["ser-paper"]["delta"]
        out.append(f"* The all-label RM is {fmt(gap, sign=True)} points over the 15 % seed RM; `ser-paper` moves "
                   f"{fmt(gain, sign=True)} points, i.e. {100 * gain / gap:.0f} % of that gap "
                   "(the paper: +7.9 points on average, 0.3 from the all-label RM)." if gap else "")
    for v in ser:  # a run that stops before any retraining keeps its seed RM: SER did nothing there
        first = [r for r in rows if r["variant"] == v and r["loop"] == 1]
        idle = [r for r in first if r["status"] == STOP]
        if idle:
            out.append(f"* `{v}` reached Stop at loop 1, having selected nothing, in {len(idle)} of {len(first)} seeds: "
                       "fewer pool pairs were eligible for either status than its count floor "
                       "(--status1_min_pairs / --status2_min_pairs), so its final RM there is the seed RM.")
    # the paper's condition: above 50 % initial accuracy, training on confident self-labels improves
    runs = []
    for r in rows:
        if r["variant"].startswith("ser-") and r["loop"] == 0:
            final = final_rows([x for x in rows if x["variant"] == r["variant"] and x["seed"] == r["seed"]])
            f = final.get((r["variant"], r["seed"]))
            if f and f["loop"] > 0:
                runs.append((r["accuracy"], f["accuracy"] - r["accuracy"]))
    above = [d for a, d in runs if a > 0.5]
    if above:
        out.append(f"* The paper's condition (\"when initial accuracy exceeds 50 %, iterative training with "
                   f"high-confidence samples can further improve performance\"): {len(above)} SER runs started above "
                   f"50 %; {sum(d > 0 for d in above)} ended above their seed RM, {sum(d < 0 for d in above)} below "
                   f"(mean change {fmt(statistics.fmean(above), sign=True)} points).")
    prec = [r.get("pseudo_label_precision") for r in rows if r["variant"] == "ser-paper" and r["loop"] == 1]
    prec = [p for p in prec if p is not None]
    seed_acc = [r["accuracy"] for r in rows if r["variant"] == "ser-paper" and r["loop"] == 0]
    if prec and seed_acc:
        p, a = statistics.fmean(prec), statistics.fmean(seed_acc)
        out.append(f"* In loop 1 the self-labels of `ser-paper` agree with the hidden human labels "
                   f"{fmt(p)} % of the time, against a seed-RM accuracy of {fmt(a)} % on held-out pairs: the "
                   f"confident pairs are labelled {'better' if p > a else 'no better'} than the RM's average pair.")
    gold = [r.get("gold_precision") for r in rows if r["variant"] == "ser-paper" and r["loop"] == 1
            and r.get("gold_precision") is not None]
    if gold and prec:
        g, p = statistics.fmean(gold), statistics.fmean(prec)
        out.append(f"* Against the synthetic gold reward the same self-labels are right {fmt(g)} % of the time "
                   f"({'more' if g > p else 'less'} often than they match the human labels, which are themselves "
                   "samples from the gold reward).")
    by_fraction = [(f, ser[v]["delta"]) for f, v in ((0.05, "ser-paper@0.05"), (0.15, "ser-paper"), (0.30, "ser-paper@0.30"))
                   if v in ser]
    if len(by_fraction) > 1:
        out.append("* By labelled fraction, `ser-paper` against its own seed RM: " + ", ".join(
            f"{100 * f:.0f} % → {fmt(d, sign=True)} points" for f, d in by_fraction)
            + " (the intervals are in the table above).")
    ece = {}
    for r in rows:
        if r["variant"] == "ser-paper" and r.get("ece") is not None:
            ece.setdefault(r["loop"], []).append(r["ece"])
    if len(ece) > 1:
        out.append("* Calibration of `ser-paper` on held-out pairs (expected calibration error, mean over seeds) by "
                   "loop: " + ", ".join(f"loop {t} {fmt(statistics.fmean(v))}" for t, v in sorted(ece.items()))
                   + ". Retraining on its own confident labels makes the RM more sure of itself whether or not it "
                   "is more often right." if ece[max(ece)] and statistics.fmean(ece[max(ece)]) > statistics.fmean(ece[0])
                   else "* Calibration of `ser-paper` by loop: " + ", ".join(
                       f"loop {t} {fmt(statistics.fmean(v))}" for t, v in sorted(ece.items())) + ".")
    agree = [r.get("seed_rm_agreement") for r in rows if r["variant"] == "ser-paper" and r["loop"] >= 1
             and r.get("seed_rm_agreement") is not None]
    if agree:
        out.append(f"* Across loops, the seed RM already preferred {fmt(statistics.fmean(agree))} % of the pairs "
                   "that were selected, so that share of the self-labels repeats what RM_0 believed.")
    return out + [""]


def prompt_table(rows, field="gold_gain_by_prompt"):
    """The seeds x prompts table of a per-prompt figure (gold gain, gold win rate), or None unless every row
    recorded it for the same prompts."""
    by_prompt = [r.get(field) for r in rows]
    if len(rows) < 2 or any(g is None for g in by_prompt) or any(g.keys() != by_prompt[0].keys() for g in by_prompt):
        return None
    return [[g[q] for q in sorted(g)] for g in by_prompt]


def ppo_report(setting, rows, rng):
    """Downstream: PPO against each variant's RM, judged against SFT by the hidden gold reward."""
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    lines = [f"## Setting `{setting}`: PPO against each RM", "",
             f"Seeds: {', '.join(map(str, sorted({r['seed'] for r in rows})))}. Each policy gives "
             f"{rows[0]['n_eval']} samples on held-out prompts (16 per prompt), as does the SFT policy with the same seed; "
             "the gold reward of the synthetic task judges. Win rates leave ties apart. Every seed answers the same "
             "held-out prompts, so the intervals of the gold gain and the gold win rate count both seeds and prompts "
             "(`ser.stats.crossed` on the seeds x prompts table of per-prompt figures); rows that did not record "
             "per-prompt figures (their run folders were reused) have intervals over seeds alone, marked *seeds*.", "",
             "Configurations (experiments/run.py's PPO_CONFIGS): `old` = PPO's former defaults (raw RM scores, KL "
             "horizon 10000 samples, KL target 6 nats); `target6` = scores normalised by the RM's mean and std on SFT "
             "samples, horizon a tenth of the run, target 6; `kl3` = the same with target 3 (chosen on seeds 5–9 by the "
             "rule of PREREGISTRATION-ppo-defaults.md); `new` = today's defaults: `kl3` with a step's PPO epochs "
             "stopped once their approximate KL passes 1.5 x 0.1 (chosen on seeds 10–14 by the rule of "
             "PREREGISTRATION-ppo-round2.md, where it is `kl3-early`); `ensemble` = `kl3` on the mean − std of every "
             "SER loop's RM, `ensemble-new` the same under today's defaults; the candidates `early` (early stopping at "
             "target 6) and `budget` (a step past 12 nats ends the run, the last checkpoint within it kept; target 6). "
             "Rows without a configuration ran before they existed (the old defaults).", "",
             "| RM behind PPO | seeds | RM accuracy | gold reward, PPO − SFT | 95 % CI | gold fell | gold win rate vs SFT | "
             "95 % CI | all-label RM's win rate | KL to SFT (nats) | median step KL |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    summary = {}
    for v in variants:
        rs = [r for r in rows if r["variant"] == v]
        gain = [gold_gain(r) for r in rs]
        win = [r["gold_win_rate"] for r in rs]
        g, gsd = mean_std(gain)
        w, wsd = mean_std(win)
        fell = sum(x < 0 for x in gain)
        step_kl = [r["step_kl_median"] for r in rs if r.get("step_kl_median") is not None]
        summary[v] = {"gold_gain": g, "gold_gain_std": gsd, "gold_win_rate": w, "gold_win_rate_std": wsd, "n": len(rs),
                      "gold_fell": fell, "step_kl_median": statistics.median(step_kl) if step_kl else None}
        gains, wins = prompt_table(rs), prompt_table(rs, "gold_win_by_prompt")
        seeds_ci = bootstrap_ci(gain, rng)  # drawn for every row, so the other intervals' draws stay as they were
        ci = _ci3(crossed(gains)["ci"]) if gains is not None else f"{_ci3(seeds_ci)} *seeds*"
        seeds_win_ci = bootstrap_ci(win, rng)
        win_ci = fmt_ci(crossed(wins)["ci"]) if wins is not None else f"{fmt_ci(seeds_win_ci)} *seeds*"
        summary[v]["gold_gain_ci"] = "seeds x prompts" if gains is not None else "seeds"
        summary[v]["gold_win_rate_ci"] = "seeds x prompts" if wins is not None else "seeds"
        lines.append(f"| {v.removeprefix('ppo:')} | {len(rs)} | {fmt(mean_std([r['rm_accuracy'] for r in rs])[0])} | "
                     f"{g:+.3f} ± {gsd:.3f} | {ci} | {fell} of {len(rs)} | {fmt(w)} ± {fmt(wsd)} | "
                     f"{win_ci} | {fmt(mean_std([r['full_rm_win_rate'] for r in rs])[0])} | "
                     f"{mean_std([r['kl_to_sft'] for r in rs])[0]:.1f} | "
                     f"{'–' if not step_kl else f'{statistics.median(step_kl):.1f}'} |")
    return lines + [""] + ppo_choice(rows) + ppo_confirmation(rows), summary


# The pre-registered rounds of the KL choice: each names its tuning seeds, its candidates in the order that breaks
# the last tie (the simpler change first) and what breaks the first tie. A round is reported where two or more of
# its candidates have rows of its seeds.
PPO_ROUNDS = (
    {"file": "PREREGISTRATION-ppo-defaults.md", "note": " (its `new` is `target6` here)", "seeds": range(5, 10),
     "candidates": ("target6", "kl3", "early", "budget"), "tie": "mean gold gain"},
    {"file": "PREREGISTRATION-ppo-round2.md", "note": "", "seeds": range(10, 15),
     "candidates": ("kl3", "kl3-early"), "tie": "weakest RM kind's mean gold gain"},
)


def kl_target(config: str) -> float:
    """The KL target a configuration of experiments/run.py's PPO_CONFIGS passes (each candidate names its own)."""
    from experiments.run import PPO_CONFIGS  # here, not at the top: run.py imports this module

    flags = PPO_CONFIGS[config]
    return float(flags[flags.index("--kl_target") + 1])


def rm_kind(row) -> str:
    return row["variant"].removeprefix("ppo:").partition("@")[0]


def gold_gain(row) -> float:
    return row["ppo_gold_reward"] - row["sft_gold_reward"]


def ppo_choice(rows) -> list[str]:
    """Each pre-registered choice among the KL candidates (where their rows of its seeds are here): the most (RM kind, seed)
    cells in which gold rose over SFT among those whose median step KL is within 2x of their target; ties to the
    round's tie-breaker (the mean gold gain, or the lowest of the RM kinds' mean gold gains), then to the simpler
    change."""
    lines = []
    for round_ in PPO_ROUNDS:
        candidates = round_["candidates"]
        by = {c: [r for r in rows if r.get("ppo_config") == c and r["seed"] in round_["seeds"]] for c in candidates}
        if sum(bool(rs) for rs in by.values()) < 2:
            continue
        lines += [f"The choice of {round_['file']}{round_['note']}:", "",
                  f"| candidate | cells | gold rose | {round_['tie']} | median step KL | within 2x of its target |",
                  "|---|---|---|---|---|---|"]
        score = {}
        for c, rs in by.items():
            if not rs:
                continue
            gains = [gold_gain(r) for r in rs]
            if round_["tie"] == "mean gold gain":
                tie = statistics.mean(gains)
            else:
                tie = min(statistics.mean(gold_gain(r) for r in rs if rm_kind(r) == k) for k in dict.fromkeys(map(rm_kind, rs)))
            kl = statistics.median(r["step_kl_median"] for r in rs)
            eligible = kl <= 2 * kl_target(c)
            score[c] = (eligible, sum(g > 0 for g in gains), tie, -candidates.index(c))
            lines.append(f"| {c} | {len(rs)} | {score[c][1]} | {tie:+.3f} | {kl:.2f} | {'yes' if eligible else 'no'} |")
        best = max((c for c in score if score[c][0]), key=lambda c: score[c][1:], default=None)
        lines += ["", f"Chosen: `{best}`." if best else "No candidate is eligible.", ""]
    return lines


def ppo_confirmation(rows, config="new", target=3.0) -> list[str]:
    """Issue 32's criterion as PREREGISTRATION-ppo-round2.md judges it: today's defaults on the confirmation seeds
    0-4 and 15-19 together, gold rising over SFT in at least 80 % of the seeds for each RM kind, and the median over
    the cells of the per-step median KL within 2x of the target. Shown once rows of seeds 15-19 exist."""
    rs = [r for r in rows if r["variant"].endswith(f"@{config}") and (r["seed"] < 5 or 15 <= r["seed"] < 20)]
    if not any(r["seed"] >= 15 for r in rs):
        return []
    lines = [f"Issue 32's criterion on the confirmation seeds (PREREGISTRATION-ppo-round2.md), today's defaults (`{config}`):",
             "", "| RM kind | seeds | gold rose, all | seeds 0–4 | seeds 15–19 | at least 80 % |", "|---|---|---|---|---|---|"]
    for kind in dict.fromkeys(map(rm_kind, rs)):
        mine = [r for r in rs if rm_kind(r) == kind]
        early, late = [r for r in mine if r["seed"] < 5], [r for r in mine if r["seed"] >= 15]
        rose = sum(gold_gain(r) > 0 for r in mine)
        lines.append(f"| {kind} | {len(mine)} | {rose} of {len(mine)} | {sum(gold_gain(r) > 0 for r in early)} of "
                     f"{len(early)} | {sum(gold_gain(r) > 0 for r in late)} of {len(late)} | "
                     f"{'yes' if rose >= 0.8 * len(mine) else 'no'} |")
    kl = statistics.median(r["step_kl_median"] for r in rs)
    return lines + ["", f"Median over the {len(rs)} cells of the per-step median KL: {kl:.2f} (target {target:g}; "
                    f"{'within' if kl <= 2 * target else 'beyond'} 2x).", ""]


def _ci3(ci):
    return "–" if ci is None else f"[{ci[0]:+.3f}, {ci[1]:+.3f}]"


# ----------------------------------------------------------------------------- plots


def plot_setting(setting, rows, variants, seeds, folder: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for v in variants:
        sel = [r for r in rows if r["variant"] == v and r.get("accuracy") is not None]
        loops = sorted({r["loop"] for r in sel})
        if v in ("seed", "full") or v.startswith(("seed@", "full@")):
            m, sd = mean_std([r["accuracy"] for r in sel])
            if m is not None:
                ax.axhline(100 * m, ls="--" if v.startswith("full") else ":", lw=1, color="gray" if "full" in v else "k")
                ax.text(0.02, 100 * m, v, fontsize=7, va="bottom", transform=ax.get_yaxis_transform())
            continue
        means = [100 * mean_std([r["accuracy"] for r in sel if r["loop"] == t])[0] for t in loops]
        sds = [100 * mean_std([r["accuracy"] for r in sel if r["loop"] == t])[1] for t in loops]
        ax.errorbar(loops, means, yerr=sds, marker="o", ms=3, capsize=2, lw=1, label=v)
    ax.set_xlabel("loop (0 = the seed RM)")
    ax.set_ylabel("held-out accuracy, % (mean ± std over seeds)")
    ax.set_title(f"{setting}: accuracy per SER loop")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    acc_png = folder / f"{setting}-accuracy.png"
    fig.savefig(acc_png, dpi=110)
    plt.close(fig)

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 4))
    sel = [r for r in rows if r["variant"] == "ser-paper"]
    for t in sorted({r["loop"] for r in sel}):
        rs = [r for r in sel if r["loop"] == t and r.get("reliability")]
        if rs:
            pairs = [sum(r["reliability"][b]["pairs"] for r in rs) for b in range(10)]
            conf = [sum((r["reliability"][b]["confidence"] or 0) * r["reliability"][b]["pairs"] for r in rs) for b in range(10)]
            acc = [sum((r["reliability"][b]["accuracy"] or 0) * r["reliability"][b]["pairs"] for r in rs) for b in range(10)]
            xs = [c / n for c, n in zip(conf, pairs) if n]
            ys = [a / n for a, n in zip(acc, pairs) if n]
            a1.plot(xs, ys, marker="o", ms=3, label=f"loop {t}")
        rs = [r for r in sel if r["loop"] == t and r.get("precision_by_confidence")]
        if rs and t > 0:
            n = [sum(r["precision_by_confidence"][b]["pairs"] for r in rs) for b in range(10)]
            hit = [sum((r["precision_by_confidence"][b]["precision"] or 0) * r["precision_by_confidence"][b]["pairs"]
                       for r in rs) for b in range(10)]
            xs = [0.5 + 0.025 + 0.05 * b for b in range(10) if n[b]]
            a2.plot(xs, [h / m for h, m in zip(hit, n) if m], marker="o", ms=3, label=f"loop {t}")
    for ax, title in ((a1, "reliability on held-out pairs"), (a2, "self-label precision (human labels)")):
        ax.plot([0.5, 1], [0.5, 1], ls=":", color="gray", lw=1)
        ax.set_xlabel("RM confidence sigmoid(|r_j - r_k|)")
        ax.set_ylabel("accuracy" if ax is a1 else "precision")
        ax.set_title(title, fontsize=9)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(f"{setting}, ser-paper, pooled over seeds", fontsize=9)
    fig.tight_layout()
    cal_png = folder / f"{setting}-calibration.png"
    fig.savefig(cal_png, dpi=110)
    plt.close(fig)
    return [f"![accuracy per loop]({acc_png.name})", "", f"![calibration and self-label precision]({cal_png.name})", ""]


# ----------------------------------------------------------------------------- the report


def write_report(results_dir, doc=None) -> str:
    results_dir = Path(results_dir)
    rows = json.loads((results_dir / "results.json").read_text())["rows"]
    rng = random.Random(0)
    lines = ["# Does SER work? Results", "",
             "Generated by `python -m experiments.report` from `results.json`; every figure below is computed "
             "from its rows. Machine: 2 CPU cores, no GPU.", ""]
    revisions = {}
    for r in rows:
        revisions[r.get("git_rev", "unknown")] = revisions.get(r.get("git_rev", "unknown"), 0) + 1
    lines += ["Rows by the git revision they ran on: " + ", ".join(f"`{k}` {v}" for k, v in revisions.items()) + ".", ""]
    summaries = {}
    for setting in dict.fromkeys(r["setting"] for r in rows):
        mine = [r for r in rows if r["setting"] == setting]
        if setting.endswith("-ppo"):
            part, summaries[setting] = ppo_report(setting, mine, rng)
        else:
            part, summaries[setting] = setting_report(setting, mine, rng, results_dir)
        lines += part
    text = "\n".join(lines) + "\n"
    (results_dir / "REPORT.md").write_text(text)
    (results_dir / "summary.json").write_text(json.dumps(summaries, indent=1) + "\n")
    if doc is not None:
        update_doc(Path(doc), lines, results_dir)
    return text


BEGIN, END = "<!-- results:begin (generated by experiments/report.py) -->", "<!-- results:end -->"


def update_doc(doc: Path, lines, results_dir: Path):
    """Put each setting's headline table into docs/results.md between the markers; the rest stays in REPORT.md."""
    if not doc.is_file() or BEGIN not in doc.read_text():
        return
    block, keep = [], False
    for line in lines:
        if line.startswith("## Setting"):
            keep = True
            block.append("#" + line)
            continue
        if keep:
            block.append(line)
            if line == "" and block[-2].startswith("|"):
                keep = False  # the end of the setting's first table
    try:
        where = os.path.relpath(results_dir.resolve(), doc.resolve().parent)
    except ValueError:
        where = results_dir
    block.append(f"Per-loop figures, calibration, self-label precision and the plots: `{where}/REPORT.md`.")
    text = doc.read_text()
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    doc.write_text(head + BEGIN + "\n" + "\n".join(block) + "\n" + END + tail)


if __name__ == "__main__":
    args = parse([Args])[0]
    print(write_report(args.results, args.doc))
