"""Run a stage script with one process late to the collectives that `ser.scoring.gather_parts` makes:
`python tests/late_rank.py RANK SECONDS SCRIPT ARGS...` (RANK sleeps SECONDS before each gather), as a process
that finishes hours of work after the others would be."""

import os
import runpy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import ser.scoring  # noqa: E402


def main():
    rank, seconds, script, *args = sys.argv[1:]
    gather_parts = ser.scoring.gather_parts

    def late(part, state):
        if os.environ.get("RANK") == rank:
            time.sleep(float(seconds))
        return gather_parts(part, state)

    ser.scoring.gather_parts = late  # before the script imports it by name
    sys.argv = [script, *args]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
