"""Shared pieces of the speed benchmarks (issue #15: compare_peft, mfu, scaling, inference).

``host_facts()``: the machine a benchmark ran on, recorded beside its numbers: CPU name (from /proc/cpuinfo:
``platform.processor()`` is empty on Linux), cores, torch threads, the bf16 flags that decide ``--precision
auto`` (``ptune.engine.precision.cpu_flags`` / ``bf16_available``) and library versions. ``load()``: the
1/5/15-minute load averages, taken before and after each measured run, because a time measured on a shared
machine is comparable only under similar load. ``parse_options``: a ``--...-options`` flag's JSON objects
or key=value items. ``step_trainer``: ptune's own Trainer, set up as ``Trainer.fit`` leaves it before its
first step, so a benchmark can time real ``train_step`` calls.
Scripts in bench/ import it as ``from speed import ...`` (bench/ is on sys.path when run as a script).
"""

from __future__ import annotations

import json
import os
import platform
from typing import Any


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((x.split(":", 1)[1].strip() for x in f if x.startswith("model name")), "")
    except OSError:
        return platform.processor() or platform.machine()


def load() -> list[float]:
    """The 1, 5 and 15-minute load averages."""
    return [round(x, 2) for x in os.getloadavg()]


def host_facts() -> dict[str, Any]:
    import torch
    import transformers

    from ptune.engine.precision import bf16_available, cpu_flags

    flags = cpu_flags()
    facts = {"cpu": cpu_name(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
             "avx512f": "avx512f" in flags, "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags,
             "bf16_available": bf16_available(), "torch": torch.__version__, "transformers": transformers.__version__,
             "python": platform.python_version()}
    try:
        import peft

        facts["peft"] = peft.__version__
    except ImportError:
        pass
    return facts


def describe(facts: dict[str, Any]) -> str:
    """One Markdown line naming the machine."""
    return (f"CPU: {facts['cpu']} ({facts['cpus']} cores, {facts['torch_threads']} torch threads); avx512_bf16 "
            f"{facts['avx512_bf16']}, amx_bf16 {facts['amx_bf16']} (bf16 autocast "
            f"{'native' if facts['bf16_available'] else 'emulated: ptune --precision auto uses fp32'}); "
            f"torch {facts['torch']}, transformers {facts['transformers']}"
            + (f", peft {facts['peft']}" if "peft" in facts else "") + ".")


def parse_options(items: list[str], flag: str) -> dict[str, Any]:
    """JSON objects and/or key=value items (values read as YAML: 3, 5e-4, true, top:3, [a, b]) -> one dict;
    ValueError with a one-line message naming the bad item."""
    from ptune.yamlfile import load_yaml

    out: dict[str, Any] = {}
    for item in items:
        item = item.strip()
        if item.startswith("{"):
            try:
                got = json.loads(item)
            except json.JSONDecodeError as e:
                raise ValueError(f"{flag} {item!r} is not valid JSON ({e.msg}); give a JSON object or key=value") from None
            if not isinstance(got, dict):
                raise ValueError(f"{flag} {item!r} must be a JSON object")
            out.update(got)
            continue
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"{flag} {item!r}: expected key=value (e.g. layers=top:3) or a JSON object")
        out[key.strip()] = load_yaml(value) if value.strip() else ""
    return out


def step_trainer(options: dict[str, Any]):
    """ptune's Trainer for ``TrainConfig.from_dict(options)`` (built exactly as ``ptune.engine.train`` builds
    it), in the state ``Trainer.fit`` puts it in before the first step. Close ``trainer.directory`` after."""
    from ptune.engine import TrainConfig
    from ptune.engine.loop import Trainer, _adapter_hooks

    trainer = Trainer(TrainConfig.from_dict(options))
    trainer.extra_loss, trainer.after_step, set_total = _adapter_hooks(trainer.inner.adapter)
    if set_total is not None:
        set_total(trainer.total)
    trainer.seen = 0
    trainer.model.train()
    return trainer
