"""Building frozen config dataclasses from plain values (YAML, JSON, CLI) with clear errors."""

from __future__ import annotations

import dataclasses
from typing import Any

from .errors import ConfigError


def from_values(cls: type, values: dict[str, Any], owner: str) -> Any:
    """``cls(**values)``, refusing unknown keys by name and turning type errors into ConfigError."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{owner}: unknown option(s) {unknown}; valid ones are {sorted(known)}")
    try:
        return cls(**values)
    except TypeError as e:
        raise ConfigError(f"{owner}: {e}") from e
