"""The frozen-trunk study's runs, on the feature cache of experiments/frozen.py.

Every RM is `rm_training.py --trunk frozen`'s head (`ser.features.train_head`) and every selection is the
filter's (`ser.selection.select`); a SER run is scripts/ser_loop.sh's loop on those two, run in this process
because a run on cached features takes a fraction of a second while a driver run starts a dozen Python
processes. `tests/test_frozen_study.py` checks that this loop and scripts/ser_loop.sh (with
`RM_ARGS="--trunk frozen ..."` and `FILTER_ARGS="--feature_cache ..."`) give the same rows.

Order of work (each step is written to results.json before the next runs, and skipped when present):
 1. tuning on the validation split (never the held-out pairs): the layer, then the head's L2 per fraction;
 2. the learning curve: seed-RM accuracy against the number of human labels, 20 seeds;
 3. the pre-registration: the primary label fraction, chosen from the curve alone;
 4. the SER grid: 20 seeds at each fraction for seed / ser-paper / full, the secondary variants and the
    controls at the primary fraction, with each loop's mechanism.
"""

import json
import math
import random
import time
from pathlib import Path

import torch

from ser import features
from ser import loop as ser_loop
from ser.data import write_json
from ser.selection import Thresholds
from ser.stats import calibration, crossed, holm, seeds_and_pairs_ci, sign_flip_p, sign_flip_p_mc

SEEDS = list(range(20))
FRACTIONS = [0.01, 0.02, 0.05, 0.10, 0.15, 0.30, 0.50, 1.0]
GRID_FRACTIONS = [0.01, 0.05, 0.15, 0.30]
L2S = [1e-4, 1e-3, 1e-2, 1e-1, 1.0]
DEFAULT_L2 = 1e-3  # rm_training.py's --head_l2 default
VALIDATION = 500   # pairs carved from the pool, once, for every choice made before the held-out pairs are read
VALIDATION_SHARE = 0.2  # at most this share of a small pool (UltraFeedback's 847 pairs) goes to validation
MAX_LOOPS = 3
PAPER_FLOOR = 600 / 136_000  # the paper's count floor as a share of its pool (0.44 %)


# ----------------------------------------------------------------------------- data on features


class Pairs:
    """Features of both sides of pairs at one layer; side j is the human-preferred response."""

    def __init__(self, f_j, f_k):
        self.j, self.k = f_j, f_k

    def __len__(self):
        return len(self.j)

    def take(self, idx):
        idx = torch.as_tensor(idx, dtype=torch.long)
        return Pairs(self.j[idx], self.k[idx])


def feature_pairs(cache, tokenizer, records, layer: int, max_length: int) -> Pairs:
    """Cached features of records' pairs, side j the human-preferred response (a pool pair's order is random;
    its `gold_preferred` says which)."""
    from ser.data import encode

    j, k = [], []
    for r in records:
        a, b = (encode(tokenizer, r["question"], r[s], max_length)["input_ids"] for s in ("response_j", "response_k"))
        if r.get("gold_preferred", "j") == "k":
            a, b = b, a
        j.append(a)
        k.append(b)
    return Pairs(features.load_features(cache, j, layer), features.load_features(cache, k, layer))


def load(work: Path, splits: dict, layer: int):
    cache = work / "cache"
    pool = Pairs(*(features.load_features(cache, splits["reward_full"][i], layer) for i in (1, 2)))
    held = Pairs(*(features.load_features(cache, splits["evaluation"][i], layer) for i in (1, 2)))
    return pool, held


def load_layers(work: Path, splits: dict, layers) -> tuple[dict, dict]:
    """({layer: pool pairs}, {layer: held-out pairs}) at each of `layers`."""
    loaded = {layer: load(work, splits, layer) for layer in layers}
    return {k: v[0] for k, v in loaded.items()}, {k: v[1] for k, v in loaded.items()}


def last_trained(ser_rows) -> dict:
    """A SER run's last loop that trained an RM (Loop 0 if none did)."""
    return max((r for r in ser_rows if r.get("accuracy") is not None), key=lambda r: r["loop"])


def universe_split(n: int):
    """(validation, the rest) indices of the pool; the validation pairs are the same for every seed."""
    order = list(range(n))
    random.Random(12345).shuffle(order)
    size = min(VALIDATION, int(VALIDATION_SHARE * n))
    return order[:size], order[size:]


def seed_split(rest, fraction: float, seed: int):
    """(labelled seed, unlabelled pool) of the non-validation pairs for one seed."""
    order = list(rest)
    random.Random(seed).shuffle(order)
    n = max(2, round(fraction * len(order)))
    return order[:n], order[n:]


CENTER = 0.01  # TRL's center_rewards_coefficient, the value its docs suggest (see ser.features.train_head)


def fit(train_j, train_k, l2, w0=None):
    return features.train_head(train_j, train_k, w0, l2, center=CENTER)


def accuracy(w, pairs: Pairs) -> tuple[float, list[bool]]:
    d = (pairs.j - pairs.k) @ w
    correct = (d > 0).tolist()
    return sum(correct) / len(correct), correct


def ece(w, pairs: Pairs) -> float:
    """Expected calibration error of sigmoid(|r_j - r_k|) in ten bins over [0.5, 1] (ser.stats.calibration)."""
    return calibration(((pairs.j - pairs.k) @ w).tolist())[0]


# ----------------------------------------------------------------------------- one SER run


def ser_run(labelled: Pairs, pool: Pairs, held: Pairs, l2: float, floor: int, probability="sigmoid", rule="paper",
            forward_only=False, ensemble=0, seed=0, thresholds: dict | None = None, max_loops: int = MAX_LOOPS,
            keep_seed: bool = True, union: bool = True, continue_training: bool = True, bootstrap_seed: int | None = None,
            train=None, w0=None, ask=None):
    """scripts/ser_loop.sh's loop (ser/loop.py's `run`, the driver's settings as arguments) on features: Loop 0
    on the labelled seed, then each loop self-labels the remaining pool, decides its status, selects, and
    retrains, until Stop. `forward_only` is the monotone status; `ensemble` K adds K bootstrap heads of each
    RM's training pairs as members (--selection ensemble, as rm_training.py --bootstrap_heads K, whose
    resamples are drawn with its --seed: `bootstrap_seed`; by default a seed per run and loop). `train(j, k,
    init)` replaces the L-BFGS retraining at `l2` (another L2 rule or a step-budget trainer), and `w0` the seed
    RM fitted here. `ask(loop, rm, idx)` -> pool indices among idx for humans to label (their human labels join
    the retraining, as the driver's ASK_HUMANS does; ser/loop.py's `run`). Returns one row per loop, with the
    mechanism figures, and each loop's selection: its pool indices and whether the RM preferred side j of each
    (its self-labels)."""
    t = Thresholds(**{"status1_min_pairs": floor, "status2_min_pairs": floor, "probability": probability,
                      "monotone": forward_only, **(thresholds or {})})
    w0 = fit(labelled.j, labelled.k, l2) if w0 is None else w0
    train = train or (lambda j, k, init: fit(j, k, l2, init))
    acc, correct = accuracy(w0, held)
    rows = [{"loop": 0, "accuracy": acc, "correct": bits(correct), "ece": ece(w0, held), "status": "seed", "selected": 0}]

    def pairs_of(mix):  # the training mix's pairs, each selection oriented as the RM that selected it prefers
        j, k = [], []
        for item in mix:
            if item == "seed":
                j.append(labelled.j), k.append(labelled.k)
            else:
                idx, prefers_j = item
                sel = pool.take(idx)
                j.append(torch.where(prefers_j[:, None], sel.j, sel.k)), k.append(torch.where(prefers_j[:, None], sel.k, sel.j))
        return torch.cat(j), torch.cat(k)

    def score(w, idx):
        cur = pool.take(idx)
        return cur.j @ w, cur.k @ w

    def members(loop_t, rms, idx, mix):  # bootstrap heads of the pairs RM_{t-1} was trained on
        draw = seed * 1000 + loop_t if bootstrap_seed is None else bootstrap_seed
        heads = features.bootstrap_heads(*pairs_of(mix), ensemble, draw, l2=l2, center=CENTER)
        return [tuple(x.tolist() for x in ser_loop.probabilities(*score(h, idx), probability)) for h in heads]

    settings = ser_loop.Settings(thresholds=t, rule="ensemble" if ensemble else rule, max_loops=max_loops,
                             keep_seed=keep_seed, union=union, continue_training=continue_training)
    def asking(loop_t, rm, idx):  # the asked pairs with their human labels: side j, the human-preferred one
        asked = ask(loop_t, rm, idx)
        return None if asked is None else (asked, (asked, torch.ones(len(asked), dtype=torch.bool)))

    loops = ser_loop.run(w0, score, lambda mix, init: train(*pairs_of(mix), init), len(pool), settings,
                         members if ensemble else None, ask=asking if ask else None)
    selected_total = 0
    for rec in loops:
        d, both = rec.decision, torch.cat([rec.r_j, rec.r_k])
        row = {"loop": rec.loop, "status": d.status, "status1_eligible": d.status1_eligible,
               "status2_eligible": d.status2_eligible, "pool": len(rec.pool), "reward_mean": both.mean().item(),
               "reward_std": both.std().item(), "selected": sum(d.mask),
               "asked": 0 if rec.asked is None else len(rec.asked)}
        if rec.rm is None:
            rows.append({**row, "accuracy": None})
            break
        mask = torch.tensor(d.mask, dtype=torch.bool)
        agrees = rec.prefers_j  # side j is the human-preferred one: the self-label agrees where the RM prefers j
        conf = torch.sigmoid((rec.r_j - rec.r_k)[mask].abs())
        bins = [[int(((conf >= lo) & (conf < lo + 0.05)).sum()), int((agrees & (conf >= lo) & (conf < lo + 0.05)).sum())]
                for lo in [0.5 + 0.05 * b for b in range(10)]]
        sel = pool.take(rec.selected)
        seed_pref = ((sel.j - sel.k) @ w0 > 0) == agrees  # the seed RM already preferred the self-labelled side
        selected_total += len(rec.selected)
        acc, correct = accuracy(rec.rm, held)
        rows.append({**row, "accuracy": acc, "correct": bits(correct), "ece": ece(rec.rm, held),
                     "self_label_precision": agrees.float().mean().item(),
                     "precision_by_confidence": [{"pairs": m, "precision": c / m if m else None} for m, c in bins],
                     "seed_rm_agreement": seed_pref.float().mean().item(), "selected_total": selected_total})
    return rows, [(rec.selected, rec.prefers_j) for rec in loops if rec.selected is not None]


def bits(correct) -> str:
    """Which held-out pairs a model ranks right, as hex digits of the bit string (pair i is bit i)."""
    text = "".join("1" if c else "0" for c in correct)
    return f"{len(text)}:" + (f"{int(text, 2):0{(len(text) + 3) // 4}x}" if text else "")


# ----------------------------------------------------------------------------- the study


def fingerprint(work: Path, data: Path | None = None) -> dict:
    """What the saved rows depend on: the prepared data (its source's sha256, seed and split counts; `data`,
    by default the study's own WORK/data) and the features (the trunk's files by content, the cache's length,
    layers and precision)."""
    from ser.data import file_sha256

    manifest = json.loads(((data or work / "data") / "manifest.json").read_text())
    meta = features.read_meta(work / "cache")
    trunk = Path(meta["trunk_path"])
    files = {p.name: file_sha256(p) for p in sorted(trunk.iterdir()) if p.suffix in (".safetensors", ".json")} \
        if trunk.is_dir() else {"name": str(trunk)}
    return {"data": {k: manifest.get(k) for k in ("source_sha256", "seed", "counts")},
            "features": {"trunk_files_sha256": files, "max_length": meta["max_length"], "layers": meta["layers"],
                         "compute": meta["compute"]}}


def check_resume(state: dict, now: dict, n_pool: int, n_held: int, path: Path) -> None:
    """Saved rows are resumed only on the data and features they were computed on."""
    if "fingerprint" in state and state["fingerprint"] != now:
        differ = [k for k in now if state["fingerprint"].get(k) != now[k]]
        raise SystemExit(f"{path}: its rows were computed on other {' and '.join(differ)} ({json.dumps(state['fingerprint'])}; "
                         f"now {json.dumps(now)}); give another --results folder, or move {path} away to start again")
    if "fingerprint" not in state and any(k in state for k in ("tuning", "rows", "curve")):
        if (state.get("pool_pairs"), state.get("held_out_pairs")) != (n_pool, n_held):
            raise SystemExit(f"{path}: its rows were computed on {state.get('pool_pairs')} pool and "
                             f"{state.get('held_out_pairs')} held-out pairs, this data has {n_pool} and {n_held}; "
                             f"give another --results folder, or move {path} away to start again")
        print(f"frozen: {path} has no fingerprint (saved before one was recorded); its pair counts match, and this "
              "data's fingerprint is recorded from now on", flush=True)


def run(args, work: Path, splits: dict, seeds=SEEDS, data: Path | None = None):
    """The study on the cache at `work` (args: its name and the results folder) and the prepared folder `data`
    (default WORK/data), `seeds` per cell."""
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    name = getattr(args, "name", None) or args.setting
    l2s = getattr(args, "l2s", None) or L2S
    path = out / f"{name}.json"
    state = json.loads(path.read_text()) if path.is_file() else {"setting": name}
    save = lambda: write_json(path, state)  # noqa: E731 (after every step: an interruption loses at most it)
    n_pool = len(splits["reward_full"][0])
    check_resume(state, now := fingerprint(work, data), n_pool, len(splits["evaluation"][0]), path)
    state["fingerprint"] = now
    validation, rest = universe_split(n_pool)
    state.update(pool_pairs=n_pool, held_out_pairs=len(splits["evaluation"][0]), validation_pairs=len(validation))
    if getattr(args, "trunk", None):
        state["trunk"] = Path(args.trunk).name

    # 1. tuning on the validation split: the layer at 15 % labels, then L2 per fraction
    if "tuning" not in state:
        t0 = time.perf_counter()
        by_layer = {}
        for layer in json.loads((work / "cache" / features.META).read_text())["layers"]:
            pool, _ = load(work, splits, layer)
            val = pool.take(validation)
            by_layer[layer] = {str(l2): sum(accuracy(fit(*_seed(pool, rest, 0.15, s), l2), val)[0] for s in seeds[:5]) / len(seeds[:5])
                               for l2 in l2s}
        layer = max(by_layer, key=lambda x: max(by_layer[x].values()))
        pool, _ = load(work, splits, layer)
        val = pool.take(validation)
        l2_by_fraction = {}
        for f in sorted(set(FRACTIONS + GRID_FRACTIONS)):
            scores = {l2: sum(accuracy(fit(*_seed(pool, rest, f, s), l2), val)[0] for s in seeds[:5]) / len(seeds[:5])
                      for l2 in l2s}
            l2_by_fraction[str(f)] = max(scores, key=scores.get)
        state["tuning"] = {"layer": layer, "l2_grid": l2s, "validation_accuracy_by_layer_and_l2_at_15pct": by_layer,
                           "l2_by_fraction": l2_by_fraction, "seconds": time.perf_counter() - t0}
        save()
    layer = state["tuning"]["layer"]
    l2_of = lambda f: state["tuning"]["l2_by_fraction"][str(f)]  # noqa: E731
    pool, held = load(work, splits, layer)

    # 2. the learning curve (held-out accuracy of the seed RM, tuned L2), 20 seeds
    if "curve" not in state:
        state["curve"] = {str(f): [accuracy(fit(*_seed(pool, rest, f, s), l2_of(f)), held)[0] for s in seeds]
                          for f in FRACTIONS}
        save()

    # 3. pre-registration, from the curve alone
    if "preregistration" not in state:
        mean = {f: sum(v) / len(v) for f, v in state["curve"].items()}
        gaps = {f: mean["1.0"] - mean[f] for f in mean if f != "1.0"}
        primary = "0.15" if gaps["0.15"] >= 0.03 else max(gaps, key=gaps.get)
        state["preregistration"] = {
            "gap_all_labels_over_15pct": gaps["0.15"], "gaps": gaps, "primary_fraction": float(primary),
            "rule": "15 % if all labels beat it by 3 points or more, else the fraction with the largest gap",
            "primary_test": f"ser-paper vs its own seed RM, paired over {len(seeds)} seeds, same held-out pairs",
            "floor": "the paper's count floor as a share of the pool (600 of 136k = 0.44 %)",
            "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        save()
    primary = state["preregistration"]["primary_fraction"]

    # 4. the SER grid
    rows = state.setdefault("rows", [])
    done = {(r["variant"], r["fraction"], r["seed"]) for r in rows}
    write_report(out, name)  # the curve and the choice are in the report before any SER row exists
    plan = [(v, f) for f in sorted(set(GRID_FRACTIONS) | {primary}) for v in ("seed", "ser-paper")] + [("full", primary)]
    plan += [(v, primary) for v in ("ser-paper@l2=default", "seed@l2=default", "ser-released", "ser-pairwise",
                                    "ser-centred", "ser-floor10", "ser-forward", "ser-ensemble", "oracle", "random")]
    for variant, fraction in plan:
        for s in seeds:
            if (variant, fraction, s) in done:
                continue
            rows += run_one(variant, fraction, s, pool, held, rest, l2_of)
        save()
    return state


def _seed(pool: Pairs, rest, fraction, seed):
    labelled, _ = seed_split(rest, fraction, seed)
    sub = pool.take(labelled)
    return sub.j, sub.k


def run_one(variant, fraction, seed, pool: Pairs, held: Pairs, rest, l2_of):
    t0 = time.perf_counter()
    labelled_idx, pool_idx = seed_split(rest, fraction, seed)
    labelled, unlabelled = pool.take(labelled_idx), pool.take(pool_idx)
    default = variant.endswith("@l2=default")
    l2 = 1e-3 if default else l2_of(fraction)
    base = variant.split("@")[0]
    floor = max(1, math.ceil(PAPER_FLOOR * len(unlabelled)))
    if base == "full":
        everything = pool.take(rest)
        acc, correct = accuracy(fit(everything.j, everything.k, l2_of(1.0)), held)
        loops = [{"loop": 0, "accuracy": acc, "correct": bits(correct), "status": "full", "selected": 0}]
    elif base == "seed":
        acc, correct = accuracy(fit(labelled.j, labelled.k, l2), held)
        loops = [{"loop": 0, "accuracy": acc, "correct": bits(correct), "status": "seed", "selected": 0}]
    elif base == "oracle":  # ser-paper's selected pairs of each loop, with their hidden human labels
        paper, selections = ser_run(labelled, unlabelled, held, l2, floor)
        loops, w = [paper[0]], None
        for t in range(1, len(selections) + 1):
            union = unlabelled.take(torch.cat([idx for idx, _ in selections[:t]]))
            w = fit(torch.cat([labelled.j, union.j]), torch.cat([labelled.k, union.k]), l2, w)
            acc, correct = accuracy(w, held)
            loops.append({"loop": t, "accuracy": acc, "correct": bits(correct), "status": "oracle", "selected": len(union)})
    elif base == "random":  # as many random pool pairs as ser-paper selected in all, self-labelled by the seed RM
        paper, _ = ser_run(labelled, unlabelled, held, l2, floor)
        n = max([r.get("selected_total", 0) for r in paper])
        idx = torch.randperm(len(unlabelled), generator=torch.Generator().manual_seed(seed))[:n]
        w0 = fit(labelled.j, labelled.k, l2)
        sub = unlabelled.take(idx)
        pref = (sub.j - sub.k) @ w0 > 0
        tj = torch.cat([labelled.j, torch.where(pref[:, None], sub.j, sub.k)])
        tk = torch.cat([labelled.k, torch.where(pref[:, None], sub.k, sub.j)])
        acc, correct = accuracy(fit(tj, tk, l2, w0), held)
        loops = [{"loop": 0, "accuracy": paper[0]["accuracy"], "correct": paper[0]["correct"], "status": "seed", "selected": 0},
                 {"loop": 1, "accuracy": acc, "correct": bits(correct), "status": "random", "selected": int(n),
                  "self_label_precision": pref.float().mean().item() if n else None}]
    else:
        kwargs = {"ser-paper": {}, "ser-released": {"rule": "released"}, "ser-pairwise": {"probability": "pairwise"},
                  "ser-centred": {"probability": "centred"}, "ser-forward": {"forward_only": True},
                  "ser-ensemble": {"ensemble": 5, "seed": seed}, "ser-floor10": {}}[base]
        if base == "ser-floor10":
            floor = max(1, math.ceil(0.10 * len(unlabelled)))
        loops, _ = ser_run(labelled, unlabelled, held, l2, floor, **kwargs)
    seconds = time.perf_counter() - t0
    return [{"variant": variant, "fraction": fraction, "seed": seed, "l2": l2, "floor": floor,
             "labelled": len(labelled_idx), "pool": len(pool_idx), "seconds": seconds, **r} for r in loops]


# ----------------------------------------------------------------------------- the report (from the JSON alone)

SECONDARY = ["ser-released", "ser-pairwise", "ser-centred", "ser-floor10", "ser-forward", "ser-ensemble"]
CONTROLS = ["oracle", "random"]


def final(rows):
    """{(variant, fraction, seed): the run's last row with an accuracy}."""
    out = {}
    for r in rows:
        if r.get("accuracy") is not None:
            k = (r["variant"], r["fraction"], r["seed"])
            if k not in out or r["loop"] > out[k]["loop"]:
                out[k] = r
    return out


def unbits(text: str) -> list[int]:
    """The correctness bits that `bits` stored."""
    n, digits = text.split(":")
    return [int(c) for c in f"{int(digits, 16):0{int(n)}b}"] if int(n) else []


def paired(finals, a, b, fraction, rng):
    """Variant a against b on the same seeds and held-out pairs: the mean difference, with the seed-level 95 %
    bootstrap interval and exact sign-flip p, and the interval and p that count the held-out pairs' sampling
    too (ser.stats.crossed, from the stored correctness bits), which the report leads with."""
    seeds = sorted(s for (v, f, s) in finals if v == a and f == fraction and (b, fraction, s) in finals)
    diffs = [finals[(a, fraction, s)]["accuracy"] - finals[(b, fraction, s)]["accuracy"] for s in seeds]
    if not diffs:
        return None
    means = sorted(sum(rng.choices(diffs, k=len(diffs))) / len(diffs) for _ in range(2000))
    out = {"seeds": len(diffs), "mean": sum(diffs) / len(diffs), "ci": (means[49], means[1949]),
           "p": sign_flip_p(diffs) if len(diffs) <= 16 else sign_flip_p_mc(diffs, rng)}
    if all("correct" in finals[(v, fraction, s)] for s in seeds for v in (a, b)):
        table = [[x - y for x, y in zip(unbits(finals[(a, fraction, s)]["correct"]), unbits(finals[(b, fraction, s)]["correct"]))]
                 for s in seeds]
        both = crossed(table)
        out.update(crossed_ci=both["ci"], crossed_p=both["p"])
    return out


def pct(x):
    return "–" if x is None else f"{100 * x:.1f}"


def report(state) -> str:
    rng = random.Random(0)
    rows = state.get("rows", [])
    finals = final(rows)
    pre = state["preregistration"]
    primary = pre["primary_fraction"]
    t = state["tuning"]
    grid = t.get("l2_grid", L2S)
    lines = [f"# Frozen-trunk study: `{state['setting']}`", "",
             f"{state.get('trunk', 'SmolLM2-135M-Instruct')}, frozen; a linear score head on the last-token state "
             f"of layer {t['layer']} "
             f"(chosen on {state['validation_pairs']} validation pairs carved from the pool, never the held-out ones). "
             f"Pool {state['pool_pairs'] - state['validation_pairs']} pairs; {state['held_out_pairs']} held-out pairs, "
             "the same for every seed. Accuracy is strict, in %. Generated from the JSON beside this file by "
             "`python -m experiments.frozen` (experiments/frozen_study.py).", "",
             "## 1. Tuning (validation split)", "",
             "| layer | " + " | ".join(f"L2 {x}" for x in grid) + " |", "|---|" + "---:|" * len(grid)]
    for layer, by in t["validation_accuracy_by_layer_and_l2_at_15pct"].items():
        lines.append(f"| {layer} | " + " | ".join(pct(by[str(x)]) for x in grid) + " |")
    lines += ["", "L2 chosen per label fraction (validation, 5 seeds): " +
              ", ".join(f"{float(f):g}: {v:g}" for f, v in t["l2_by_fraction"].items()), "",
              f"## 2. Learning curve (seed RM, tuned L2, {len(next(iter(state['curve'].values())))} seeds)", "",
              "The interval counts the seeds and the held-out pairs (seed variance over the seeds, plus the binomial "
              "bound on the pairs' share, `ser.stats.seeds_and_pairs_ci`).", "",
              "| human-labelled share of the pool | pairs | accuracy mean ± std | 95 % CI (seeds and pairs) |",
              "|---|---:|---|---|"]
    n_pool = state["pool_pairs"] - state["validation_pairs"]
    for f, accs in state["curve"].items():
        m = sum(accs) / len(accs)
        sd = (sum((a - m) ** 2 for a in accs) / (len(accs) - 1)) ** 0.5
        lo, hi = seeds_and_pairs_ci(accs, state["held_out_pairs"])
        lines.append(f"| {100 * float(f):g} % | {max(2, round(float(f) * n_pool))} | {pct(m)} ± {pct(sd)} | "
                     f"[{pct(lo)}, {pct(hi)}] |")
    lines += ["", "## 3. Pre-registration (written before any SER run)", "",
              f"All labels beat the 15 % seed RM by {100 * pre['gap_all_labels_over_15pct']:.1f} points"
              + (" (less than 3)" if pre["gap_all_labels_over_15pct"] < 0.03 else "") +
              f". Primary setting: {100 * primary:g} % of the pool labelled ({pre['rule']}). Primary test: "
              f"{pre['primary_test']}. Count floor: {pre['floor']}. Recorded at {pre['written_at']}.", ""]
    if not rows:
        return "\n".join(lines + ["The SER grid has not run yet."])
    lines += ["## 4. SER against its seed RM", "",
              "Final accuracy (the last loop that trained); Δ = variant − its own seed RM on the same seeds and "
              "held-out pairs. The 95 % CI and p count both sources of variance, the seeds and the sampling of the "
              "held-out pairs (the random-effects variance of the seeds × pairs table of per-pair differences, "
              "`ser.stats.crossed`); the paired sign-flip p over seeds alone, which takes the held-out pairs as "
              "fixed, is given beside it. Holm family: the secondary variants against their seed RM at the primary "
              "fraction, on the seeds-and-pairs p.", "",
              "| variant | labelled | seeds | accuracy mean | Δ vs seed RM | 95 % CI (seeds and pairs) | p | Holm p | "
              "p, seeds only | loops run (min–max) |",
              "|---|---|---:|---:|---:|---|---:|---:|---:|---|"]
    fractions = sorted({f for (_, f, _) in finals})
    secondary_ps = {}
    stats = {}
    for v in ["seed", "ser-paper", "full", "seed@l2=default", "ser-paper@l2=default", *SECONDARY, *CONTROLS]:
        for f in fractions:
            keys = [k for k in finals if k[0] == v and k[1] == f]
            if not keys:
                continue
            base = "seed@l2=default" if v.endswith("@l2=default") else "seed"
            cmp = paired(finals, v, base, f, rng) if v not in ("seed", "full", "seed@l2=default") else None
            stats[(v, f)] = (keys, cmp)
            if v in SECONDARY and cmp and f == primary:
                secondary_ps[v] = cmp.get("crossed_p", cmp["p"])
    adjusted = holm(secondary_ps)
    for (v, f), (keys, cmp) in stats.items():
        accs = [finals[k]["accuracy"] for k in keys]
        loops = [max(r["loop"] for r in rows if (r["variant"], r["fraction"], r["seed"]) == k) for k in keys]
        labelled = "all" if v == "full" else f"{100 * f:g} %"
        ci, p = (cmp.get("crossed_ci"), cmp.get("crossed_p")) if cmp else (None, None)
        lines.append(f"| {v} | {labelled} | {len(keys)} | {pct(sum(accs) / len(accs))} | "
                     + (f"{100 * cmp['mean']:+.1f} | " if cmp else "– | ")
                     + (f"[{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}] | {p:.3g} | " if ci else "– | – | ")
                     + (f"{adjusted[v]:.3g}" if v in adjusted and f == primary else "–")
                     + (f" | {cmp['p']:.3g}" if cmp else " | –") + f" | {min(loops)}–{max(loops)} |")
    lines += ["", f"## 5. Mechanism per loop (`ser-paper`, {100 * primary:g} % labelled)", "",
              "Means over the seeds that reached the loop (their number is given).", "",
              "| loop | seeds | status (count) | status-1 eligible | status-2 eligible | selected | reward mean ± std | "
              "self-label precision | seed RM already preferred | accuracy | ECE |",
              "|---|---:|---|---:|---:|---:|---|---:|---:|---:|---:|"]
    paper = [r for r in rows if r["variant"] == "ser-paper" and r["fraction"] == primary]
    for loop in sorted({r["loop"] for r in paper}):
        at = [r for r in paper if r["loop"] == loop]
        mean = lambda key: (lambda xs: sum(xs) / len(xs) if xs else None)([r[key] for r in at if r.get(key) is not None])  # noqa: E731
        counts = {}
        for r in at:
            counts[r["status"]] = counts.get(r["status"], 0) + 1
        rm, rs = mean("reward_mean"), mean("reward_std")
        lines.append(f"| {loop} | {len(at)} | {', '.join(f'{k} {v}' for k, v in counts.items())} | "
                     f"{mean('status1_eligible') or 0:.0f} | {mean('status2_eligible') or 0:.0f} | {mean('selected') or 0:.0f} | "
                     + (f"{rm:+.2f} ± {rs:.2f}" if rm is not None else "–") + f" | {pct(mean('self_label_precision'))} | "
                     f"{pct(mean('seed_rm_agreement'))} | {pct(mean('accuracy'))} | "
                     + (f"{mean('ece'):.3f}" if mean("ece") is not None else "–") + " |")
    bins = [[0, 0.0] for _ in range(10)]
    for r in paper:
        for b, cell in enumerate(r.get("precision_by_confidence") or []):
            if cell["pairs"]:
                bins[b][0] += cell["pairs"]
                bins[b][1] += cell["precision"] * cell["pairs"]
    lines += ["", "Self-label precision by the RM's confidence sigmoid(|r_j − r_k|), all loops and seeds pooled:", "",
              "| confidence | " + " | ".join(f"{0.5 + 0.05 * b:.2f}–{0.55 + 0.05 * b:.2f}" for b in range(10)) + " |",
              "|---|" + "---:|" * 10,
              "| pairs | " + " | ".join(str(n) for n, _ in bins) + " |",
              "| precision | " + " | ".join(pct(c / n) if n else "–" for n, c in bins) + " |", ""]
    return "\n".join(lines)


def write_report(results: Path, setting: str) -> str:
    state = json.loads((results / f"{setting}.json").read_text())
    text = report(state)
    (results / f"REPORT-{setting}.md").write_text(text + "\n")
    return text
