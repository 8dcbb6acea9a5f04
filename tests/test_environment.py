"""The two routes to the environment (pip via pyproject.toml, conda via environment.yml) agree."""

import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_environment_yml_pins_equal_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = set(project["dependencies"]) | set(project["optional-dependencies"]["dev"])
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_items = [d for d in env["dependencies"] if isinstance(d, dict)]
    conda_pins = set(pip_items[0]["pip"])
    assert conda_pins == pins, (conda_pins ^ pins)
    assert "python=3.11" in env["dependencies"]
    assert all("==" in p for p in pins), "every dependency is pinned exactly"
