"""Figures 1, S1, S2 (training dynamics per scaling) and 2 (Taylor check), docs/theory.md §5.

Usage:
    python -m beyond_eos.figures --runs DIR [DIR ...] --summary results/summary.csv \
        --out figures [--smooth N] [--dpi D]
Writes OUT/<name>.pdf and OUT/<name>.png for every scaling present in the runs (name from
FIGURE_BY_SCALING) and OUT/figure2.{pdf,png}. Rerunning on the same inputs gives the same
bytes: the Agg/PDF canvases are used without pyplot, rcParams start from matplotlib's defaults
and the files carry no timestamps.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import LogFormatter

from beyond_eos.aggregate import ORDERS, Run, load_runs, taylor_errors
from beyond_eos.config import FIGURE_BY_SCALING, fmt_num

log = logging.getLogger("beyond_eos.figures")

# one dynamics figure per scaling, in this order; figure2 uses the first one present
TAYLOR_FIGURE = "figure2"
PALETTE = "viridis"  # sequential: the colour order follows the eta order
R_MARKERS = ("o", "^", "s", "D", "v")

# Fixed settings on top of matplotlib's defaults, so a user's matplotlibrc cannot change bytes
RC = {
    "svg.hashsalt": "beyond_eos",
    "pdf.fonttype": 42,  # TrueType: editable text, and no Type 3 fonts for paper checkers
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "legend.fontsize": 8,
    "axes.grid": True,
    "grid.alpha": 0.3,
}
PDF_METADATA = {"CreationDate": None, "ModDate": None, "Producer": "beyond_eos.figures"}
PNG_METADATA = {"Software": None}


class PlainLogFormatter(LogFormatter):
    """Log-axis tick labels as plain numbers (0.6, 2, 30) rather than 6x10^-1 etc.

    LogFormatter still picks which ticks get a label; only the text changes.
    """

    def _num_to_string(self, x, vmin, vmax):
        return f"{x:.3g}"


def log_y(ax) -> None:
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(PlainLogFormatter())
    ax.yaxis.set_minor_formatter(PlainLogFormatter(labelOnlyBase=False))


def figure_name(scaling: str) -> str:
    """File stem of the dynamics figure of ``scaling``; an unknown scaling raises."""
    try:
        return FIGURE_BY_SCALING[scaling]
    except KeyError:
        raise KeyError(
            f"no figure for scaling '{scaling}'; add it to FIGURE_BY_SCALING "
            f"(known: {sorted(FIGURE_BY_SCALING)})"
        ) from None


def eta_colors(etas: list[float]) -> dict[float, tuple]:
    """One colour per eta on seaborn's sequential palette, smallest eta darkest."""
    import seaborn as sns  # imported here: it pulls in scipy.stats, slow for the other paths

    etas = sorted(set(etas))
    return dict(zip(etas, sns.color_palette(PALETTE, n_colors=len(etas))))


def save(fig: Figure, out: Path, name: str, dpi: int) -> None:
    """name.pdf and name.png without timestamps or version stamps."""
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / f"{name}.pdf", format="pdf", metadata=PDF_METADATA)
    # keep the layout the PDF's draw computed: constrained layout is most of a draw's cost
    fig.set_layout_engine("none")
    fig.savefig(out / f"{name}.png", format="png", dpi=dpi, metadata=PNG_METADATA)
    log.info("wrote %s/%s.{pdf,png}", out, name)


# ---- Figures 1/S1/S2: dynamics per r -------------------------------------------------------


def run_series(run: Run, column: str, smooth: int = 1) -> pd.Series:
    """A metrics column against step, measured rows only; optional trailing running mean.

    A non-finite value (the loss at a divergence) is dropped: the curve ends at the last
    value that can be drawn.
    """
    m = run.metrics
    s = pd.Series(m[column].to_numpy(), index=m["step"].to_numpy())
    s = s[np.isfinite(s)]
    if smooth > 1:
        s = s.rolling(smooth, min_periods=1).mean()
    return s


def plot_seed_band(ax, runs: list[Run], column: str, color, smooth: int = 1, marker=None):
    """Mean over seeds with a min-max band; a diverged seed's curve ends with an 'x'."""
    pairs = [(run, run_series(run, column, smooth)) for run in runs]
    pairs = [(run, s) for run, s in pairs if len(s)]  # a run may diverge before any value
    if not pairs:
        return
    # steps x seeds, NaN once a seed has stopped: mean and band over the seeds still running
    table = pd.concat([s for _, s in pairs], axis=1).sort_index()
    steps = table.index.to_numpy()
    ax.fill_between(steps, table.min(axis=1), table.max(axis=1), color=color, alpha=0.2, lw=0)
    ax.plot(steps, table.mean(axis=1), color=color, lw=1.3, marker=marker, ms=3)
    for run, s in pairs:
        if run.summary["status"] == "diverged":
            ax.plot(s.index[-1], s.iloc[-1], ls="", marker="x", ms=7, mew=2, color=color)


def plot_acc_vs_eta(ax, summary: pd.DataFrame, colors: dict) -> None:
    """Test accuracy against eta: mean and min-max over non-diverged seeds; 'x' + count for
    diverged seeds at the bottom of the panel."""
    xs, means, any_diverged = [], [], False
    bottom = ax.get_xaxis_transform()  # x in data, y in axes fraction
    for eta, g in summary.groupby("eta", sort=True):
        acc = g.loc[g["status"] != "diverged", "test_acc"].dropna()
        if len(acc):
            m = acc.mean()
            err = [[m - acc.min()], [acc.max() - m]]
            ax.errorbar(eta, m, yerr=err, color=colors[eta], marker="o", ms=5, capsize=3)
            xs.append(eta)
            means.append(m)
        n_div = int((g["status"] == "diverged").sum())
        if n_div:
            any_diverged = True
            ax.plot(eta, 0.04, transform=bottom, ls="", marker="x", ms=7, mew=2, color=colors[eta])
            ax.text(eta, 0.1, str(n_div), transform=bottom, ha="center", fontsize=8)
    ax.plot(xs, means, color="0.5", lw=0.8, zorder=0)
    if any_diverged and xs:
        # a strip at the bottom for the diverged marks, below every accuracy shown
        lo, hi = ax.get_ylim()
        ax.set_ylim(lo - 0.2 * (hi - lo), hi)
    ax.set_xscale("log", base=2)
    etas = sorted(colors)
    ax.set_xlim(etas[0] / 1.6, etas[-1] * 1.6)


def dynamics_figure(runs: list[Run], summary: pd.DataFrame, scaling: str, smooth: int) -> Figure:
    """One column per r; rows: loss, last-layer soft rank, EOS ratio, test acc vs eta."""
    runs = [run for run in runs if run.key[1] == scaling]
    summary = summary[summary["scaling"] == scaling]
    rs = sorted({run.key[0] for run in runs})
    colors = eta_colors([run.key[2] for run in runs])
    depth = runs[0].depth
    # without sharpness measurements the third row shows test accuracy over training instead
    has_eos = any(run.metrics["eos_ratio"].notna().any() for run in runs)

    fig = Figure(figsize=(3.6 * len(rs) + 1.2, 10.5), layout="constrained")
    axes = fig.subplots(4, len(rs), squeeze=False, sharex="row")
    for j, r in enumerate(rs):
        col = axes[:, j]
        col[0].set_title(f"r = {fmt_num(r)}")
        for eta, color in colors.items():
            group = [run for run in runs if run.key[0] == r and run.key[2] == eta]
            if not group:
                continue
            plot_seed_band(col[0], group, "loss", color, smooth)
            plot_seed_band(col[1], group, f"srank_{depth}", color)
            if has_eos:
                plot_seed_band(col[2], group, "eos_ratio", color, marker="o")
            else:
                plot_seed_band(col[2], group, "test_acc", color, marker="o")
        plot_acc_vs_eta(col[3], summary[summary["r"] == r], colors)

        log_y(col[0])
        if has_eos:
            col[2].axhline(1.0, color="k", ls="--", lw=1)
            log_y(col[2])
        else:
            col[2].set_title(f"r = {fmt_num(r)}: test accuracy (no sharpness measured)")
        for ax in col[:3]:
            ax.set_xlabel("step")
        col[3].set_xlabel("learning rate η")
    axes[0, 0].set_ylabel(f"training loss\n(running mean, {smooth} steps)")
    axes[1, 0].set_ylabel(f"soft rank of H_{depth}\n(last hidden layer)")
    # normalized runs: the step is -eta P G, so the curvature that matters is lambda_pre
    eos_label = "EOS ratio η λ_pre / 2" if scaling != "none" else "EOS ratio η λ / 2"
    axes[2, 0].set_ylabel(eos_label if has_eos else "test accuracy")
    axes[3, 0].set_ylabel("final test accuracy")

    handles = [Line2D([], [], color=c, lw=2, label=f"η = {fmt_num(e)}") for e, c in colors.items()]
    handles.append(Line2D([], [], color="k", ls="", marker="x", mew=2, label="diverged"))
    fig.legend(
        handles=handles, loc="outside lower center", ncol=min(len(handles), 3 * len(rs)),
        title="lines: mean over seeds; bands: min–max",
    )
    fig.suptitle(f"scaling '{scaling}'")
    return fig


# ---- Figure 2: Taylor prediction vs actual change ------------------------------------------


def taylor_points(runs: list[Run]) -> pd.DataFrame:
    """Taylor rows of all runs with their r and eta (columns r, eta, dL_actual, dL_1..3)."""
    parts = []
    for run in runs:
        m = run.metrics
        rows = m.loc[m["dL_actual"].notna(), ["dL_actual", *[f"dL_{k}" for k in ORDERS]]]
        parts.append(rows.assign(r=run.key[0], eta=run.key[2]))
    cols = ["r", "eta", "dL_actual", *[f"dL_{k}" for k in ORDERS]]
    return pd.concat(parts, ignore_index=True)[cols] if parts else pd.DataFrame(columns=cols)


def symlog_ticks(linthresh: float, lim: float, per_side: int = 3) -> list[float]:
    """0 and at most ``per_side`` decades on each side, the outermost at ``lim``.

    The default symlog ticks label every decade, which overlap when the data span many;
    +-linthresh is left unlabelled too, as it sits one decade-width from 0.
    """
    lo, hi = round(np.log10(linthresh)), round(np.log10(lim))
    step = max(1, int(np.ceil((hi - lo) / per_side)))
    pos = [10.0**d for d in range(hi, lo, -step)] or [lim]
    return sorted(-p for p in pos) + [0.0] + sorted(pos)


def taylor_figure(runs: list[Run]) -> Figure:
    """Predicted vs actual one-step loss change, one panel per order, for one scaling."""
    present = [s for s in FIGURE_BY_SCALING if any(run.key[1] == s for run in runs)]
    scaling = present[0]
    runs = [run for run in runs if run.key[1] == scaling]
    pts = taylor_points(runs)
    colors = eta_colors([run.key[2] for run in runs])
    rs = sorted({run.key[0] for run in runs})
    markers = {r: R_MARKERS[i % len(R_MARKERS)] for i, r in enumerate(rs)}
    err = pd.concat([taylor_errors(run.metrics) for run in runs], ignore_index=True)

    fig = Figure(figsize=(11.5, 4.0), layout="constrained")
    axes = fig.subplots(1, len(ORDERS))
    vals = pts[["dL_actual", *[f"dL_{k}" for k in ORDERS]]].to_numpy(dtype=float).ravel()
    vals = np.abs(vals[np.isfinite(vals) & (vals != 0)])
    # symlog (changes of either sign over many decades): linear below the decade holding the
    # smallest 10% of the values, log above
    linthresh = 10.0 ** np.floor(np.log10(np.quantile(vals, 0.1))) if len(vals) else 1e-6
    lim = 10.0 ** np.ceil(np.log10(vals.max() * 1.01)) if len(vals) else 1.0
    ticks = symlog_ticks(linthresh, lim)
    for ax, k in zip(axes, ORDERS):
        for (r, eta), g in pts.groupby(["r", "eta"], sort=True):
            ax.scatter(
                g["dL_actual"], g[f"dL_{k}"], s=14, color=colors[eta], marker=markers[r],
                alpha=0.8, lw=0,
            )
        ax.plot([-lim, lim], [-lim, lim], color="k", lw=0.8, ls="--")
        ax.set_xscale("symlog", linthresh=linthresh)
        ax.set_yscale("symlog", linthresh=linthresh)
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_xticks(ticks)
        ax.set_yticks(ticks)
        ax.minorticks_off()
        med = err[f"relerr_{k}"].median() if len(err) else float("nan")
        ax.set_title(f"order {k} (median rel. error {med:.2g})")
        ax.set_xlabel("actual change of minibatch loss")
        if not len(pts):
            ax.text(0.5, 0.5, "no Taylor measurements", transform=ax.transAxes, ha="center")
    axes[0].set_ylabel("predicted change")

    handles = [Line2D([], [], color=c, lw=0, marker="o", label=f"η = {fmt_num(e)}")
               for e, c in colors.items()]
    handles += [Line2D([], [], color="0.3", lw=0, marker=m, label=f"r = {fmt_num(r)}")
                for r, m in markers.items()]
    handles.append(Line2D([], [], color="k", ls="--", lw=0.8, label="y = x"))
    fig.legend(handles=handles, loc="outside right upper")
    fig.suptitle(f"Taylor prediction of the one-step loss change, scaling '{scaling}'")
    return fig


# ---- driver --------------------------------------------------------------------------------


def make_figures(
    run_dirs: list[str | Path], summary_csv: str | Path, out: str | Path,
    smooth: int = 1, dpi: int = 150,
) -> list[str]:
    """Write every figure; return their names."""
    out = Path(out)
    runs = load_runs(run_dirs)
    if not runs:
        raise ValueError("no runs to plot")
    summary = pd.read_csv(summary_csv)
    # the summary row of every run plotted, and no other (a wider summary is fine)
    ids = [run.summary["run_id"] for run in runs]
    missing = sorted(set(ids) - set(summary["run_id"]))
    if missing:
        raise ValueError(
            f"{summary_csv} has no rows for runs {missing}; rerun beyond_eos.aggregate on them"
        )
    summary = summary[summary["run_id"].isin(ids)]
    present = {run.key[1] for run in runs}
    for scaling in sorted(present):
        figure_name(scaling)  # an unknown scaling raises before anything is drawn
    scalings = [s for s in FIGURE_BY_SCALING if s in present]
    names = []
    with matplotlib.rc_context():
        matplotlib.rcdefaults()  # undone on leaving the context
        matplotlib.rcParams.update(RC)
        for scaling in scalings:
            name = figure_name(scaling)
            save(dynamics_figure(runs, summary, scaling, smooth), out, name, dpi)
            names.append(name)
        save(taylor_figure(runs), out, TAYLOR_FIGURE, dpi)
        names.append(TAYLOR_FIGURE)
    return names


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--runs", nargs="+", required=True, help="run folders or folders of them")
    p.add_argument("--summary", required=True, help="results/summary.csv from beyond_eos.aggregate")
    p.add_argument("--out", default="figures")
    p.add_argument("--smooth", type=int, default=1, help="running mean of the loss over N steps")
    p.add_argument("--dpi", type=int, default=150, help="resolution of the PNGs")
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    if args.smooth < 1:
        p.error("--smooth must be >= 1")
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("fontTools").setLevel(logging.WARNING)  # a line per glyph table at INFO
    make_figures(args.runs, args.summary, args.out, args.smooth, args.dpi)
    return 0


if __name__ == "__main__":
    sys.exit(main())
