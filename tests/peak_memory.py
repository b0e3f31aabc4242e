"""Run a stage script and record this process's peak anonymous memory above its start:
`python tests/peak_memory.py OUT_DIR SCRIPT ARGS...` writes OUT_DIR/rank{RANK}.json.

Anonymous memory (RssAnon), not RSS: RSS also counts the pages of a memory-mapped safetensors file, which
the page cache holds once for all processes. The heavy libraries are imported before the baseline, and
the caller sets MALLOC_MMAP_THRESHOLD_ so that freed tensors go back to the system instead of staying in
the allocator's arenas (else the figure is a high-water mark of the heap, not of what was held)."""

import json
import os
import runpy
import sys
import threading
import time
from pathlib import Path

import accelerate  # noqa: F401
import deepspeed  # noqa: F401
import peft  # noqa: F401
import torch  # noqa: F401
import transformers  # noqa: F401
import trl  # noqa: F401


def anonymous_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/status has no RssAnon line")


def main():
    out, script, *args = sys.argv[1:]
    base = peak = anonymous_bytes()
    done = threading.Event()

    def watch():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, anonymous_bytes())
            time.sleep(0.002)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    sys.argv = [script, *args]
    sys.path.insert(0, str(Path(script).resolve().parent))
    try:
        runpy.run_path(script, run_name="__main__")
    finally:
        done.set()
        watcher.join()
        Path(out).mkdir(parents=True, exist_ok=True)
        rank = os.environ.get("RANK", "0")
        (Path(out) / f"rank{rank}.json").write_text(json.dumps({"peak_bytes_above_start": peak - base}))


if __name__ == "__main__":
    main()
