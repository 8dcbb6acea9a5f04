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
from beyond_eos.config import ConfigError, check_cross_fields, grid_points, run_config, run_dir
from beyond_eos.config import RUN_ID, figure_names, schema_errors

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
# Each profile writes under its own folder (config key outdir; "." for the paper profile),
# so the quick profile can never overwrite the paper's results.
OUTDIR = config.get("outdir", ".")


def out(path):
    """A workflow output path under the profile's outdir."""
    return path if OUTDIR in ("", ".") else f"{OUTDIR}/{path}"


IDX = [
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
]
RUN = out(f"results/runs/{RUN_ID}")


wildcard_constraints:
    r="[0-9.]+",
    scaling="[a-z]+",
    eta="[0-9.]+",
    seed="[0-9]+",


def run_dirs():
    """Every run folder of the grid, in the config's order."""
    return [str(run_dir(out("results"), *point)) for point in grid_points(config)]


def run_json(wildcards):
    """The RunConfig of one grid point as shell-quoted JSON (params: reruns when it changes)."""
    cfg = run_config(config, wildcards.r, wildcards.scaling, wildcards.eta, wildcards.seed)
    return shlex.quote(json.dumps(asdict(cfg), sort_keys=True))


def final_outputs():
    tables = expand(
        out("results/tables/{t}.{ext}"), t=["table1", "table2", "table3"], ext=["csv", "md", "tex"]
    )
    figures = expand(out("figures/{f}.{ext}"), f=figure_names(config), ext=["pdf", "png"])
    return [out("results/summary.csv"), out("results/calibration.csv"), *tables, *figures]
