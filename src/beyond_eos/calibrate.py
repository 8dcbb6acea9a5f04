"""Calibrate the learning-rate grid: plain-SGD sharpness at initialization, per r and seed.

Usage:
    python -m beyond_eos.calibrate --configfile config/config.yaml --out results/calibration.csv

For each r of the grid and each seed, lambda_0 is the top Hessian eigenvalue of the loss on the
run's own probe batch at its own initialization (exactly the state that training starts from),
and 2 / lambda_0 is the plain-SGD edge of stability. The CSV also states where the config's eta
grid sits relative to it, so a reader can check that it spans from below the edge to at least
32 times beyond it (docs/theory.md §5).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import sys
import tempfile
from pathlib import Path

import pandas as pd

from beyond_eos.config import load_config, run_config, validate_config
from beyond_eos.train import Trainer, atomic_write, parse_sets

log = logging.getLogger("beyond_eos.calibrate")


def sharpness_at_init(cfg) -> float:
    """lambda_max of the probe-batch Hessian at the initialization of run ``cfg``."""
    from beyond_eos.sharpness import sharpness

    with tempfile.TemporaryDirectory() as tmp:
        tr = Trainer(cfg, tmp)  # builds the same weights and probe as the training run
        W, m = [w.double() for w in tr.W], cfg.sharpness_probe or cfg.probe_size
        lam, _ = sharpness(
            W, tr.xp[:m].double(), tr.yp[:m], cfg.a, cfg.b,
            tol=cfg.lanczos_tol, maxiter=cfg.lanczos_maxiter,
        )
    return lam


def calibrate(config: dict) -> pd.DataFrame:
    etas = sorted(config["grid"]["eta"])
    rows = []
    for r in config["grid"]["r"]:
        for seed in config["grid"]["seed"]:
            cfg = run_config(config, r, "none", etas[0], seed)
            lam = sharpness_at_init(cfg)
            edge = 2.0 / lam
            log.info("r = %s, seed %d: lambda_0 = %.6g, 2/lambda_0 = %.6g", r, seed, lam, edge)
            rows.append(
                {
                    "r": r, "seed": seed, "lambda_0": lam, "eos_eta": edge,
                    "eta_min": etas[0], "eta_max": etas[-1],
                    "eta_min_over_edge": etas[0] / edge, "eta_max_over_edge": etas[-1] / edge,
                }
            )
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--configfile", help="workflow YAML config")
    src.add_argument("--config-json", help="the workflow config as JSON (what the rule passes)")
    p.add_argument("--set", action="append", default=[], help="override, e.g. data.root=/x")
    p.add_argument("--out", default="results/calibration.csv")
    args = p.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.config_json:
        config = json.loads(args.config_json)
        validate_config(config)
    else:
        config = load_config(args.configfile, parse_sets(args.set))
    table = calibrate(config)
    buf = io.StringIO()
    table.to_csv(buf, index=False, float_format="%.6g", lineterminator="\n")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(Path(args.out), buf.getvalue().encode())
    for r, grp in table.groupby("r"):
        lo, hi = grp["eta_min_over_edge"].max(), grp["eta_max_over_edge"].min()
        ok = lo < 1 and hi >= 32
        log.info("r = %s: grid spans %.3g .. %.3g x the edge (%s)", r, lo, hi,
                 "ok" if ok else "does NOT span below-edge .. 32x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
