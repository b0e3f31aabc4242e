"""One SER loop's data step: self-label the pool, decide the learning status, select.

1. Self-label. With --reward_model_name, the RM scores both responses of every pool pair (in
   length-sorted batches, split across processes under `accelerate launch`, chunk by chunk so that a
   killed run resumes) and the scored pool is written. Without it, the pool must already carry
   `score_j`/`score_k` (the released workflow).
2. Learning status (paper, section 3). With p the RM's predicted probability of each response:
   Status 1 ("tell good from bad"): one p > tau_high and the other p < tau_low, on enough pairs;
   else Status 2 ("amplify differences"): |p_j - p_k| >= tau_delta, on enough pairs; else Stop.
   With --probability pairwise (p_j = sigmoid(r_j - r_k), p_k = 1 - p_j) the paper's Status-1 rule
   is weaker than its Status-2 rule (|r_j - r_k| > 0.20 against >= 0.62), so Status 2 could never
   be reached. There, the two statuses keep their meaning as easy pairs first, then hard ones:
   Status 1 takes the pairs the RM is sure of, |p_j - p_k| >= --pairwise_easy_gap (0.6: p >= 0.8);
   Status 2, once too few of those remain, the clear but smaller preferences, |p_j - p_k| >= tau_delta.
3. Select. The eligible pairs of the status are kept, oriented so that response_j is the response the
   RM prefers; every other pair stays in the pool for the next loop. Selected + remaining = pool.

The human label of a pool pair (`gold_preferred`, "j" or "k") is never read by steps 1-3; only the
statistics read it, to report the precision of the self-labels.
"""

import contextlib
import hashlib
import json
import math
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ser import loop
from ser.cli import get_logger, parse
from ser.data import (
    DataError,
    RecordWriter,
    check_writable,
    pool_chunks,
    read_records,
    remove_stale_temporaries,
    write_json,
    write_records,
)
from ser.flags import DataArguments, default_of, hidden
from ser.loop import probabilities
from ser.modeling import end_processes
from ser.scoring import FORWARD_COST
from ser.selection import RULES, STATUS1, STATUS2, WITH_MEMBERS, Decision, Thresholds

GOLD = "gold_preferred"
logger = get_logger("filter")


@dataclass
class ScriptArguments(DataArguments, Thresholds):
    """The filter's flags: the data flags, the rules' thresholds (ser.selection.Thresholds, declared there
    once) and these."""

    subset: str | None = default_of(DataArguments, "subset", "data/unlabeled")
    load_from_json: bool = hidden(False)  # a file pool is read as a file anyway
    seed: int = hidden(0)  # nothing here is random
    rm_next_loop_save_path: str = field(kw_only=True, metadata={"help": "where the selected (self-labelled) pairs go"})
    remaining_data_save_path: str = field(kw_only=True, metadata={
        "help": "where the rest of the pool goes, for the next loop"})
    selection: str = field(default="paper", metadata={
        "help": "a rule of ser/selection.py: paper (one status per loop, or Stop), released (Status-1 OR a gap > "
                "tau_delta, no status), ensemble (the RM and its members agree; their mean p), agreement (the "
                "previous loop's RM prefers the same response)", "choices": RULES.keys()})
    reached_status: str | None = field(default=None, metadata={
        "help": "the furthest status an earlier loop reached (the driver passes it), for --monotone",
        "choices": [STATUS1, STATUS2]})
    member_models: list[str] = field(default_factory=list, metadata={
        "help": "--selection ensemble: other RMs whose probabilities join the RM's (a frozen-trunk RM's own "
                "bootstrap heads are used without this)"})
    previous_model: str | None = field(default=None, metadata={
        "help": "--selection agreement: the previous loop's RM (the driver passes it from loop 2 on)"})
    reward_model_name: str | None = field(default=None, metadata={"help": "RM that self-labels the pool"})
    scored_save_path: str | None = field(default=None, metadata={"help": "scored pool; default: scored.jsonl beside the selection"})
    stats_save_path: str | None = field(default=None, metadata={"help": "statistics; default: stats.json beside the selection"})
    batch_size: int = field(default=32, metadata={"help": "sequences per scoring batch and process, at most"})
    forward_cost: float = field(default=FORWARD_COST, metadata={
        "help": "a forward pass's fixed cost in padded tokens: batches of similar length are cut where a new one "
                "saves more padding than this; inf: full batches"})
    chunk_pairs: int = field(default=10_000, metadata={
        "help": "pairs scored and saved at a time (tokenised ones are held per chunk); a killed run resumes after the last"})
    shared_prefix: bool = field(default=False, metadata={
        "help": "run each pair's question once and reuse its KV cache for both responses (same scores); with "
                "--feature_cache, featurise that way too"})
    shared_prefix_chunk: int = field(default=0, metadata={
        "help": "pairs whose question caches are held at once with --shared_prefix; default 4 batches"})
    dtype: str = field(default="auto", metadata={"help": "RM weights dtype: auto, float32, bfloat16, float16"})
    device: str | None = field(default=None, metadata={"help": "scoring device; default: the process's accelerator or cpu"})
    feature_cache: str | None = field(default=None, metadata={
        "help": "with a frozen-trunk RM (rm_training.py --trunk frozen): read the trunk's features from this cache "
                "(featurising what it lacks) and score them with the RM's head, instead of running the RM"})


# ----------------------------------------------------------------------------- 1. self-label


def self_label(pool, args, scored_path):
    """Add reward_j/reward_k (raw RM scores) and score_j/score_k (probabilities) to every pair of `pool`
    (what `read_pool` kept of each).

    The pool's texts are read again and scored in chunks of --chunk_pairs pairs in file order, each split
    across the processes. The main process saves each finished chunk's rewards in SCORED.parts/ (removed
    once the stage is done), so a killed run resumes after the last chunk saved; chunks saved by a run
    with another RM, pool or settings are discarded, never reused. Under DeepSpeed ZeRO-3 the RM is partitioned
    over the processes as it loads (`load_scorer`), for RMs too large for one GPU.
    """
    from tqdm.auto import tqdm

    from ser.cli import check_accelerator
    from ser.modeling import held_weights, load_scorer, load_tokenizer, model_identity, process_state
    from ser.scoring import score_pairs

    if not args.device:
        check_accelerator()
    state = process_state()
    tokenizer = load_tokenizer(args.tokenizer_name or args.reward_model_name)
    model = load_scorer(args.reward_model_name, tokenizer, args.dtype, args.device or state.device)
    parts = chunk_folder(scored_path)
    run = {"reward_model": str(Path(args.reward_model_name).resolve()), "tokenizer": args.tokenizer_name,
           "pool": str(Path(args.dataset_name).resolve()), "subset": args.subset, "pairs": len(pool),
           "chunk_pairs": args.chunk_pairs, "max_length": args.max_length, "dtype": args.dtype,
           "reward_model_files": model_identity(args.reward_model_name)}
    done = []  # the chunks saved before a kill: the main process looks, and tells the others
    if state.is_main_process:
        if parts.exists() and not parts.is_dir():
            raise ValueError(f"{parts}: a file where the filter keeps its scored chunks; move it away and rerun")
        if parts.is_dir() and saved_run(parts) != run:
            logger.warning(f"filter: {parts} holds chunks scored by another run (or an unreadable run.json); "
                           "they are discarded")
            shutil.rmtree(parts)
        parts.mkdir(parents=True, exist_ok=True)
        write_json(parts / "run.json", run)
        done = sorted(p.name for p in parts.glob("*.jsonl"))
    if state.num_processes > 1:  # one answer for all: a rank with a stale view of a shared filesystem would score
        from accelerate.utils import broadcast_object_list  # a chunk the others skip, and the forwards fall out of step

        done = broadcast_object_list([done])[0]
    chunks, resumed, start = [], 0, 0
    bar = tqdm(total=len(pool), desc="self-labelling", unit="pair", disable=not state.is_main_process)
    for c, chunk in enumerate(pool_chunks(args.dataset_name, args.subset, args.chunk_pairs)):
        part, kept = parts / f"{c:06d}.jsonl", pool[start:start + len(chunk)]
        check_same_pairs(kept, chunk)
        saved = read_part(part, chunk) if part.name in done else None  # saved before a kill: not scored again
        if saved:
            r_j, r_k = saved
            resumed += len(chunk)
        else:
            t = time.perf_counter()
            r_j, r_k, stats = score_pairs(model, tokenizer, chunk, args.max_length, args.batch_size, state,
                                          shared_prefix=args.shared_prefix, chunk_pairs=args.shared_prefix_chunk,
                                          forward_cost=args.forward_cost)
            chunks.append({**stats, "pairs_scored": len(chunk), "seconds": time.perf_counter() - t})
            if state.is_main_process:
                write_records(part, [part_record(p, a, b) for p, a, b in zip(chunk, r_j, r_k)])
        set_scores(kept, r_j, r_k, args)
        start += len(chunk)
        bar.update(len(chunk))
    bar.close()
    stats = merge_scoring(chunks, state.num_processes)
    held = held_weights(model)
    stats.update(chunks=c + 1, resumed_pairs=resumed,
                 rm_partitioned=getattr(model, "zero_optimization_stage", lambda: 0)() == 3,  # ZeRO-3 shards
                 rm_share_held=round(held[0] / held[1], 4))  # of the RM's weights, by the main process
    return state, stats


def set_scores(pairs, r_j, r_k, args) -> None:
    """Each pair's rewards, and its probabilities by --probability (ser.loop.probabilities)."""
    p_j, p_k = probabilities(r_j, r_k, args.probability)
    for pair, a, b, x, y in zip(pairs, r_j, r_k, p_j.tolist(), p_k.tolist(), strict=True):
        pair["reward_j"], pair["reward_k"], pair["score_j"], pair["score_k"] = a, b, x, y


def member_probabilities(pool, args) -> list:
    """Other RMs' (p_j, p_k) of the pool's pairs, for the rules that read them: a frozen-trunk RM's bootstrap
    heads and --member_models (ensemble), or --previous_model (agreement). Frozen-trunk RMs are scored from
    the cache with --feature_cache, any other RM by running it."""
    from ser import features

    paths = args.member_models if args.selection == "ensemble" else [args.previous_model] if args.previous_model else []
    if not args.reward_model_name:
        raise ValueError(f"--selection {args.selection}: needs --reward_model_name (its members score the pool too)")
    out, ids = [], []  # the pool's token ids, tokenised once when a member reads the cache

    def cached():
        if not ids:
            ids.extend(cached_ids(args))
        return ids

    if args.selection == "ensemble" and args.feature_cache and (features.frozen_info(args.reward_model_name) or {}).get(
            "bootstrap_heads"):
        for r_j, r_k in features.bootstrap_rewards(args.feature_cache, *cached(), args.reward_model_name):
            out.append(probabilities(r_j, r_k, args.probability))
    for path in paths:
        if args.feature_cache and features.frozen_info(path):
            features.check_trunk(features.frozen_info(path), path)
            ids_j, ids_k = cached()
            r_j, r_k = features.rewards(args.feature_cache, ids_j, path), features.rewards(args.feature_cache, ids_k, path)
        else:
            r_j, r_k = score_whole_pool(path, args)
        out.append(probabilities(r_j, r_k, args.probability))
    if args.selection == "ensemble" and not out:
        raise ValueError("--selection ensemble: no members: train the frozen-trunk RM with --bootstrap_heads K (and "
                         "pass --feature_cache), or pass --member_models")
    return [(a.tolist(), b.tolist()) for a, b in out]


def cached_ids(args):
    """Token ids of both responses of every pool pair, as the cache keys them."""
    from ser.data import encode
    from ser.modeling import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer_name or args.reward_model_name)
    ids_j, ids_k = [], []
    for chunk in pool_chunks(args.dataset_name, args.subset, args.chunk_pairs):
        for r in chunk:
            ids_j.append(encode(tokenizer, r["question"], r["response_j"], args.max_length)["input_ids"])
            ids_k.append(encode(tokenizer, r["question"], r["response_k"], args.max_length)["input_ids"])
    return ids_j, ids_k


def score_whole_pool(path, args):
    """A member RM's rewards of the pool, run on this process."""
    from ser.modeling import THIS_PROCESS_ONLY, check_reward_model, load_scorer, load_tokenizer
    from ser.scoring import score_pairs

    check_reward_model(path)
    tokenizer = load_tokenizer(args.tokenizer_name or path)
    model = load_scorer(path, tokenizer, args.dtype, args.device or "cpu")
    r_j, r_k = [], []
    for chunk in pool_chunks(args.dataset_name, args.subset, args.chunk_pairs):
        a, b, _ = score_pairs(model, tokenizer, chunk, args.max_length, args.batch_size, THIS_PROCESS_ONLY,
                              forward_cost=args.forward_cost)
        r_j += a
        r_k += b
    return r_j, r_k


def self_label_cached(pool, args):
    """Self-labelling by a frozen-trunk RM (rm_training.py --trunk frozen) from the trunk's cached features:
    rewards = features @ head. What the cache lacks is featurised first (split across processes)."""
    from ser import features
    from ser.data import encode
    from ser.modeling import load_tokenizer, process_state

    info = features.frozen_info(args.reward_model_name)
    if info is None:
        raise ValueError(f"--feature_cache {args.feature_cache}: {args.reward_model_name} is not a frozen-trunk RM "
                         "(rm_training.py --trunk frozen writes frozen_trunk.json); drop --feature_cache to score it")
    features.check_trunk(info, args.reward_model_name)  # features of a changed trunk would not be this RM's
    state, start = process_state(), time.perf_counter()
    tokenizer = load_tokenizer(args.tokenizer_name or args.reward_model_name)
    ids_j, ids_k, truncated = [], [], 0
    for chunk in pool_chunks(args.dataset_name, args.subset, args.chunk_pairs):
        for r in chunk:
            j, k = (encode(tokenizer, r["question"], r[side], args.max_length) for side in ("response_j", "response_k"))
            ids_j.append(j["input_ids"])
            ids_k.append(k["input_ids"])
            truncated += j["truncated"] + k["truncated"]
    built = features.build_cache(args.feature_cache, info["trunk"], tokenizer.pad_token_id, ids_j + ids_k,
                                 args.max_length, [info["layer"]], args.batch_size, args.dtype, None, state,
                                 shared_prefix=args.shared_prefix)
    set_scores(pool, features.rewards(args.feature_cache, ids_j, args.reward_model_name),
               features.rewards(args.feature_cache, ids_k, args.reward_model_name), args)
    seconds = time.perf_counter() - start
    return state, {"feature_cache": str(args.feature_cache), "feature_layer": info["layer"], "pairs_scored": len(pool),
                   "sequences": 2 * len(pool), "truncated": truncated, "processes": state.num_processes,
                   "seconds": seconds, "pairs_per_second": len(pool) / seconds if seconds else None, **built}


def chunk_folder(scored_path) -> Path:
    return Path(f"{scored_path}.parts")


def fingerprint(pair) -> str:
    """A short hash of a pair's texts: a saved chunk is reused only for the same pairs."""
    text = "\0".join(str(pair.get(k)) for k in ("id", "question", "response_j", "response_k"))
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def saved_run(parts: Path):
    """The run.json of a chunk folder, or None when it is missing or unreadable."""
    try:
        return json.loads((parts / "run.json").read_text())
    except (OSError, ValueError):
        return None


def _check(fp: str, reward_j, reward_k) -> str:
    return hashlib.sha1(f"{fp} {reward_j!r} {reward_k!r}".encode()).hexdigest()[:16]


def part_record(pair, reward_j, reward_k) -> dict:
    """One scored pair of a saved chunk, with a check over its fingerprint and rewards."""
    fp = fingerprint(pair)
    return {"pair": fp, "reward_j": reward_j, "reward_k": reward_k, "check": _check(fp, reward_j, reward_k)}


def read_part(part: Path, chunk):
    """A saved chunk's rewards, or None (the chunk is scored again, with a warning) when the part is damaged:
    unreadable, of other pairs, or with a reward that is not a number or not the one its check was written for."""
    try:
        saved = read_records(part)
        ok = [r.get("pair") for r in saved] == [fingerprint(p) for p in chunk] and all(
            isinstance(r.get("reward_j"), float) and isinstance(r.get("reward_k"), float)
            and r.get("check") == _check(r["pair"], r["reward_j"], r["reward_k"]) for r in saved)
    except DataError:
        ok = False
    if not ok:
        logger.warning(f"filter: {part} is damaged (unreadable, other pairs, or a reward that fails its check); "
                       "its chunk is scored again")
        return None
    return [r["reward_j"] for r in saved], [r["reward_k"] for r in saved]


def merge_scoring(chunks, processes) -> dict:
    """One record of the scoring figures of the chunks scored by this run (counts summed, shares and rates
    over the totals)."""
    total = {k: sum(c.get(k, 0) for c in chunks) for k in ("pairs_scored", "sequences", "pairs", "scored_here",
                                                            "tokenised_here", "truncated", "tokens", "tokens_run",
                                                            "tokens_plain", "padded_tokens", "seconds")}
    shared = any(c.get("shared_prefix") for c in chunks)
    run = total["tokens_run"] if shared else total["tokens"]
    stats = {k: v for k, v in total.items() if v or k in ("sequences", "scored_here")}
    stats.update(processes=processes, shared_prefix=shared,
                 padding_share=1 - run / total["padded_tokens"] if total["padded_tokens"] else 0.0,
                 pairs_per_second=total["pairs_scored"] / total["seconds"] if total["seconds"] else None)
    if shared:
        stats["shared_prefix_token_saving"] = 1 - run / total["tokens_plain"] if total["tokens_plain"] else 0.0
    return stats


# ----------------------------------------------------------------------------- 2. status


def decide(pool, args, members=None) -> Decision:
    """The loop's status and the pairs it selects: ser/loop.py's `decide` with the registered rule
    --selection (ser/selection.py) over the pool's probabilities."""
    return loop.decide([p["score_j"] for p in pool], [p["score_k"] for p in pool], Thresholds.of(args),
                       args.selection, args.reached_status, members)


# ----------------------------------------------------------------------------- 3. select


def orient(pair):
    """response_j becomes the response the RM prefers (the higher p); the human label follows it."""
    if pair["score_j"] >= pair["score_k"]:
        return dict(pair)
    swapped = dict(pair)
    for a, b in (("response_j", "response_k"), ("score_j", "score_k"), ("reward_j", "reward_k")):
        if a in pair:
            swapped[a], swapped[b] = pair[b], pair[a]
    if GOLD in pair:
        swapped[GOLD] = {"j": "k", "k": "j"}[pair[GOLD]]
    return swapped


def select_pairs(pool, args, members=None):
    """An in-memory pool's status, selected pairs (oriented), remaining pairs and counts (`main` streams
    the same steps: `decide`, then `orient` as it writes)."""
    decision = decide(pool, args, members)
    selected = [orient(p) for p, keep in zip(pool, decision.mask) if keep]
    remaining = [p for p, keep in zip(pool, decision.mask) if not keep]
    return decision.status, selected, remaining, decision.counts


def histogram(values, lo=0.0, hi=1.0, bins=10):
    """Counts in `bins` equal bins over [lo, hi], computed in halves so that rewards near ±1e308 do not overflow."""
    span = hi / 2 - lo / 2
    counts = Counter(min(bins - 1, max(0, int((v / 2 - lo / 2) / span * bins))) if span > 0 else 0 for v in values)
    return {"edges": [lo * (1 - i / bins) + hi * (i / bins) for i in range(bins + 1)],
            "counts": [counts[i] for i in range(bins)]}


def statistics(pool, mask, status, counts, args, scoring=None):
    selected = [p for p, keep in zip(pool, mask) if keep]
    gold = [p for p in selected if GOLD in p]
    seen = Counter(p["texts"] for p in pool)
    stats = {
        "status": status, "selection": args.selection, "probability": args.probability,
        "pool": len(pool), "selected": len(selected), "remaining": len(pool) - len(selected), **counts,
        # a pair that occurs twice counts twice toward the status thresholds: say how many there are
        "duplicate_pairs": sum(n - 1 for n in seen.values() if n > 1),
        "thresholds": {"tau_low": args.left_threshold, "tau_high": args.right_threshold,
                       "tau_delta": args.delta_threshold, "pairwise_easy_gap": args.pairwise_easy_gap,
                       "status1_min_pairs": args.status1_min_pairs,
                       "status2_min_pairs": args.status2_min_pairs, "status1_min_share": args.status1_min_share,
                       "status2_min_share": args.status2_min_share, "monotone": args.monotone,
                       "floors": Thresholds.of(args).floors(len(pool))},
        "reached_status": args.reached_status,
        # the self-label precision against the hidden human labels (key name kept for results files)
        # (a selected pair is oriented to the response the RM prefers: the label agrees when it names that one)
        "pseudo_label_precision": sum((p[GOLD] == "j") == (p["score_j"] >= p["score_k"]) for p in gold) / len(gold)
        if gold else None,
        "pseudo_label_pairs_with_gold": len(gold),
        "score_histogram": histogram([p[k] for p in pool for k in ("score_j", "score_k")]),
    }
    if pool and "reward_j" in pool[0]:
        rewards = [p[k] for p in pool for k in ("reward_j", "reward_k")]
        stats["reward_histogram"] = histogram(rewards, min(rewards), max(rewards) + 1e-9)
    stats["args"] = {k: v for k, v in vars(args).items()}
    if scoring:
        stats["max_length"] = args.max_length
        stats["scoring"] = scoring  # includes the number of processes that shared the scoring
    return stats


KEPT = ("_source", "_line", GOLD, "score_j", "score_k", "reward_j", "reward_k")


def read_pool(args) -> list[dict]:
    """Every pool pair checked, and what selection and the statistics need of it kept: where it is, its
    human label, any scores it carries and a hash of its texts. The texts are read again, chunk by
    chunk, to score them and to write the outputs, so memory does not grow with their size."""
    pool = []
    for chunk in pool_chunks(args.dataset_name, args.subset, args.chunk_pairs):
        for r in chunk:
            pool.append({**{k: r[k] for k in KEPT if k in r}, "texts": texts_hash(r)})
    return pool


def texts_hash(pair) -> int:
    """The same for the same question and responses, in either order (a repeated pair)."""
    return hash((pair["question"], frozenset((pair["response_j"], pair["response_k"]))))


def check_same_pairs(kept, chunk) -> None:
    """The pool read again must be the pool read first."""
    for k, r in zip(kept, chunk, strict=True):
        if k["texts"] != texts_hash(r):
            raise ValueError(f"{r['_source']}:{r['_line']}: the pool changed while the filter ran; nothing was written")


def write_outputs(pool, mask, args, scored_path=None) -> None:
    """The scored pool (with an RM), the selected pairs (oriented) and the remaining ones, all written in
    one more pass over the pool's texts; each file appears whole at the end, or not at all."""
    with contextlib.ExitStack() as files:
        selected = files.enter_context(RecordWriter(args.rm_next_loop_save_path))
        remaining = files.enter_context(RecordWriter(args.remaining_data_save_path))
        scored = files.enter_context(RecordWriter(scored_path)) if scored_path else None
        start = 0
        for chunk in pool_chunks(args.dataset_name, args.subset, args.chunk_pairs):
            kept = pool[start:start + len(chunk)]
            check_same_pairs(kept, chunk)
            for record, pair, keep in zip(chunk, kept, mask[start:start + len(chunk)]):
                record.update({k: pair[k] for k in ("reward_j", "reward_k", "score_j", "score_k") if k in pair})
                if scored:
                    scored.write(record)
                (selected.write(orient(record)) if keep else remaining.write(record))
            start += len(chunk)


def check_scores(pool, args, keys=("score_j", "score_k")):
    """Every score a finite number (not a boolean), before anything is written."""
    for pair in pool:
        for key in keys:
            value = pair.get(key)
            where = f"{pair.get('_source', args.dataset_name)}:{pair.get('_line', '?')}: field '{key}'"
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                hint = "" if args.reward_model_name else "; pass --reward_model_name to self-label the pool"
                said = "missing" if key not in pair else f"is {value!r}, expected a number"
                raise ValueError(f"{where} {said}{hint}")
            if not math.isfinite(value):
                source = f"the reward model {args.reward_model_name} returned it" if args.reward_model_name else \
                    "the pool holds it"
                raise ValueError(f"{where} is {value} ({source}); nothing was written")
            if key.startswith("score_") and not 0 <= value <= 1:
                raise ValueError(f"{where} is {value}, expected the RM's probability, in [0, 1]; nothing was written")


def check_args(args, scored_path, stats_path) -> None:
    """Refuse, naming the flag, what would select nonsense or write over a file it reads or writes."""
    problems = Thresholds.of(args).problems()
    for name in ("chunk_pairs", "batch_size"):
        if getattr(args, name) < 1:
            problems.append(f"--{name} {getattr(args, name)}: at least 1")
    if not args.forward_cost >= 0:  # NaN too
        problems.append(f"--forward_cost {args.forward_cost}: a number of tokens, 0 or more (inf: full batches)")
    outputs = {"--rm_next_loop_save_path": args.rm_next_loop_save_path,
               "--remaining_data_save_path": args.remaining_data_save_path,
               "--scored_save_path": scored_path, "--stats_save_path": stats_path}
    seen = {}
    for flag, path in outputs.items():
        resolved = Path(path).resolve()
        if resolved in seen:
            problems.append(f"{flag} and {seen[resolved]} are the same file {path}: one would overwrite the other")
        seen[resolved] = flag
        if Path(args.dataset_name).exists() and resolved == Path(args.dataset_name).resolve():
            problems.append(f"{flag} is the pool it reads (--dataset_name {args.dataset_name})")
    if problems:
        raise ValueError("rm_loop_filter_by_self.py: " + "; ".join(problems) + "; nothing was written")


def main(args: ScriptArguments):
    out_dir = Path(args.rm_next_loop_save_path).parent
    scored_path = args.scored_save_path or out_dir / "scored.jsonl"
    stats_path = Path(args.stats_save_path or out_dir / "stats.json")
    check_args(args, scored_path, stats_path)
    if args.reward_model_name:
        from ser.modeling import check_reward_model

        check_reward_model(args.reward_model_name)  # before any work: a bad folder is named, not a tokenizer error
    check_writable(args.rm_next_loop_save_path, args.remaining_data_save_path, scored_path, stats_path)
    stats_path.unlink(missing_ok=True)  # the done marker goes before the first new write (a re-run into a done folder)
    stale = remove_stale_temporaries(args.rm_next_loop_save_path, args.remaining_data_save_path, scored_path, stats_path)
    pool = read_pool(args)
    if not pool:
        raise ValueError(f"{args.dataset_name}: the pool is empty; there is nothing to self-label "
                         "(an exhausted pool stops the loop before this stage)")
    scoring = None
    if args.reward_model_name:
        state, scoring = self_label_cached(pool, args) if args.feature_cache else self_label(pool, args, scored_path)
        end_processes()  # what follows is the main process's alone: it selects and writes
        if not state.is_main_process:
            return
        check_scores(pool, args, ("reward_j", "reward_k"))
    else:
        from ser.modeling import process_state

        process_state()  # the scores come from the file; the state is the logger's
        check_scores(pool, args)
    members = member_probabilities(pool, args) if args.selection in WITH_MEMBERS else None
    decision = decide(pool, args, members)
    status = decision.status
    write_outputs(pool, decision.mask, args, scored_path if args.reward_model_name else None)
    stats = statistics(pool, decision.mask, status, decision.counts, args, scoring)
    stats["stale_temporaries_removed"] = [str(p) for p in stale]  # left by a killed write of an earlier run
    write_json(stats_path, stats)  # written last: marks the step done
    shutil.rmtree(chunk_folder(scored_path), ignore_errors=True)
    precision = stats["pseudo_label_precision"]
    if stats["duplicate_pairs"]:
        logger.warning(f"filter: warning: {stats['duplicate_pairs']} pool pairs repeat an earlier one (same question "
                       "and responses) and count again toward the status thresholds")
    logger.info(f"filter: {status}; {stats['selected']} of {len(pool)} pairs selected "
                f"(status-1 eligible {decision.status1_eligible}, status-2 eligible {decision.status2_eligible})"
                + (f", self-label precision {precision:.3f}" if precision is not None else ""))


if __name__ == "__main__":
    main(*parse([ScriptArguments]))
