"""The budget question on real text: B more human labels, or SER, or both?

    python -m experiments.ask_study --setting hh-rlhf-frozen     # after experiments.frozen (its cache and tuning)

The frozen-trunk setting of experiments/frozen.py (the same cache, layer, L2 rule and seed splits), at the
study's primary seed share (1 % of the pool labelled). The pool's hidden labels play the human. For each
budget B (1 %, 5 %, 15 % of the pool) and each of 20 seeds, four ways to spend it, each scored by the final
RM's held-out accuracy:
  human-random  the seed plus B random pool pairs with their human labels;
  human-ask     the seed plus the B pairs ser/ask.py picks (the seed RM's least certain, one per question,
                near-duplicates spread by hashed n-grams of the question; data/ask_humans.py's rule);
  ser           SER alone (scripts/ser_loop.sh's loop, experiments/frozen_study.ser_run), no extra labels;
  ser+ask       the B asked pairs join the seed, then SER on the rest of the pool.
The asked pairs are picked once, by the seed RM, before the first loop: in the driver (ASK_HUMANS) they are
picked by the same RM after loop 1's filter, from the pairs it did not self-label, and join the seed for
loop 1's retraining. The head's L2 is the validation-tuned value for the labelled share nearest to the run's
(seed plus human pairs), never a held-out choice. Results: RESULTS/ask-SETTING.json (resumable, per seed)
and REPORT-ask-SETTING.md with ask-SETTING.png, generated from that JSON alone.
"""

import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from experiments import frozen_study as fs
from ser import ask
from ser.cli import parse
from ser.data import write_json
from ser.stats import sign_flip_p, sign_flip_p_mc

BUDGETS = [0.01, 0.05, 0.15]  # extra human labels, as a share of the (non-validation) pool
SEED_FRACTION = 0.01  # the frozen study's pre-registered primary share
ARMS = ["human-random", "human-ask", "ser", "ser+ask"]


@dataclass
class Args:
    setting: str = field(default="hh-rlhf-frozen", metadata={"help": "a setting of experiments/frozen.py, already tuned"})
    workdir: str = field(default="runs/frozen", metadata={"help": "the frozen study's data and feature cache"})
    results: str = field(default="experiments/results-frozen", metadata={"help": "where the study's results are"})
    seeds: int = field(default=20, metadata={"help": "seeds per budget"})
    report_only: bool = field(default=False, metadata={"help": "rewrite the report from the JSON, run nothing"})


def l2_for(share: float, l2_by_fraction: dict) -> float:
    """The validation-tuned L2 of the tuned labelled share nearest to `share`."""
    nearest = min(l2_by_fraction, key=lambda f: abs(math.log(float(f)) - math.log(share)))
    return l2_by_fraction[nearest]


def one_seed(seed: int, pool, held, rest, questions, vectors, l2_by_fraction) -> list[dict]:
    labelled_idx, pool_idx = fs.seed_split(rest, SEED_FRACTION, seed)
    labelled, unlabelled = pool.take(labelled_idx), pool.take(pool_idx)
    floor = max(1, math.ceil(fs.PAPER_FLOOR * len(unlabelled)))
    n_rest = len(rest)
    rows = []

    def row(arm, budget, acc, **more):
        rows.append({"arm": arm, "budget": budget, "seed": seed, "accuracy": acc, **more})

    l2_seed = l2_for(len(labelled_idx) / n_rest, l2_by_fraction)
    w0 = fs.fit(labelled.j, labelled.k, l2_seed)
    row("seed", 0.0, fs.accuracy(w0, held)[0], labelled=len(labelled_idx))
    t0 = time.perf_counter()
    ser_rows, _ = fs.ser_run(labelled, unlabelled, held, l2_seed, floor)
    last = [r for r in ser_rows if r.get("accuracy") is not None][-1]
    row("ser", 0.0, last["accuracy"], loops=last["loop"], self_labels=last.get("selected_total", 0),
        seconds=time.perf_counter() - t0)
    p = torch.sigmoid((unlabelled.j - unlabelled.k) @ w0).tolist()  # side j is the human-preferred one
    q = [questions[i] for i in pool_idx]
    for budget in BUDGETS:
        b = round(budget * n_rest)
        l2 = l2_for((len(labelled_idx) + b) / n_rest, l2_by_fraction)
        gen = torch.Generator().manual_seed(seed * 1000 + round(budget * 1000))
        randomly = torch.randperm(len(unlabelled), generator=gen)[:b]
        asked = torch.tensor(ask.pick(p, vectors[pool_idx], b, groups=q))
        for arm, idx in (("human-random", randomly), ("human-ask", asked)):
            extra = unlabelled.take(idx)
            w = fs.fit(torch.cat([labelled.j, extra.j]), torch.cat([labelled.k, extra.k]), l2)
            row(arm, budget, fs.accuracy(w, held)[0], extra=len(idx), l2=l2,
                seed_rm_uncertainty=sum(ask.uncertainty(p[i]) for i in idx.tolist()) / max(1, len(idx)),
                distinct_questions=len({q[i] for i in idx.tolist()}))
        keep = torch.ones(len(unlabelled), dtype=torch.bool)
        keep[asked] = False
        both = fs.Pairs(torch.cat([labelled.j, unlabelled.j[asked]]), torch.cat([labelled.k, unlabelled.k[asked]]))
        t0 = time.perf_counter()
        ser_rows, _ = fs.ser_run(both, unlabelled.take(keep.nonzero().view(-1)), held, l2, floor)
        last = [r for r in ser_rows if r.get("accuracy") is not None][-1]
        row("ser+ask", budget, last["accuracy"], extra=len(asked), l2=l2, loops=last["loop"],
            self_labels=last.get("selected_total", 0), seconds=time.perf_counter() - t0)
    return rows


def run(args: Args) -> Path:
    from experiments import frozen

    results = Path(args.results)
    study = json.loads((results / f"{args.setting}.json").read_text())
    path = results / f"ask-{args.setting}.json"
    state = json.loads(path.read_text()) if path.is_file() else {"setting": args.setting, "rows": []}
    work, splits, _ = frozen.featurise(frozen.Args(setting=args.setting, workdir=args.workdir, results=args.results))
    layer, l2_by_fraction = study["tuning"]["layer"], study["tuning"]["l2_by_fraction"]
    pool, held = fs.load(work, splits, layer)
    _, rest = fs.universe_split(len(pool))
    questions = [r["question"] for r in splits["reward_full"][0]]
    vectors = ask.ngram_vectors(questions)
    state.update(layer=layer, seed_fraction=SEED_FRACTION, budgets=BUDGETS, pool_pairs=len(rest),
                 held_out_pairs=len(held), seed_pairs=len(fs.seed_split(rest, SEED_FRACTION, 0)[0]),
                 budget_pairs={str(b): round(b * len(rest)) for b in BUDGETS})
    done = {r["seed"] for r in state["rows"]}
    for seed in range(args.seeds):
        if seed in done:
            continue
        state["rows"] += one_seed(seed, pool, held, rest, questions, vectors, l2_by_fraction)
        write_json(path, state)
        print(f"ask_study: seed {seed} done", flush=True)
    return path


# ----------------------------------------------------------------------------- the report (from the JSON alone)


def accuracy_of(rows, arm, budget):
    """{seed: accuracy}; SER alone spends no budget, so it is the same run at every B."""
    return {r["seed"]: r["accuracy"] for r in rows if r["arm"] == arm and (arm in ("ser", "seed") or r["budget"] == budget)}


def paired(a: dict, b: dict, rng) -> dict:
    seeds = sorted(set(a) & set(b))
    diffs = [a[s] - b[s] for s in seeds]
    means = sorted(sum(rng.choices(diffs, k=len(diffs))) / len(diffs) for _ in range(2000))
    return {"seeds": len(diffs), "mean": sum(diffs) / len(diffs), "ci": (means[49], means[1949]),
            "p": sign_flip_p(diffs) if len(diffs) <= 16 else sign_flip_p_mc(diffs, rng, 20_000)}


COMPARISONS = [("human-ask", "human-random", "asking where the RM is unsure vs random pairs, both human-labelled"),
               ("ser+ask", "ser", "SER plus B asked human labels vs SER alone"),
               ("ser+ask", "human-ask", "SER on top of B asked human labels vs those labels alone"),
               ("human-ask", "ser", "B asked human labels vs SER alone")]


def p_text(p: float) -> str:
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def report(state, png_name: str | None = None) -> str:
    rng = random.Random(0)
    rows = state["rows"]
    seeds = len({r["seed"] for r in rows})
    pct = fs.pct
    seed_acc = accuracy_of(rows, "seed", 0)
    lines = [f"# Asking humans vs SER: {state['setting']}", "",
             f"Generated by `python -m experiments.ask_study --setting {state['setting']}` from "
             f"`ask-{state['setting']}.json`. Frozen-trunk RMs (layer {state['layer']}) on the frozen study's cache; "
             f"{seeds} seeds; seed RM on {state['seed_pairs']} human pairs ({pct(state['seed_fraction'])} % of the "
             f"{state['pool_pairs']}-pair pool); accuracy on the {state['held_out_pairs']} held-out pairs. The pool's "
             "hidden labels play the human. The seed RM alone: "
             f"{pct(sum(seed_acc.values()) / len(seed_acc))} %.", "",
             "## Held-out accuracy (%) against the extra human budget B", "",
             "| B (share of pool) | pairs | " + " | ".join(ARMS) + " |", "|---|---|" + "---|" * len(ARMS)]
    for b in state["budgets"]:
        cells = []
        for arm in ARMS:
            acc = sorted(accuracy_of(rows, arm, b).values())
            cells.append(f"{pct(sum(acc) / len(acc))} [{pct(acc[0])}, {pct(acc[-1])}]" if acc else "–")
        lines.append(f"| {pct(b)} % | {state['budget_pairs'][str(b)]} | " + " | ".join(cells) + " |")
    lines += ["", "Mean over seeds [lowest, highest seed]. SER alone spends no labels: its column is one run per seed, "
              "the same at every B.", "", "## Paired differences (points; 95 % bootstrap interval over seeds; "
              "sign-flip p)", "", "| B | comparison | difference | interval | p |", "|---|---|---|---|---|"]
    verdict = {}
    for b in state["budgets"]:
        for a, c, _ in COMPARISONS:
            d = paired(accuracy_of(rows, a, b), accuracy_of(rows, c, b), rng)
            verdict[(b, a, c)] = d
            lines.append(f"| {pct(b)} % | {a} − {c} | {100 * d['mean']:+.1f} | [{100 * d['ci'][0]:+.1f}, "
                         f"{100 * d['ci'][1]:+.1f}] | {p_text(d['p'])} |")
    lines += ["", "Comparisons: " + "; ".join(f"{a} − {c}: {what}" for a, c, what in COMPARISONS) + ".", "",
              "## What wins", ""]
    for b in state["budgets"]:
        mean = {arm: sum(v := accuracy_of(rows, arm, b).values()) / len(v) for arm in ARMS}
        best, second = sorted(ARMS, key=mean.get, reverse=True)[:2]
        lead = paired(accuracy_of(rows, best, b), accuracy_of(rows, second, b), rng)
        ask_gain = verdict[(b, "human-ask", "human-random")]
        ser_gain = verdict[(b, "ser+ask", "human-ask")]
        asked = "beat" if ask_gain["ci"][0] > 0 else "lose to" if ask_gain["ci"][1] < 0 else "do not clearly beat"
        ser = "adds" if ser_gain["ci"][0] > 0 else "costs" if ser_gain["ci"][1] < 0 else "changes nothing clear:"
        lines.append(f"* B = {pct(b)} % ({state['budget_pairs'][str(b)]} pairs): the best mean is {best}, "
                     f"{100 * lead['mean']:+.1f} points over {second} ([{100 * lead['ci'][0]:+.1f}, "
                     f"{100 * lead['ci'][1]:+.1f}], p {p_text(lead['p'])}). "
                     f"Asked pairs {asked} random ones ({100 * ask_gain['mean']:+.1f} points); SER on top of them "
                     f"{ser} {100 * ser_gain['mean']:+.1f} points.")
    if png_name:
        lines += ["", f"![accuracy against B]({png_name})"]
    return "\n".join(lines)


def plot(state, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [100 * b for b in state["budgets"]]
    for arm in ARMS:
        means = [sum(v := list(accuracy_of(state["rows"], arm, b).values())) / len(v) for b in state["budgets"]]
        ax.plot(xs, [100 * m for m in means], marker="o", label=arm)
    seed = list(accuracy_of(state["rows"], "seed", 0).values())
    ax.axhline(100 * sum(seed) / len(seed), color="grey", ls=":", label="seed RM alone")
    ax.set_xscale("log")
    ax.set_xticks(xs, [f"{x:g} %" for x in xs])
    ax.set_xlabel("extra human labels B (share of the pool)")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title(f"{state['setting']}: seed {100 * state['seed_fraction']:g} %, mean of "
                 f"{len({r['seed'] for r in state['rows']})} seeds")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(path: Path) -> str:
    state = json.loads(path.read_text())
    png = path.with_suffix(".png")
    plot(state, png)
    text = report(state, png.name)
    (path.parent / f"REPORT-{path.stem}.md").write_text(text + "\n")
    return text


def main(args: Args):
    path = Path(args.results) / f"ask-{args.setting}.json"
    if not args.report_only:
        path = run(args)
    print(write_report(path))


if __name__ == "__main__":
    main(*parse([Args]))
