"""How many torch threads `pyro-lpc train` should use by default: the default run (LPC on the
embedded digits), shortened to a few epochs, with 1 and 2 threads, alone and beside another busy
process (a pure-Python loop holding one core), each in a fresh process, repeated; then the full
default run once, alone, with the thread count whose mean training time over both conditions
was lowest (the `--threads` default, `pyro_lpc.images.cli.THREADS`, is set from it).

    python benchmarks/cli_threads.py [--epochs 5] [--repeats 2] [--no-full]

Timings: the training seconds from the run's history (the clock `fit` keeps, excluding start-up
and evaluation) and the whole command's wall time (start-up, training and evaluation).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import RESULTS, loadavg, log, write_results

from pyro_lpc.images.cli import THREADS


def train(out: Path, threads: int, extra) -> dict:
    """One `pyro-lpc train` in a fresh process: training seconds, total seconds, test log-likelihood."""
    begin = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pyro_lpc", "train", "--out", str(out), "--threads", str(threads),
                    "--quiet", *extra], check=True, stdout=subprocess.DEVNULL)
    total = time.perf_counter() - begin
    with open(out / "history.jsonl") as f:
        rows = [json.loads(line) for line in f]
    with open(out / "metrics.json") as f:
        metrics = json.load(f)
    return {"train_seconds": rows[-1]["time"], "total_seconds": total, "iterations": len(rows),
            "test_log_likelihood": metrics["test_log_likelihood"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=5, help="epochs of the shortened runs")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-full", action="store_true", help="skip the full default run")
    parser.add_argument("--out", default=str(RESULTS / "cli_threads.json"))
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="pyro-lpc-threads-") as tmp:
        for repeat in range(args.repeats):
            for busy in (False, True):
                for threads in (1, 2):
                    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
                    try:
                        before = loadavg()
                        run = train(Path(tmp) / f"r{repeat}-{busy}-{threads}", threads,
                                    ["--epochs", str(args.epochs)])
                    finally:
                        if hog is not None:
                            hog.kill()
                            hog.wait()
                    rows.append({"threads": threads, "busy_neighbour": busy, "repeat": repeat, "loadavg": before,
                                 **run})
                    log(f"threads {threads}, {'busy neighbour' if busy else 'alone'}, repeat {repeat}: "
                        f"train {run['train_seconds']:.1f} s, total {run['total_seconds']:.1f} s ({before})")
        mean = {t: sum(r["train_seconds"] for r in rows if r["threads"] == t) / (2 * args.repeats) for t in (1, 2)}
        best = min(mean, key=mean.get)
        log(f"mean training seconds over both conditions: {mean}; best {best} thread(s) (CLI default {THREADS})")
        full = None
        if not args.no_full:
            before = loadavg()
            full = {"threads": best, "loadavg": before, **train(Path(tmp) / "full", best, [])}
            log(f"full default run, {best} thread(s): train {full['train_seconds']:.0f} s, "
                f"total {full['total_seconds']:.0f} s ({before})")
    write_results(args.out, {"epochs": args.epochs, "rows": rows, "best_threads": best, "full_run": full},
                  note="The machine's 2 cores were shared with other workers' jobs during these runs (see each "
                       "row's load average); compare the ratios within a repeat rather than the absolute seconds.")


if __name__ == "__main__":
    main()
