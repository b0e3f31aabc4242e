"""Turn one of the paper's datasets into the folder layout the stages load, with the SER splits.

    python data/prepare.py --dataset hh-rlhf --source ../shared/data/raw/hh_rlhf --out OUT

OUT/data/ gets, in the pair schema (question, response_j preferred, response_k):
  finetune     pairs whose preferred response is an SFT demonstration
  reward       the human-labelled seed: --labeled_fraction of the pool
  unlabeled    the rest of the pool, responses in random order, the human label in `gold_preferred`
  reward_full  the whole pool with its human labels (the all-label baseline; = reward + unlabeled)
  evaluation   held-out human pairs
  rl           prompts only
and OUT/manifest.json the counts, the drops with their reasons, the seed and the source's sha256.
Splits are made by conversation root (the first human turn of a conversation, the question itself
elsewhere), so no conversation, and no question, is in two of finetune/pool/evaluation/rl; the
manifest counts any root shared across splits (`root_overlap`, 0 by construction). The splits are
the same for the same source and seed. OUT is written whole or not at all.
"""

import csv
import hashlib
import os
import random
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ser.cli import parse
from ser.data import DATA_SUFFIXES, DataError, data_files, read_records, split_transcript, umask_mode, write_json, write_records

# --dataset NAME -> parse_*(args, files, records, rows) -> pairs, filled by @parser below: the choices, the help
# and the dispatch are this one registry.
PARSERS = {}


def parser(name):
    def register(fn):
        PARSERS[name] = fn
        return fn
    return register


@dataclass
class Args:
    dataset: str = field(metadata={"help": "which parser reads --source", "choices": PARSERS.keys()})
    source: str = field(metadata={"help": "a local file or folder of the dataset, or a hub id when online"})
    out: str = field(metadata={"help": "output folder (new or empty)"})
    labeled_fraction: float = field(default=0.15, metadata={"help": "share of the pool that keeps its human label"})
    eval_fraction: float = field(default=0.1, metadata={"help": "share of questions held out for evaluation"})
    finetune_fraction: float = field(default=0.1, metadata={"help": "share of questions for SFT demonstrations"})
    rl_fraction: float = field(default=0.1, metadata={"help": "share of questions kept as PPO prompts"})
    ultrafeedback_ties: str = field(default="drop", metadata={
        "help": "UltraFeedback rows whose two scores are equal: drop, or keep", "choices": ["drop", "keep"]})
    on_error: str = field(default="raise", metadata={
        "help": "a bad row: raise (stop, naming file, line and field) or skip (count it in the manifest)",
        "choices": ["raise", "skip"]})
    seed: int = field(default=0, metadata={"help": "seed of the split and of the pool's response order"})


class Rows:
    """Counts what is dropped and why; bad rows raise or are skipped per --on_error."""

    def __init__(self, on_error):
        self.on_error, self.dropped, self.skipped = on_error, Counter(), []

    def bad(self, message):
        if self.on_error == "raise":
            raise DataError(message)
        self.skipped.append(message)

    def text(self, row, key, where, response=False):
        """row[key] as a non-empty string, or None after reporting it.

        An empty *response* is a known quirk of real data (a model answered nothing): it is dropped and
        counted rather than treated as a malformed row. Anything else missing or empty is a bad row.
        """
        value = row
        for part in key.split("."):
            if not isinstance(value, dict) or part not in value:
                self.bad(f"{where}: missing field '{key}'")
                return None
            value = value[part]
        if not isinstance(value, str):
            self.bad(f"{where}: field '{key}' is {type(value).__name__}, expected a string")
            return None
        if not value.strip():
            if response:
                self.dropped["empty response"] += 1
            else:
                self.bad(f"{where}: field '{key}' is empty")
            return None
        return value


# ----------------------------------------------------------------------------- sources


def source_files(source: str) -> list[Path]:
    path = Path(source)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = data_files(path, DATA_SUFFIXES + (".csv",))
        if not files:
            raise DataError(f"{source}: no data files in this folder")
        return files
    raise DataError(f"{source}: no such file or folder")


def sha256(files) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def hub_rows(source):
    from datasets import load_dataset

    try:
        ds = load_dataset(source, split="train")
    except Exception as e:
        raise DataError(f"{source}: not a local file or folder, and not loadable from the hub: {e}") from e
    return [{**r, "_line": i + 1, "_source": source} for i, r in enumerate(ds)]


def json_rows(files, rows: Rows):
    out = []
    for f in files:
        for r in read_records(f, rows.skipped if rows.on_error == "skip" else None):
            out.append({**r, "_source": str(f)})
    return out


# ----------------------------------------------------------------------------- formats


@parser("hh-rlhf")
def parse_hh(args, files, records, rows: Rows):
    for r in records:
        where = f"{r['_source']}:{r['_line']}"
        chosen, rejected = rows.text(r, "chosen", where), rows.text(r, "rejected", where)
        if chosen is None or rejected is None:
            continue
        q_j, a_j = split_transcript(chosen)
        q_k, a_k = split_transcript(rejected)
        if q_j is None or q_k is None:
            rows.bad(f"{where}: field 'chosen'/'rejected' has no '\\n\\nAssistant:' turn")
            continue
        if q_j != q_k:
            rows.dropped["chosen and rejected differ before the last assistant turn"] += 1
            continue
        if not a_j or not a_k:
            rows.dropped["empty response"] += 1
            continue
        yield {"question": q_j, "response_j": a_j, "response_k": a_k}


def last_assistant(messages):
    for m in reversed(messages):
        if isinstance(m, dict) and m.get("role") == "assistant" and isinstance(m.get("content"), str):
            return m["content"]
    return None


@parser("ultrafeedback")
def parse_ultrafeedback(args, files, records, rows: Rows):
    for r in records:
        where = f"{r['_source']}:{r['_line']}"
        prompt = rows.text(r, "prompt", where)
        if prompt is None:
            continue
        sides = []
        for key in ("chosen", "rejected"):
            value = r.get(key)
            if isinstance(value, list):  # H4 layout: a list of {role, content} messages
                value = last_assistant(value)
                if value is None:
                    rows.bad(f"{where}: field '{key}' has no assistant message")
                    break
                if not value.strip():
                    rows.dropped["empty response"] += 1
                    break
            else:  # flattened layout: the assistant text
                value = rows.text(r, key, where, response=True)
                if value is None:
                    break
            sides.append(value)
        if len(sides) < 2:
            continue
        scores = r.get("metadata", r)
        s_j, s_k = scores.get("score_chosen"), scores.get("score_rejected")
        if s_j is not None and s_j == s_k and args.ultrafeedback_ties == "drop":
            rows.dropped["tied scores (--ultrafeedback_ties drop)"] += 1
            continue
        yield {"question": prompt, "response_j": sides[0], "response_k": sides[1]}


@parser("summarize")
def parse_summarize(args, files, records, rows: Rows):
    """The TL;DR comparisons: CSV rows (post_title, post_text, winner_text, loser_text) or the original
    JSON (info.post, info.title, summaries[i].text, choice)."""
    for f in files:
        if f.suffix != ".csv":
            continue
        with open(f, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            for r in reader:
                where = f"{f}:{reader.line_num}"
                post = rows.text(r, "post_text", where)
                win, lose = rows.text(r, "winner_text", where, True), rows.text(r, "loser_text", where, True)
                if None in (post, win, lose):
                    continue
                title = (r.get("post_title") or "").strip()
                yield {"question": f"{title}\n\n{post.strip()}" if title else post.strip(),
                       "response_j": win.strip(), "response_k": lose.strip()}
    for r in records:
        where = f"{r['_source']}:{r['_line']}"
        if "info" not in r and "summaries" not in r:
            rows.dropped["no post text (summary-only annotation rows)"] += 1
            continue
        post = rows.text(r, "info.post", where)
        summaries = r.get("summaries")
        choice = r.get("choice")
        if post is None:
            continue
        if not (isinstance(summaries, list) and len(summaries) == 2 and choice in (0, 1)):
            rows.bad(f"{where}: field 'summaries'/'choice' must be two summaries and a choice of 0 or 1")
            continue
        texts = [rows.text(s, "text", where, True) for s in summaries]
        if None in texts:
            continue
        title = (r.get("info", {}).get("title") or "").strip()
        yield {"question": f"{title}\n\n{post.strip()}" if title else post.strip(),
               "response_j": texts[choice].strip(), "response_k": texts[1 - choice].strip()}


@parser("stack-exchange")
def parse_stack_exchange(args, files, records, rows: Rows):
    for r in records:
        where = f"{r['_source']}:{r['_line']}"
        q = rows.text(r, "question", where)
        j, k = rows.text(r, "response_j", where, True), rows.text(r, "response_k", where, True)
        if None not in (q, j, k):
            yield {"question": q, "response_j": j, "response_k": k}


def csv_rows(path) -> int:
    with open(path, newline="", encoding="utf-8") as fh:
        return sum(1 for _ in csv.DictReader(fh))


def load_pairs(args: Args, rows: Rows):
    if Path(args.source).exists():
        files = source_files(args.source)
        records = json_rows([f for f in files if f.suffix != ".csv"], rows)
        digest = sha256(files)
    else:
        if args.source.startswith(("/", ".", "~")) or args.source.count("/") != 1:
            raise DataError(f"{args.source}: no such file or folder")
        files, records, digest = [], hub_rows(args.source), None
    n_rows = len(records) + sum(csv_rows(f) for f in files if f.suffix == ".csv")
    pairs = PARSERS[args.dataset](args, files, records, rows)
    kept = []
    for p in pairs:
        if p["response_j"].strip() == p["response_k"].strip():
            rows.dropped["identical chosen and rejected"] += 1
            continue
        kept.append(p)
    return kept, n_rows, digest, [str(f) for f in files]


# ----------------------------------------------------------------------------- splits


def conversation_root(question: str) -> str:
    """The first human turn of an HH-style conversation ("Human: ... Assistant: ..."), else the question.

    Multi-turn conversations that open the same way are one conversation for splitting: otherwise a
    held-out pair can share its opening with a pool pair (41 of 618 HH evaluation pairs did)."""
    text = question.strip()
    if text.startswith("Human:"):
        end = text.find("\n\nAssistant:")
        text = text[len("Human:"):end if end >= 0 else None]
    return " ".join(text.split())


def root_overlap(splits) -> dict:
    """Pairs of each split whose conversation root also occurs in another split (expected: none)."""
    names = ("finetune", "reward_full", "evaluation", "rl")
    roots = {n: {conversation_root(p["question"]) for p in splits[n]} for n in names}
    out = {}
    for a in names:
        for b in names[names.index(a) + 1:]:
            out[f"{a}~{b}"] = sum(conversation_root(p["question"]) in roots[b] for p in splits[a])
    return out


def split(pairs, args: Args):
    """Assign whole conversations (by root) to splits, deterministically for a seed."""
    rng = random.Random(args.seed)
    roots = sorted({conversation_root(p["question"]) for p in pairs})
    rng.shuffle(roots)
    n = len(roots)
    cuts = [round(n * args.eval_fraction), round(n * args.finetune_fraction), round(n * args.rl_fraction)]
    evaluation_r = set(roots[:cuts[0]])
    finetune_r = set(roots[cuts[0]:cuts[0] + cuts[1]])
    rl_r = set(roots[cuts[0] + cuts[1]:cuts[0] + cuts[1] + cuts[2]])
    root = {p["question"]: conversation_root(p["question"]) for p in pairs}
    rl_q = list(dict.fromkeys(p["question"] for p in pairs if root[p["question"]] in rl_r))
    rl_set = set(rl_q)
    pool = [p for p in pairs if root[p["question"]] not in evaluation_r | finetune_r | rl_r]
    for i, p in enumerate(pairs):
        p["id"] = i
    n_seed = round(len(pool) * args.labeled_fraction)
    seed_idx = set(rng.sample(range(len(pool)), n_seed))
    unlabeled = []
    for i, p in enumerate(pool):
        if i in seed_idx:
            continue
        if rng.random() < 0.5:  # random response order; the human label goes where only statistics read
            unlabeled.append({**p, "gold_preferred": "j"})
        else:
            unlabeled.append({**p, "response_j": p["response_k"], "response_k": p["response_j"],
                              "gold_preferred": "k"})
    return {
        "finetune": [p for p in pairs if root[p["question"]] in finetune_r],
        "reward": [p for i, p in enumerate(pool) if i in seed_idx],
        "unlabeled": unlabeled,
        "reward_full": pool,
        "evaluation": [p for p in pairs if root[p["question"]] in evaluation_r],
        "rl": [{"id": f"rl-{i}", "question": q} for i, q in enumerate(rl_q)],
    }, sum(p["question"] in rl_set for p in pairs)


def main(args: Args):
    if args.dataset not in PARSERS:
        raise DataError(f"--dataset {args.dataset}: unknown dataset; choose one of {', '.join(PARSERS)}")
    for name in ("labeled_fraction", "eval_fraction", "finetune_fraction", "rl_fraction"):
        value = getattr(args, name)
        if not 0 <= value <= 1:  # NaN too
            raise DataError(f"--{name} {value}: a share between 0 and 1")
    held = args.eval_fraction + args.finetune_fraction + args.rl_fraction
    if held >= 1:
        raise DataError(f"--eval_fraction + --finetune_fraction + --rl_fraction = {held:g}: nothing would be left for the "
                        "reward pool; they must sum to less than 1")
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"{out}: exists and is not an empty folder; choose a new --out")
    rows = Rows(args.on_error)
    pairs, n_rows, digest, files = load_pairs(args, rows)
    if not pairs:
        raise DataError(f"{args.source}: no usable pairs")
    splits, rl_pairs = split(pairs, args)

    # Build in a temporary sibling and move it into place: OUT is whole or absent.
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    os.chmod(tmp, umask_mode(0o777))  # a shared cluster folder keeps the group's access
    try:
        for name, records in splits.items():
            write_records(tmp / "data" / name / "train.jsonl", records)
        manifest = {
            "dataset": args.dataset, "source": args.source, "source_files": files, "source_sha256": digest,
            "seed": args.seed, "args": vars(args), "source_rows": n_rows, "pairs": len(pairs),
            "counts": {name: len(records) for name, records in splits.items()},
            "pairs_behind_rl_prompts": rl_pairs,
            "root_overlap": root_overlap(splits),
            "dropped": dict(rows.dropped), "skipped_bad_rows": len(rows.skipped),
            "skipped_examples": rows.skipped[:20],
            "truncated": 0,
            "notes": "nothing is truncated here; the stages cut over-long questions from the left and count it",
        }
        write_json(tmp / "manifest.json", manifest)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"prepare: {args.dataset}: {len(pairs)} pairs -> " + ", ".join(f"{k} {v}" for k, v in manifest["counts"].items())
          + (f"; dropped {dict(rows.dropped)}" if rows.dropped else "")
          + (f"; skipped {len(rows.skipped)} bad rows" if rows.skipped else ""))
    return manifest


if __name__ == "__main__":
    main(*parse([Args]))
