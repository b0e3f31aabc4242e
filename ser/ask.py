"""Which pool pairs to ask humans about: the RM's least certain ones, spread over different questions.

The rule (`pick`) is cheap and deterministic:
 1. each pair's uncertainty u = 1 - 2|p - 1/2|, where p = sigmoid(r_j - r_k) is the RM's probability that
    response j is the better one (u = 1 for a coin flip, 0 for certainty);
 2. one pair per question, the most uncertain one: no question is asked twice;
 3. a shortlist of the SHORTLIST * n most uncertain of those;
 4. greedy farthest-point, weighted by uncertainty: first the most uncertain pair; then, each time, the
    pair with the largest u * d, where d is the cosine distance from its vector to the nearest pair already
    chosen. The vectors are hashed word 1- and 2-grams of the question (`ngram_vectors`), or a frozen trunk's
    features. A near-duplicate of a chosen question has d near 0 and waits until the distinct ones are taken.
The order of the result is the order of choice: the first m of a longer list are the m one would ask.
Plain uncertainty sampling is the same rule with every d = 1 (`diverse=False`).
"""

import hashlib
import json
import math
import random
import re
import zlib

import torch

from ser.selection import sigmoid

CONTROL = "preference"  # the Pairwise control of the Label Studio export (data/ask_humans.py, import_labels.py)
SHORTLIST = 4  # candidates per asked pair that the greedy step considers
NGRAM_DIM = 4096  # hashed n-gram buckets


def pair_id(record) -> str:
    """A pool pair's id: its own `id` when it has one, else a hash of its texts."""
    if record.get("id") not in (None, ""):
        return str(record["id"])
    text = json.dumps([str(record[k]) for k in ("question", "response_j", "response_k")], ensure_ascii=False)
    return hashlib.sha1(text.encode()).hexdigest()[:16]  # JSON: no separator inside a text can shift a field


def pairwise_probability(reward_j: float, reward_k: float) -> float:
    """The RM's probability that response j is preferred (Bradley-Terry)."""
    return sigmoid(reward_j - reward_k)


def uncertainty(p: float) -> float:
    return 1 - 2 * abs(p - 0.5)


def ngram_vectors(texts, dim: int = NGRAM_DIM) -> torch.Tensor:
    """Unit vectors of hashed lower-cased word 1- and 2-grams (crc32 into `dim` buckets): texts that share
    most of their words are close in cosine."""
    out = torch.zeros(len(texts), dim)
    for row, text in enumerate(texts):
        words = re.findall(r"\w+", text.lower())
        for gram in words + [f"{a} {b}" for a, b in zip(words, words[1:])]:
            out[row, zlib.crc32(gram.encode()) % dim] += 1
    return torch.nn.functional.normalize(out, dim=1)


def pick(p, vectors: torch.Tensor, n: int, groups=None, diverse: bool = True, shortlist: int = SHORTLIST) -> list[int]:
    """The indices of (at most) n pairs to ask about, in the order of choice (the module's rule).

    p: each pair's probability that response j is better; vectors: one row per pair (normalised here);
    groups: a key per pair (the question), of which at most one pair is taken; None: every pair its own."""
    if n < 0:
        raise ValueError(f"n={n}: the number of pairs to ask about is 0 or more")
    if len(p) != len(vectors) or (groups is not None and len(groups) != len(p)):
        raise ValueError(f"{len(p)} probabilities, {len(vectors)} vectors and "
                         f"{len(groups) if groups is not None else len(p)} groups: one of each per pair")
    u = [uncertainty(x) for x in p]
    order = sorted(range(len(p)), key=lambda i: (-u[i], i))
    candidates = one_per_group(order, groups)[:max(n * shortlist, n)]  # the most uncertain pair of each question
    if not diverse or not candidates:
        return candidates[:n]
    vec = torch.nn.functional.normalize(vectors[candidates].float(), dim=1)
    weight = torch.tensor([u[i] for i in candidates], dtype=torch.float32)
    distance = torch.ones(len(candidates))  # to the nearest chosen pair; 1 before any is chosen
    taken = torch.zeros(len(candidates), dtype=torch.bool)
    chosen = []
    for _ in range(min(n, len(candidates))):
        score = torch.where(taken, torch.tensor(-1.0), weight * distance)
        best = int(torch.argmax(score))  # the first of equal scores: the more uncertain one
        chosen.append(candidates[best])
        taken[best] = True
        distance = torch.minimum(distance, (1 - vec @ vec[best]).clamp(min=0))
    return chosen


# ----------------------------------------------------------------------------- rules on the head's features
#
# The rules below read features: x_i = f_j - f_k, the difference of the two responses' features under the
# RM's linear head (a frozen-trunk RM's cached features), for the pair-level Fisher information and the
# bootstrap heads; and one vector per pair (f_j + f_k) for coverage. Each takes at most one pair per question
# (`groups`) and returns distinct pool indices in the order of choice.

RULES = ("uncertainty", "random", "d-optimal", "ensemble-diverse", "typical")
FEATURE_RULES = ("d-optimal", "ensemble-diverse", "typical")


def choose(rule: str, n: int, p, groups, seed: int = 0, f_j=None, f_k=None, member_p=None,
           diverse: bool = True) -> list[int]:
    """The indices of (at most) n pairs to ask about by `rule`, in the order of choice, at most one per question
    (`groups`): the one place a rule is dispatched (data/ask_humans.py and the budget study call it).
    p: each pair's probability that response j is better (the RM's); f_j, f_k: the head's features of both
    responses, for the rules in FEATURE_RULES; member_p: [K, pairs] bootstrap heads' p, for ensemble-diverse."""
    if rule == "uncertainty":
        return pick(p, ngram_vectors(groups), n, groups=groups, diverse=diverse)
    if rule == "random":
        order = list(range(len(p)))
        random.Random(f"{seed}:random").shuffle(order)
        return one_per_group(order, groups)[:n]
    if rule not in FEATURE_RULES:
        raise ValueError(f"rule {rule!r}: one of {', '.join(RULES)}")
    if f_j is None or f_k is None:
        raise ValueError(f"rule {rule}: reads the head's features f_j and f_k")
    if rule == "d-optimal":
        return d_optimal(f_j - f_k, p, n, groups)[0]
    if rule == "typical":
        return typical(f_j + f_k, n, groups, seed=seed)
    if member_p is None:
        raise ValueError("rule ensemble-diverse: reads the bootstrap heads' probabilities member_p")
    return ensemble_diverse(member_p, f_j + f_k, n, groups)


def one_per_group(order, groups) -> list[int]:
    """The indices of `order` whose group (question) has not come before."""
    seen, out = set(), []
    for i in order:
        key = i if groups is None else groups[i]
        if key not in seen:
            seen.add(key)
            out.append(i)
    return out


def d_optimal(diffs: torch.Tensor, p, n: int, groups=None, ridge: float = 1e-3) -> tuple[list[int], list[float]]:
    """Greedy D-optimal design for a Bradley-Terry head (Shen, Sun and Ton, ICML 2025): each step takes the pair
    whose Fisher information p(1-p) x x^T raises log det(ridge I + sum over the chosen) the most, i.e. the largest
    p(1-p) x^T A^-1 x (the matrix determinant lemma). A^-1 changes by a rank-one Sherman-Morrison step, so each
    pair's x^T A^-1 x is updated in O(dim), not recomputed. At most one pair per question: once one is taken,
    its question's other pairs are not. Returns the chosen indices and log det A after each choice (never
    decreasing)."""
    x = diffs.double()
    weight = torch.tensor([q * (1 - q) for q in p], dtype=torch.float64)
    a_inv = torch.eye(x.shape[1], dtype=torch.float64) / ridge
    quad = (x * x).sum(1) / ridge  # x_i^T A^-1 x_i
    logdet = x.shape[1] * math.log(ridge)
    keys = list(range(len(x))) if groups is None else list(groups)
    index = {k: i for i, k in enumerate(dict.fromkeys(keys))}
    key_ids = torch.tensor([index[k] for k in keys], dtype=torch.long)
    blocked = torch.zeros(len(x), dtype=torch.bool)
    chosen, logdets = [], []
    for _ in range(min(n, len(index))):
        gain = torch.where(blocked, torch.tensor(-1.0, dtype=torch.float64), weight * quad)
        best = int(torch.argmax(gain))
        if gain[best] < 0:
            break
        v = a_inv @ x[best]
        step = weight[best] * (x[best] @ v)
        a_inv = a_inv - weight[best] * torch.outer(v, v) / (1 + step)
        quad = quad - weight[best] * (x @ v) ** 2 / (1 + step)
        logdet += math.log1p(float(step))
        chosen.append(best)
        logdets.append(logdet)
        blocked |= key_ids == key_ids[best]
    return chosen, logdets


def ensemble_diverse(member_p: torch.Tensor, vectors: torch.Tensor, n: int, groups=None) -> list[int]:
    """The pairs K bootstrap heads disagree on most (the std of their probabilities that j is better, an
    epistemic uncertainty), spread over the trunk's feature space: `pick`'s farthest-point step with the
    disagreement as the weight and the pairs' features as the vectors. member_p: [K, pairs]."""
    disagreement = member_p.float().std(0)
    scale = float(disagreement.max()) or 1.0
    pseudo_p = (0.5 + 0.5 * (1 - disagreement / scale)).tolist()  # pick's uncertainty of this p is disagreement/scale
    return pick(pseudo_p, vectors, n, groups=groups, shortlist=max(1, len(pseudo_p)))  # every pair a candidate


def typical(vectors: torch.Tensor, n: int, groups=None, seed: int = 0, iterations: int = 30) -> list[int]:
    """Typical first (TypiClust's idea, for the smallest budgets): k-means with k = n on the pairs' features,
    then from each cluster, largest first, its most typical pair (the one nearest its centre), one per question."""
    if n == 0 or len(vectors) == 0:
        return []
    x = torch.nn.functional.normalize(vectors.float(), dim=1)
    k = min(n, len(x))
    generator = torch.Generator().manual_seed(seed)
    centres = x[torch.randperm(len(x), generator=generator)[:k]].clone()
    for _ in range(iterations):
        assign = torch.cdist(x, centres).argmin(1)
        for c in range(k):
            members = x[assign == c]
            if len(members):
                centres[c] = members.mean(0)
    distance = torch.cdist(x, centres)
    assign = distance.argmin(1)
    sizes = torch.bincount(assign, minlength=k)
    picks, seen = [], set()

    def take(i) -> bool:
        key = i if groups is None else groups[i]
        if key in seen:
            return False
        seen.add(key)
        picks.append(i)
        return True

    for c in sorted(range(k), key=lambda c: (-int(sizes[c]), c)):  # the largest cluster first
        members = (assign == c).nonzero().view(-1)
        for i in members[distance[members, c].argsort()].tolist():  # its most typical pair of a new question
            if take(i):
                break
    for i in distance.min(1).values.argsort().tolist():  # questions repeat: the next most typical pairs
        if len(picks) >= n:
            break
        take(i)
    return picks[:n]
