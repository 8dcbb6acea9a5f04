# Config validation and the helpers every rule uses. Logic lives in src/beyond_eos.
import json
import shlex
import sys
from dataclasses import asdict
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

# The package is installed editable (pip -e); fall back to the source tree for bare checkouts.
sys.path.insert(0, str(Path(workflow.basedir) / "src"))
from beyond_eos.config import ConfigError, check_cross_fields, grid_points, run_config, run_id
from beyond_eos.config import FIGURE_BY_SCALING, schema_errors

# A typo or bad value fails here, before any job is planned. Snakemake's validate is the gate;
# on failure we restate every violation in one line each (key, value, what is allowed).
try:
    validate(config, "../schemas/config.schema.yaml")
except WorkflowError:
    lines = "\n  ".join(schema_errors(config))
    raise WorkflowError(f"invalid config (fix these keys):\n  {lines}") from None
try:
    check_cross_fields(config)
except ConfigError as err:
    raise WorkflowError(f"invalid config: {err}") from None

PY = shlex.quote(sys.executable)  # the interpreter running snakemake runs the jobs too
RAW = f"{config['data']['root']}/MNIST/raw"
IDX = [
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
]
RUN = "results/runs/r{r}-{scaling}-eta{eta}-s{seed}"


wildcard_constraints:
    r="[0-9.]+",
    scaling="[a-z]+",
    eta="[0-9.]+",
    seed="[0-9]+",


def run_dirs():
    """Every run folder of the grid, in the config's order."""
    return [
        "results/runs/" + run_id(r, s, eta, seed) for r, s, eta, seed in grid_points(config)
    ]


def run_json(wildcards):
    """The RunConfig of one grid point as shell-quoted JSON (params: reruns when it changes)."""
    cfg = run_config(config, wildcards.r, wildcards.scaling, wildcards.eta, wildcards.seed)
    return shlex.quote(json.dumps(asdict(cfg), sort_keys=True))


def figure_names():
    return [FIGURE_BY_SCALING[s] for s in config["grid"]["scaling"]] + ["figure2"]


def final_outputs():
    tables = expand("results/tables/{t}.{ext}", t=["table1", "table2"], ext=["csv", "md", "tex"])
    figures = expand("figures/{f}.{ext}", f=figure_names(), ext=["pdf", "png"])
    return ["results/summary.csv", "results/calibration.csv", *tables, *figures]
