"""Layer ranges: which transformer layers a deep-prompt or weight method acts in (``layers`` option).

P-Tuning v2's paper reports prompts in the upper layers alone doing about as well as prompts in every
layer. A method confined to the top layers leaves the layers below it exactly as the frozen base has
them, which :mod:`ptune.frozen` turns into skipped work: no backward pass below the lowest adapted
layer, and their outputs cached across epochs.

Written forms (layers numbered from 1, as papers count them; ranges inclusive):
``"top:6"`` (the upper six), ``"bottom:3"``, ``"7-12"``, ``"1,3,5-6"``; None / ``"all"``: every layer;
``"auto"``: the upper half (rounded up: 3 of MiniLM's 6, 6 of BERT-base's 12, 1 of 2), P-Tuning v2's
default (bench/results/time_to_target*.md), and every layer on an encoder-decoder model.
"""

from __future__ import annotations

import re

from torch import nn

from ..errors import ConfigError, UnsupportedModelError
from ..models import arch_facts, backbone_of

_PART = re.compile(r"^(?:(top|bottom):(\d+)|(\d+)(?:-(\d+))?)$")
FORMS = "'top:K', 'bottom:K', 'A-B' (1-based, inclusive), a comma list of those, 'all' or 'auto' (the upper half)"


def check_layers(value: object) -> str | None:
    """The option normalised (whitespace dropped); a one-line error when it cannot be read."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise ConfigError(f"layers={value!r} must be a string such as 'top:6' ({FORMS})")
    text = value.replace(" ", "")
    if text in ("", "all"):
        return None
    if text == "auto":
        return text
    for part in text.split(","):
        m = _PART.match(part)
        if m is None:
            raise ConfigError(f"layers={value!r}: cannot read {part!r}; write {FORMS}")
        numbers = [int(g) for g in m.groups()[1:] if g is not None]
        if any(n < 1 for n in numbers):
            raise ConfigError(f"layers={value!r}: layers are numbered from 1 ({part!r})")
        if m.group(3) and m.group(4) and int(m.group(4)) < int(m.group(3)):
            raise ConfigError(f"layers={value!r}: range {part!r} runs backwards; write low-high")
    return text


def picks_layers(value: object) -> bool:
    """True when ``value`` names particular layers of one stack (not every layer, not ``auto``): refused on an
    encoder-decoder model, where ``auto`` means every layer."""
    return check_layers(value) not in (None, "auto")


def resolve_layers(value: str | None, num_layers: int) -> tuple[int, ...]:
    """0-based sorted layer indices of ``value`` for a model of ``num_layers`` layers."""
    text = check_layers(value)
    if text is None:
        return tuple(range(num_layers))
    if text == "auto":  # the upper half, rounded up
        return tuple(range(num_layers // 2, num_layers))
    chosen: set[int] = set()
    for part in text.split(","):
        side, k, lo, hi = _PART.match(part).groups()
        if side:
            if int(k) > num_layers:
                raise ConfigError(f"layers={value!r} asks for {k} layers; the model has {num_layers}")
            n = int(k)
            chosen.update(range(num_layers - n, num_layers) if side == "top" else range(n))
        else:
            a, b = int(lo), int(hi or lo)
            if b > num_layers:
                raise ConfigError(f"layers={value!r} names layer {b}; the model has {num_layers} (1..{num_layers})")
            chosen.update(range(a - 1, b))
    return tuple(sorted(chosen))


def layer_list(base: nn.Module) -> nn.ModuleList:
    """The body's list of transformer layers (``encoder.layer``, ``layers``, ``h``, ``block``...)."""
    body = backbone_of(base)
    n = arch_facts(base).num_layers
    found = [m for name, m in body.named_modules()
             if isinstance(m, nn.ModuleList) and len(m) == n and name.rsplit(".", 1)[-1] in ("layer", "layers", "h",
                                                                                              "block", "blocks")]
    if len(found) != 1:
        raise UnsupportedModelError(
            f"cannot tell which of {type(body).__name__}'s modules are its {n} transformer layers, so a layer "
            "range cannot be applied; leave layers unset (every layer)")
    return found[0]


def module_layers(base: nn.Module) -> dict[int, int]:
    """id(module) -> the index of the transformer layer that holds it, for every module inside a layer."""
    return {id(sub): i for i, layer in enumerate(layer_list(base)) for sub in layer.modules()}
