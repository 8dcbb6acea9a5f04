"""Aggregation and figures on synthetic run folders written in the trainer's own format.

The runs are seeded numbers, not training: the tests check the bookkeeping (counts, means,
sds, medians against hand computations), that every figure is written, and that a second
pass gives byte-identical files.
"""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pandas as pd
import pytest

from beyond_eos import aggregate, figures
from beyond_eos.config import RunConfig, run_id
from beyond_eos.train import fmt, metric_columns

DEPTH = 3
STEPS = 40
EVERY = 5  # measure.every and Taylor cadence
SHARP_STEPS = (0, 1, 3, 9, 20, 39)
EPOCH = 10  # steps per epoch: test metrics at each epoch end

# (r, scaling, eta, seed) -> how the synthetic run ends
SPECIAL = {
    (2.0, "normalized", 8.0, 1): ("diverged", 23),
    (1.0, "none", 8.0, 0): ("diverged", 7),
    (1.0, "none", 8.0, 1): ("diverged", 12),
    (1.0, "normalized", 0.5, 1): ("collapsed", 15),
}
GRID = [
    (r, s, eta, seed)
    for r in (1.0, 2.0)
    for s in ("normalized", "none")
    for eta in (0.5, 8.0)
    for seed in (0, 1)
]


def write_run(root, r, scaling, eta, seed):
    """One run folder as train.Trainer.finish writes it; returns its summary dict and the
    (dL_actual, dL_1, dL_2, dL_3) rows it holds. Sharpness is off for scaling 'none'."""
    rng = np.random.default_rng([int(r), len(scaling), int(eta * 2), seed])
    status, stop = SPECIAL.get((r, scaling, eta, seed), ("ok", None))
    diverged = status == "diverged"
    last = stop if diverged else STEPS - 1
    sharp = scaling != "none"
    cols = metric_columns(DEPTH)

    rows, taylor, eos, srank = [], [], [], None
    test = (None, None)
    for t in range(last + 1):
        rec = {"step": t, "epoch": t // EPOCH}
        smooth_decay = 2.3 * np.exp(-t / 15) + 0.01 * rng.random()
        rec["loss"] = math.inf if t == stop and diverged else smooth_decay
        rec["acc"] = float(rng.random())
        if t == stop and diverged:
            rows.append([fmt(rec.get(c)) for c in cols])
            break
        if t % EVERY == 0 or t == STEPS - 1:
            for k in range(1, DEPTH + 1):
                rec[f"srank_{k}"] = 1 + 10 * rng.random()
                rec[f"stable_{k}"] = 1 + 3 * rng.random()
                rec[f"fwd_{k}"] = rng.random()
            for k in range(DEPTH + 1):
                rec[f"xi_{k}"], rec[f"T1_{k}"], rec[f"cos_{k}"] = rng.random(3)
            srank = rec[f"srank_{DEPTH}"]
        if sharp and t in SHARP_STEPS:
            rec["sharpness"] = rec["sharpness_pre"] = 10 * rng.random()
            rec["eos_ratio"] = eta * rec["sharpness_pre"] / 2
            eos.append(rec["eos_ratio"])
        if t % EVERY == 0:
            actual = -0.05 * rng.random()
            if t == 10:
                actual = 0.0  # no relative error defined at this step
            pred = [actual * (1 + rng.normal(0, 0.5 / k)) for k in (1, 2, 3)]
            rec["dL_actual"], rec["dL_1"], rec["dL_2"], rec["dL_3"] = actual, *pred
            taylor.append((actual, *pred))
        if (t + 1) % EPOCH == 0 or t == STEPS - 1:
            test = (0.5 * rng.random(), 0.5 + 0.5 * rng.random())
            rec["test_loss"], rec["test_acc"] = test
        rows.append([fmt(rec.get(c)) for c in cols])

    rid = run_id(r, scaling, eta, seed)
    d = root / rid
    d.mkdir(parents=True)
    cfg = RunConfig(
        r=r, scaling=scaling, eta=eta, seed=seed, n_train=512, depth=DEPTH, width=4, probe_size=128,
        batch_size=64, measure_every=EVERY, taylor_every=EVERY,
        sharpness_points=len(SHARP_STEPS) if sharp else 0,
    )
    (d / "config.json").write_text(cfg.to_json())
    lines = [",".join(cols)] + [",".join(row) for row in rows]
    (d / "metrics.csv").write_text("\n".join(lines) + "\n")
    summary = {
        "run_id": rid, "r": r, "scaling": scaling, "eta": eta, "seed": seed,
        "status": status,
        "diverged_step": stop if diverged else None,
        "collapsed_step": stop if status == "collapsed" else None,
        "steps": len(rows), "total_steps": STEPS,
        "final_train_loss": None if diverged else float(rng.random()),
        "final_train_acc": None if diverged else float(rng.random()),
        "test_loss": None if diverged else test[0],
        "test_acc": None if diverged else test[1],
        "srank_last": srank,
        "stable_rank_last": 2.0,
        "sharpness_init": eos[0] * 2 / eta if eos else None,
        "sharpness_last": eos[-1] * 2 / eta if eos else None,
        "eos_ratio_init": eos[0] if eos else None,
        "eos_ratio_last": eos[-1] if eos else None,
        "max_eos_ratio": max(eos) if eos else None,
    }
    (d / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary, np.array(taylor)


def relerr_median(points: np.ndarray, k: int) -> float:
    ok = points[:, 0] != 0
    return float(np.median(np.abs(points[ok, k] - points[ok, 0]) / np.abs(points[ok, 0])))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    made = {key: write_run(root, *key) for key in GRID}
    return root, made


@pytest.fixture(scope="module")
def outputs(runs, tmp_path_factory):
    """Aggregate and plot twice, into two folders, through the CLIs (~20 s: the tests that
    use it are marked slow)."""
    root, _ = runs
    outs = []
    for i in range(2):
        out = tmp_path_factory.mktemp(f"out{i}")
        dirs = [str(d) for d in sorted(root.iterdir())]
        assert aggregate.main(["--runs", *dirs, "--out", str(out / "results")]) == 0
        assert figures.main([
            "--runs", str(root), "--summary", str(out / "results" / "summary.csv"),
            "--out", str(out / "figures"), "--smooth", "3", "--dpi", "50",
        ]) == 0
        outs.append(out)
    return outs


@pytest.mark.slow
def test_summary_rows(runs, outputs):
    _, made = runs
    s = pd.read_csv(outputs[0] / "results" / "summary.csv")
    assert list(s.columns) == aggregate.SUMMARY_COLUMNS
    assert len(s) == len(GRID)
    assert list(zip(s.r, s.scaling, s.eta, s.seed)) == sorted(GRID)
    row = s[s.run_id == run_id(2.0, "normalized", 8.0, 1)].iloc[0]
    assert row.status == "diverged" and row.diverged_step == 23
    assert math.isnan(row.test_acc)
    # per-run Taylor medians, skipping the step where the actual change is zero
    for key in [(1.0, "normalized", 0.5, 0), (2.0, "none", 8.0, 1)]:
        summary, pts = made[key]
        row = s[s.run_id == summary["run_id"]].iloc[0]
        assert row.taylor_points == len(pts)
        for k in (1, 2, 3):
            assert row[f"taylor_relerr_{k}"] == pytest.approx(relerr_median(pts, k), rel=1e-12)


@pytest.mark.slow
def test_table1_counts_and_moments(runs, outputs):
    _, made = runs
    t1 = pd.read_csv(outputs[0] / "results" / "tables" / "table1.csv")
    assert list(t1.columns) == aggregate.TABLE1_COLUMNS
    assert len(t1) == 8  # (r, scaling, eta) groups
    assert t1.n_seeds.tolist() == [2] * 8
    assert t1.n_diverged.sum() == 3
    assert t1.n_collapsed.sum() == 1

    def group(r, s, eta):
        return t1[(t1.r == r) & (t1.scaling == s) & (t1.eta == eta)].iloc[0]

    # both seeds kept: mean and sample sd by hand
    for key in [(1.0, "normalized", 0.5), (2.0, "normalized", 0.5)]:
        g = group(*key)
        sums = [made[(*key, seed)][0] for seed in (0, 1)]
        for name, col in aggregate.TABLE1_METRICS.items():
            if col in aggregate.TRAJECTORY_COLUMNS:  # from metrics.csv, checked below
                continue
            a, b = (x[col] for x in sums)
            assert g[f"{name}_mean"] == pytest.approx((a + b) / 2, rel=1e-5)
            assert g[f"{name}_sd"] == pytest.approx(abs(a - b) / math.sqrt(2), rel=1e-5)
    # one seed diverged: the moments are over the other, sd undefined
    g = group(2.0, "normalized", 8.0)
    assert g.n_diverged == 1
    assert g.test_acc_mean == pytest.approx(made[(2.0, "normalized", 8.0, 0)][0]["test_acc"])
    assert math.isnan(g.test_acc_sd)
    # all seeds diverged: nothing to average; sharpness off: no EOS ratio
    g = group(1.0, "none", 8.0)
    assert g.n_diverged == 2 and math.isnan(g.test_acc_mean)
    assert math.isnan(group(1.0, "none", 0.5).max_eos_ratio_mean)
    md = (outputs[0] / "results" / "tables" / "table1.md").read_text()
    assert "non-diverged seeds" in md and md.count("\n|") == 2 + 8  # header, rule, rows


@pytest.mark.slow
def test_max_loss_is_the_worst_finite_minibatch_loss(runs, outputs):
    root, _ = runs
    summary = pd.read_csv(outputs[0] / "results" / "summary.csv")
    for _, row in summary.iterrows():
        loss = pd.read_csv(root / row.run_id / "metrics.csv")["loss"]
        assert row.max_loss == pytest.approx(loss[np.isfinite(loss)].max())


def test_table3_puts_scalings_side_by_side(outputs):
    t1 = pd.read_csv(outputs[0] / "results" / "tables" / "table1.csv")
    t3 = pd.read_csv(outputs[0] / "results" / "tables" / "table3.csv", dtype=str)
    assert len(t3) == t1.groupby(["r", "eta"]).ngroups
    for scaling in ("none", "normalized"):
        assert f"{scaling}: diverged" in t3.columns
    row = t1[(t1.r == 1.0) & (t1.scaling == "normalized") & (t1.eta == 0.5)].iloc[0]
    cell = t3[(t3.r == "1") & (t3.eta == "0.5")]["normalized: test_acc"].iloc[0]
    assert cell == f"{row.test_acc_mean:.3g} ± {row.test_acc_sd:.2g}"
    assert aggregate.pm(float("nan"), float("nan")) == "-"


def test_table2_pooled_medians(runs, outputs):
    _, made = runs
    t2 = pd.read_csv(outputs[0] / "results" / "tables" / "table2.csv")
    assert list(t2.columns) == aggregate.TABLE2_COLUMNS
    key = (2.0, "normalized", 8.0)
    pts = np.concatenate([made[(*key, seed)][1] for seed in (0, 1)])
    g = t2[(t2.r == key[0]) & (t2.scaling == key[1]) & (t2.eta == key[2])].iloc[0]
    assert g.n_runs == 2 and g.taylor_points == len(pts)
    for k in (1, 2, 3):
        assert g[f"median_relerr_{k}"] == pytest.approx(relerr_median(pts, k), rel=1e-5)


@pytest.mark.slow
def test_figures_written(outputs):
    fig_dir = outputs[0] / "figures"
    for name in ("figure1", "figureS1", "figure2"):
        for ext in ("pdf", "png"):
            assert (fig_dir / f"{name}.{ext}").stat().st_size > 1000
    assert not (fig_dir / "figureS2.png").exists()  # no 'relative' runs


@pytest.mark.slow
def test_byte_identical_rerun(outputs):
    first, second = outputs
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert len(files) == 1 + 9 + 6  # summary, three tables x 3 formats, three figures x 2
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()
    for rel in files:
        assert digest(first / rel) == digest(second / rel), rel


def test_unknown_scaling_raises():
    assert figures.figure_name("none") == "figureS1"
    with pytest.raises(KeyError, match="FIGURE_BY_SCALING"):
        figures.figure_name("adam")


def test_missing_file_names_it(tmp_path):
    (tmp_path / "r1-none-eta1-s0").mkdir()
    (tmp_path / "r1-none-eta1-s0" / "summary.json").write_text("{}")
    with pytest.raises(aggregate.RunFolderError, match="config.json"):
        aggregate.load_runs([tmp_path])
