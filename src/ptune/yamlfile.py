"""Reading ptune's YAML files (training configs, task files) with YAML 1.2's numbers.

PyYAML implements YAML 1.1, where a float needs a dot: ``lr: 5e-4`` reads as the *string* '5e-4' and
the config then refuses it, although every other YAML reader and every Python user reads a number.
:class:`Loader` adds YAML 1.2's float form (``5e-4``, ``1E3``, ``.5``, ``-2e-5``); everything else is
``yaml.SafeLoader`` (nothing is evaluated).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError


class Loader(yaml.SafeLoader):
    """SafeLoader that also reads YAML 1.2 floats (``5e-4``)."""


Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                   |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                   |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                   |[-+]?\.(?:inf|Inf|INF)
                   |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=Loader)  # noqa: S506 (a SafeLoader subclass)


def read_yaml(path: Path) -> Any:
    """The file's YAML; ConfigError naming the file where it is not valid YAML or not UTF-8 text."""
    try:
        return load_yaml(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from e
