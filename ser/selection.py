"""Learning status and selection (paper, section 3): pure functions over the RM's probabilities.

A rule takes the probabilities (p_j, p_k) the RM gives both responses of every pool pair, and the
thresholds, and returns a `Decision`: the loop's status, which pairs it selects, and how many pairs were
eligible for each status. Rules are registered by name; the filter's `--selection` choices are the
registry's names, and the filter's `main` and the property tests call the same `select`. A new rule is
one function under `@rule("name")`.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass, fields

# The learning statuses a loop's stats.json records (the driver stops on STOP).
STATUS1, STATUS2, STOP, RELEASED = "status1", "status2", "stop", "released"


def sigmoid(x: float) -> float:
    """The logistic function, without overflow for large |x|."""
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))
PROBABILITIES = ("sigmoid", "pairwise")


@dataclass(frozen=True)
class Thresholds:
    """The rule's settings, named after the filter's flags."""

    left_threshold: float = 0.45     # tau_low: a 'bad' response has p below this
    right_threshold: float = 0.55    # tau_high: a 'good' response has p above this
    delta_threshold: float = 0.3     # tau_delta: the Status-2 gap |p_j - p_k|
    status1_min_pairs: int = 600     # Status-1 eligible pairs needed for Status 1
    status2_min_pairs: int = 600     # Status-2 eligible pairs needed for Status 2
    probability: str = "sigmoid"     # sigmoid: p = sigmoid(r) per response; pairwise: p_j = sigmoid(r_j - r_k)
    pairwise_easy_gap: float = 0.6   # with pairwise probabilities, the Status-1 gap

    @classmethod
    def of(cls, args) -> "Thresholds":
        """The thresholds among an object's attributes (the filter's ScriptArguments)."""
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})

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
        if self.probability not in PROBABILITIES:
            out.append(f"--probability {self.probability!r}: one of {', '.join(PROBABILITIES)}")
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


Rule = Callable[[list[float], list[float], Thresholds], Decision]
RULES: dict[str, Rule] = {}


def rule(name: str):
    """Register a selection rule under `name` (the filter's --selection value)."""
    def register(fn: Rule) -> Rule:
        RULES[name] = fn
        return fn
    return register


def select(p_j: list[float], p_k: list[float], thresholds: Thresholds, name: str = "paper") -> Decision:
    """The status and selected pairs of a scored pool under rule `name`."""
    if name not in RULES:
        raise ValueError(f"--selection {name!r}: unknown rule; the rules are {', '.join(RULES)}")
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
    flags = [eligibility(a, b, t) for a, b in zip(p_j, p_k, strict=True)]
    n1, n2 = sum(f[0] for f in flags), sum(f[1] for f in flags)
    if n1 >= t.status1_min_pairs:
        return Decision(STATUS1, [f[0] for f in flags], n1, n2)
    if n2 >= t.status2_min_pairs:
        return Decision(STATUS2, [f[1] for f in flags], n1, n2)
    return Decision(STOP, [False] * len(flags), n1, n2)


@rule("released")
def released(p_j, p_k, t: Thresholds) -> Decision:
    """The released script: Status-1 eligible OR a strict gap > tau_delta, in one pass, with no count
    check and no Stop."""
    flags = [eligibility(a, b, t) for a, b in zip(p_j, p_k, strict=True)]
    mask = [f[0] or abs(a - b) > t.delta_threshold for f, a, b in zip(flags, p_j, p_k)]
    return Decision(RELEASED, mask, sum(f[0] for f in flags), sum(f[1] for f in flags))
