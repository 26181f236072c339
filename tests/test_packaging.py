"""What an installed ptune says about itself: its version and its licence (an SPDX expression, PEP 639)."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest

import ptune
from ptune.cli import main

tomllib = pytest.importorskip("tomllib", reason="Python 3.11+ reads pyproject.toml itself")

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def test_version_flag_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"ptune {ptune.__version__}" == "ptune 0.1.0"


def test_license_is_an_spdx_expression_in_the_source_and_the_installed_metadata():
    project = tomllib.loads(PYPROJECT.read_text())
    assert project["project"]["license"] == "Apache-2.0"  # a string: setuptools deprecates the {text = ...} table
    assert "setuptools>=77" in " ".join(project["build-system"]["requires"])  # the first to read it
    metadata = importlib.metadata.metadata("ptune")  # what `pip install -e .` wrote (reinstall after editing)
    assert metadata["License-Expression"] == "Apache-2.0"
    assert metadata["Version"] == ptune.__version__


def test_track_extra_is_in_the_test_extra():
    """CI installs `./install.sh test`: the tracking tests' readers must come with it."""
    extras = tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]
    assert set(extras["track"]) <= set(extras["test"])
