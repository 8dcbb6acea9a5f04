"""The committed paper results: they must cover the grid of config/config.yaml, as it is now.

A config edit that is not followed by a rerun of the profile fails here, rather than leaving
figures and tables that no longer match the config they claim to come from.
"""

from pathlib import Path

import pandas as pd
import pytest

from beyond_eos.config import figure_names, grid_points, load_config, run_id

REPO = Path(__file__).resolve().parents[1]
CONFIG = load_config(REPO / "config" / "config.yaml")


@pytest.fixture(scope="module")
def summary():
    return pd.read_csv(REPO / "results" / "summary.csv")


def test_one_summary_row_per_grid_point(summary):
    expected = sorted(run_id(*p) for p in grid_points(CONFIG))
    assert sorted(summary["run_id"]) == expected
    assert summary["status"].isin(["ok", "diverged", "collapsed"]).all()


def test_summary_rows_come_from_the_current_config(summary):
    # keys of config.yaml -> the summary.csv column that records them per run
    keys = {
        "model.depth": "depth", "model.width": "width", "model.a": "a", "model.b": "b",
        "train.batch_size": "batch_size", "train.epochs": "epochs", "train.dtype": "dtype",
        "measure.every": "measure_every", "measure.taylor_every": "taylor_every",
        "measure.sharpness_points": "sharpness_points",
    }
    for key, col in keys.items():
        section, name = key.split(".")
        want = CONFIG[section][name]
        assert (summary[col] == want).all(), f"{col} differs from {key} = {want!r}"
    for key in ("n_train", "n_test"):  # null in the config: the whole set, an empty cell
        assert CONFIG["data"][key] is None and summary[key].isna().all()


def test_tables_cover_every_configuration():
    g = CONFIG["grid"]
    table1 = pd.read_csv(REPO / "results" / "tables" / "table1.csv")
    cells = {(float(r), s, float(e)) for r in g["r"] for s in g["scaling"] for e in g["eta"]}
    got = set(zip(table1["r"].astype(float), table1["scaling"], table1["eta"].astype(float)))
    assert got == cells
    assert (table1["n_seeds"] == len(g["seed"])).all()


def test_a_figure_per_scaling():
    for name in figure_names(CONFIG):
        for ext in ("pdf", "png"):
            assert (REPO / "figures" / f"{name}.{ext}").stat().st_size > 0, name
