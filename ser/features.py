"""Frozen-trunk reward models on cached features.

With the trunk frozen, a reward model's reward is its linear `score` head applied to the trunk's hidden
state at the sequence's last token (its eos), final norm included. `build_cache` computes those states once
for every token sequence (as `ser.data.encode` builds it) and for the layers asked; `train_head` fits a head
on them in seconds; `save_frozen_rm` writes an ordinary sequence-classification checkpoint (the trunk,
truncated after the layer, with the trained head) that every stage loads unchanged, plus
`frozen_trunk.json`, which lets the filter and the next retraining read the cache instead of the model.

A cache folder holds `meta.json` (the trunk's identity, `max_length`, the layers, the hidden size) and
parts written as they are done (`part-R-ID.safetensors`: float32 features [rows, layers, hidden];
`part-R-ID.json`: the sha1 of each row's token ids, and the sha256 of the features and keys together).
A part's tensor is written under a temporary name and renamed, then its key file: a part is in the cache
once its key file exists, and ID is unique, so builders never write over each other's parts. A builder
holds `.lock` (flock) while it builds, so two jobs given one cache (a sweep) take turns and the second
featurises only what the first did not; on a filesystem without flock they build side by side, safely,
at worst featurising some sequences twice. A part whose check fails (flipped bytes, reordered keys, a
truncated or missing tensor, a garbage key file) is removed with a warning at the next build and its
sequences are featurised again; a reader refuses it. A killed build resumes after its last part; a cache
built for another trunk, length or set of layers is refused.
"""

import contextlib
import fcntl
import hashlib
import json
import math
import uuid
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ser.cli import get_logger
from ser.data import DataError, replacing, write_json
from ser.modeling import model_identity
from ser.scoring import FORWARD_COST, deal_out, length_batches, prefix_groups, run_shared

META = "meta.json"
FROZEN = "frozen_trunk.json"
logger = get_logger("features")


def key(ids) -> str:
    return hashlib.sha1(",".join(map(str, ids)).encode()).hexdigest()


def layer_index(layer: int, num_layers: int) -> int:
    """A layer number in 0..num_layers (0: the embeddings; negative counts from the last)."""
    index = layer if layer >= 0 else num_layers + 1 + layer
    if not 0 < index <= num_layers:
        raise ValueError(f"layer {layer}: the trunk has layers 1..{num_layers} (or -1 for the last)")
    return index


def load_trunk(path, dtype="auto"):
    from transformers import AutoModel

    return AutoModel.from_pretrained(str(path), dtype=dtype).eval()


def read_meta(folder: Path) -> dict:
    """meta.json of a cache, or a DataError naming it when it is missing or unreadable."""
    path = Path(folder) / META
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{folder}: not a feature cache (no {META}); build it first") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: unreadable ({e}); remove the cache folder {folder} and build it again") from None
    if not isinstance(meta, dict) or not all(k in meta for k in ("trunk", "max_length", "layers", "hidden", "compute")):
        raise DataError(f"{path}: not a feature cache's meta (fields trunk, max_length, layers, hidden, compute); "
                        f"remove the cache folder {folder} and build it again")
    return meta


def check_trunk(info: dict, rm_path) -> None:
    """A frozen-trunk RM's trunk is the one it was trained on: features of a changed trunk are not its own."""
    recorded = info.get("trunk_identity")
    if recorded is None:
        return  # saved before the identity was recorded
    now = model_identity(info["trunk"])
    if now != recorded:
        changed = sorted(k for k in set(now.get("files", {})) | set(recorded.get("files", {}))
                         if now.get("files", {}).get(k) != recorded.get("files", {}).get(k))
        raise DataError(f"{rm_path}: its trunk {info['trunk']} has changed since the RM was trained (files differing in "
                        f"size, modification time or hash: {', '.join(changed) or 'the base'}); recorded identity "
                        f"{json.dumps(recorded)}, now {json.dumps(now)}. Train the RM again on this trunk, or restore "
                        "the trunk the RM was trained on (a copy keeps its identity only with cp -p)")


def check_meta(folder: Path, meta: dict) -> list[int]:
    """The layers the cache holds (those asked for when it is new). A cache built for another trunk or length,
    or without a layer asked for, is refused."""
    path = folder / META
    if not path.is_file():
        return meta["layers"]
    saved = read_meta(folder)
    for field, what in (("trunk", "trunk model"), ("max_length", "max_length"), ("compute", "precision")):
        if saved.get(field) != meta[field]:
            raise ValueError(f"{folder}: a feature cache built for another {what} ({saved.get(field)!r}; this run "
                             f"has {meta[field]!r}); use another --feature_cache folder, or remove this one")
    missing = set(meta["layers"]) - set(saved["layers"])
    if missing:
        raise ValueError(f"{folder}: the cache holds layers {saved['layers']}, not {sorted(missing)}; use another "
                         "--feature_cache folder")
    return saved["layers"]


def checksum(features: torch.Tensor, keys: list) -> str:
    """The sha256 of a part's features (float32, contiguous) and its keys, in order."""
    digest = hashlib.sha256(features.float().contiguous().numpy().tobytes())
    digest.update(json.dumps(keys).encode())
    return digest.hexdigest()


def read_keys(part: Path) -> dict:
    """A part's key file: {"keys": [...], "sha256": ...}; the old format (a bare list) has sha256 None."""
    try:
        saved = json.loads(part.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{part}: unreadable key file ({e})") from None
    if isinstance(saved, list) and all(isinstance(k, str) for k in saved):
        return {"keys": saved, "sha256": None}
    if not isinstance(saved, dict) or not isinstance(saved.get("keys"), list) or not isinstance(saved.get("sha256"), str):
        raise DataError(f"{part}: not a part's key file (fields keys, sha256)")
    return saved


def read_part(part: Path) -> tuple[list, torch.Tensor | None]:
    """A part's keys and features, checked; a DataError naming the part and what is wrong with it. A key file
    of the old format (no checksum) is read without the check, its tensor left to the caller (None)."""
    from safetensors import safe_open

    saved = read_keys(part)
    if saved["sha256"] is None:
        return saved["keys"], None
    tensor = part.with_suffix(".safetensors")
    try:
        with safe_open(str(tensor), "pt") as f:
            features = f.get_tensor("features")
    except Exception as e:  # a missing, truncated or garbage file: safetensors raises several kinds
        raise DataError(f"{tensor}: unreadable ({type(e).__name__}: {e})") from None
    if len(features) != len(saved["keys"]) or checksum(features, saved["keys"]) != saved["sha256"]:
        raise DataError(f"{part}: its features or keys do not match its checksum (changed on disk)")
    return saved["keys"], features


def cached_keys(folder: Path, repair: bool = False) -> dict:
    """{key: (part file, row)} of every saved part, from the key files. With `repair` (a build, which
    featurises their sequences again) every part's features are checked too, and a damaged part is removed
    with a warning; without it a damaged key file is an error naming it (a reader checks the features of
    each part it opens)."""
    index = {}
    for part in sorted(folder.glob("part-*.json")):
        try:
            keys = read_part(part)[0] if repair else read_keys(part)["keys"]
        except DataError as e:
            if not repair:
                raise DataError(f"{e}; build the cache again (rm_training.py or the filter with this --feature_cache), "
                                "which featurises a damaged part again") from None
            logger.warning(f"features: {e}; the part is removed and its sequences are featurised again")
            part.unlink(missing_ok=True)
            part.with_suffix(".safetensors").unlink(missing_ok=True)
            continue
        for row, k in enumerate(keys):
            index[k] = (part.with_suffix(".safetensors"), row)
    return index


@contextlib.contextmanager
def building(folder: Path, state):
    """The cache's build lock, held by the main process (the other processes of its job wait at a barrier):
    concurrent builders take turns. Where the filesystem has no flock, builders proceed side by side."""
    handle = None
    if state.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        handle = open(folder / ".lock", "a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError as e:
            logger.warning(f"features: {folder} has no flock ({e}); concurrent builders featurise side by side")
    state.wait_for_everyone()
    try:
        yield
    finally:
        if handle:
            handle.close()  # releases the lock


@torch.no_grad()
def build_cache(folder, trunk_path, pad_id: int, sequences, max_length: int, layers, batch_size: int = 16,
                dtype: str = "auto", bf16: bool | None = None, state=None, part_rows: int = 4096,
                progress: str | None = "featurising", device=None, shared_prefix: bool = False) -> dict:
    """Features of every sequence not yet in the cache at `folder`. Each process featurises its share (split
    like pool scoring) in batches of similar length and saves a part every `part_rows` rows. With
    `shared_prefix`, sequences that share a prefix (both sides of a pair: their question) are grouped
    (`prefix_groups`), whole groups are dealt out, and each group's prefix runs once (`run_shared`); the
    features equal the plain pass's up to float rounding. The trunk's weights dtype and bf16 autocast are part
    of the cache's identity; `bf16=None` takes the cache's own (off for a new cache)."""
    from ser.modeling import process_state

    folder, state = Path(folder), state or process_state()
    if bf16 is None:
        bf16 = (folder / META).is_file() and json.loads((folder / META).read_text())["compute"]["bf16_autocast"]
    trunk = load_trunk(trunk_path, dtype)
    n_layers = trunk.config.num_hidden_layers
    layers = sorted({layer_index(x, n_layers) for x in layers})
    meta = {"trunk": model_identity(trunk_path), "trunk_path": str(Path(trunk_path).resolve()),
            "max_length": max_length, "layers": layers, "hidden": trunk.config.hidden_size,
            "compute": {"dtype": str(next(trunk.parameters()).dtype), "bf16_autocast": bool(bf16)}}
    with building(folder, state):
        layers = meta["layers"] = check_meta(folder, meta)
        if state.is_main_process:
            write_json(folder / META, meta)
            cached_keys(folder, repair=True)  # damaged parts go before anyone reads the index
        state.wait_for_everyone()
        have = cached_keys(folder)
        todo = list({key(s): s for s in sequences if key(s) not in have}.items())
        if shared_prefix:
            groups = prefix_groups([s for _, s in todo])
            mine = [[todo[i] for i in groups[g]] for g in deal_out([sum(len(todo[i][1]) for i in g) for g in groups],
                                                                     state)]
            featurise_shared(trunk, mine, folder, layers, n_layers, pad_id, batch_size, bf16, state, part_rows,
                             progress, device or state.device)
            featurised = sum(map(len, mine))
        else:
            mine = [todo[i] for i in deal_out([len(s) for _, s in todo], state)]
            featurise(trunk, mine, folder, layers, n_layers, pad_id, batch_size, bf16, state, part_rows, progress,
                      device or state.device)
            featurised = len(mine)
        state.wait_for_everyone()
    return {"sequences": len(sequences), "featurised_here": featurised, "cached_before": len(sequences) - len(todo)}


def cut(trunk, layers, n_layers, device) -> int:
    """No layer past the deepest one asked is computed: the trunk is cut there (its last hidden state is then
    that layer's, normed). Returns the trunk's layer count."""
    deepest = max(layers)
    if deepest < n_layers:
        trunk.layers = trunk.layers[:deepest]
        trunk.config.num_hidden_layers = n_layers = deepest
    trunk.to(device)
    return n_layers


def readout(trunk, hidden, last, layers, n_layers) -> torch.Tensor:
    """[rows, layers, hidden] features at each row's `last` position: hidden_states[n_layers] is after the
    final norm; a checkpoint truncated after layer l computes norm(h_l)."""
    at = torch.arange(len(last), device=last.device)
    return torch.stack([hidden[x][at, last] if x == n_layers else trunk.norm(hidden[x][at, last]) for x in layers],
                       1).float().cpu()


def featurise(trunk, mine, folder, layers, n_layers, pad_id, batch_size, bf16, state, part_rows, progress, device):
    """The features of `mine` ((key, ids) pairs), saved as parts of `part_rows` rows."""
    n_layers = cut(trunk, layers, n_layers, device)
    batches = length_batches([len(s) for _, s in mine], batch_size, FORWARD_COST)
    rows, keys = [], []
    bar = tqdm(total=len(mine), desc=progress, unit="seq", disable=progress is None or not state.is_main_process)
    for b, batch in enumerate(batches):
        seqs = [mine[i][1] for i in batch]
        width = max(map(len, seqs))
        ids = torch.tensor([s + [pad_id] * (width - len(s)) for s in seqs], device=device)
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=device)
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
            hidden = trunk(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        rows.append(readout(trunk, hidden, torch.tensor([len(s) - 1 for s in seqs], device=device), layers, n_layers))
        keys += [mine[i][0] for i in batch]
        bar.update(len(batch))
        if len(keys) >= part_rows or b == len(batches) - 1:
            save_part(folder, f"part-{state.process_index}-{uuid.uuid4().hex[:16]}", torch.cat(rows), keys)
            rows, keys = [], []
    bar.close()


def featurise_shared(trunk, mine, folder, layers, n_layers, pad_id, batch_size, bf16, state, part_rows, progress,
                     device):
    """`featurise` for `mine` in groups ([[(key, ids), ...], ...]) whose shared prefix runs once (`run_shared`),
    whole groups to a part of about `part_rows` rows."""
    n_layers = cut(trunk, layers, n_layers, device)
    bar = tqdm(total=sum(map(len, mine)), desc=progress, unit="seq",
               disable=progress is None or not state.is_main_process)

    def read(output, last):
        return readout(trunk, output.hidden_states, last, layers, n_layers)

    start = 0
    while start < len(mine):
        end, rows = start, 0
        while end < len(mine) and (rows < part_rows or end == start):
            rows, end = rows + len(mine[end]), end + 1
        groups = {g: [ids for _, ids in mine[g]] for g in range(start, end)}
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
            values, _ = run_shared(trunk, pad_id, pad_id, groups, read, batch_size, output_hidden_states=True)
        save_part(folder, f"part-{state.process_index}-{uuid.uuid4().hex[:16]}",
                  torch.stack([v for g in groups for v in values[g]]), [k for g in groups for k, _ in mine[g]])
        bar.update(rows)
        start = end
    bar.close()


def save_part(folder: Path, name: str, features: torch.Tensor, keys: list) -> None:
    """The features, then their keys with the checksum of both; each file is written under a temporary name
    and renamed, so a part is in the cache, whole, once its key file exists."""
    from safetensors.torch import save_file

    features = features.float().contiguous()
    with replacing(folder / f"{name}.safetensors") as tmp:
        save_file({"features": features}, tmp)
    write_json(folder / f"{name}.json", {"keys": keys, "sha256": checksum(features, keys)})


def load_features(folder, sequences, layer: int) -> torch.Tensor:
    """[len(sequences), hidden] features of one layer, in the order of `sequences`."""
    from safetensors import safe_open

    folder = Path(folder)
    meta = read_meta(folder)
    index = cached_keys(folder)
    if layer not in meta["layers"]:
        raise ValueError(f"{folder}: layer {layer} is not cached (it holds {meta['layers']})")
    column = meta["layers"].index(layer)
    parts, out = {}, torch.empty(len(sequences), meta["hidden"])
    for i, s in enumerate(sequences):
        k = key(s)
        if k not in index:
            raise ValueError(f"{folder}: sequence {i} is not in the cache; build it first")
        path, row = index[k]
        if path not in parts:
            try:
                _, features = read_part(path.with_suffix(".json"))  # checked against its checksum
            except DataError as e:
                raise DataError(f"{e}; build the cache again (rm_training.py or the filter with this "
                                "--feature_cache), which featurises a damaged part again") from None
            if features is None:  # an old part without a checksum
                with safe_open(str(path), "pt") as f:
                    features = f.get_tensor("features")
            parts[path] = features[:, column]
        out[i] = parts[path][row]
    return out


def train_head(f_j, f_k, w0=None, l2: float = 1e-3, max_iter: int = 200, loss: str = "bt", margin: float = 1.0,
               center: float = 0.0):
    """The score head w minimising the mean pairwise loss of rewards f @ w plus l2/2 |w|^2 (full-batch L-BFGS,
    deterministic). `w0` warm-starts it (a retraining continues from the previous head). `center` adds TRL's
    reward-centring term, center * mean((r_j + r_k)^2): a head has no bias, and the features share a large
    common component, so without it the rewards carry an arbitrary offset that probabilities p = sigmoid(r)
    (the paper's status thresholds) read as confidence."""
    from ser.scoring import pair_loss

    f_j, f_k = f_j.double(), f_k.double()
    both = f_j + f_k
    w = torch.zeros(f_j.shape[1], dtype=torch.float64) if w0 is None else w0.double().clone()
    w.requires_grad_(True)
    opt = torch.optim.LBFGS([w], lr=1, max_iter=max_iter, tolerance_grad=1e-9, tolerance_change=1e-12,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        value = pair_loss(f_j @ w, f_k @ w, loss, margin).mean()
        value = value + 0.5 * l2 * (w * w).sum() + (center * ((both @ w) ** 2).mean() if center else 0)
        value.backward()
        return value

    opt.step(closure)
    return w.detach().float()


def train_head_steps(f_j, f_k, w0=None, l2: float = 1e-3, epochs: float = 1.0, lr: float = 1e-3, batch_size: int = 32,
                     warmup: float = 0.0, seed: int = 0, loss: str = "bt", margin: float = 1.0, center: float = 0.0,
                     steps: int | None = None):
    """The score head trained as the paper trains RMs, not to convergence: AdamW on minibatches of the mean
    pairwise loss plus l2/2 |w|^2 (and `center` as in `train_head`), a linear learning-rate schedule after
    `warmup` steps of warm-up (a share of them below 1, as transformers' warmup_steps), `epochs` passes over
    the pairs in a seeded order (or exactly `steps` optimiser steps: a matched-steps control). `w0` continues
    a previous head, which now differs from restarting. Returns the head and the optimiser steps run."""
    from ser.scoring import pair_loss

    n = len(f_j)
    per_epoch = math.ceil(n / batch_size)
    total = steps if steps is not None else max(1, round(epochs * per_epoch))
    w = (torch.zeros(f_j.shape[1]) if w0 is None else w0.float().clone()).requires_grad_(True)
    opt = torch.optim.AdamW([w], lr=lr, weight_decay=0.0)
    warmup = int(warmup * total) if 0 < warmup < 1 else int(warmup)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: (t + 1) / max(1, warmup) if t < warmup else max(0.0, (total - t) / max(1, total - warmup)))
    generator, order = torch.Generator().manual_seed(seed), torch.empty(0, dtype=torch.long)
    for step in range(total):
        if len(order) == 0:  # a new pass over the pairs
            order = torch.randperm(n, generator=generator)
        idx, order = order[:batch_size], order[batch_size:]
        r_j, r_k = f_j[idx].float() @ w, f_k[idx].float() @ w
        value = pair_loss(r_j, r_k, loss, margin).mean() + 0.5 * l2 * (w * w).sum()
        if center:
            value = value + center * ((r_j + r_k) ** 2).mean()
        opt.zero_grad()
        value.backward()
        opt.step()
        schedule.step()
    return w.detach().float(), total


def frozen_info(path) -> dict | None:
    """What a frozen-trunk RM records of its trunk, layer and cache; None for any other model."""
    p = Path(path) / FROZEN
    return json.loads(p.read_text()) if p.is_file() else None


def save_frozen_rm(out, trunk_path, layer: int, w: torch.Tensor, tokenizer, cache, max_length: int,
                   dtype: str = "auto") -> torch.Tensor:
    """An ordinary sequence-classification checkpoint: the trunk truncated after `layer` in `dtype` (auto: the
    trunk's), the head `w` in fp32. Returns the head as saved."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from ser.modeling import fit_embeddings, save_whole

    config = AutoConfig.from_pretrained(str(trunk_path), num_labels=1)
    config.num_hidden_layers = layer
    model = AutoModelForSequenceClassification.from_pretrained(str(trunk_path), config=config, dtype=dtype)
    model = fit_embeddings(model, tokenizer)
    model.score.float()  # the head in fp32 whatever the trunk's dtype: the cached path scores with it as fitted
    with torch.no_grad():
        model.score.weight.copy_(w.view(1, -1).float())
    save_whole(out, model, tokenizer)
    write_json(Path(out) / FROZEN, {"trunk": str(Path(trunk_path).resolve()), "layer": layer,
                                    "feature_cache": str(Path(cache).resolve()), "max_length": max_length,
                                    "trunk_identity": model_identity(trunk_path)})
    return model.score.weight.detach().float().view(-1)


BOOTSTRAP = "bootstrap_heads.safetensors"


def bootstrap_heads(f_j, f_k, k: int, seed: int, **fit) -> torch.Tensor:
    """[k, hidden] heads, each fitted (`train_head`, same settings) to a bootstrap resample of the pairs: the
    members of a frozen-trunk RM's ensemble (--selection ensemble)."""
    generator = torch.Generator().manual_seed(seed)
    heads = []
    for _ in range(k):
        idx = torch.randint(len(f_j), (len(f_j),), generator=generator)
        heads.append(train_head(f_j[idx], f_k[idx], **fit))
    return torch.stack(heads)


def save_bootstrap_heads(out, heads: torch.Tensor) -> None:
    from safetensors.torch import save_file

    with replacing(Path(out) / BOOTSTRAP) as tmp:
        save_file({"heads": heads.float().contiguous()}, tmp)
    info = frozen_info(out)
    write_json(Path(out) / FROZEN, {**info, "bootstrap_heads": len(heads)})


def load_bootstrap_heads(rm_path) -> torch.Tensor:
    """[k, hidden]: the bootstrap heads saved beside a frozen-trunk RM; refused, naming it, if it has none."""
    from safetensors import safe_open

    path = Path(rm_path) / BOOTSTRAP
    if not path.is_file():
        raise FileNotFoundError(f"{rm_path}: no {BOOTSTRAP}: train it with rm_training.py --trunk frozen "
                                "--bootstrap_heads K")
    with safe_open(str(path), "pt") as f:
        return f.get_tensor("heads")


def bootstrap_rewards(cache, ids_j, ids_k, rm_path) -> list[tuple[list, list]]:
    """Each bootstrap head's rewards (r_j, r_k) of the pairs, from the cache."""
    heads = load_bootstrap_heads(rm_path)
    layer = frozen_info(rm_path)["layer"]
    f_j, f_k = load_features(cache, ids_j, layer), load_features(cache, ids_k, layer)
    return [((f_j @ w).tolist(), (f_k @ w).tolist()) for w in heads]


def head_weight(rm_path) -> torch.Tensor:
    from safetensors import safe_open

    for f in sorted(Path(rm_path).glob("*.safetensors")):
        with safe_open(str(f), "pt") as s:
            if "score.weight" in s.keys():
                return s.get_tensor("score.weight").float().view(-1)
    raise ValueError(f"{rm_path}: no score.weight saved")


def rewards(cache, sequences, rm_path) -> list[float]:
    """A frozen-trunk RM's rewards of token sequences, read from the cache: features @ w."""
    info = frozen_info(rm_path)
    return (load_features(cache, sequences, info["layer"]) @ head_weight(rm_path)).tolist()

