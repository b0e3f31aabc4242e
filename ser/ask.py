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
    seen, candidates = set(), []
    for i in order:  # the most uncertain pair of each question
        key = i if groups is None else groups[i]
        if key not in seen:
            seen.add(key)
            candidates.append(i)
    candidates = candidates[:max(n * shortlist, n)]
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
