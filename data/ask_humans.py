"""Export the pool pairs most worth a human label, for annotators.

    python data/ask_humans.py --pool RUN/loop_1/remaining.jsonl --n 200 --out RUN/loop_1/ask

The pool is a loop's scored pairs (the filter's remaining.jsonl: the pairs it did not self-label, each with
the RM's reward_j and reward_k). The n pairs are chosen by --rule (ser/ask.py's `choose`), one per question.
The default is `random`: in the pre-registered budget study (experiments/results-frozen/REPORT-ask-*.md: a
frozen 135M trunk, a 1 % seed, 20 seeds, budgets of 1, 5 and 15 % of the pool) no rule beat random pairs,
alone or asked after SER's loop 1, once held-out sampling and the 12 comparisons were counted (Holm). OUT gets:
  label_studio.json   Label Studio tasks (import them into a project with label_studio.xml as its labelling
                      config); `predictions` holds the RM's choice: leave "use predictions to prelabel" off
                      so that annotators do not see it
  label_studio.xml    the labelling config: the question and a Pairwise choice between answer A and answer B
  pairs.jsonl         the same pairs for Argilla or a spreadsheet: pair_id, question, answer_a, answer_b,
                      rm_probability_a, and an empty `choice` column to fill with A, B, tie or skip
  asked.jsonl         the key: each pair as the pool holds it, and which response is answer A
  ask.json            what was asked, written last (the step's done marker)
Which response is answer A is random per pair (seeded by --seed and the pair id), so the RM's preference
never shows as a position. data/import_labels.py reads the labels back.
"""

import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ser import ask
from ser.cli import parse
from ser.data import (
    DataError,
    RecordWriter,
    check_writable,
    file_sha256,
    iter_records,
    remove_stale_temporaries,
    strip_meta,
    write_json,
    write_text,
)

CONTROL = ask.CONTROL
LABEL_CONFIG = f"""<View>
  <Header value="Which answer to the question is better? Click it."/>
  <Text name="question" value="$question"/>
  <Pairwise name="{CONTROL}" toName="answer_a,answer_b"/>
  <View style="display: flex; gap: 1em;">
    <View style="flex: 1;"><Header value="Answer A" size="5"/><Text name="answer_a" value="$answer_a"/></View>
    <View style="flex: 1;"><Header value="Answer B" size="5"/><Text name="answer_b" value="$answer_b"/></View>
  </View>
</View>
"""
FILES = ("label_studio.json", "label_studio.xml", "pairs.jsonl", "asked.jsonl")


DEFAULT_RULE = "random"  # the pre-registered decision of the budget study (experiments/ask_study.py)


@dataclass
class Args:
    pool: str = field(metadata={"help": "scored pool pairs (a JSON/JSONL file with reward_j and reward_k): a loop's remaining.jsonl"})
    n: int = field(metadata={"help": "pairs to ask humans about"})
    out: str = field(metadata={"help": "folder for the export"})
    rule: str = field(default=DEFAULT_RULE, metadata={
        "help": "random (the default: in the pre-registered budget study on HH-RLHF, 1 %% seed, 20 seeds, no rule beat "
                "random at 1, 5 or 15 %% of the pool, alone or after SER's loop 1, once Holm-corrected; the best was "
                "ensemble-diverse after SER at 15 %%, +0.5 points [+0.0, +1.0], Holm p 0.46; docs/stages.md): a seeded "
                "random pair per question; uncertainty: the RM's least certain pairs, spread by hashed n-grams (ser/ask.py pick); "
                "d-optimal: greedy log-det of the head's Fisher information; "
                "ensemble-diverse: the pairs the RM's bootstrap heads disagree on, spread in feature space; typical: "
                "the most typical pair of each k-means cluster of the features. The last three read a frozen-trunk "
                "RM's features: --reward_model_name and --feature_cache", "choices": list(ask.RULES)})
    diverse: bool = field(default=True, metadata={"help": "spread near-duplicate questions out (False: plain uncertainty order)"})
    seed: int = field(default=0, metadata={"help": "seed of the answers' order (A/B) per pair, and of --rule random"})
    reward_model_name: str | None = field(default=None, metadata={
        "help": "the frozen-trunk RM that scored the pool (rm_training.py --trunk frozen), for the rules on features"})
    feature_cache: str | None = field(default=None, metadata={"help": "its feature cache (built here for what it lacks)"})


def read_scored(path) -> list[dict]:
    """The pool's pairs, each with its id and the RM's probability that response j is better."""
    pairs, where = [], {}
    for r in iter_records(path):
        at = f"{path}:{r['_line']}"
        for key in ("question", "response_j", "response_k"):
            if not isinstance(r.get(key), str):
                raise DataError(f"{at}: field '{key}' is {'missing' if key not in r else repr(r[key])}; expected text")
        for key in ("reward_j", "reward_k"):
            value = r.get(key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or abs(value) == float("inf"):
                raise DataError(f"{at}: field '{key}' is {'missing' if key not in r else repr(value)}; expected the RM's "
                                "reward (a scored pool: the filter's remaining.jsonl or scored.jsonl)")
        r["pair_id"] = ask.pair_id(r)
        if r["pair_id"] in where:
            raise DataError(f"{at}: pair id {r['pair_id']!r} is also the id of line {where[r['pair_id']]}; "
                            "every pair needs its own id")
        where[r["pair_id"]] = r["_line"]
        r["p_j"] = ask.pairwise_probability(r["reward_j"], r["reward_k"])
        pairs.append(r)
    return pairs


def pair_features(pool, args):
    """Each pair's features (f_j, f_k) at the frozen-trunk RM's layer, from --feature_cache (featurising what
    it lacks); a clear error naming what is missing otherwise."""
    from ser import features
    from ser.data import encode
    from ser.modeling import load_tokenizer

    if not args.reward_model_name or not args.feature_cache:
        raise SystemExit(f"--rule {args.rule}: reads the head's features; give --reward_model_name (the frozen-trunk "
                         "RM that scored the pool) and --feature_cache (its cache)")
    info = features.frozen_info(args.reward_model_name)
    if info is None:
        raise SystemExit(f"--rule {args.rule}: {args.reward_model_name} is not a frozen-trunk RM (no frozen_trunk.json); "
                         "the rules on features need one (rm_training.py --trunk frozen)")
    features.check_trunk(info, args.reward_model_name)
    tokenizer = load_tokenizer(args.reward_model_name)
    ids = {side: [encode(tokenizer, r["question"], r[side], info["max_length"])["input_ids"] for r in pool]
           for side in ("response_j", "response_k")}
    features.build_cache(args.feature_cache, info["trunk"], tokenizer.pad_token_id, ids["response_j"] + ids["response_k"],
                         info["max_length"], [info["layer"]], progress=None)
    return (features.load_features(args.feature_cache, ids["response_j"], info["layer"]),
            features.load_features(args.feature_cache, ids["response_k"], info["layer"]), info)


def choose(pool, args) -> list[int]:
    """The indices of the pairs to ask about, by --rule (ser/ask.py's `choose`), in the order of choice."""
    groups, p = [r["question"] for r in pool], [r["p_j"] for r in pool]
    if args.rule not in ask.FEATURE_RULES:
        return ask.choose(args.rule, args.n, p, groups, seed=args.seed, diverse=args.diverse)
    f_j, f_k, info = pair_features(pool, args)
    member_p = None
    if args.rule == "ensemble-diverse":
        from ser import features

        path = Path(args.reward_model_name) / features.BOOTSTRAP
        if not path.is_file():
            raise SystemExit(f"--rule ensemble-diverse: {args.reward_model_name} has no bootstrap heads; train it with "
                             "rm_training.py --trunk frozen --bootstrap_heads K")
        from safetensors.torch import load_file

        heads = load_file(str(path))["heads"]
        member_p = torch.sigmoid((f_j - f_k) @ heads.T).T  # [K, pairs]
    return ask.choose(args.rule, args.n, p, groups, seed=args.seed, f_j=f_j, f_k=f_k, member_p=member_p)


def task(record, a_is: str) -> tuple[dict, dict]:
    """The pair as Label Studio shows it and as the JSONL lists it, answer A being response `a_is`."""
    b_is = {"j": "k", "k": "j"}[a_is]
    prob_a = record["p_j"] if a_is == "j" else 1 - record["p_j"]
    data = {"pair_id": record["pair_id"], "question": record["question"],
            "answer_a": record[f"response_{a_is}"], "answer_b": record[f"response_{b_is}"]}
    prediction = {"model_version": "ser-rm", "score": max(prob_a, 1 - prob_a),
                  "result": [{"from_name": CONTROL, "to_name": "answer_a,answer_b", "type": "pairwise",
                              "value": {"selected": "left" if prob_a >= 0.5 else "right"}}]}
    return {"data": data, "predictions": [prediction]}, {**data, "rm_probability_a": prob_a, "choice": ""}


def main(args: Args):
    if args.n < 1:
        raise SystemExit(f"--n {args.n}: ask about at least 1 pair")
    out = Path(args.out)
    outputs = [out / name for name in (*FILES, "ask.json")]
    check_writable(*outputs)
    if any(o.resolve() == Path(args.pool).resolve() for o in outputs):
        raise SystemExit(f"--out {out}: would overwrite the pool {args.pool}; choose another folder")
    for tmp in remove_stale_temporaries(*outputs):
        print(f"ask_humans: removed {tmp}, left by a killed export")
    (out / "ask.json").unlink(missing_ok=True)  # the done marker goes before the first new write
    pool = read_scored(args.pool)
    if not pool:
        raise SystemExit(f"{args.pool}: no pairs to ask about")
    chosen = [pool[i] for i in choose(pool, args)]
    with (RecordWriter(out / "label_studio.json") as ls, RecordWriter(out / "pairs.jsonl") as plain,
          RecordWriter(out / "asked.jsonl") as key):
        for r in chosen:
            a_is = random.Random(f"{args.seed}:{r['pair_id']}").choice("jk")
            ls_task, row = task(r, a_is)
            ls.write(ls_task)
            plain.write(row)
            key.write({**{k: v for k, v in strip_meta(r).items() if k != "p_j"}, "answer_a_is": a_is,
                       "source": f"{args.pool}:{r['_line']}"})
    write_text(out / "label_studio.xml", LABEL_CONFIG)
    u = [ask.uncertainty(r["p_j"]) for r in chosen]
    # the pool relative to the export, so a run folder moved or copied whole imports from its own pool
    summary = {"pool": os.path.relpath(Path(args.pool).resolve(), out.resolve()), "pool_sha256": file_sha256(args.pool),
               "pool_pairs": len(pool), "asked": len(chosen), "rule_name": args.rule,
               "distinct_questions_in_pool": len({r["question"] for r in pool}), "rule": "ser/ask.py pick",
               "diverse": args.diverse, "seed": args.seed, "uncertainty_min": min(u), "uncertainty_mean": sum(u) / len(u),
               "files": list(FILES)}
    write_json(out / "ask.json", summary)
    print(f"ask_humans: {len(chosen)} of {len(pool)} pairs to label in {out}/label_studio.json "
          f"(config {out}/label_studio.xml) or {out}/pairs.jsonl; then: python data/import_labels.py "
          f"--asked {out} --labels EXPORT")
    print(json.dumps({k: v for k, v in summary.items() if k != "files"}))


if __name__ == "__main__":
    main(*parse([Args]))
