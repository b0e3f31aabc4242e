"""A synthetic preference task with a known gold reward, small enough for CPU minutes.

A question names a place; a response is a short list of items to bring. Each (place, item) has a
hidden gold weight, centred so that the average item of a place is worth zero, and the gold reward
of a response is the total weight of its items: good items add, bad items subtract, and a longer
list is better only if what it adds is good. Labels are sampled Bradley-Terry style from the gold reward, so they are noisy the
way human labels are. The gold reward also scores policy samples (ppo/evaluate.py).
"""

import math
import random
import re

PLACES = ["beach", "office", "garden", "kitchen"]
ITEMS = [
    "apple", "basket", "blanket", "book", "bottle", "brush", "bucket", "camera", "chair", "coat",
    "cup", "drum", "hammer", "hat", "kettle", "kite", "lamp", "map", "pencil", "rope",
    "shovel", "spoon", "tent", "towel",
]
QUESTION_TEMPLATES = [
    "What should I bring to the {place}?",
    "I am going to the {place} tomorrow. What do I need?",
    "Pack a bag for a day at the {place}.",
    "Which things are useful at the {place}?",
]
GOLD_SEED = 1234
PLACE_SHARE = 1.0
_rng = random.Random(GOLD_SEED)
# Hidden gold weights, fixed by GOLD_SEED: an item's general worth plus a smaller place-specific part.
_GENERAL = {it: _rng.gauss(0.0, 1.0) for it in ITEMS}
_RAW = {p: {it: _GENERAL[it] + PLACE_SHARE * _rng.gauss(0.0, 1.0) for it in ITEMS} for p in PLACES}
WEIGHTS = {p: {it: w - sum(ws.values()) / len(ws) for it, w in ws.items()} for p, ws in _RAW.items()}
_PLACE_RE = re.compile(r"\b(" + "|".join(PLACES) + r")\b")
_ITEM_RE = re.compile(r"\b(" + "|".join(ITEMS) + r")\b")


def make_question(rng: random.Random) -> str:
    return rng.choice(QUESTION_TEMPLATES).format(place=rng.choice(PLACES))


def make_response(rng: random.Random, min_items: int = 2, max_items: int = 6) -> str:
    """What the reference (pre-RLHF) policy writes: items drawn uniformly."""
    items = [rng.choice(ITEMS) for _ in range(rng.randint(min_items, max_items))]
    return "Bring " + ", ".join(items) + "."


def gold_reward(question: str, response: str) -> float:
    """Total gold weight of the items named in the response (0 when it names none)."""
    place = _PLACE_RE.search(question)
    if place is None:
        raise ValueError(f"question names no place of the synthetic task: {question!r}")
    weights = WEIGHTS[place.group(1)]
    return sum(weights[it] for it in _ITEM_RE.findall(response))


def sample_preference(rng: random.Random, question: str, a: str, b: str, beta: float) -> bool:
    """True when a labeller prefers `a`: P = sigmoid(beta * (gold(a) - gold(b)))."""
    diff = gold_reward(question, a) - gold_reward(question, b)
    return rng.random() < 1.0 / (1.0 + math.exp(-beta * diff))


def corpus(n: int = 2000, seed: int = 0) -> list[str]:
    """Text of the task, for training a tokenizer."""
    rng = random.Random(seed)
    return [f"Question: {make_question(rng)}\n\nAnswer: {make_response(rng)}" for _ in range(n)]
