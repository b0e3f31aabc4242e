"""Batched reward scoring of pairs (length-sorted batches, the shared-prefix scorer), split over processes,
and the pairwise loss and metrics every stage reports."""

import itertools
import math
import time

import torch
from accelerate import PartialState
from tqdm.auto import tqdm

from ser.data import encode
from ser.modeling import THIS_PROCESS_ONLY, process_state, whole_numel

FORWARD_COST = 64  # a forward pass's fixed cost, counted in padded tokens (see `length_batches`)


def length_batches(lengths, max_rows: int, forward_cost: float = FORWARD_COST) -> list[list[int]]:
    """Indices of `lengths` in batches of at most `max_rows` sequences of similar length, shortest first.

    Each batch is padded to its own longest. Of all the ways to cut the length-sorted order into batches,
    this takes the one with the fewest padded tokens plus `forward_cost` tokens per batch (the fixed cost
    of a forward pass, which keeps batches from shrinking to single sequences), found exactly by dynamic
    programming in len(lengths) x max_rows steps. A `forward_cost` of math.inf gives full batches of
    `max_rows`, as plain length-sorted batching does.
    """
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    if math.isinf(forward_cost):
        return [order[i:i + max_rows] for i in range(0, len(order), max_rows)]
    n = len(order)
    best, start = [0.0] + [math.inf] * n, [0] * (n + 1)  # best[i]: the cost of order[:i]; start[i]: its last batch's
    for i in range(1, n + 1):
        width = lengths[order[i - 1]]  # the longest of any batch that ends at i
        for j in range(max(0, i - max_rows), i):  # the largest batch first: ties keep it
            cost = best[j] + width * (i - j) + forward_cost
            if cost < best[i]:
                best[i], start[i] = cost, j
    return runs(order, start)


def runs(order, start) -> list[list]:
    """The runs a segmentation by dynamic programming cut `order` into, from `start` (each end's run start)."""
    out, i = [], len(order)
    while i:
        out.append(order[start[i]:i])
        i = start[i]
    return out[::-1]


def deal_out(lengths, state) -> list[int]:
    """This process's share of items of these lengths: every item in length order, then each
    world_size-th from this rank, so each item goes to exactly one process and shares have similar lengths."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    return order[state.process_index::state.num_processes]


def gather_parts(part, state) -> list:
    """Every process's `part`, in rank order (this one's alone in a single process)."""
    if state.num_processes == 1:
        return [part]
    from accelerate.utils import gather_object

    return gather_object([part])


def in_step(counts: list[int], state) -> list[int]:
    """This process's planned forward passes, step by step, each raised to the most any process of `state`
    plans (a process with fewer steps plans 0 for the rest), so all run the same passes, as ZeRO-3 needs."""
    return [max(c) for c in itertools.zip_longest(*gather_parts(counts, state), fillvalue=0)]


def score(model, tokenizer, questions, responses, max_length: int, batch_size: int = 32,
          state: PartialState | None = None, progress: str | None = None,
          forward_cost: float = FORWARD_COST) -> tuple[list[float], dict]:
    """Reward of each (question, response), in input order, on every process (see `score_ids`).

    Each process tokenises only its own share: the pairs are dealt out by character length (a close proxy
    for token length) before tokenising, so memory per process does not grow with the whole pool.
    """
    state = state or process_state()
    mine = deal_out([len(q) + len(r) for q, r in zip(questions, responses)], state)
    encoded = [encode(tokenizer, questions[i], responses[i], max_length) for i in mine]
    rewards, stats = score_ids(model, tokenizer, [e["input_ids"] for e in encoded], batch_size, THIS_PROCESS_ONLY,
                               progress if state.process_index == 0 else None, forward_cost, in_step_with=state)
    parts = gather_parts((dict(zip(mine, rewards)), sum(e["truncated"] for e in encoded)), state)
    merged = {i: r for part, _ in parts for i, r in part.items()}
    stats.update(sequences=len(questions), processes=state.num_processes, scored_here=len(mine),
                 tokenised_here=len(mine), truncated=sum(t for _, t in parts))
    return [merged[i] for i in range(len(questions))], stats


@torch.no_grad()
def score_ids(model, tokenizer, sequences, batch_size: int = 32, state: PartialState | None = None,
              progress: str | None = None, forward_cost: float = FORWARD_COST,
              in_step_with: PartialState | None = None, heads: bool = False) -> tuple[list, dict]:
    """Reward of each token sequence (already `encode`d), in input order, on every process; with `heads`, the
    list of every score head's reward (an RM scoring with several heads) instead of the first head's.

    Sequences go in batches of similar length (`length_batches`: file order wastes about half of the
    compute on padding on real data). With several processes, rank r scores every world_size-th sequence
    of the length order, so each sequence is scored exactly once and ranks get similar lengths. Every
    process of `in_step_with` (default `state`) runs the same number of forward passes (a process short of
    a batch runs a one-token dummy), which ZeRO-3 needs.
    With `progress` (a description), the main process shows a tqdm bar of the sequences it scores.
    """
    state = state or process_state()
    mine = deal_out([len(s) for s in sequences], state)
    batches = [[mine[i] for i in b] for b in length_batches([len(sequences[i]) for i in mine], batch_size, forward_cost)]
    n_batches = in_step([len(batches)], in_step_with or state)[0]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    rewards, real_tokens, padded_tokens = {}, 0, 0
    start = time.perf_counter()
    bar = tqdm(total=len(mine), desc=progress, unit="seq", disable=progress is None or state.process_index != 0)
    for b in range(n_batches):
        idx = batches[b] if b < len(batches) else []
        bar.update(len(idx))
        seqs = [sequences[i] for i in idx] or [[tokenizer.eos_token_id]]
        input_ids, attention_mask = _right_padded(seqs, tokenizer.pad_token_id)
        logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False).logits
        for i, value in zip(idx, (logits if heads else logits[:, 0]).float().cpu().tolist()):
            rewards[i] = value
        real_tokens += sum(len(sequences[i]) for i in idx)
        padded_tokens += input_ids.numel() if idx else 0
    seconds = time.perf_counter() - start
    bar.close()
    if was_training:
        model.train()
    rewards = {i: r for part in gather_parts(rewards, state) for i, r in part.items()}
    stats = {
        "sequences": len(sequences), "processes": state.num_processes, "scored_here": len(mine),
        "tokens": real_tokens, "padded_tokens": padded_tokens, "seconds": seconds, "forward_passes": n_batches,
        "padding_share": 1 - real_tokens / padded_tokens if padded_tokens else 0.0,
        "sequences_per_second": len(mine) / seconds if seconds > 0 else float("nan"),
        "tokens_per_second": real_tokens / seconds if seconds > 0 else float("nan"),
        # model FLOP/s actually spent (forward = 2 FLOPs per parameter per token, padding included)
        "model_tflops": 2 * sum(whole_numel(p) for p in model.parameters()) * padded_tokens / seconds / 1e12
        if seconds > 0 else float("nan"),
    }
    return [rewards[i] for i in range(len(sequences))], stats


def score_pairs(model, tokenizer, records, max_length: int, batch_size: int = 32, state=None, progress=None,
                shared_prefix: bool = False, chunk_pairs: int = 0, forward_cost: float = FORWARD_COST):
    """(r_j, r_k, stats) for pair records: both sides scored in one pass in batches of similar length, or,
    with `shared_prefix`, by `score_pairs_shared` (the question run once per pair, `chunk_pairs` at a time)."""
    n = len(records)
    if shared_prefix:
        state = state or process_state()
        mine = deal_out([len(r["question"]) + len(r["response_j"]) + len(r["response_k"]) for r in records], state)
        encoded = {i: (encode(tokenizer, records[i]["question"], records[i]["response_j"], max_length)["input_ids"],
                       encode(tokenizer, records[i]["question"], records[i]["response_k"], max_length)["input_ids"])
                   for i in mine}
        r_j, r_k, stats = score_pairs_shared(model, tokenizer, encoded, batch_size, progress if state.process_index == 0
                                             else None, chunk_pairs, forward_cost, in_step_with=state)
        merged = {i: rs for part in gather_parts(dict(zip(encoded, zip(r_j, r_k))), state) for i, rs in part.items()}
        stats.update(pairs=n, processes=state.num_processes, scored_here=len(mine))
        return [merged[i][0] for i in range(n)], [merged[i][1] for i in range(n)], stats
    questions = [r["question"] for r in records] * 2
    responses = [r["response_j"] for r in records] + [r["response_k"] for r in records]
    rewards, stats = score(model, tokenizer, questions, responses, max_length, batch_size, state, progress, forward_cost)
    return rewards[:n], rewards[n:], stats


def common_prefix(a, b) -> int:
    """Tokens the two sequences share at the start, leaving each at least its last token."""
    n, limit = 0, min(len(a), len(b)) - 1
    while n < limit and a[n] == b[n]:
        n += 1
    return n


def _right_padded(rows, pad_id):
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, :len(r)] = 1
    return ids, mask


def _stacked_cache(prefixes, width):
    """One DynamicCache for a batch from each row's own prefix keys and values (a list per layer of
    unpadded (keys, values); None for a row without a prefix), right-padded with zeros to `width`."""
    from transformers import DynamicCache

    layers = next(p for p in prefixes if p)
    stacked = []
    for layer, (k0, v0) in enumerate(layers):
        keys = k0.new_zeros(len(prefixes), k0.shape[0], width, k0.shape[2])
        values = v0.new_zeros(len(prefixes), v0.shape[0], width, v0.shape[2])
        for row, prefix in enumerate(prefixes):
            if prefix:
                k, v = prefix[layer]
                keys[row, :, :k.shape[1]], values[row, :, :v.shape[1]] = k, v
        stacked.append((keys, values))
    return DynamicCache(ddp_cache_data=stacked)


def score_pairs_shared(model, tokenizer, pairs: dict, batch_size: int = 32, progress: str | None = None,
                       chunk_pairs: int = 0, forward_cost: float = FORWARD_COST,
                       in_step_with: PartialState | None = None) -> tuple[list[float], list[float], dict]:
    """Rewards of both sides of each pair of token sequences ({key: (ids_j, ids_k)}, scored on this process
    only), running the prefix they share (the question) once and reusing its KV cache for each side
    (`run_shared`). The scores equal `score_ids`'s on the whole sequences up to float rounding."""
    def reward(output, last):
        return output.logits[:, 0].float().cpu().tolist()

    values, stats = run_shared(model, tokenizer.pad_token_id, tokenizer.eos_token_id, pairs, reward, batch_size,
                               progress, chunk_pairs, forward_cost, in_step_with)
    return [values[k][0] for k in pairs], [values[k][1] for k in pairs], stats


def shared_prefix(group) -> int:
    """Tokens every sequence of the group shares at the start, leaving each at least its last token."""
    return min((common_prefix(group[0], other) for other in group[1:]), default=0)


def prefix_groups(sequences, max_group: int = 64) -> list[list[int]]:
    """Indices of `sequences` in groups that share a prefix, chosen to save the most tokens when each group's
    shared prefix runs once (`run_shared`): the sequences sorted, then cut into runs of at most `max_group` by
    dynamic programming over (members - 1) x shared prefix. Both sides of a pair, or every response to one
    question, fall into one group; a prefix every sequence shares (a chat template's system prompt) does not
    merge different questions when their own groups save more."""
    order = sorted(range(len(sequences)), key=lambda i: sequences[i])
    n = len(order)
    neighbour = [common_prefix(sequences[order[i]], sequences[order[i + 1]]) for i in range(n - 1)]
    best, start = [0] + [-1] * n, [0] * (n + 1)  # best[i]: most tokens saved by order[:i]; start[i]: its last run's
    for i in range(1, n + 1):
        shared = None
        for j in range(i - 1, max(-1, i - 1 - max_group), -1):  # the run order[j:i], growing to the left
            shared = math.inf if j == i - 1 else min(shared, neighbour[j])
            saved = best[j] + (0 if j == i - 1 else (i - j - 1) * shared)
            if saved > best[i]:
                best[i], start[i] = saved, j
    return runs(order, start)


@torch.no_grad()
def run_shared(model, pad_id: int, eos_id: int, groups: dict, read, batch_size: int = 32, progress: str | None = None,
               chunk_groups: int = 0, forward_cost: float = FORWARD_COST, in_step_with: PartialState | None = None,
               **model_kwargs) -> tuple[dict, dict]:
    """`read`'s value for every sequence of each group of token sequences ({key: [ids, ...]}, on this process
    only; a pair is a group of two), running the prefix a group shares (a pair's question) once and reusing
    its KV cache for each member: {key: [value per member]}. `read(output, last)` turns a continuation
    batch's model output into one value per row; `last` holds each row's last real position in the batch.

    The groups, sorted by prefix length, go in chunks of `chunk_groups` (default 4 batches), in two passes:
    1. the chunk's prefixes in batches of similar length (`length_batches`); each prefix's keys and values
       are kept without their padding;
    2. the chunk's continuations, members of all its groups mixed, in batches of similar length of their own:
       each runs over the stacked cache of its own prefix (right-padded, the padding masked out), with
       positions continuing from that prefix's length.
    A cache's padding never runs through the projections and MLP, so the padding left is the continuations'
    and the prefixes' own; a group that shares nothing runs whole, over an empty prefix. But a continuation
    batch carries the cache of its longest prefix, and the rows of shorter prefixes pay for it in attention
    and in the copies that stack the caches, so a chunk is kept to a narrow range of prefix lengths; larger
    chunks sort the continuations better and pad less.
    A chunk's prefix caches are held at once: layers x 2 x KV heads x head size x prefix tokens (for
    SmolLM2-135M in bf16, 23 KB a token; Llama-3-8B, 131 KB).
    Every process of `in_step_with` runs the same number of chunks and of forward passes in each (dummy ones
    when short), so ZeRO-3-partitioned processes stay in step.
    """
    chunk_groups = chunk_groups or 4 * batch_size
    splits = {k: shared_prefix(groups[k]) for k in groups}
    keys = sorted(groups, key=lambda k: (splits[k], sum(map(len, groups[k]))))
    plan = []  # per chunk: its keys, its batches of prefixes (keys) and of continuations ((key, member))
    for start in range(0, len(keys), chunk_groups):
        chunk = keys[start:start + chunk_groups]
        shared = [k for k in chunk if splits[k]]
        items = [(k, m) for k in chunk for m in range(len(groups[k]))]
        plan.append((chunk, [[shared[i] for i in b] for b in length_batches([splits[k] for k in shared], batch_size,
                                                                              forward_cost)],
                     [[items[i] for i in b] for b in length_batches(
                         [len(groups[k][m]) - splits[k] for k, m in items], batch_size, forward_cost)]))
    counts = in_step([n for _, p, c in plan for n in (len(p), len(c))], in_step_with or THIS_PROCESS_ONLY)
    steps = list(zip(counts[::2], counts[1::2]))  # per chunk: prefix and continuation forwards
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    values = {k: [None] * len(groups[k]) for k in groups}
    run_tokens, padded_tokens = 0, 0
    bar = tqdm(total=len(keys), desc=progress, unit="group", disable=progress is None)
    for c, (n_prefix, n_continuation) in enumerate(steps):
        chunk, prefix_batches, continuation_batches = plan[c] if c < len(plan) else ([], [], [])
        kv = {}  # key -> per layer (keys, values) of its prefix, unpadded
        for b in range(n_prefix):
            batch = prefix_batches[b] if b < len(prefix_batches) else []
            rows = [groups[k][0][:splits[k]] for k in batch] or [[eos_id]]
            ids, mask = _right_padded(rows, pad_id)
            cache = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=True).past_key_values
            layers = [(k, v) for k, v, *_ in cache]
            for row, key in enumerate(batch):
                kv[key] = [(k[row, :, :splits[key]], v[row, :, :splits[key]]) for k, v in layers]
            if batch:
                padded_tokens += ids.numel()
        for b in range(n_continuation):
            batch = continuation_batches[b] if b < len(continuation_batches) else []
            rows = [groups[k][m][splits[k]:] for k, m in batch] or [[eos_id]]
            lengths = [splits[k] for k, _ in batch] or [0]
            ids, mask = _right_padded(rows, pad_id)
            width = max(lengths)
            prefix_mask = (torch.arange(width).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)).long()
            cache = _stacked_cache([kv.get(k) for k, _ in batch], width) if width else None
            positions = torch.tensor(lengths).unsqueeze(1) + torch.arange(ids.shape[1]).unsqueeze(0)
            output = model(input_ids=ids.to(device), attention_mask=torch.cat([prefix_mask, mask], 1).to(device),
                           position_ids=positions.to(device), past_key_values=cache, use_cache=cache is not None,
                           **model_kwargs)
            for (key, m), value in zip(batch, read(output, torch.tensor([len(r) - 1 for r in rows], device=device))):
                values[key][m] = value
            if batch:
                padded_tokens += ids.numel()
        run_tokens += sum(sum(map(len, groups[k])) - (len(groups[k]) - 1) * splits[k] for k in chunk)
        bar.update(len(chunk))
    bar.close()
    if was_training:
        model.train()
    plain_tokens = sum(sum(map(len, g)) for g in groups.values())
    stats = {"shared_prefix": True, "tokens_run": run_tokens, "tokens_plain": plain_tokens, "padded_tokens": padded_tokens,
             "forward_passes": sum(p + c for p, c in steps),
             "shared_prefix_token_saving": 1 - run_tokens / plain_tokens if plain_tokens else 0.0,
             "padding_share": 1 - run_tokens / padded_tokens if padded_tokens else 0.0}
    return values, stats


def pair_loss(r_j, r_k, kind: str = "bt", margin: float = 1.0):
    """Per-pair loss of rewards r_j (preferred) and r_k: Bradley-Terry, -log sigmoid(r_j - r_k) (the released
    code's, TRL's), or the paper's hinge, max(0, margin - (r_j - r_k)). rm_training.py's trainer, its
    evaluation, and the frozen-trunk head (`ser.features.train_head`) all use it."""
    diff = r_j - r_k
    return torch.nn.functional.relu(margin - diff) if kind == "hinge" else torch.nn.functional.softplus(-diff)


def pair_metrics(r_j, r_k) -> dict:
    """Strict pairwise accuracy (a tie is not a win), tie rate and mean reward margin."""
    n = len(r_j)
    if n == 0:
        return {"pairs": 0, "accuracy": float("nan"), "tie_rate": float("nan"), "ties": 0, "margin": float("nan")}
    diffs = [a - b for a, b in zip(r_j, r_k)]
    ties = sum(d == 0 for d in diffs)
    return {"pairs": n, "accuracy": sum(d > 0 for d in diffs) / n, "ties": ties, "tie_rate": ties / n,
            "margin": sum(diffs) / n}
