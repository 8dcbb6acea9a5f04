"""Typed run configuration, output paths and run ids.

The workflow's YAML config (validated against workflow/schemas/config.schema.yaml) describes
a grid; ``run_config`` turns one grid point into a ``RunConfig``, the single object a training
run reads. ``run_id`` and ``run_dir`` are the only places that build output paths.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "workflow" / "schemas" / "config.schema.yaml"


# Which figure shows which scaling's runs (docs/theory.md §5); figure2 is the Taylor check.
FIGURE_BY_SCALING = {"normalized": "figure1", "none": "figureS1", "relative": "figureS2"}


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range; the message names the key."""


@dataclass(frozen=True)
class RunConfig:
    """Everything one training run depends on. Written as config.json beside its results.

    The defaults serve direct use from Python (the tests); the workflow's profiles set every
    field from config/*.yaml, so none of these defaults reaches a profile's results.
    """

    # grid point
    r: float
    scaling: str
    eta: float
    seed: int
    # data
    data_root: str = "data"
    n_train: int | None = None  # first n training images (None: all 60,000)
    n_test: int | None = None  # first n test images (None: all 10,000)
    # model (docs/theory.md §1)
    depth: int = 8
    width: int = 16
    a: float = 0.5
    b: float = 0.5
    # optimisation (docs/theory.md §3)
    batch_size: int = 256
    epochs: int = 10
    max_steps: int | None = None  # cap on steps (None: epochs * full batches per epoch)
    divergence_bound: float = 1e3
    # execution
    device: str = "auto"
    dtype: str = "float32"
    threads: int = 1
    checkpoint_every: int = 500
    # measurements (docs/theory.md §4)
    probe_size: int = 1024
    measure_every: int = 10
    taylor_every: int = 0  # 0 switches the Taylor instruments off
    taylor_full_points: int = 0  # full T3 tensors at this many log-spaced steps
    sharpness_points: int = 0  # Hessian sharpness at this many log-spaced steps (0: off)
    sharpness_probe: int | None = None  # sharpness on the first this-many probe images (None: all)
    lanczos_tol: float = 1e-4
    lanczos_maxiter: int = 300
    extra: dict = field(default_factory=dict)  # provenance filled in by the run (not inputs)

    def __post_init__(self):
        _check(self)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"

    def inputs_dict(self) -> dict:
        """The fields that determine the results (provenance in ``extra`` excluded)."""
        d = dataclasses.asdict(self)
        d.pop("extra")
        return d


def _check(c: RunConfig) -> None:
    """Cross-field and range checks for runs built outside the workflow's schema."""

    def need(ok: bool, key: str, allowed: str, value) -> None:
        if not ok:
            raise ConfigError(f"config key '{key}' = {value!r} is not allowed: {allowed}")

    from beyond_eos.scaling import SCALINGS  # late import: scaling imports nothing from here

    need(c.scaling in SCALINGS, "grid.scaling", f"one of {sorted(SCALINGS)}", c.scaling)
    need(math.isfinite(c.eta) and c.eta > 0, "grid.eta", "a finite number > 0", c.eta)
    need(c.r >= 0, "grid.r", "a number >= 0", c.r)
    need(c.seed >= 0, "grid.seed", "an integer >= 0", c.seed)
    need(c.depth >= 1, "model.depth", "an integer >= 1", c.depth)
    need(c.width >= 1, "model.width", "an integer >= 1", c.width)
    need(c.a * c.a + c.b * c.b > 0, "model.a/model.b", "a^2 + b^2 > 0", (c.a, c.b))
    need(c.batch_size >= 1, "train.batch_size", "an integer >= 1", c.batch_size)
    n_train = 60000 if c.n_train is None else c.n_train
    need(1 <= n_train <= 60000, "data.n_train", "1..60000 or null", c.n_train)
    need(c.n_test is None or 1 <= c.n_test <= 10000, "data.n_test", "1..10000 or null", c.n_test)
    need(
        c.batch_size <= n_train,
        "train.batch_size",
        f"at most the number of training images ({n_train}, data.n_train)",
        c.batch_size,
    )
    need(c.probe_size <= n_train, "measure.probe_size", f"at most {n_train}", c.probe_size)
    need(c.epochs >= 1, "train.epochs", "an integer >= 1", c.epochs)
    need(c.device in ("auto", "cpu", "cuda"), "train.device", "auto, cpu or cuda", c.device)
    need(c.dtype in ("float32", "float64"), "train.dtype", "float32 or float64", c.dtype)
    need(c.divergence_bound > 0, "train.divergence_bound", "a number > 0", c.divergence_bound)
    need(c.measure_every >= 1, "measure.every", "an integer >= 1", c.measure_every)
    need(
        c.sharpness_probe is None or 1 <= c.sharpness_probe <= c.probe_size,
        "measure.sharpness_probe",
        f"1..measure.probe_size ({c.probe_size})",
        c.sharpness_probe,
    )


def fmt_num(x: float) -> str:
    """Canonical, exact and path-safe text for a grid number: 2.0 -> '2', 0.0625 -> '0.0625'."""
    return np.format_float_positional(float(x), trim="-")


# A run's name; the workflow uses the same text as its wildcard pattern.
RUN_ID = "r{r}-{scaling}-eta{eta}-s{seed}"


def run_id(r: float, scaling: str, eta: float, seed: int) -> str:
    """The run's name; every output path of a run derives from it."""
    return RUN_ID.format(r=fmt_num(r), scaling=scaling, eta=fmt_num(eta), seed=int(seed))


def run_dir(results_root: str | Path, r: float, scaling: str, eta: float, seed: int) -> Path:
    return Path(results_root) / "runs" / run_id(r, scaling, eta, seed)


def figure_names(config: dict) -> list[str]:
    """The figures the workflow draws for a config: one per scaling in the grid, then figure2."""
    return [FIGURE_BY_SCALING[s] for s in config["grid"]["scaling"]] + ["figure2"]


def grid_points(config: dict) -> list[tuple[float, str, float, int]]:
    """Every (r, scaling, eta, seed) of the workflow config, in a fixed order."""
    g = config["grid"]
    points = []
    for r in g["r"]:
        for scaling in g["scaling"]:
            points += [(r, scaling, eta, seed) for eta in g["eta"] for seed in g["seed"]]
    return points


def lookup(values: list, text: str, key: str) -> float:
    """The grid value whose canonical text is ``text`` (wildcards are strings)."""
    for v in values:
        if fmt_num(v) == text:
            return v
    raise ConfigError(
        f"'{text}' is not in config key '{key}' ({[fmt_num(v) for v in values]}); "
        f"pick one of those, or add yours, e.g. --set {key}=[{text}]"
    )


def run_config(config: dict, r: str | float, scaling: str, eta: str | float, seed) -> RunConfig:
    """Build the RunConfig of one grid point from the (validated) workflow config."""
    g, d, m, t, ms = (config[k] for k in ("grid", "data", "model", "train", "measure"))
    return RunConfig(
        r=lookup(g["r"], fmt_num(float(r)), "grid.r"),
        scaling=scaling,
        eta=lookup(g["eta"], fmt_num(float(eta)), "grid.eta"),
        seed=int(seed),
        data_root=str(d["root"]),
        n_train=d.get("n_train"),
        n_test=d.get("n_test"),
        depth=m["depth"],
        width=m["width"],
        a=m["a"],
        b=m["b"],
        batch_size=t["batch_size"],
        epochs=t["epochs"],
        max_steps=t.get("max_steps"),
        divergence_bound=t["divergence_bound"],
        device=t["device"],
        dtype=t["dtype"],
        threads=t["threads"],
        checkpoint_every=t["checkpoint_every"],
        probe_size=ms["probe_size"],
        measure_every=ms["every"],
        taylor_every=ms["taylor_every"],
        taylor_full_points=ms["taylor_full_points"],
        sharpness_points=ms["sharpness_points"],
        sharpness_probe=ms["sharpness_probe"],
        lanczos_tol=ms["lanczos_tol"],
        lanczos_maxiter=ms["lanczos_maxiter"],
    )


def load_config(path: str | Path, overrides: dict | None = None) -> dict:
    """Read a workflow YAML config, apply nested overrides, and validate it like the workflow."""
    import yaml

    if not Path(path).is_file():
        raise ConfigError(f"config file {path} not found; the profiles are config/config.yaml "
                          "(paper) and config/quick.yaml")
    with open(path) as f:
        config = yaml.safe_load(f)
    for key, value in (overrides or {}).items():
        node = config
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    validate_config(config)
    return config


def validate_config(config: dict) -> None:
    """Schema check (unknown keys, types, enums, bounds) then cross-field checks."""
    errors = schema_errors(config)
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))
    check_cross_fields(config)


def schema_errors(config: dict) -> list[str]:
    """Every schema violation as one line that names the key and what is allowed."""
    import jsonschema
    import yaml

    with open(SCHEMA_PATH) as f:
        schema = yaml.safe_load(f)
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path))
    return [_describe(e) for e in errors]


def _describe(err) -> str:
    where = ".".join(str(p) for p in err.absolute_path) or "(top level)"
    if err.validator == "additionalProperties":
        allowed = sorted(err.schema.get("properties", {}))
        return f"{err.message} under '{where}'; allowed keys: {allowed}"
    return f"config key '{where}': {err.message}"


def check_cross_fields(config: dict) -> None:
    """Checks a JSON schema cannot express; each grid point must also make a valid RunConfig."""
    for key in ("r", "scaling", "eta", "seed"):
        values = config["grid"][key]
        texts = [fmt_num(v) if key != "scaling" else v for v in values]
        if len(set(texts)) != len(texts):
            raise ConfigError(f"config key 'grid.{key}' has repeated values: {values}")
    for point in grid_points(config):
        run_config(config, *point)
