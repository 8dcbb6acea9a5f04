"""Overhead of the instruments at the paper cadence, as a ratio (not part of the test suite).

Trains the same paper-profile configuration (r = 2, normalized, one eta) for a number of steps
twice: with the instruments of config/config.yaml, and with Taylor and sharpness switched off
(the per-step loss, norms and ranks stay on in both). Prints the wall times and their ratio.
By default both runs are the paper's full 10 epochs (2340 steps), so the log-spaced sharpness
and full-T3 points fall where they do in the paper profile; expect about 10 minutes on 2 cores.

    python benchmarks/bench_overhead.py [--steps 2340] [--eta 1] [--data-root data]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace

from beyond_eos.config import load_config, run_config
from beyond_eos.train import train


def timed(cfg) -> float:
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        train(cfg, out)
        return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", default="config/config.yaml")
    p.add_argument("--steps", type=int, default=2340, help="2340 = the paper's 10 epochs")
    p.add_argument("--r", type=float, default=2)
    p.add_argument("--eta", type=float, default=1)
    p.add_argument("--data-root", default="data")
    args = p.parse_args()

    config = load_config(args.config, {"data.root": args.data_root})
    cfg = replace(run_config(config, args.r, "normalized", args.eta, 0), max_steps=args.steps)
    off = replace(cfg, taylor_every=0, taylor_full_points=0, sharpness_points=0)
    t_off = timed(off)
    t_on = timed(cfg)
    print(f"steps {args.steps}, r = {args.r}, eta = {args.eta}")
    print(f"instruments off: {t_off:.1f} s   on (paper cadence): {t_on:.1f} s")
    print(f"overhead ratio on/off: {t_on / t_off:.3f}  (target <= 1.35)")


if __name__ == "__main__":
    main()
