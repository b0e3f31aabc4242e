"""Learning status and selection (paper, section 3): pure functions over the RM's probabilities.

A rule takes the probabilities (p_j, p_k) the RM gives both responses of every pool pair, and the
thresholds, and returns a `Decision`: the loop's status, which pairs it selects, and how many pairs were
eligible for each status. A rule registered with `members=True` also takes other RMs' probabilities of
the same pairs (an ensemble's heads, the previous loop's RM). Rules are registered by name; the filter's
`--selection` choices are the registry's names, and ser/loop.py (which the filter, the driver and the
in-process loop call) and the property tests call the same `select`. A new rule is one function under
`@rule("name")`; a new threshold is one field of `Thresholds`, which the filter's flags are built from.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields

# The learning statuses a loop's stats.json records (the driver stops on STOP).
STATUS1, STATUS2, STOP, RELEASED = "status1", "status2", "stop", "released"


def sigmoid(x: float) -> float:
    """The logistic function, without overflow for large |x|."""
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))
MAPPINGS = ("sigmoid", "pairwise", "centred")  # r -> p (ser.loop.probabilities)


def _flag(default, help: str, **more):
    return field(default=default, metadata={"help": help, **more})


@dataclass(kw_only=True)
class Thresholds:
    """The rules' settings, declared once: the filter's ScriptArguments subclasses this, so its flags are
    these fields (with their help)."""

    left_threshold: float = _flag(0.45, "tau_low: a 'bad' response has p below this")
    right_threshold: float = _flag(0.55, "tau_high: a 'good' response has p above this")
    delta_threshold: float = _flag(0.3, "tau_delta: Status-2 gap |p_j - p_k|")
    status1_min_pairs: int = _flag(600, "Status-1 eligible pairs needed for Status 1 (the larger of this and "
                                        "--status1_min_share of the pool)")
    status2_min_pairs: int = _flag(600, "Status-2 eligible pairs needed for Status 2 (the larger of this and "
                                        "--status2_min_share of the pool)")
    status1_min_share: float = _flag(0.0, "Status-1 floor as a share of the pool (the paper's 600 of 136k: 0.0044)")
    status2_min_share: float = _flag(0.0, "Status-2 floor as a share of the pool")
    probability: str = _flag("sigmoid", "r -> p: sigmoid (p = sigmoid(r) per response, the paper); pairwise "
                                        "(p_j = sigmoid(r_j - r_k)); centred (sigmoid(r - the pool's mean reward))",
                             choices=list(MAPPINGS))
    pairwise_easy_gap: float = _flag(0.6, "--probability pairwise: Status-1 gap |p_j - p_k| (0.6: the RM gives the "
                                          "pair p >= 0.8)")
    monotone: bool = _flag(False, "the status only moves forward: once a loop reached Status 2, Status 1 is not "
                                  "tried again")

    @classmethod
    def of(cls, args) -> "Thresholds":
        """The thresholds among an object's attributes (the filter's ScriptArguments)."""
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})

    def floors(self, n: int) -> tuple[int, int]:
        """The Status-1 and Status-2 floors for a pool of n pairs."""
        return (max(self.status1_min_pairs, math.ceil(self.status1_min_share * n)),
                max(self.status2_min_pairs, math.ceil(self.status2_min_share * n)))

    def problems(self) -> list[str]:
        """What makes these thresholds select nonsense, one message per flag; empty when they are sound."""
        out = []
        for name in ("left_threshold", "right_threshold", "delta_threshold", "pairwise_easy_gap"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or not 0 <= value <= 1:
                out.append(f"--{name} {value}: a probability (gap) between 0 and 1")
        if not out and self.left_threshold > self.right_threshold:
            out.append(f"--left_threshold {self.left_threshold} is above --right_threshold {self.right_threshold}: "
                       "a pair could then be both good and bad")
        for name in ("status1_min_pairs", "status2_min_pairs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                out.append(f"--{name} {value}: at least 1 (with 0 a loop with nothing eligible selects 0 pairs "
                           "and never reaches Stop)")
        for name in ("status1_min_share", "status2_min_share"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                out.append(f"--{name} {value}: a share of the pool, between 0 and 1")
        if self.probability not in MAPPINGS:
            out.append(f"--probability {self.probability!r}: one of {', '.join(MAPPINGS)}")
        return out


@dataclass
class Decision:
    status: str
    mask: list[bool]            # selected pairs, in pool order
    status1_eligible: int
    status2_eligible: int

    @property
    def counts(self) -> dict:
        return {"status1_eligible": self.status1_eligible, "status2_eligible": self.status2_eligible}


Rule = Callable[..., Decision]
RULES: dict[str, Rule] = {}
WITH_MEMBERS: set[str] = set()  # rules that also take other RMs' probabilities


def rule(name: str, members: bool = False):
    """Register a selection rule under `name` (the filter's --selection value); with `members`, the rule
    is called with members=[(p_j, p_k), ...] of other RMs too."""
    def register(fn: Rule) -> Rule:
        RULES[name] = fn
        (WITH_MEMBERS.add if members else WITH_MEMBERS.discard)(name)
        return fn
    return register


def select(p_j: list[float], p_k: list[float], thresholds: Thresholds, name: str = "paper",
           members: list | None = None) -> Decision:
    """The status and selected pairs of a scored pool under rule `name` (called by ser/loop.py's `decide`)."""
    if name not in RULES:
        raise ValueError(f"--selection {name!r}: unknown rule; the rules are {', '.join(RULES)}")
    if name in WITH_MEMBERS:
        return RULES[name](list(p_j), list(p_k), thresholds, members=[(list(a), list(b)) for a, b in members or []])
    return RULES[name](list(p_j), list(p_k), thresholds)


def eligibility(p_j: float, p_k: float, t: Thresholds) -> tuple[bool, bool]:
    """(Status-1 eligible, Status-2 eligible) for one pair.

    With pairwise probabilities (p_k = 1 - p_j) the paper's Status-1 rule is weaker than its Status-2
    rule, so Status 2 could never be reached: there the statuses keep their meaning as easy pairs first
    (|p_j - p_k| >= pairwise_easy_gap), then the clear but smaller preferences (>= tau_delta)."""
    gap = abs(p_j - p_k)
    if t.probability == "pairwise":
        return gap >= t.pairwise_easy_gap, gap >= t.delta_threshold
    lo, hi = t.left_threshold, t.right_threshold
    return (p_j > hi and p_k < lo) or (p_k > hi and p_j < lo), gap >= t.delta_threshold


@rule("paper")
def paper(p_j, p_k, t: Thresholds) -> Decision:
    """One status per loop: Status 1 while enough pairs are Status-1 eligible, else Status 2 while enough
    are Status-2 eligible, else Stop (fewer eligible pairs than the floor: the RM has converged)."""
    return by_status([eligibility(a, b, t) for a, b in zip(p_j, p_k, strict=True)], t)


def by_status(flags: list[tuple[bool, bool]], t: Thresholds) -> Decision:
    """The paper's rule over each pair's (Status-1 eligible, Status-2 eligible) flags."""
    n1, n2 = sum(f[0] for f in flags), sum(f[1] for f in flags)
    floor1, floor2 = t.floors(len(flags))
    if n1 >= floor1:
        return Decision(STATUS1, [f[0] for f in flags], n1, n2)
    if n2 >= floor2:
        return Decision(STATUS2, [f[1] for f in flags], n1, n2)
    return Decision(STOP, [False] * len(flags), n1, n2)


def agreeing(p_j, p_k, members) -> list[bool]:
    """Pairs on which the RM and every member prefer the same response."""
    prefs = [[a >= b for a, b in zip(p_j, p_k, strict=True)]]
    prefs += [[a >= b for a, b in zip(mj, mk, strict=True)] for mj, mk in members]
    return [len(set(column)) == 1 for column in zip(*prefs)]


@rule("ensemble", members=True)
def ensemble(p_j, p_k, t: Thresholds, members) -> Decision:
    """Ensemble confidence: the paper's statuses over the mean probabilities of the RM and its members (K
    bootstrap heads of a frozen-trunk RM, or other RMs), on the pairs where all of them prefer the same
    response."""
    if not members:
        raise ValueError("--selection ensemble: needs the ensemble's members (a frozen-trunk RM trained with "
                         "--bootstrap_heads K, or --member_models)")
    n = len(members) + 1
    mean_j = [(a + sum(m[0][i] for m in members)) / n for i, a in enumerate(p_j)]
    mean_k = [(b + sum(m[1][i] for m in members)) / n for i, b in enumerate(p_k)]
    agree = agreeing(p_j, p_k, members)
    return by_status([(f[0] and g, f[1] and g) for f, g in
                      zip((eligibility(a, b, t) for a, b in zip(mean_j, mean_k)), agree)], t)


@rule("agreement", members=True)
def agreement(p_j, p_k, t: Thresholds, members) -> Decision:
    """CREAM-style consistency: the paper's statuses over this RM's probabilities, on the pairs where the
    previous loop's RM (the member) prefers the same response. With no member (loop 1 has no previous RM)
    it is the paper's rule."""
    agree = agreeing(p_j, p_k, members)
    return by_status([(f[0] and g, f[1] and g) for f, g in
                      zip((eligibility(a, b, t) for a, b in zip(p_j, p_k)), agree)], t)


@rule("released")
def released(p_j, p_k, t: Thresholds) -> Decision:
    """The released script: Status-1 eligible OR a strict gap > tau_delta, in one pass, with no count
    check and no Stop."""
    flags = [eligibility(a, b, t) for a, b in zip(p_j, p_k, strict=True)]
    mask = [f[0] or abs(a - b) > t.delta_threshold for f, a, b in zip(flags, p_j, p_k)]
    return Decision(RELEASED, mask, sum(f[0] for f in flags), sum(f[1] for f in flags))
