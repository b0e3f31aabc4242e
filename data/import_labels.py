"""Import human labels for the pairs that data/ask_humans.py exported, as SER pairs.

    python data/import_labels.py --asked RUN/loop_1/ask --labels export.json

--labels is one of (told apart by what the file holds, whatever its name ends in):
  * a Label Studio export of the tasks in ASKED/label_studio.json, as JSON (tasks with their `annotations`)
    or JSON-MIN (one flat record per annotation); the Pairwise choice is `"selected": "left"` (answer A)
    or `"right"` (answer B);
  * ASKED/pairs.jsonl with its `choice` column filled: A, B, tie or skip (as JSONL or a JSON list).
ASKED gets human.jsonl (the labelled pairs, response_j the preferred answer, ready to join the seed),
remaining.jsonl (the pool the pairs were asked from, less the labelled pairs) and import.json (the counts,
written last). A tie, a skip and a cancelled annotation are counted and not turned into a label.

Nothing is written unless the whole file is valid. Refused, naming the file, the item and the field: an
item of another task (no pair id, or one that was not asked), a choice that is not A or B, a pair labelled
twice with different answers, and, unless --unlabelled skip, asked pairs with no choice at all (JSON-MIN
leaves cancelled annotations out, so there a skipped task reads as unlabelled). The pool is read from where
ask.json says, relative to ASKED, and must be the file that was asked from (its sha256); the outputs may not
be the pool itself.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

from ser.ask import CONTROL, pair_id
from ser.cli import parse
from ser.data import (
    DataError,
    RecordWriter,
    check_writable,
    file_sha256,
    iter_records,
    read_records,
    remove_stale_temporaries,
    strip_meta,
    write_json,
)

CHOICES = {"a": "A", "b": "B", "left": "A", "right": "B", "tie": "tie", "skip": "skip"}


@dataclass
class Args:
    asked: str = field(metadata={"help": "the folder data/ask_humans.py wrote"})
    labels: str = field(metadata={"help": "the labels: a Label Studio export (JSON or JSON-MIN) or the filled pairs.jsonl"})
    unlabelled: str = field(default="error", metadata={
        "help": "asked pairs with no choice: error (refuse the import) or skip (count them as skipped)",
        "choices": ["error", "skip"]})


def choices_from_label_studio(items, path) -> list[tuple[str, str, str]]:
    """(pair id, choice, where) per annotation of a Label Studio JSON or JSON-MIN export; choice is A, B,
    skip (a cancelled annotation) or None (a task with no annotation)."""
    out = []
    for n, item in enumerate(items, start=1):
        at = f"{path}: item {n}"
        if not isinstance(item, dict):
            raise DataError(f"{at}: is {type(item).__name__}, expected a task object")
        full = "annotations" in item or "completions" in item
        data = item.get("data") if full else item
        if not isinstance(data, dict) or "pair_id" not in data:
            raise DataError(f"{at}: field '{'data.' if full else ''}pair_id' is missing: not an export of the tasks "
                            "that data/ask_humans.py wrote")
        pid = str(data["pair_id"])
        if not full:  # JSON-MIN: the control's results as a list of values (or one value)
            value = item.get(CONTROL)
            if value is None:
                out.append((pid, None, at))
                continue
            values = value if isinstance(value, list) else [value]
            if not all(isinstance(v, (dict, str)) for v in values):
                raise DataError(f"{at}: field '{CONTROL}' is {value!r}; expected one Pairwise choice "
                                "({'selected': 'left'} or 'left')")
            picks = {v.get("selected") if isinstance(v, dict) else v for v in values}
            if len(picks) != 1:
                raise DataError(f"{at}: field '{CONTROL}' is {value!r}; expected one Pairwise choice")
            out.append((pid, _choice(picks.pop(), f"{at}: field '{CONTROL}'"), at))
            continue
        annotations = item.get("annotations", item.get("completions")) or []
        if not isinstance(annotations, list):
            raise DataError(f"{at}: field 'annotations' is {type(annotations).__name__}; expected a list")
        if not annotations:
            out.append((pid, None, at))
        for m, annotation in enumerate(annotations, start=1):
            where = f"{at} (pair {pid}), annotation {m}"
            if not isinstance(annotation, dict):
                raise DataError(f"{where}: is {type(annotation).__name__}, expected an annotation object")
            if annotation.get("was_cancelled") or annotation.get("skipped"):
                out.append((pid, "skip", where))
                continue
            result = annotation.get("result")
            if not isinstance(result, list) or not all(isinstance(r, dict) for r in result):
                raise DataError(f"{where}: field 'result' is {result!r}; expected a list of result objects")
            results = [r for r in result if r.get("from_name") == CONTROL]
            if len(results) != 1:
                raise DataError(f"{where}: field 'result' holds {len(results)} results of the '{CONTROL}' control; "
                                "expected one")
            value = results[0].get("value")
            if not isinstance(value, dict):
                raise DataError(f"{where}: field 'value' is {value!r}; expected an object with 'selected'")
            out.append((pid, _choice(value.get("selected"), f"{where}: field 'value.selected'"), where))
    return out


def _choice(value, where) -> str:
    choice = CHOICES.get(str(value).strip().lower()) if value is not None else None
    if choice is None:
        raise DataError(f"{where} is {value!r}; expected left (answer A) or right (answer B)")
    return choice


def choices_from_pairs(rows, path) -> list[tuple[str, str, str]]:
    """(pair id, choice, where) per row of a filled pairs.jsonl; choice is A, B, tie, skip or None (empty)."""
    out = []
    for r in rows:
        at = f"{path}:{r['_line']}"
        if "pair_id" not in r:
            raise DataError(f"{at}: field 'pair_id' is missing: not the pairs.jsonl that data/ask_humans.py wrote")
        value = r.get("choice")
        if value is None or (isinstance(value, str) and not value.strip()):
            out.append((str(r["pair_id"]), None, at))
            continue
        word = str(value).strip().lower() if isinstance(value, str) else None
        if word not in CHOICES or word in ("left", "right"):  # left/right name Label Studio's sides, not a column
            raise DataError(f"{at}: field 'choice' is {value!r}; expected A, B, tie or skip")
        out.append((str(r["pair_id"]), CHOICES[word], at))
    return out


def label_format(items, path) -> str:
    """'pairs' (the filled pairs.jsonl) or 'label_studio' (a JSON or JSON-MIN export), from what the items
    hold: a pairs row has a `choice` column and answer texts, an export item its annotations or control."""
    kinds = {}
    for item in items:
        pairs = "choice" in item or "rm_probability_a" in item  # JSON-MIN flattens answer_a too: not a sign
        studio = "annotations" in item or "completions" in item or "data" in item or CONTROL in item
        if pairs and studio:
            raise DataError(f"{path}: item {item['_line']} holds both a pairs.jsonl column and Label Studio fields; "
                            "cannot tell which format the file is")
        kinds.setdefault("pairs" if pairs else "label_studio", item["_line"])
    if len(kinds) > 1:
        raise DataError(f"{path}: item {kinds['pairs']} is a pairs.jsonl row and item {kinds['label_studio']} a Label "
                        "Studio task; a labels file holds one format")
    return next(iter(kinds), "label_studio")


def read_choices(path) -> list[tuple[str, str, str]]:
    path = Path(path)
    items = read_records(path)  # a JSON list or JSONL, whatever the suffix
    if label_format(items, path) == "pairs":
        return choices_from_pairs(items, path)
    for item in items:  # read_records numbers the items; the export's own fields stay as they are
        item.pop("_line", None)
    return choices_from_label_studio(items, path)


def resolve(asked: dict, choices, path, unlabelled: str) -> tuple[dict, dict]:
    """One verdict per asked pair (A, B, tie or skip), and the counts; refuses what is not one answer."""
    verdict, where, counts = {}, {}, {"annotations": len(choices), "unlabelled": 0}
    known = [c for c in choices if c[0] in asked]
    if choices and not known:
        raise DataError(f"{path}: none of its {len(choices)} items names a pair of this export: the export of "
                        "another task or another loop")
    for pid, choice, at in choices:
        if pid not in asked:
            raise DataError(f"{at}: its pair id (field 'pair_id') is {pid!r}, a pair that was not asked")
        if choice is None:
            continue
        if choice == "skip" and pid in verdict:  # a cancelled annotation beside a real one: the real one counts
            continue
        if pid in verdict and verdict[pid] not in ("skip", choice):
            raise DataError(f"{at}: pair {pid} is labelled {choice} here and {verdict[pid]} at {where[pid]}; "
                            "resolve the disagreement in the export")
        verdict[pid], where[pid] = choice, at
    missing = [pid for pid in asked if pid not in verdict]
    if missing and unlabelled == "error":
        raise DataError(f"{path}: {len(missing)} of the {len(asked)} asked pairs have no choice (e.g. pair "
                        f"{missing[0]}); label them, or pass --unlabelled skip to count them as skipped")
    counts["unlabelled"] = len(missing)
    for pid in missing:
        verdict[pid] = "skip"
    return verdict, counts


def read_ask(folder: Path) -> tuple[dict, dict, Path]:
    """ask.json, the asked pairs by id, and the pool's path; a damaged file is named with its field."""
    try:
        summary = json.loads((folder / "ask.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{folder / 'ask.json'}: not valid JSON ({e}); run data/ask_humans.py --out {folder} again") \
            from None
    if not isinstance(summary, dict) or not isinstance(summary.get("pool"), str):
        raise DataError(f"{folder / 'ask.json'}: field 'pool' is missing; run data/ask_humans.py --out {folder} again")
    asked = {}
    for r in read_records(folder / "asked.jsonl"):
        at = f"{folder / 'asked.jsonl'}:{r['_line']}"
        if r.get("answer_a_is") not in ("j", "k"):
            raise DataError(f"{at}: field 'answer_a_is' is {r.get('answer_a_is')!r}; expected 'j' or 'k'")
        for name in ("pair_id", "response_j", "response_k", "reward_j", "reward_k"):
            if name not in r:
                raise DataError(f"{at}: field '{name}' is missing")
        asked[str(r["pair_id"])] = strip_meta(r)
    return summary, asked, folder / summary["pool"]  # relative to the ask folder (an absolute one stays)


def check_pool(summary: dict, pool: Path, outputs) -> None:
    """The pool is the file the pairs were asked from, and no output would overwrite it."""
    if not pool.is_file():
        raise DataError(f"{pool}: the pool the pairs were asked from (ask.json's 'pool') is missing; move it back "
                        "beside the ask folder as it was")
    for out in outputs:
        if out.resolve() == pool.resolve():
            raise DataError(f"{out}: is the pool the pairs were asked from; export to another folder "
                            "(data/ask_humans.py --out) so that the import does not overwrite the pool")
    if "pool_sha256" in summary and file_sha256(pool) != summary["pool_sha256"]:
        raise DataError(f"{pool}: changed since the pairs were asked from it (sha256 differs from ask.json's "
                        "'pool_sha256'); import into the export made from this pool")


def human_pair(record: dict, choice: str) -> dict:
    """The asked pair as a SER pair: response_j is the answer the human chose."""
    a_is = record["answer_a_is"]
    preferred = a_is if choice == "A" else {"j": "k", "k": "j"}[a_is]
    other = {"j": "k", "k": "j"}[preferred]
    pair = {k: v for k, v in record.items() if k not in ("response_j", "response_k", "answer_a_is", "reward_j",
                                                           "reward_k", "score_j", "score_k", "gold_preferred")}
    pair.update(response_j=record[f"response_{preferred}"], response_k=record[f"response_{other}"],
                label_source="human", rm_agreed=(record["reward_j"] >= record["reward_k"]) == (preferred == "j"))
    if "gold_preferred" in record:  # the hidden label (synthetic and study pools): does the human agree with it
        pair["gold_agreed"] = record["gold_preferred"] == preferred
    return pair


def main(args: Args):
    folder = Path(args.asked)
    if not (folder / "ask.json").is_file():
        raise SystemExit(f"{folder}: no ask.json; run data/ask_humans.py --out {folder} first")
    summary, asked, pool = read_ask(folder)
    outputs = [folder / n for n in ("human.jsonl", "remaining.jsonl", "import.json")]
    check_writable(*outputs)
    check_pool(summary, pool, outputs)
    verdict, counts = resolve(asked, read_choices(args.labels), args.labels, args.unlabelled)
    labelled = {pid for pid, v in verdict.items() if v in ("A", "B")}
    pairs = [human_pair(record, verdict[pid]) for pid, record in asked.items() if pid in labelled]
    for tmp in remove_stale_temporaries(*outputs):
        print(f"import_labels: removed {tmp}, left by a killed import")
    (folder / "import.json").unlink(missing_ok=True)  # the done marker goes before the first new write
    removed = set()
    with RecordWriter(folder / "human.jsonl") as human, RecordWriter(folder / "remaining.jsonl") as rest:
        for pair in pairs:
            human.write(pair)
        for r in iter_records(pool):  # the pool less the labelled pairs, by the ids the export gave
            if pair_id(r) in labelled:
                removed.add(pair_id(r))
            else:
                rest.write(r)
        if removed != labelled:  # raised inside the block: neither file replaces an old one
            raise DataError(f"{pool}: {len(labelled - removed)} labelled pairs (e.g. {sorted(labelled - removed)[0]}) "
                            "are not in the pool asked from; export again with data/ask_humans.py")
    result = {"labels": str(Path(args.labels).resolve()), "asked": len(asked), "labelled": len(labelled),
              "ties": sum(v == "tie" for v in verdict.values()), "skipped": sum(v == "skip" for v in verdict.values()),
              **counts, "remaining": rest.count,
              "rm_agreement": sum(p["rm_agreed"] for p in pairs) / len(pairs) if pairs else None,
              "gold_agreement": (sum(p["gold_agreed"] for p in pairs if "gold_agreed" in p) /
                                 sum("gold_agreed" in p for p in pairs)) if any("gold_agreed" in p for p in pairs) else None}
    write_json(folder / "import.json", result)
    print(f"import_labels: {result['labelled']} human pairs in {folder / 'human.jsonl'} "
          f"({result['ties']} ties and {result['skipped']} skipped not used); {json.dumps(result)}")


if __name__ == "__main__":
    main(*parse([Args]))
