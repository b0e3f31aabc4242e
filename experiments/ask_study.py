"""Which pairs to ask humans about: does any rule beat random? Pre-registered in
experiments/results-frozen/PREREGISTRATION-ask.md (committed before any row):

    python -m experiments.ask_study --setting hh-rlhf-frozen     # after experiments.frozen (its cache and study)
    python -m experiments.ask_study --setting ultrafeedback-frozen

On the frozen study's cache, pool and held-out pairs, a 1 % human-labelled seed, 20 seeds; the pool's hidden
labels play the human. For each budget B (1, 5, 15 % of the pool, in human labels) and each rule of ser/ask.py
(`choose`, what data/ask_humans.py --rule runs; the seed RM RM_0 scores):
  alone:RULE  the seed plus the B pairs RULE picks from the pool;
  ser:RULE    SER asking where scripts/ser_loop.sh's ASK_HUMANS asks: after loop 1's filter, among the pairs
              loop 1 did not self-label, with RM_0; the asked pairs join loop 1's retraining and every later one
              (ser/loop.py's `run`, through frozen_study.ser_run);
and per seed `seed` and `ser` (no asking). The layer and L2 are chosen by 5-fold CV inside the human labels
(experiments/why_study.py), never on held-out pairs. Results: RESULTS/ask-SETTING.json (each seed's rows at
once; a rerun skips them) and REPORT-ask-SETTING.md with ask-SETTING.png, from that JSON alone.
"""

import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch

from experiments import frozen_study as fs
from experiments import why_study as why
from ser import ask, features
from ser.cli import parse
from ser.data import write_json
from ser.stats import holm

PREREGISTRATION = Path(__file__).resolve().parent / "results-frozen" / "PREREGISTRATION-ask.md"
BUDGETS = [0.01, 0.05, 0.15]  # extra human labels, as a share of the (non-validation) pool
SEED_FRACTION = 0.01
HEADS = 5  # bootstrap heads of RM_0 for ensemble-diverse
RULES = list(ask.RULES)


@dataclass
class Args:
    setting: str = field(default="hh-rlhf-frozen", metadata={"help": "a setting experiments.frozen has featurised"})
    workdir: str = field(default="runs/frozen", metadata={"help": "the frozen study's data and feature cache"})
    results: str = field(default="experiments/results-frozen", metadata={"help": "where the study's results go"})
    seeds: int = field(default=20, metadata={"help": "seeds per budget"})
    report_only: bool = field(default=False, metadata={"help": "rewrite the report from the JSON, run nothing"})
    diagnose_seeds: int = field(default=0, metadata={
        "help": "also describe, for this many seeds, what each rule's picks cover and how decisive their labels are "
                "(descriptive, not pre-registered)"})


def setup(seed: int, pools: dict, helds: dict, rest, questions) -> SimpleNamespace:
    """One seed's split, layer, L2, seed RM RM_0 and its bootstrap heads, and `picks(rule, n, rm, idx)`: the pool
    indices (into `unlabelled`) of the n pairs `rule` picks among idx, scored by the RM `rm`."""
    labelled_idx, pool_idx = fs.seed_split(rest, SEED_FRACTION, seed)
    layer, l2 = why.choose_layer(pools, labelled_idx, seed)
    pool, held = pools[layer], helds[layer]
    labelled, unlabelled = pool.take(labelled_idx), pool.take(pool_idx)
    groups = [questions[i] for i in pool_idx]
    w0 = fs.fit(labelled.j, labelled.k, l2)
    heads = features.bootstrap_heads(labelled.j, labelled.k, HEADS, seed, l2=l2, center=fs.CENTER)

    def picks(rule, n, rm, idx):
        sub = unlabelled.take(idx)
        # side j is the human-preferred one; the rules see only the RM's view of it. p = sigmoid of the feature
        # difference's reward, the driver's sigmoid(r_j - r_k) up to float rounding (tests/test_ask.py checks
        # that the driver's and ser/loop.py's asks agree when p is taken from each response's reward)
        d = sub.j - sub.k
        chosen = ask.choose(rule, n, torch.sigmoid(d @ rm).tolist(), [groups[i] for i in idx.tolist()], seed=seed,
                            f_j=sub.j, f_k=sub.k, member_p=torch.sigmoid(d @ heads.T).T)
        return idx[torch.tensor(chosen, dtype=torch.long)]

    return SimpleNamespace(labelled_idx=labelled_idx, layer=layer, l2=l2, labelled=labelled, unlabelled=unlabelled,
                           held=held, groups=groups, w0=w0, picks=picks)


def one_seed(seed: int, pools: dict, helds: dict, rest, questions) -> list[dict]:
    s = setup(seed, pools, helds, rest, questions)
    labelled_idx, layer, l2, labelled, unlabelled = s.labelled_idx, s.layer, s.l2, s.labelled, s.unlabelled
    held, groups, w0, picks = s.held, s.groups, s.w0, s.picks
    floor = max(1, math.ceil(fs.PAPER_FLOOR * len(unlabelled)))
    rows = []

    def row(variant, budget, w=None, ser_rows=None, **more):
        if ser_rows is not None:
            last = fs.last_trained(ser_rows)
            acc, correct = last["accuracy"], last["correct"]
            more.update(loops=last["loop"], self_labels=last.get("selected_total", 0),
                        asked=sum(r.get("asked", 0) for r in ser_rows))
        else:
            acc, correct = fs.accuracy(w, held)
            correct = fs.bits(correct)
        rows.append({"variant": variant, "fraction": budget, "seed": seed, "accuracy": acc, "correct": correct,
                     "layer": layer, **more})

    row("seed", 0.0, w0, l2=l2, labelled=len(labelled_idx))
    row("ser", 0.0, ser_rows=fs.ser_run(labelled, unlabelled, held, l2, floor, w0=w0)[0], l2=l2)
    for budget in BUDGETS:
        b = round(budget * len(rest))
        for rule in RULES:
            t0 = time.perf_counter()
            asked = picks(rule, b, w0, torch.arange(len(unlabelled)))
            extra = unlabelled.take(asked)
            tj, tk = torch.cat([labelled.j, extra.j]), torch.cat([labelled.k, extra.k])
            l2_b, _ = why.choose_l2(tj, tk, seed)
            row(f"alone:{rule}", budget, fs.fit(tj, tk, l2_b), l2=l2_b, asked=len(asked),
                distinct_questions=len({groups[i] for i in asked.tolist()}),
                uncertainty=sum(ask.uncertainty(q) for q in torch.sigmoid((extra.j - extra.k) @ w0).tolist()) / max(1, len(asked)),
                seconds=time.perf_counter() - t0)
            t0 = time.perf_counter()
            tuned = {}

            def ask_at_loop_1(loop_t, rm, idx, rule=rule, b=b, tuned=tuned):
                if loop_t != 1:
                    return None
                asked = picks(rule, b, rm, idx)
                extra = unlabelled.take(asked)
                tuned["l2"] = why.choose_l2(torch.cat([labelled.j, extra.j]), torch.cat([labelled.k, extra.k]), seed)[0]
                return asked

            def train(j, k, init, tuned=tuned):  # at the L2 of the human pairs (seed + asked) once asked
                return fs.fit(j, k, tuned.get("l2", l2), init)

            ser_rows, _ = fs.ser_run(labelled, unlabelled, held, l2, floor, w0=w0, train=train, ask=ask_at_loop_1)
            row(f"ser:{rule}", budget, ser_rows=ser_rows, l2=tuned.get("l2"), seconds=time.perf_counter() - t0)
    return rows


def cosine_cover(held: torch.Tensor, asked: torch.Tensor, centre: torch.Tensor) -> float:
    """Mean over held-out vectors of the cosine distance (1 - cos) to the nearest asked one, both centred on
    the pool's mean (a trunk's features share one direction, which raw cosines would measure): how well the
    asked pairs cover the held-out pairs (0: each held-out pair has an asked twin)."""
    h, a = (torch.nn.functional.normalize(x.float() - centre, dim=1) for x in (held, asked))
    return float((1 - (h @ a.T).max(1).values).mean())


def diagnose_seed(seed: int, pools: dict, helds: dict, rest, questions, full_heads: dict) -> list[dict]:
    """What each rule's alone picks are, beside random's: the seed RM's uncertainty on them, their coverage of the
    held-out pairs (in the pair space f_j + f_k that typical and ensemble-diverse spread over, and in the
    difference space f_j - f_k the head learns from), and how decisive their human labels are: the agreement with
    them of the head trained on every pool label (its training accuracy on those pairs) and its mean confidence
    2|p - 1/2|. Descriptive, added after the study; nothing here is tested."""
    s = setup(seed, pools, helds, rest, questions)
    if s.layer not in full_heads:
        pool = pools[s.layer].take(torch.as_tensor(rest))
        full_heads[s.layer] = fs.fit(pool.j, pool.k, why.choose_l2(pool.j, pool.k, 0)[0])
    w_full, u, out = full_heads[s.layer], s.unlabelled, []
    centre_pair, centre_diff = (u.j + u.k).float().mean(0), (u.j - u.k).float().mean(0)

    def mean_uncertainty(p) -> float:
        return sum(map(ask.uncertainty, p.tolist())) / len(p)

    for budget in BUDGETS:
        b = round(budget * len(rest))
        for rule in RULES:
            x = u.take(s.picks(rule, b, s.w0, torch.arange(len(u))))
            d = x.j - x.k
            p_full = torch.sigmoid(d @ w_full)
            out.append({"seed": seed, "fraction": budget, "rule": rule, "layer": s.layer, "asked": len(x.j),
                        "uncertainty": mean_uncertainty(torch.sigmoid(d @ s.w0)),
                        "cover_pair": cosine_cover(s.held.j + s.held.k, x.j + x.k, centre_pair),
                        "cover_diff": cosine_cover(s.held.j - s.held.k, d, centre_diff),
                        "full_agree": float((p_full > 0.5).float().mean()),
                        "full_confidence": 1 - mean_uncertainty(p_full)})
    return out


def run(args: Args) -> Path:
    from experiments import frozen

    results = Path(args.results)
    path = results / f"ask-{args.setting}.json"
    sha = hashlib.sha256(PREREGISTRATION.read_bytes()).hexdigest()
    state = json.loads(path.read_text()) if path.is_file() else {}
    if state.get("preregistration_sha256") != sha:  # the earlier study's rows (git history keeps them)
        state = {"setting": args.setting, "preregistration_sha256": sha, "rows": []}
    work, splits, data = frozen.featurise(frozen.Args(setting=args.setting, workdir=args.workdir, results=args.results))
    n_pool = len(splits["reward_full"][0])
    _, rest = fs.universe_split(n_pool)
    layers = features.read_meta(work / "cache")["layers"]
    pools, helds = fs.load_layers(work, splits, layers)
    questions = [r["question"] for r in splits["reward_full"][0]]
    state.update(fingerprint=fs.fingerprint(work, data), seed_fraction=SEED_FRACTION, budgets=BUDGETS,
                 pool_pairs=len(rest), held_out_pairs=len(splits["evaluation"][0]),
                 seed_pairs=len(fs.seed_split(rest, SEED_FRACTION, 0)[0]),
                 budget_pairs={str(b): round(b * len(rest)) for b in BUDGETS})
    done = {r["seed"] for r in state["rows"]}
    for seed in range(args.seeds):
        if seed in done:
            continue
        t0 = time.perf_counter()
        state["rows"] += one_seed(seed, pools, helds, rest, questions)
        write_json(path, state)  # a seed's rows at once: an interruption loses at most one seed
        print(f"ask_study: {args.setting} seed {seed} done ({time.perf_counter() - t0:.0f} s)", flush=True)
    diagnosed, full_heads = {r["seed"] for r in state.get("diagnostics", [])}, {}
    for seed in range(args.diagnose_seeds):
        if seed not in diagnosed:
            state["diagnostics"] = state.get("diagnostics", []) + diagnose_seed(seed, pools, helds, rest, questions,
                                                                               full_heads)
            write_json(path, state)
            print(f"ask_study: {args.setting} seed {seed} diagnosed", flush=True)
    return path


# ----------------------------------------------------------------------------- the report (from the JSON alone)


def report(state, png_name: str | None = None) -> str:
    c = why.cells(state["rows"])
    pct = why.pct
    seeds = len({r["seed"] for r in state["rows"]})
    lines = [f"# Which pairs to ask humans about: `{state['setting']}`", "",
             "Pre-registered in `PREREGISTRATION-ask.md` (committed before any of these rows; sha256 "
             f"`{state.get('preregistration_sha256', '?')[:12]}`). Generated by `python -m experiments.ask_study "
             f"--setting {state['setting']}` from `ask-{state['setting']}.json`. Frozen-trunk RMs on the frozen study's "
             f"cache; {seeds} seeds; a seed of {state['seed_pairs']} human pairs ({100 * state['seed_fraction']:g} % of "
             f"the {state['pool_pairs']}-pair pool); held-out accuracy (%) on {state['held_out_pairs']} pairs. Layer and "
             "L2 by 5-fold CV inside the human labels. The pool's hidden labels play the human. Seed RM alone: "
             f"{pct(why.mean(c, ('seed', 0.0, None)))}; SER alone: {pct(why.mean(c, ('ser', 0.0, None)))}.", "",
             "## Held-out accuracy against the extra human budget B", "",
             "`alone`: the seed plus the B pairs the rule picks; `after SER`: SER asking where the driver asks "
             "(after loop 1's filter, among the pairs it did not self-label), the asked pairs in every retraining.", "",
             "| B (share of pool) | pairs | " + " | ".join(f"{r} alone" for r in RULES) + " | "
             + " | ".join(f"{r} after SER" for r in RULES) + " |", "|---|---:|" + "---:|" * (2 * len(RULES))]
    for b in state["budgets"]:
        lines.append(f"| {100 * b:g} % | {state['budget_pairs'][str(b)]} | "
                     + " | ".join(pct(why.mean(c, (f"{arm}:{r}", b, None))) for arm in ("alone", "ser") for r in RULES) + " |")
    lines += ["", "## Each rule against random (points; Δ paired on seeds and held-out pairs, 95 % CI and p counting "
              "both, `ser.stats.crossed`; Holm within each arm type over its 12 tests)", "",
              "| arm | B | rule | Δ vs random | 95 % CI | p | Holm p |", "|---|---|---|---:|---|---:|---:|"]
    verdict = {}
    for arm in ("alone", "ser"):
        tests = {(b, r): why.compare(c, (f"{arm}:{r}", b, None), (f"{arm}:random", b, None))
                 for b in state["budgets"] for r in RULES if r != "random"}
        adjusted = holm({k: d["p"] for k, d in tests.items() if d})
        for (b, r), d in tests.items():
            verdict[(arm, b, r)] = (d, adjusted.get((b, r)))
            lines.append(f"| {'alone' if arm == 'alone' else 'after SER'} | {100 * b:g} % | {r} | "
                         f"{why.diff(d, adjusted.get((b, r)))} |")
    lines += ["", "The best rule against random at each B (the largest mean difference):", ""]
    for arm in ("alone", "ser"):
        for b in state["budgets"]:
            r = max((r for r in RULES if r != "random" and verdict[(arm, b, r)][0]), key=lambda r: verdict[(arm, b, r)][0]["mean"])
            d, p_holm = verdict[(arm, b, r)]
            lines.append(f"- {'alone' if arm == 'alone' else 'after SER'}, B = {100 * b:g} %: {r}, {100 * d['mean']:+.1f} points "
                         f"[{100 * d['ci'][0]:+.1f}, {100 * d['ci'][1]:+.1f}], Holm p {p_holm:.2g}")
    lines += ["", "## What the rules picked (alone; means over seeds)", "",
              "The seed RM's mean uncertainty 1 − 2|p − 1/2| over the asked pairs (1: a coin flip to the RM; random "
              "pairs show the pool's).", "", "| B | " + " | ".join(RULES) + " |", "|---|" + "---:|" * len(RULES)]
    for b in state["budgets"]:
        cells = []
        for r in RULES:
            u = [x["uncertainty"] for x in c.get((f"alone:{r}", b, None), {}).values() if x.get("uncertainty") is not None]
            cells.append(f"{sum(u) / len(u):.2f}" if u else "–")
        lines.append(f"| {100 * b:g} % | " + " | ".join(cells) + " |")
    if state.get("diagnostics"):
        lines += diagnostics_table(state["diagnostics"])
    lines += ["", "## What SER adds on top of the asked labels (after SER − alone, same rule and B; not tested)", "",
              "| B | " + " | ".join(RULES) + " |", "|---|" + "---:|" * len(RULES)]
    for b in state["budgets"]:
        cells = []
        for r in RULES:
            d = why.compare(c, (f"ser:{r}", b, None), (f"alone:{r}", b, None))
            cells.append("–" if d is None else f"{100 * d['mean']:+.1f} [{100 * d['ci'][0]:+.1f}, {100 * d['ci'][1]:+.1f}]")
        lines.append(f"| {100 * b:g} % | " + " | ".join(cells) + " |")
    wins = {r: [b for b in state["budgets"] if (d := verdict[("ser", b, r)][0]) and d["mean"] > 0
                and verdict[("ser", b, r)][1] is not None and verdict[("ser", b, r)][1] < 0.05] for r in RULES if r != "random"}
    best = max(wins, key=lambda r: (len(wins[r]), sum(verdict[("ser", b, r)][0]["mean"] for b in state["budgets"]
                                                      if verdict[("ser", b, r)][0])))
    lines += ["", "## The pre-registered decision", "",
              (f"`{best}` beats random after SER with Holm p < 0.05 at B = "
               + ", ".join(f"{100 * b:g} %" for b in wins[best]) + ".") if wins[best] else
              "No rule beats random after SER with Holm p < 0.05 at any budget: by the pre-registered rule, random is "
              "the default."]
    if png_name:
        lines += ["", f"![accuracy against B]({png_name})"]
    return "\n".join(lines) + "\n"


def diagnostics_table(diag: list[dict]) -> list[str]:
    seeds = sorted({r["seed"] for r in diag})
    lines = ["", f"## Why: what each rule's picks cover and how decisive their labels are (alone; means over seeds "
             f"{seeds[0]}–{seeds[-1]}; descriptive, added after the study, not tested)", "",
             "Uncertainty: the seed RM's 1 − 2|p − 1/2| on the asked pairs. Cover: the mean cosine distance from a "
             "held-out pair to its nearest asked pair, centred on the pool's mean (lower covers better), in the "
             "pair space (f_j + f_k, where typical and ensemble-diverse spread) and the difference space "
             "(f_j − f_k, what the head learns from). "
             "Label decisiveness: on the asked pairs, the share of human labels the head trained on every pool label "
             "agrees with, and its mean confidence 2|p − 1/2|; near-ties score near 50 % and 0.",
             "", "| B | rule | uncertainty | cover, pair space | cover, difference space | all-label head agrees (%) "
             "| its confidence |", "|---|---|---:|---:|---:|---:|---:|"]
    for b in sorted({r["fraction"] for r in diag}):
        for rule in RULES:
            rs = [r for r in diag if r["fraction"] == b and r["rule"] == rule]
            m = {k: sum(r[k] for r in rs) / len(rs) for k in ("uncertainty", "cover_pair", "cover_diff", "full_agree",
                                                              "full_confidence")}
            lines.append(f"| {100 * b:g} % | {rule} | {m['uncertainty']:.2f} | {m['cover_pair']:.3f} | "
                         f"{m['cover_diff']:.3f} | {100 * m['full_agree']:.1f} | {m['full_confidence']:.2f} |")
    return lines


def plot(state, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = why.cells(state["rows"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    xs = [100 * b for b in state["budgets"]]
    for ax, arm, title in zip(axes, ("alone", "ser"), ("seed + asked labels", "SER asking after loop 1")):
        for r in RULES:
            ax.plot(xs, [100 * why.mean(c, (f"{arm}:{r}", b, None)) for b in state["budgets"]], marker="o", label=r)
        ax.axhline(100 * why.mean(c, ("seed", 0.0, None)), color="grey", ls=":", label="seed RM alone")
        ax.set_xscale("log")
        ax.set_xticks(xs, [f"{x:g} %" for x in xs])
        ax.set_xlabel("extra human labels B (share of the pool)")
        ax.set_title(title)
    axes[0].set_ylabel("held-out accuracy (%)")
    axes[1].legend(fontsize=8)
    fig.suptitle(f"{state['setting']}: seed {100 * state['seed_fraction']:g} %, mean of "
                 f"{len({r['seed'] for r in state['rows']})} seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(path: Path) -> str:
    state = json.loads(path.read_text())
    png = path.with_suffix(".png")
    plot(state, png)
    text = report(state, png.name)
    (path.parent / f"REPORT-{path.stem}.md").write_text(text)
    return text


def main(args: Args):
    path = Path(args.results) / f"ask-{args.setting}.json"
    if not args.report_only:
        path = run(args)
    print(write_report(path))


if __name__ == "__main__":
    main(*parse([Args]))
