"""The Snakemake DAG: config validation, the paper grid, and the quick profile end to end."""

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from beyond_eos.config import ConfigError, load_config, validate_config

REPO = Path(__file__).resolve().parents[1]
OUTPUTS = [
    "results/summary.csv",
    "results/calibration.csv",
    *[f"results/tables/{t}.{e}" for t in ("table1", "table2", "table3")
      for e in ("csv", "md", "tex")],
    *[f"figures/{f}.{e}" for f in ("figure1", "figureS1", "figure2") for e in ("pdf", "png")],
]


def snakemake(workdir, *args, check=True):
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=workdir)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def write_config(path, profile="quick", **edits):
    """A profile with edits, writing under the work folder itself (outdir '.')."""
    config = yaml.safe_load((REPO / "config" / f"{profile}.yaml").read_text())
    config["outdir"] = "."
    for key, value in edits.items():
        node = config
        *parents, last = key.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    path.write_text(yaml.safe_dump(config))
    return path


def digest(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def quick_runs(mnist_root, tmp_path_factory):
    """The quick profile run twice from scratch in two folders."""
    dirs = []
    for name in ("first", "second"):
        wd = tmp_path_factory.mktemp(name)
        write_config(wd / "quick.yaml", **{"data.root": str(mnist_root)})
        snakemake(wd, "--cores", "2", "--configfile", "quick.yaml")
        dirs.append(wd)
    return dirs


@pytest.mark.slow
def test_quick_profile_makes_every_output(quick_runs):
    wd = quick_runs[0]
    for out in OUTPUTS:
        assert (wd / out).stat().st_size > 0, out
    runs = sorted((wd / "results" / "runs").iterdir())
    assert len(runs) == 8
    for run in runs:
        for name in ("config.json", "metrics.csv", "instruments.npz", "summary.json"):
            assert (run / name).exists(), run / name
    assert (wd / "logs" / "aggregate.log").exists()


@pytest.mark.slow
def test_quick_profile_is_byte_identical_from_scratch(quick_runs):
    first, second = quick_runs
    files = OUTPUTS + [
        str(p.relative_to(first)) for p in (first / "results" / "runs").rglob("*") if p.is_file()
    ]
    differ = [f for f in files if digest(first / f) != digest(second / f)]
    assert not differ, differ


@pytest.mark.slow
def test_report_holds_figures_and_tables(quick_runs):
    wd = quick_runs[0]
    snakemake(wd, "--configfile", "quick.yaml", "--report", "report.html")
    html = (wd / "report.html").read_text(errors="replace")
    for name in ("figure1.png", "figureS1.png", "figure2.png", "table1.md", "summary.csv"):
        assert name in html, name


def test_paper_grid_dry_run_lists_every_configuration(tmp_path, mnist_root):
    write_config(tmp_path / "paper.yaml", profile="config", **{"data.root": str(mnist_root)})
    proc = snakemake(tmp_path, "-n", "--configfile", "paper.yaml")
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    g = config["grid"]
    expected = len(g["r"]) * len(g["scaling"]) * len(g["eta"]) * len(g["seed"])
    stats = proc.stdout.split("Job stats:")[1]
    assert f"train {expected}" in " ".join(stats.split())
    assert "results/runs/r2-normalized-eta256-s2/summary.json" in proc.stdout
    assert set(g["r"]) == {1, 2} and set(g["scaling"]) == {"normalized", "none", "relative"}


@pytest.mark.parametrize(
    "edit, key",
    [
        ({"train.bogus": 1}, "bogus"),
        ({"grid.eta": [0.5, -1.0]}, "grid.eta"),
        ({"model.depth": 0}, "model.depth"),
        ({"train.batch_size": 1024}, "train.batch_size"),  # more than the 512 images used
        ({"grid.r": [-1]}, "grid.r"),
        ({"grid.seed": [-2]}, "grid.seed"),
        ({"grid.eta": []}, "grid.eta"),
        ({"model.a": 0, "model.b": 0}, "model.a"),
        ({"train.device": "tpu"}, "train.device"),
        ({"train.epochs": "ten"}, "train.epochs"),
    ],
)
def test_bad_config_fails_before_any_job_and_names_the_key(tmp_path, edit, key):
    write_config(tmp_path / "bad.yaml", **edit)
    proc = snakemake(tmp_path, "-n", "--configfile", "bad.yaml", check=False)
    assert proc.returncode != 0
    assert key in proc.stdout + proc.stderr
    assert not (tmp_path / "results").exists() and not (tmp_path / "logs").exists()
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate_config(yaml.safe_load((tmp_path / "bad.yaml").read_text()))


def test_quick_profile_writes_apart_from_the_paper(tmp_path, mnist_root):
    cfg = yaml.safe_load((REPO / "config" / "quick.yaml").read_text())
    cfg["data"]["root"] = str(mnist_root)
    (tmp_path / "q.yaml").write_text(yaml.safe_dump(cfg))
    proc = snakemake(tmp_path, "-n", "--configfile", "q.yaml")
    assert "quick/results/summary.csv" in proc.stdout
    assert "quick/figures/figure1.png" in proc.stdout
    assert " results/summary.csv" not in proc.stdout


def test_load_config_applies_overrides():
    config = load_config(REPO / "config" / "quick.yaml", {"train.epochs": 2})
    assert config["train"]["epochs"] == 2


def test_slurm_profile_dry_run_plans_every_job(tmp_path, mnist_root):
    # The SLURM executor plugin plans a dry run without a cluster (no sbatch is called).
    pytest.importorskip("snakemake_executor_plugin_slurm")
    cfg = write_config(tmp_path / "paper.yaml", profile="config",
                       **{"data.root": str(mnist_root)})
    proc = snakemake(tmp_path, "-n", "--profile", str(REPO / "profiles" / "slurm"),
                     "--configfile", str(cfg))
    g = yaml.safe_load(cfg.read_text())["grid"]
    expected = len(g["r"]) * len(g["scaling"]) * len(g["eta"]) * len(g["seed"])
    assert f"train {expected}" in " ".join(proc.stdout.split("Job stats:")[1].split())
    train_jobs = proc.stdout.split("rule train:")[1:]
    assert train_jobs and all("mem_mb=4000" in job and "runtime=60" in job for job in train_jobs)


@pytest.mark.slow
def test_one_crashing_job_does_not_stop_the_others(tmp_path, mnist_root):
    cfg = write_config(
        tmp_path / "quick.yaml",
        **{"data.root": str(mnist_root), "grid.r": [1], "grid.scaling": ["normalized"],
           "measure.sharpness_points": 0, "measure.taylor_every": 0,
           "measure.taylor_full_points": 0},
    )
    # A fault the run cannot get past: its metrics file's temporary name is a folder.
    bad = tmp_path / "results" / "runs" / "r1-normalized-eta8-s0"
    (bad / "metrics.csv.tmp").mkdir(parents=True)
    proc = snakemake(tmp_path, "--cores", "2", "--configfile", str(cfg), check=False)
    assert proc.returncode != 0
    assert "r1-normalized-eta8-s0" in proc.stderr + proc.stdout
    good = tmp_path / "results" / "runs" / "r1-normalized-eta0.5-s0" / "summary.json"
    assert good.exists(), "the healthy job must still run (--keep-going)"
    assert (tmp_path / "logs" / "train" / "r1-normalized-eta8-s0.log").exists()
