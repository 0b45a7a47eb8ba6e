"""Time from `serve` to ready on the tiny model, as a newcomer's `./run serve` starts (NO_TORCH_COMPILE unset).

    ./run bench startup [--runs 3] [--checkout DIR ...]

Each checkout (default: this one) is started in turn, alternating, with the same Python; a run is the
seconds from the process start to its "ready for" line, and the engine's own "warmed up in" figure.
Give an older checkout (a `git worktree`) beside this one for a side-by-side comparison.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_once(checkout: Path) -> tuple[float, float | None]:
    env = {k: v for k, v in os.environ.items() if k != "NO_TORCH_COMPILE"}
    started = time.perf_counter()
    server = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--model", "tiny", "--port",
                               str(free_port())], cwd=checkout, env=env, stderr=subprocess.PIPE, text=True)
    warm_s = None
    try:
        for line in server.stderr:
            if found := re.search(r"engine warmed up in ([0-9.]+) s", line):
                warm_s = float(found.group(1))
            if "ready for" in line:
                return time.perf_counter() - started, warm_s
        raise RuntimeError(f"{checkout}: serve exited before it was ready")
    finally:
        server.terminate()
        server.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--checkout", type=Path, action="append",
                        help="a checkout to start (repeatable; default: this one)")
    args = parser.parse_args()
    checkouts = args.checkout or [Path(__file__).resolve().parent.parent]
    results: dict[Path, list[tuple[float, float | None]]] = {c: [] for c in checkouts}
    for _ in range(args.runs):
        for checkout in checkouts:  # alternating: a noisy machine hits both alike
            results[checkout].append(start_once(checkout))
    for checkout, runs in results.items():
        ready = [r for r, _ in runs]
        warm = [w for _, w in runs if w is not None]
        warm_up = f"; warm-up {statistics.median(warm):.2f} s median" if warm else ""
        print(f"{checkout}: ready {statistics.median(ready):.2f} s median "
              f"({', '.join(f'{r:.2f}' for r in ready)}){warm_up}")


if __name__ == "__main__":
    main()
