"""Per-run outputs -> results/summary.csv and the tables (docs/theory.md §5).

Usage:
    python -m beyond_eos.aggregate --runs DIR [DIR ...] --out results
Each DIR is a run folder (holding summary.json, config.json, metrics.csv) or a folder of
run folders. Writes
    OUT/summary.csv                     one row per run, columns SUMMARY_COLUMNS
    OUT/tables/table1.{csv,md,tex}      per (r, scaling, eta) over seeds, columns TABLE1_COLUMNS
    OUT/tables/table2.{csv,md,tex}      Taylor prediction error per order, TABLE2_COLUMNS
The same inputs give byte-identical files: rows are sorted, column order is fixed and every
float is written with a fixed format.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

log = logging.getLogger("beyond_eos.aggregate")

RUN_FILES = ("summary.json", "config.json", "metrics.csv")
GROUP = ["r", "scaling", "eta"]
ORDERS = (1, 2, 3)

# config.json fields copied into summary.csv (what distinguishes runs of different profiles)
CONFIG_COLUMNS = [
    "r", "scaling", "eta", "seed", "depth", "width", "a", "b", "batch_size", "n_train",
    "n_test", "epochs", "max_steps", "dtype", "measure_every", "taylor_every",
    "sharpness_points",
]
# summary.json fields, as train.Trainer.summary writes them
RESULT_COLUMNS = [
    "status", "diverged_step", "collapsed_step", "steps", "total_steps", "final_train_loss",
    "final_train_acc", "test_loss", "test_acc", "srank_last", "stable_rank_last",
    "sharpness_init", "sharpness_last", "eos_ratio_init", "eos_ratio_last", "max_eos_ratio",
]
TAYLOR_COLUMNS = ["taylor_points"] + [f"taylor_relerr_{k}" for k in ORDERS]
# from metrics.csv: the worst minibatch loss before any divergence (a loss explosion that the
# run survived shows here, not in the final loss), and the last preconditioned sharpness
TRAJECTORY_COLUMNS = ["max_loss", "sharpness_pre_last"]
SUMMARY_COLUMNS = [
    "run_id", *CONFIG_COLUMNS, *RESULT_COLUMNS, *TRAJECTORY_COLUMNS, *TAYLOR_COLUMNS
]
# integer columns that may be missing: nullable so that 12 is not written as 12.0
NULLABLE_INT = ["n_train", "n_test", "max_steps", "diverged_step", "collapsed_step"]

# Table 1: means and sds over the seeds that did not diverge (a diverged run has no final
# loss or accuracy, and its max EOS ratio would only say where it blew up)
TABLE1_METRICS = {
    "max_loss": "max_loss",
    "train_loss": "final_train_loss",
    "test_acc": "test_acc",
    "srank_last": "srank_last",
    "sharpness_last": "sharpness_last",
    "max_eos_ratio": "max_eos_ratio",
}
TABLE1_COLUMNS = [
    *GROUP, "n_seeds", "n_diverged", "n_collapsed",
    *[f"{name}_{stat}" for name in TABLE1_METRICS for stat in ("mean", "sd")],
]
TABLE2_COLUMNS = [*GROUP, "n_runs", "taylor_points", *[f"median_relerr_{k}" for k in ORDERS]]

TABLE_FLOAT = "%.6g"
CAPTIONS = {
    "table1": (
        "Table 1. Per (r, scaling, eta) over seeds. n_seeds counts all seeds, n_diverged"
        " those stopped by divergence, n_collapsed those whose last hidden layer died on the"
        " probe batch at some step. Means and sample sds (ddof 1) of the largest minibatch"
        " loss seen before any divergence (max_loss), the final training loss,"
        " test accuracy, last-hidden-layer soft rank, final plain sharpness and max EOS ratio"
        " are over the"
        " non-diverged seeds only; sd is empty with fewer than two."
    ),
    "table2": (
        "Table 2. Per (r, scaling, eta): median over the Taylor steps of all seeds (pooled)"
        " of the relative error |dL_k - dL_actual| / |dL_actual| of the order-k prediction"
        " of the one-step change of the minibatch loss. taylor_points counts the Taylor"
        " steps; one whose actual change is exactly zero has no relative error and is left"
        " out of the medians."
    ),
    "table3": (
        "Table 3. The scalings side by side per (r, eta), from Table 1: diverged seeds out of"
        " all, then mean ± sd over the non-diverged seeds of the largest minibatch loss, the"
        " final training loss, test"
        " accuracy, last-hidden-layer soft rank, final plain sharpness and max EOS ratio"
        " (eta lambda_pre / 2). A dash: every seed diverged, or not measured."
    ),
}
# Table 3: the columns of Table 1 shown per scaling, as "mean ± sd" text
TABLE3_METRICS = [
    "max_loss", "train_loss", "test_acc", "srank_last", "sharpness_last", "max_eos_ratio"
]


class RunFolderError(FileNotFoundError):
    """A run folder is missing a file or a column; the message names it."""


@dataclass(frozen=True)
class Run:
    """One run's outputs, as train.Trainer.finish writes them."""

    path: Path
    summary: dict
    config: dict
    metrics: pd.DataFrame

    @property
    def key(self) -> tuple:
        s = self.summary
        return (float(s["r"]), s["scaling"], float(s["eta"]), int(s["seed"]))

    @property
    def depth(self) -> int:
        return int(self.config["depth"])


def find_run_dirs(dirs: list[str | Path]) -> list[Path]:
    """Run folders among ``dirs``: each is a run folder itself or holds run folders."""
    found = []
    for d in map(Path, dirs):
        if (d / "summary.json").is_file():
            found.append(d)
            continue
        children = sorted(c for c in d.glob("*") if (c / "summary.json").is_file())
        if not children:
            raise RunFolderError(
                f"{d} is neither a run folder (no summary.json) nor a folder of run folders;"
                " pass results/runs/<run id> folders written by beyond_eos.train"
            )
        found += children
    return found


def read_metrics(path: Path, depth: int) -> pd.DataFrame:
    """metrics.csv as floats (empty cell -> NaN), with the columns the stage needs checked."""
    df = pd.read_csv(path, dtype="float64")
    needed = [
        "step", "loss", f"srank_{depth}", "sharpness_pre", "eos_ratio", "dL_actual",
        *[f"dL_{k}" for k in ORDERS], "test_acc",
    ]
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise RunFolderError(
            f"{path} lacks columns {missing}; rerun its training with the current beyond_eos"
        )
    df["step"] = df["step"].astype(int)
    return df


def load_run(path: str | Path) -> Run:
    path = Path(path)
    absent = [f for f in RUN_FILES if not (path / f).is_file()]
    if absent:
        raise RunFolderError(f"run folder {path} lacks {absent}; was its training finished?")
    summary = json.loads((path / "summary.json").read_text())
    config = json.loads((path / "config.json").read_text())
    return Run(path, summary, config, read_metrics(path / "metrics.csv", int(config["depth"])))


def load_runs(dirs: list[str | Path]) -> list[Run]:
    """Every run under ``dirs``, sorted by (r, scaling, eta, seed); a repeated run raises."""
    runs = sorted((load_run(d) for d in find_run_dirs(dirs)), key=lambda run: run.key)
    for a, b in zip(runs, runs[1:]):
        if a.key == b.key:
            raise ValueError(f"{a.path} and {b.path} are the same run {a.key}; pass one of them")
    log.info("loaded %d runs", len(runs))
    return runs


def taylor_errors(metrics: pd.DataFrame) -> pd.DataFrame:
    """Relative error of the order-k prediction on each Taylor step (columns relerr_1..3).

    Steps with dL_actual = 0 have no relative error (NaN), nor do missing predictions.
    """
    rows = metrics[metrics["dL_actual"].notna()]
    actual = rows["dL_actual"].to_numpy()
    out = {}
    with np.errstate(divide="ignore", invalid="ignore"):
        for k in ORDERS:
            err = np.abs(rows[f"dL_{k}"].to_numpy() - actual) / np.abs(actual)
            out[f"relerr_{k}"] = np.where(np.isfinite(err), err, np.nan)
    return pd.DataFrame(out, index=rows.index)


def median_or_nan(values: pd.Series) -> float:
    v = values.dropna()
    return float(np.median(v)) if len(v) else float("nan")


def summary_table(runs: list[Run]) -> pd.DataFrame:
    """One row per run: its config, its summary.json and per-run Taylor errors."""
    records = []
    for run in runs:
        rec = {"run_id": run.summary["run_id"]}
        rec.update({c: run.config.get(c) for c in CONFIG_COLUMNS})
        rec.update({c: run.summary.get(c) for c in RESULT_COLUMNS})
        m = run.metrics
        finite = m["loss"][np.isfinite(m["loss"])]
        rec["max_loss"] = finite.max() if len(finite) else np.nan
        pre = m["sharpness_pre"].dropna()
        rec["sharpness_pre_last"] = pre.iloc[-1] if len(pre) else np.nan
        err = taylor_errors(run.metrics)
        rec["taylor_points"] = len(err)
        rec.update({f"taylor_relerr_{k}": median_or_nan(err[f"relerr_{k}"]) for k in ORDERS})
        records.append(rec)
    df = pd.DataFrame.from_records(records, columns=SUMMARY_COLUMNS)
    for c in NULLABLE_INT:
        df[c] = df[c].astype("Int64")
    float_cols = [
        "r", "eta", "a", "b", "final_train_loss", "final_train_acc", "test_loss", "test_acc",
        "srank_last", "stable_rank_last", "sharpness_init", "sharpness_last", "eos_ratio_init",
        "eos_ratio_last", "max_eos_ratio", *TRAJECTORY_COLUMNS,
    ]
    df[float_cols] = df[float_cols].astype("float64")
    return df


def table1(summary: pd.DataFrame) -> pd.DataFrame:
    """Per (r, scaling, eta): counts over seeds, mean and sd over the non-diverged seeds."""
    rows = []
    for key, g in summary.groupby(GROUP, sort=True):
        ok = g[g["status"] != "diverged"]
        row = dict(zip(GROUP, key))
        row["n_seeds"] = len(g)
        row["n_diverged"] = int((g["status"] == "diverged").sum())
        row["n_collapsed"] = int(g["collapsed_step"].notna().sum())
        for name, col in TABLE1_METRICS.items():
            row[f"{name}_mean"] = ok[col].mean()
            row[f"{name}_sd"] = ok[col].std(ddof=1)
        rows.append(row)
    return pd.DataFrame.from_records(rows, columns=TABLE1_COLUMNS)


def table2(runs: list[Run]) -> pd.DataFrame:
    """Per (r, scaling, eta): median relative Taylor error per order, seeds pooled."""
    groups: dict[tuple, list[pd.DataFrame]] = {}
    for run in runs:
        r, scaling, eta, _ = run.key
        groups.setdefault((r, scaling, eta), []).append(taylor_errors(run.metrics))
    rows = []
    for key in sorted(groups):
        err = pd.concat(groups[key], ignore_index=True)
        row = dict(zip(GROUP, key))
        row["n_runs"] = len(groups[key])
        row["taylor_points"] = len(err)
        row.update({f"median_relerr_{k}": median_or_nan(err[f"relerr_{k}"]) for k in ORDERS})
        rows.append(row)
    return pd.DataFrame.from_records(rows, columns=TABLE2_COLUMNS)


def pm(mean: float, sd: float) -> str:
    """'mean ± sd' with 3 significant digits; '-' when there is no mean."""
    if pd.isna(mean):
        return "-"
    return f"{mean:.3g}" if pd.isna(sd) else f"{mean:.3g} ± {sd:.2g}"


def table3(t1: pd.DataFrame) -> pd.DataFrame:
    """Per (r, eta): each scaling's diverged count and mean ± sd cells side by side."""
    rows = []
    for (r, eta), g in t1.groupby(["r", "eta"], sort=True):
        row = {"r": r, "eta": eta}
        for _, t in g.sort_values("scaling").iterrows():
            s = t["scaling"]
            row[f"{s}: diverged"] = f"{t['n_diverged']}/{t['n_seeds']}"
            for m in TABLE3_METRICS:
                row[f"{s}: {m}"] = pm(t[f"{m}_mean"], t[f"{m}_sd"])
        rows.append(row)
    return pd.DataFrame.from_records(rows)


def write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="\n") as f:
        f.write(text)


def latex_text(text: str) -> str:
    """Plain text made safe for a LaTeX caption (to_latex escapes cells, not captions)."""
    out = text.replace("\\", r"\textbackslash{}")
    for ch in "&%$#_{}":
        out = out.replace(ch, "\\" + ch)
    return out.replace("|", r"\textbar{}").replace("~", r"\textasciitilde{}")


def write_table(df: pd.DataFrame, out_dir: Path, name: str) -> None:
    """name.csv (machine-readable), name.md and name.tex (captioned), fixed float format.

    A missing value is an empty cell in CSV and Markdown and '--' in LaTeX.
    """
    caption = CAPTIONS[name]
    write_text(out_dir / f"{name}.csv", df.to_csv(index=False, float_format=TABLE_FLOAT))
    # None, unlike NaN, is what tabulate treats as missing; numbers stay right-aligned even
    # in a column that is all missing
    align = ["right" if pd.api.types.is_numeric_dtype(df[c]) else "left" for c in df.columns]
    md = df.astype(object).where(df.notna(), None).to_markdown(
        index=False, floatfmt=TABLE_FLOAT.lstrip("%"), missingval="", colalign=align
    )
    write_text(out_dir / f"{name}.md", f"{caption}\n\n{md}\n")
    tex = df.to_latex(
        index=False, float_format=TABLE_FLOAT, escape=True, na_rep="--",
        caption=latex_text(caption), label=f"tab:{name}",
    )
    write_text(out_dir / f"{name}.tex", tex)
    log.info("wrote %s/%s.{csv,md,tex} (%d rows)", out_dir, name, len(df))


def aggregate(run_dirs: list[str | Path], out: str | Path) -> pd.DataFrame:
    """Write OUT/summary.csv and OUT/tables/*; return the summary frame."""
    out = Path(out)
    runs = load_runs(run_dirs)
    summary = summary_table(runs)
    # full precision in the per-run file: pandas writes the shortest round-trip repr
    write_text(out / "summary.csv", summary.to_csv(index=False, na_rep=""))
    log.info("wrote %s (%d runs)", out / "summary.csv", len(summary))
    t1 = table1(summary)
    write_table(t1, out / "tables", "table1")
    write_table(table2(runs), out / "tables", "table2")
    write_table(table3(t1), out / "tables", "table3")
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--runs", nargs="+", required=True, help="run folders or folders of them")
    p.add_argument("--out", default="results", help="folder for summary.csv and tables/")
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    aggregate(args.runs, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
