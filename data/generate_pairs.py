"""Build an unlabelled SER pool from prompts: two sampled answers per question, nobody's label.

    python data/generate_pairs.py --prompts data/generated/synthetic --subset data/rl \\
        --model runs/demo/sft --out runs/demo/pool/train.jsonl
    python data/generate_pairs.py --prompts questions.jsonl --model sft-epoch10 --model_b sft-epoch1 --out pool.jsonl
    accelerate launch --num_processes 8 data/generate_pairs.py ...        # prompts sharded across processes

The release sampled two answers per question from two SFT checkpoints (epoch 1 and epoch 10) with vLLM
at temperature 0.2, top_k 20, top_p 0.9, max_tokens 512 and presence_penalty 1.0, and dropped identical
pairs; those are the defaults here. Without --model_b, --model is sampled twice.

Sampling uses HF `generate` on length-sorted batches. The presence penalty is vLLM's and OpenAI's, not
an approximation through `repetition_penalty`: `presence_penalty` is subtracted from the logit of every
token already generated in this answer (prompt tokens are not penalised), before temperature, top-k and
top-p, as vLLM orders them. (HF's multiplicative `--repetition_penalty` is there too, off by default.)

Output: JSONL pool pairs {id, question, response_j, response_k} with no `gold_preferred`, in the order
of the prompts, plus OUT.stats.json (counts, arguments, models). Pairs whose two answers are identical
(after stripping) or where an answer is empty are dropped and counted. The same seed, process count and
batch size give the same pool. --engine vllm uses vLLM when it is installed (one process; its calls are
tested against a stand-in, not a real engine); the HF path is the default.
"""

import datetime
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import LogitsProcessor, LogitsProcessorList, set_seed

from ser.cli import check_accelerator, get_logger, parse
from ser.data import DataError, check_writable, load_records, write_json, write_records
from ser.modeling import end_processes, load_causal_lm, load_tokenizer, process_state
from ser.rollout import response_texts, sample
from ser.scoring import deal_out, gather_parts

logger = get_logger("generate_pairs")


@dataclass
class Args:
    prompts: str = field(metadata={"help": "a prepared data folder (with --subset), or a JSON/JSONL file with `question`"})
    model: str = field(metadata={"help": "the SFT model that writes the answers (the release: the epoch-10 checkpoint)"})
    out: str = field(metadata={"help": "the pool to write (JSONL); OUT.stats.json beside it"})
    model_b: str | None = field(default=None, metadata={"help": "a second checkpoint for the other answer "
                                                                "(the release: epoch 1); default: --model again"})
    subset: str | None = field(default="data/rl", metadata={"help": "the split inside a --prompts folder (data/rl, "
                                                                    "data/unlabeled)"})
    max_prompts: int | None = field(default=None, metadata={"help": "use the first N prompts only"})
    temperature: float = field(default=0.2, metadata={"help": "sampling temperature (the release: 0.2)"})
    top_k: int = field(default=20, metadata={"help": "top-k sampling (the release: 20; 0 = off)"})
    top_p: float = field(default=0.9, metadata={"help": "nucleus sampling (the release: 0.9)"})
    max_tokens: int = field(default=512, metadata={"help": "new tokens per answer (the release: 512)"})
    presence_penalty: float = field(default=1.0, metadata={"help": "subtracted from the logits of tokens already in "
                                                                   "the answer, as in vLLM/OpenAI (the release: 1.0)"})
    repetition_penalty: float = field(default=1.0, metadata={"help": "HF's multiplicative repetition penalty (1: off)"})
    max_prompt_length: int = field(default=512, metadata={"help": "prompt tokens kept (cut from the left)"})
    batch_size: int = field(default=16, metadata={"help": "prompts per generate call and process"})
    seed: int = field(default=0, metadata={"help": "sampling seed (each process offsets it by its rank)"})
    engine: str = field(default="hf", metadata={"help": "hf, or vllm when installed (tested against a stand-in)",
                                                 "choices": ["hf", "vllm"]})
    tensor_parallel_size: int = field(default=1, metadata={"help": "--engine vllm: GPUs one model is sharded over"})
    dtype: str = field(default="auto", metadata={"help": "model dtype: auto, bfloat16, float32"})
    device: str | None = field(default=None, metadata={"help": "default: the process's accelerator or cpu"})
    gather_timeout_hours: float = field(default=24.0, metadata={
        "help": "how long a process that has finished waits for the others at the final gather"})


class PresencePenalty(LogitsProcessor):
    """vLLM/OpenAI presence penalty: minus `penalty` on each token already generated (not on the prompt).

    One instance per `generate` call: the first call sees the prompt alone and records its width."""

    def __init__(self, penalty: float):
        self.penalty, self.prompt_width = penalty, None

    def __call__(self, input_ids, scores):
        if self.prompt_width is None:
            self.prompt_width = input_ids.shape[1]
        generated = input_ids[:, self.prompt_width:]
        if generated.shape[1] == 0 or not self.penalty:
            return scores
        seen = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, generated, True)
        return scores - self.penalty * seen.to(scores.dtype)


def answers_hf(model, tokenizer, questions, args, device, bar) -> list[str]:
    """One sampled answer per question, in batches of consecutive questions (given in length order)."""
    out = []
    for b in range(0, len(questions), args.batch_size):
        rollout = sample(model, tokenizer, questions[b:b + args.batch_size], args.max_prompt_length, args.max_tokens,
                         args.temperature, True, device, top_k=args.top_k, top_p=args.top_p,
                         repetition_penalty=args.repetition_penalty,
                         logits_processor=LogitsProcessorList([PresencePenalty(args.presence_penalty)]))
        out += response_texts(tokenizer, rollout)
        bar.update(len(rollout.prompts))
    return out


def answers_vllm(models, tokenizer, questions, args) -> list[list[str]]:
    """Both answers of every question with the release's engine, when installed (one process; it shards a
    model over --tensor_parallel_size GPUs itself).

    The prompts are the HF path's token ids (`[bos] prompt`, cut from the left to --max_prompt_length, no
    trailing space). Every request has a seed of its own, the second answers' offset by the number of
    questions: with one seed for all, the two answers of a question from one model would be identical and
    every pair dropped. One engine is alive at a time (a second one in the process runs out of GPU memory)."""
    try:
        from vllm import LLM, SamplingParams
    except ImportError as e:
        raise SystemExit("--engine vllm: vLLM is not installed (pip install vllm); --engine hf needs nothing more") from e
    from ser.data import prompt_ids
    from ser.rollout import model_prompt

    prompts = [{"prompt_token_ids": model_prompt(tokenizer, prompt_ids(tokenizer, q), args.max_prompt_length)}
               for q in questions]
    answers, llm, loaded = [], None, None
    for k, name in enumerate(models):
        if name != loaded:
            if llm is not None:
                llm = None  # the previous engine goes before the next one is built
                release_vllm()
            llm, loaded = LLM(model=name, dtype=args.dtype, seed=args.seed,
                              tensor_parallel_size=args.tensor_parallel_size), name
        params = [SamplingParams(temperature=args.temperature, top_k=args.top_k or -1, top_p=args.top_p,
                                 max_tokens=args.max_tokens, presence_penalty=args.presence_penalty,
                                 repetition_penalty=args.repetition_penalty, seed=args.seed + k * len(questions) + i)
                  for i in range(len(questions))]
        answers.append([o.outputs[0].text for o in llm.generate(prompts, params)])
    llm = None
    release_vllm()
    return answers


def release_vllm() -> None:
    """Free the GPU memory of an engine no longer referenced (vLLM's own teardown, where it has one)."""
    import gc

    try:
        from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

        destroy_model_parallel()
        destroy_distributed_environment()
    except ImportError:
        pass
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main(args: Args):
    if not args.temperature > 0:  # NaN too
        raise SystemExit(f"--temperature {args.temperature}: answers are sampled, at a temperature above 0 (the "
                         "release: 0.2); near-greedy answers come from a small one, such as 0.05")
    if not args.device:
        check_accelerator()
    # the only collective is the gather at the end, after hours of generation: a process that finished first
    # waits there for the slowest, longer than NCCL's 10-minute default
    state = process_state(timeout=datetime.timedelta(hours=args.gather_timeout_hours))
    source_subset = args.subset if Path(args.prompts).is_dir() else None
    records = load_records(args.prompts, source_subset, fields=("question",))[:args.max_prompts or None]
    if not records:
        raise DataError(f"{args.prompts}: no prompts (--subset {args.subset})")
    check_writable(args.out)
    models = [args.model, args.model_b or args.model]

    # 1. each process answers its share of the questions (dealt out by length, so in length order), twice
    mine = deal_out([len(r["question"]) for r in records], state)
    questions = [records[i]["question"] for i in mine]
    tokenizer = load_tokenizer(args.model)
    if args.engine == "vllm":
        if state.num_processes > 1:
            raise SystemExit("--engine vllm runs in one process (vLLM shards over the GPUs itself)")
        answers = answers_vllm(models, tokenizer, questions, args)
    else:
        device = torch.device(args.device) if args.device else state.device
        set_seed(args.seed + state.process_index)
        bar = tqdm(total=2 * len(questions), desc="generating", unit="answer", disable=state.process_index != 0)
        answers, model = [], None
        for k, name in enumerate(models):
            if model is None or name != models[k - 1]:
                model = load_causal_lm(name, tokenizer, args.dtype).to(device).eval()
            answers.append(answers_hf(model, tokenizer, questions, args, device, bar))
        bar.close()
    part = {i: (a, b) for i, a, b in zip(mine, *answers)}
    rows = {i: ab for shard in gather_parts(part, state) for i, ab in shard.items()}
    end_processes()  # what follows is the main process's alone
    if not state.is_main_process:
        return None

    # 2. pool pairs in prompt order; identical or empty answers are no preference pair: dropped, counted
    pool, identical, empty = [], 0, 0
    for i, r in enumerate(records):
        a, b = rows[i]
        if not a.strip() or not b.strip():
            empty += 1
        elif a.strip() == b.strip():
            identical += 1
        else:
            pool.append({"id": r.get("id", f"gen-{i}"), "question": r["question"], "response_j": a, "response_k": b})
    stats = {"prompts": len(records), "pairs": len(pool), "dropped_identical": identical, "dropped_empty": empty,
             "processes": state.num_processes, "models": models, "args": asdict(args)}
    if not pool:  # an empty pool marked done would make the driver's next stage fail far from the cause
        raise DataError(f"generate_pairs: none of the {len(records)} prompts gave two different, non-empty answers "
                        f"({identical} identical, {empty} with an empty answer): raise --temperature, or give --model_b; "
                        "nothing was written")
    write_records(args.out, pool)
    write_json(Path(args.out).with_suffix(".stats.json"), stats)  # written last: marks the pool done
    logger.info(f"generate_pairs: {len(pool)} pairs from {len(records)} prompts ({identical} identical and "
                f"{empty} with an empty answer dropped) -> {args.out}")
    return stats


if __name__ == "__main__":
    main(*parse([Args]))
