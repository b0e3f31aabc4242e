"""RUN/config.json: how a run was made, and the check that a re-run asks for the same thing.

    python -m ser.run_config --run RUN [--force] DATA=... SFT=... MAX_LOOPS=3 RM_ARGS="..."
    python -m ser.run_config --run RUN --note human_labels.loop_1=PATH

The loop driver and the demo call this before any stage. The first call writes RUN/config.json with
the settings, the git revision and the package versions. A later call into the same RUN compares the
settings: when one differs, the finished stages in RUN were made with other settings and must not be
skipped as if they were this run's, so it stops and names the setting (exit 3), unless --force
(FORCE=1 in the driver), which records the new settings and lets the run continue. A note (--note KEY=VALUE)
records what a run took in along the way, such as the human labels each loop imported; notes are kept,
never compared.
"""

import json
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from ser.data import write_json

PACKAGES = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "deepspeed")


def git_revision(root: Path) -> str | None:
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True,
                               text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return rev.stdout.strip() + ("+dirty" if dirty else "")


def versions() -> dict:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def check(run: Path, settings: dict, force: bool = False) -> str:
    """Write or compare RUN/config.json; returns what happened, raises SystemExit(3) on a mismatch."""
    path = run / "config.json"
    record = {"settings": settings, "git_revision": git_revision(Path(__file__).resolve().parents[1]),
              "versions": versions()}
    if path.is_file():
        try:
            previous = json.loads(path.read_text())["settings"]
            if not isinstance(previous, dict):
                raise TypeError(f"field 'settings' is {type(previous).__name__}, expected an object")
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            if not force:
                raise SystemExit(f"error: {path}: unreadable run config ({e}); remove it, use another RUN, or "
                                 "FORCE=1 to record this run's settings over it") from None
            record["forced_over"] = path.read_text(errors="replace")
            write_json(path, record)
            return f"unreadable run config replaced under FORCE ({e})"
        differ = sorted(k for k in set(previous) | set(settings) if previous.get(k) != settings.get(k))
        if not differ:
            return "same settings"
        said = "; ".join(f"{k}: was {previous.get(k)!r}, now {settings.get(k)!r}" for k in differ)
        if not force:
            print(f"error: {run} was made with other settings ({said}). Its finished stages would be skipped as "
                  "if they were this run's. Use another RUN, or FORCE=1 to continue it with the new settings.",
                  file=sys.stderr)
            raise SystemExit(3)
        record["forced_over"] = previous
        record["notes"] = json.loads(path.read_text()).get("notes", {})
        write_json(path, record)
        return f"settings changed under FORCE ({said})"
    write_json(path, record)
    return "new run"


def note(run: Path, key: str, value: str) -> None:
    """Record KEY=VALUE under RUN/config.json's notes (kept, never compared)."""
    path = run / "config.json"
    record = json.loads(path.read_text())
    record.setdefault("notes", {})[key] = value
    write_json(path, record)
    print(f"ser: {path}: noted {key}={value}")


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--run" not in argv:
        raise SystemExit("usage: python -m ser.run_config --run RUN [--force] KEY=VALUE ... | --note KEY=VALUE")
    i = argv.index("--run")
    run = Path(argv[i + 1])
    rest = argv[:i] + argv[i + 2:]
    if rest[:1] == ["--note"] and len(rest) == 2 and "=" in rest[1]:
        note(run, *rest[1].split("=", 1))
        return
    force = "--force" in rest
    pairs = [a for a in rest if a != "--force"]
    bad = [a for a in pairs if "=" not in a]
    if bad:
        raise SystemExit(f"error: settings are KEY=VALUE, got {bad}")
    settings = dict(a.split("=", 1) for a in pairs)
    run.mkdir(parents=True, exist_ok=True)
    print(f"ser: {run}/config.json: {check(run, settings, force)}")


if __name__ == "__main__":
    main()
