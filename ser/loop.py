"""The SER loop, defined once (paper, section 3).

Loop 0 trains RM_0 on the human-labelled seed. Each loop t >= 1 then:
 1. self-labels its pool (the pool less every pair selected so far, and less any human-labelled pairs) with
    RM_{t-1}: rewards r_j, r_k, mapped to probabilities by `probabilities`;
 2. decides its learning status and selects (`decide`: a registered rule of ser/selection.py, its floors as
    counts or shares of the pool, the status monotone or not, other RMs' probabilities for the rules that
    need them);
 3. orients each selected pair to the response RM_{t-1} prefers (the self-label);
 4. retrains on `training_mix` (the seed if KEEP_SEED, human labels, and every loop's selections if UNION,
    else the newest), starting from RM_{t-1} if CONTINUE (`start_from`), else afresh;
until Stop or MAX_LOOPS.

Two paths run this definition. scripts/ser_loop.sh, the users' driver, runs each step as a stage (the
filter, rm_training.py) with folders and done markers, and asks this module for what a loop decides
(`python -m ser.loop mix|start|stopped|reached`). `run` is the same loop in one process, on any scorer and
trainer (the frozen-trunk study's, on cached features). `tests/test_frozen_study.py` checks that both give
the same statuses, selections and accuracies; `tests/test_loop.py` that nothing else decides a status or
assembles a training mix.
"""

import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from ser.selection import MAPPINGS, STATUS1, STATUS2, STOP, Decision, Thresholds, select

# ----------------------------------------------------------------------------- 1. self-label: r -> p


def probabilities(r_j, r_k, mapping: str = "sigmoid"):
    """The RM's probabilities (p_j, p_k) of both responses of each pair, from its rewards (torch tensors):
    sigmoid: p = sigmoid(r) per response (the paper);
    pairwise: p_j = sigmoid(r_j - r_k), p_k = 1 - p_j (Bradley-Terry);
    centred: p = sigmoid(r - m), m the mean reward over the pool's responses (a head without a bias, or one
    whose rewards drift, has an arbitrary offset that the paper's per-response thresholds read as confidence)."""
    import torch

    r_j, r_k = torch.as_tensor(r_j, dtype=torch.float64), torch.as_tensor(r_k, dtype=torch.float64)
    if mapping == "pairwise":
        return torch.sigmoid(r_j - r_k), torch.sigmoid(r_k - r_j)
    if mapping == "centred":
        m = torch.cat([r_j, r_k]).mean() if len(r_j) else 0.0
        return torch.sigmoid(r_j - m), torch.sigmoid(r_k - m)
    if mapping != "sigmoid":
        raise ValueError(f"--probability {mapping!r}: one of {', '.join(MAPPINGS)}")
    return torch.sigmoid(r_j), torch.sigmoid(r_k)


# ----------------------------------------------------------------------------- 2. status and selection


def decide(p_j: Sequence[float], p_k: Sequence[float], thresholds: Thresholds, rule: str = "paper",
           reached: str | None = None, members: list | None = None) -> Decision:
    """The loop's status and selected pairs. `reached`: the furthest status an earlier loop reached; with
    `thresholds.monotone`, Status 1 is not tried again once Status 2 was reached. `members`: other RMs'
    (p_j, p_k) for the rules that need them (ensemble, agreement)."""
    if thresholds.monotone and reached == STATUS2:
        thresholds = replace(thresholds, status1_min_pairs=len(p_j) + 1, status1_min_share=0.0)
    return select(list(p_j), list(p_k), thresholds, rule, members=members)


def furthest_status(statuses: Sequence[str]) -> str | None:
    """The furthest learning status among earlier loops' (Status 2 after Status 1), None before any."""
    return STATUS2 if STATUS2 in statuses else STATUS1 if STATUS1 in statuses else None


# ----------------------------------------------------------------------------- 4. retraining


def training_mix(seed, selections: Sequence, human: Sequence = (), keep_seed: bool = True, union: bool = True) -> list:
    """What loop t retrains on, in order: the human seed (KEEP_SEED), the human-labelled pairs, and every
    loop's selections so far (UNION) or the newest one. The items are whatever the caller trains from
    (the driver: data folders and files; `run`: index sets)."""
    chosen = list(selections) if union else list(selections[-1:])
    return ([seed] if keep_seed else []) + list(human) + chosen


def start_from(previous_rm, sft, continue_training: bool = True):
    """RM_t starts from RM_{t-1} (CONTINUE, the paper's curves) or afresh from the SFT model."""
    return previous_rm if continue_training else sft


def stopped(decision_status: str) -> bool:
    return decision_status == STOP


# ----------------------------------------------------------------------------- the loop in one process


@dataclass(frozen=True)
class Settings:
    """The driver's settings, for `run` (names as scripts/ser_loop.sh's variables)."""

    thresholds: Thresholds = field(default_factory=Thresholds)
    rule: str = "paper"
    max_loops: int = 3
    keep_seed: bool = True
    union: bool = True
    continue_training: bool = True


@dataclass
class Loop:
    """One loop of `run`: its pool (indices into the whole pool), the rewards and probabilities RM_{t-1} gave
    it, the decision, which pool pairs were selected (indices) and which side of each the RM prefers
    (True: j), the pairs humans were asked about (indices), and RM_t (None at Stop)."""

    loop: int
    pool: object
    r_j: object
    r_k: object
    p_j: object
    p_k: object
    decision: Decision
    selected: object = None
    prefers_j: object = None
    asked: object = None
    rm: object = None


def run(rm0, score: Callable, train: Callable, n_pool: int, settings: Settings, members: Callable | None = None,
        human: Sequence = (), ask: Callable | None = None) -> list[Loop]:
    """scripts/ser_loop.sh's loop after Loop 0, in one process.

    rm0: RM_0 (trained on the seed); score(rm, idx) -> (r_j, r_k) tensors of pool pairs idx; train(mix, init)
    -> RM_t, where mix is `training_mix` over "seed", the human sets and (indices, prefers_j) selections,
    and init is RM_{t-1} or None (afresh); members(loop, rms, idx, mix) -> other RMs' (p_j, p_k) for the
    ensemble and agreement rules, or None (rms: RM_0 .. RM_{t-1}; mix: what RM_{t-1} was trained on). Without
    `members`, the agreement rule's member is RM_{t-2}, scored on the loop's pool (none at loop 1).
    ask(loop, rm, idx) -> (asked, item) or None: where the driver's ASK_HUMANS asks, after the loop's
    selection, among the pairs it did not select (idx) with RM_{t-1} (rm): the pool indices humans label
    (they leave the pool) and what train reads for them (joining the human sets of this and every later
    retraining)."""
    import torch

    t = settings.thresholds
    if members is None and settings.rule == "agreement":
        def members(loop, rms, idx, mix):
            return [tuple(x.tolist() for x in probabilities(*score(rms[-2], idx), t.probability))] if len(rms) > 1 else []
    rm, remaining, selections, statuses, loops, rms = rm0, torch.arange(n_pool), [], [], [], [rm0]
    for loop in range(1, settings.max_loops + 1):
        if len(remaining) == 0:
            break
        r_j, r_k = score(rm, remaining)
        p_j, p_k = probabilities(r_j, r_k, t.probability)
        mix = training_mix("seed", selections, human, settings.keep_seed, settings.union)
        others = members(loop, rms, remaining, mix) if members else None
        decision = decide(p_j.tolist(), p_k.tolist(), t, settings.rule, furthest_status(statuses), others)
        record = Loop(loop, remaining, r_j, r_k, p_j, p_k, decision)
        loops.append(record)
        mask = torch.tensor(decision.mask, dtype=torch.bool)
        if stopped(decision.status) or not mask.any():
            break
        statuses.append(decision.status)
        record.selected, record.prefers_j = remaining[mask], (p_j >= p_k)[mask]
        selections.append((record.selected, record.prefers_j))
        remaining = remaining[~mask]
        asked = ask(loop, rm, remaining) if ask else None
        if asked is not None and len(asked[0]):
            record.asked, human = asked[0], [*human, asked[1]]
            remaining = remaining[~torch.isin(remaining, torch.as_tensor(asked[0]))]
        mix = training_mix("seed", selections, human, settings.keep_seed, settings.union)
        rm = record.rm = train(mix, start_from(rm, None, settings.continue_training))
        rms.append(rm)
    return loops


# ----------------------------------------------------------------------------- the driver's questions


def _bool(value: str) -> bool:
    if value not in ("0", "1"):
        raise SystemExit(f"ser.loop: expected 0 or 1, got {value!r}")
    return value == "1"


def _print_paths(paths) -> None:
    for p in paths:
        if "\n" in str(p):
            raise SystemExit(f"ser.loop: a path with a newline cannot be passed on: {p!r}")
        print(p)


def main(argv: list[str]) -> None:
    """python -m ser.loop mix SEED KEEP_SEED UNION [human FILE...] [selected FILE...]: the retraining sources,
       one per line;
    python -m ser.loop start PREVIOUS_RM SFT CONTINUE: the model RM_t starts from;
    python -m ser.loop stopped STATS: True when the loop's stats.json says Stop;
    python -m ser.loop reached STATS...: the furthest status of earlier loops' stats.json ('' before any)."""
    if not argv:
        raise SystemExit(main.__doc__)
    verb, args = argv[0], argv[1:]
    if verb == "mix":
        seed, keep_seed, union, rest = args[0], _bool(args[1]), _bool(args[2]), args[3:]
        human, selected, into = [], [], None
        for a in rest:
            if a in ("human", "selected"):
                into = human if a == "human" else selected
            elif into is None:
                raise SystemExit(f"ser.loop mix: {a!r} before 'human' or 'selected'")
            else:
                into.append(a)
        _print_paths(training_mix(seed, selected, human, keep_seed, union))
    elif verb == "start":
        print(start_from(args[0], args[1], _bool(args[2])))
    elif verb == "stopped":
        print(stopped(json.loads(Path(args[0]).read_text())["status"]))
    elif verb == "reached":
        print(furthest_status([json.loads(Path(a).read_text())["status"] for a in args]) or "")
    else:
        raise SystemExit(f"ser.loop: unknown question {verb!r}\n{main.__doc__}")


if __name__ == "__main__":
    main(sys.argv[1:])
