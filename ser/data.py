"""Pair schema, loading, atomic writing, the text template and tokenisation with left truncation.

A preference pair is one JSON record::

    {"question": str, "response_j": str, "response_k": str,   # response_j is preferred
     "id": optional, "score_j": optional float, "score_k": optional float,
     "gold_preferred": optional "j"/"k", the hidden human label of a pool pair, read only by
                       statistics (see rm_loop_filter_by_self.py)}

Files are JSON (a list of records) or JSONL (one record per line), optionally gzipped.
"""

import contextlib
import gzip
import hashlib
import json
import os
import tempfile
import zlib
from pathlib import Path

PAIR_FIELDS = ("question", "response_j", "response_k")
DATA_SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz")

# The paper's template (and its released code's): the reward is read at the end of the answer.
TEMPLATE = "Question: {question}\n\nAnswer: {response}"


class DataError(ValueError):
    """Bad input data: the message names the file, the line and the field."""


def format_text(question: str, response: str) -> str:
    return TEMPLATE.format(question=question, response=response)


def prompt_text(question: str) -> str:
    """The template up to where the response starts (what a policy is conditioned on)."""
    return TEMPLATE.format(question=question, response="")


# ----------------------------------------------------------------------------- reading


def _read_bytes(path: Path, skipped: list | None) -> bytes:
    """The file's bytes, gunzipped; a truncated or corrupt gzip is an error naming the file (with a
    `skipped` list: what could be read is kept and the loss is reported there)."""
    if not path.name.endswith(".gz"):
        return path.read_bytes()
    out = bytearray()
    try:
        with gzip.open(path, "rb") as f:
            while chunk := f.read1(1 << 16):
                out += chunk
    except (EOFError, OSError, zlib.error) as e:
        message = f"{path}: truncated or corrupt gzip after {len(out):,} bytes ({e})"
        if skipped is None:
            raise DataError(message) from None
        skipped.append(message + "; the rest of the file is skipped")
        out = out[:out.rfind(b"\n") + 1]  # drop a partial last line
    return bytes(out)


def _decode(raw: bytes, path: Path, line: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line += raw[:e.start].count(b"\n")
        raise DataError(f"{path}:{line}: not UTF-8 text (byte {raw[e.start]:#04x}: {e.reason})") from None


def _loads(text: str, path, line: int):
    """json.loads, with a value nested too deeply for Python's parser named by file and line."""
    try:
        return json.loads(text)
    except RecursionError:
        raise DataError(f"{path}:{line}: JSON nested too deeply to parse") from None


def read_records(path, skipped: list | None = None) -> list[dict]:
    """Read a JSON list or a JSONL file. Each record gets `_line` (1-based line, or list index + 1).

    A malformed line (bad JSON, not UTF-8) is an error naming the file and line; with a `skipped` list
    it is appended there as a message and the line is skipped instead.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    data = _read_bytes(path, skipped)
    if data.lstrip().startswith(b"["):
        text = _decode(data, path, 1)
        try:
            rows = _loads(text, path, 1)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: malformed JSON: {e.msg}") from None
        records = []
        for i, row in enumerate(rows):
            if not isinstance(row, dict):
                raise DataError(f"{path}: record {i + 1} is {type(row).__name__}, expected an object")
            records.append({**row, "_line": i + 1})
        return records
    records = []
    # Split on "\n" only: str.splitlines() also breaks on U+2028/U+2029/U+0085, which JSON strings may
    # hold raw (the writer emits them with ensure_ascii=False).
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            row = _loads(_decode(raw, path, lineno), path, lineno)
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: record is {type(row).__name__}, expected an object")
        except (json.JSONDecodeError, DataError) as e:
            message = e.args[0] if isinstance(e, DataError) else f"{path}:{lineno}: malformed JSON line: {e.msg}"
            if skipped is None:
                raise DataError(message) from None
            skipped.append(message)
            continue
        records.append({**row, "_line": lineno})
    return records


def iter_records(path):
    """`read_records`, one record at a time: a JSONL file (gzipped or not) is read line by line, so memory
    does not grow with the file; a JSON list file is read whole. Errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    with (gzip.open if path.name.endswith(".gz") else open)(path, "rb") as f:
        first = True
        try:
            for lineno, raw in enumerate(f, start=1):  # binary lines end at b"\n" only (see read_records)
                if not raw.strip():
                    continue
                if first and raw.lstrip().startswith(b"["):
                    break  # a JSON list
                first = False
                try:
                    row = _loads(_decode(raw, path, lineno), path, lineno)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: malformed JSON line: {e.msg}") from None
                if not isinstance(row, dict):
                    raise DataError(f"{path}:{lineno}: record is {type(row).__name__}, expected an object")
                yield {**row, "_line": lineno}
            else:
                return
        except (EOFError, zlib.error, gzip.BadGzipFile) as e:
            raise DataError(f"{path}: truncated or corrupt gzip ({e})") from None
    yield from read_records(path)


def pool_chunks(dataset_name: str, subset: str | None, size: int, fields=PAIR_FIELDS):
    """`load_records`, `size` checked records at a time, in file order; local JSONL files are read lazily."""
    source = resolve_sources(dataset_name, subset)
    if isinstance(source, str):  # a hub dataset: loaded whole
        records = load_records(dataset_name, subset, fields=fields)
        for start in range(0, len(records), size):
            yield records[start:start + size]
        return
    chunk = []
    for path in source:
        for record in iter_records(path):
            check_fields([record], path, fields)
            record["_source"] = str(path)
            chunk.append(record)
            if len(chunk) == size:
                yield chunk
                chunk = []
    if chunk:
        yield chunk


def check_fields(records: list[dict], path, fields=PAIR_FIELDS) -> None:
    """Every record must hold each field as a non-empty string."""
    for r in records:
        for field in fields:
            if field not in r:
                raise DataError(f"{path}:{r.get('_line', '?')}: missing field '{field}'")
            value = r[field]
            if not isinstance(value, str):
                raise DataError(f"{path}:{r.get('_line', '?')}: field '{field}' is {type(value).__name__}, expected a string")
            if not value.strip():
                raise DataError(f"{path}:{r.get('_line', '?')}: field '{field}' is empty")
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:  # a lone surrogate ("\\ud800") parses as JSON, but is no text
                raise DataError(f"{path}:{r.get('_line', '?')}: field '{field}' holds an unpaired surrogate "
                                f"{value[e.start]!r} at character {e.start}") from None


def data_files(folder: Path, suffixes=DATA_SUFFIXES) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(suffixes))


def resolve_sources(dataset_name: str, subset: str | None, load_from_json: bool = False) -> list[Path] | str:
    """Where pairs come from, the three ways the seed commands use.

    * a file (JSON/JSONL): that file (`--load_from_json True` requires this);
    * a folder: the data files in `folder/subset` (laid out like lvwerra/stack-exchange-paired),
      or in the folder itself when `subset` is empty;
    * anything else: a hub dataset id, returned as is.
    """
    path = Path(dataset_name)
    if path.is_file():
        return [path]
    if load_from_json:
        raise DataError(f"--load_from_json True: '{dataset_name}' is not a JSON/JSONL file")
    if path.is_dir():
        folder = path / subset if subset else path
        if not folder.is_dir():
            raise DataError(f"{folder}: no such folder (--dataset_name {dataset_name} --subset {subset})")
        files = data_files(folder)
        if not files:
            raise DataError(f"{folder}: no {'/'.join(DATA_SUFFIXES)} files in this folder")
        return files
    looks_local = dataset_name.endswith(DATA_SUFFIXES) or dataset_name.startswith(("/", ".", "~")) \
        or dataset_name.count("/") > 1
    if looks_local:
        raise DataError(f"{dataset_name}: no such file or folder")
    return dataset_name


def load_records(dataset_name: str, subset: str | None = None, load_from_json: bool = False,
                 fields=PAIR_FIELDS, split: str = "train") -> list[dict]:
    """Load and check pair records from a file, a folder, or (online only) the hub."""
    source = resolve_sources(dataset_name, subset, load_from_json)
    if isinstance(source, str):
        from datasets import load_dataset  # a hub id: only when a hub is reachable

        try:
            ds = load_dataset(source, data_dir=subset or None, split=split)
        except Exception as e:
            raise DataError(f"'{source}' is neither a local file/folder nor a loadable hub dataset: {e}") from e
        records = [{**row, "_line": i + 1} for i, row in enumerate(ds)]
        check_fields(records, source, fields)
        return records
    records = []
    for path in source:
        rows = read_records(path)
        check_fields(rows, path, fields)
        for r in rows:
            r["_source"] = str(path)
        records.extend(rows)
    return records


def subsample(records: list, n: int | None, seed: int) -> list:
    """A seeded random sample of `n` records, kept in their original order; all of them when n is None,
    0, or not smaller. (The first n would take one file, or the human seed, before any other source.)"""
    if not n or n >= len(records):
        return records
    import random

    keep = sorted(random.Random(seed).sample(range(len(records)), n))
    return [records[i] for i in keep]


META = ("_line", "_source")  # where a record came from; added by the readers, never written


def strip_meta(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in META}


def umask_mode(mode: int = 0o666) -> int:
    """`mode` as the user's umask leaves it (mkstemp and mkdtemp would give 0600/0700 whatever it is)."""
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


def split_transcript(transcript: str):
    """HH-RLHF: (conversation up to the last Assistant turn, that turn's text)."""
    cut = transcript.rfind("\n\nAssistant:")
    if cut < 0:
        return None, None
    return transcript[:cut].strip(), transcript[cut + len("\n\nAssistant:"):].strip()


# ----------------------------------------------------------------------------- writing


def check_writable(*paths) -> None:
    """Fail before any work when an output could not be written: the nearest existing folder of each
    path must be writable (nothing is created here)."""
    for path in paths:
        folder = Path(path).absolute().parent
        while not folder.exists():
            folder = folder.parent
        if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
            raise PermissionError(f"{path}: cannot write here ({folder} is not a writable folder); "
                                  "nothing was computed")


def remove_stale_temporaries(*paths) -> list[Path]:
    """Remove the temporary files a killed RecordWriter or write_json left beside `paths` (`.NAME.*.tmp`):
    for a stage that alone writes these outputs, at its start. Returns what was removed."""
    removed = []
    for path in map(Path, paths):
        for tmp in path.parent.glob(f".{path.name}.*.tmp") if path.parent.is_dir() else []:
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


class RecordWriter:
    """Records written one at a time, atomically: they go to a temporary file beside `path`, which
    replaces `path` only when the `with` block ends without an error (a reader sees the old file or the
    whole new one, never half of it; a failed block leaves nothing). A JSON list when the name ends in
    .json, JSONL otherwise."""

    def __init__(self, path):
        self.path = Path(path)
        self.count = 0

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, self.tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        self.file = os.fdopen(fd, "w", encoding="utf-8")
        self.as_list = self.path.suffix == ".json"
        if self.as_list:
            self.file.write("[")
        return self

    def write(self, record) -> None:
        text = json.dumps(strip_meta(record), ensure_ascii=False)
        self.file.write(("," if self.count else "") + "\n" + text if self.as_list else text + "\n")
        self.count += 1

    def __exit__(self, error_type, error, traceback):
        try:
            if error_type is None:
                if self.as_list:
                    self.file.write("\n]\n")
                self.file.flush()
                os.fsync(self.file.fileno())  # on disk before the rename makes it visible
            self.file.close()
            if error_type is None:
                os.chmod(self.tmp, umask_mode())
                os.replace(self.tmp, self.path)
        finally:
            Path(self.tmp).unlink(missing_ok=True)
        return False


def write_records(path, records) -> None:
    """Write records atomically (see `RecordWriter`): a JSON list when the name ends in .json, JSONL otherwise."""
    with RecordWriter(path) as out:
        for r in records:
            out.write(r)


@contextlib.contextmanager
def replacing(path):
    """The one way this project writes a file whole or not at all: yields a fresh temporary path beside `path`
    (mkstemp, `.NAME.*.tmp`: no name a planted link could take, and what `remove_stale_temporaries` removes
    after a kill), which replaces `path` when the block ends without an error. On an error nothing is left."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, umask_mode())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(path, data: bytes) -> None:
    """A file written whole or not at all (`replacing`), synced to disk before it is renamed into place."""
    with replacing(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_text(path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path, obj) -> None:
    """A JSON file written whole or not at all (`replacing`): a failed write (a full disk) leaves nothing."""
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def file_sha256(path) -> str:
    """The sha256 of a file's bytes, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def replace_between(path, begin: str, end: str, text: str) -> None:
    """Put `text` between the `begin` and `end` marker lines of a generated block (a README's tables)."""
    path = Path(path)
    body = path.read_text()
    if begin not in body or end not in body.split(begin, 1)[1]:
        raise SystemExit(f"{path}: no '{begin}' ... '{end}' block")
    head, rest = body.split(begin, 1)
    path.write_text(head + begin + "\n" + text + "\n" + end + rest.split(end, 1)[1])


# ----------------------------------------------------------------------------- tokenisation


def prompt_ids(tokenizer, question: str) -> list[int]:
    """Token ids of the prompt, up to "Answer:" (the template's trailing space left out).

    This is where the response starts, in training and in generation alike: byte-level BPE tokenizers
    (GPT-2, Llama 3, SmolLM2) fold the space into the response's first token (" Bring"), so a policy
    is prompted with "...Answer:" and writes " Bring ...".
    """
    return tokenizer(prompt_text(question).rstrip(" "), add_special_tokens=False)["input_ids"]


def join_ids(tokenizer, prompt: list[int], response: list[int], max_length: int, add_eos: bool = True) -> dict:
    """`[bos] prompt response [eos]` within `max_length` tokens, cut from the left.

    The one place where a model input is assembled from prompt and response ids: `encode` (training,
    self-labelling, evaluation) and PPO (the RM scoring a sampled response) both go through it, so the
    RM scores exactly the ids it was trained on. The reward is read at the last token, so when the
    sequence is too long the start of the question is cut and the end of the response kept.
    `prompt_length` counts the kept tokens before the response (for completion-only loss).
    """
    head = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    tail = [tokenizer.eos_token_id] if add_eos else []
    budget = max_length - len(head) - len(tail)
    if budget <= 0:
        raise ValueError(f"max_length={max_length} leaves no room for text")
    body = list(prompt) + list(response)
    cut = max(0, len(body) - budget)
    return {"input_ids": head + body[cut:] + tail, "prompt_length": len(head) + max(0, len(prompt) - cut),
            "truncated": cut > 0, "response_truncated": cut > len(prompt)}


def encode(tokenizer, question: str, response: str, max_length: int, add_eos: bool = True) -> dict:
    """Tokenise `TEMPLATE(question, response)` as `[bos] text [eos]` within `max_length` tokens.

    The whole text is tokenised at once (as a tokenizer sees it in any other tool); its prompt part is
    the prefix it shares with `prompt_ids(question)`, so that a policy prompted with `prompt_ids` and
    writing the response's tokens produces exactly these ids. See `join_ids` for the cut.
    """
    # A question far longer than max_length is first cut by characters (a token is rarely more than a few
    # dozen characters), so that a 50 MB question costs no more than a long one; the cut by tokens follows.
    keep = 32 * max_length
    if len(question) > keep:
        question = question[-keep:]
    full = tokenizer(format_text(question, response), add_special_tokens=False)["input_ids"]
    n_prompt = 0
    for a, b in zip(prompt_ids(tokenizer, question), full):
        if a != b:
            break
        n_prompt += 1
    return join_ids(tokenizer, full[:n_prompt], full[n_prompt:], max_length, add_eos)
