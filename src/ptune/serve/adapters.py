"""The adapters a server holds, all on one base: the labelling ones in one ``AdapterSet`` (scored
together, mixed batches) and the generating ones (causal LM, seq2seq) as ``Run``s."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from ..adapter_io import find_adapter, read_spec
from ..adapter_set import AdapterSet, adapter_names
from ..errors import ConfigError, PtuneError
from ..heads import head_kind


def _generates(spec: Any) -> bool:
    """Whether an adapter answers through generate (a causal_lm head) rather than labelling its inputs."""
    head = getattr(spec, "head", None)
    return head is not None and head_kind(head.kind).generates


def _read(name: str, path: str | Path) -> tuple[Any, Path]:
    try:
        adapter_dir, _ = find_adapter(path)
        return read_spec(adapter_dir), adapter_dir
    except PtuneError as e:
        raise type(e)(f"adapter {name!r}: {e}") from None


def _same_base(a: Any, b: Any) -> bool:
    if a.name and a.name == b.name:
        return True
    fa = {k: v for k, v in (a.fingerprint or {}).items() if k != "name"}
    fb = {k: v for k, v in (b.fingerprint or {}).items() if k != "name"}
    return bool(fa) and fa == fb


class Adapters:
    """The labelling adapters (one :class:`AdapterSet`) and the generating ones (one ``Run`` each), on one base."""

    def __init__(self, aset: AdapterSet, runs: Mapping[str, Any] | None = None, *, trust_remote_code: bool = False,
                 allow_pickle: bool = False) -> None:
        self.set = aset
        self.runs: dict[str, Any] = dict(runs or {})
        self.consent = {"trust_remote_code": trust_remote_code, "allow_pickle": allow_pickle}

    @classmethod
    def load(cls, adapters: Mapping[str, str | Path] | Sequence[str | Path], **consent: Any) -> "Adapters":
        named = adapter_names(adapters)
        specs = {name: _read(name, path) for name, path in named.items()}  # a missing run fails here, first
        labelling = {n: p for n, p in named.items() if not _generates(specs[n][0])}
        out = cls(AdapterSet.load(labelling, **consent), **consent)
        for name, path in named.items():
            if name not in labelling:
                out._check_base(name, specs[name][0])
                out.runs[name] = out._run(name, path)
        return out

    @property
    def names(self) -> list[str]:
        return self.set.names + list(self.runs)

    def __contains__(self, name: object) -> bool:
        return name in self.set or name in self.runs

    def _specs(self) -> list[tuple[str, Any]]:
        return ([(n, self.set.spec(n)) for n in self.set.names]
                + [(n, r.model.spec) for n, r in self.runs.items()])

    def _check_base(self, name: str, spec: Any) -> None:
        from ..models import describe

        specs = self._specs()
        if not specs:
            return
        other, have = specs[0]  # every adapter held already shares one base
        if not _same_base(spec.base, have.base):
            raise ConfigError(
                f"adapter {name!r} needs the base {describe(spec.base.fingerprint or {'name': spec.base.name})} "
                f"but {other!r} needs {describe(have.base.fingerprint or {'name': have.base.name})}; one server "
                "serves one base: start one server per base")

    def _run(self, name: str, path: str | Path) -> Any:
        from ..engine.inference import Run

        try:
            return Run(path, **self.consent)
        except PtuneError as e:
            raise type(e)(f"adapter {name!r}: {e}") from None

    def add(self, name: str, path: str | Path) -> dict[str, Any]:
        if name in self:
            raise ConfigError(f"an adapter named {name!r} is already loaded; remove it first or pick another name")
        spec, _ = _read(name, path)
        self._check_base(name, spec)
        if _generates(spec):
            self.runs[name] = self._run(name, path)
        else:
            self.set.add(name, path)  # fingerprint-checked against the set's base
        return self.info(name)

    def remove(self, name: str) -> None:
        if name in self.runs:
            del self.runs[name]
        else:
            self.set.remove(name)

    def info(self, name: str) -> dict[str, Any]:
        if name in self.runs:
            run = self.runs[name]
            spec = run.model.spec
            return {"name": name, "path": str(run.path), "method": spec.method, "task": getattr(run.task, "name", None),
                    "head": spec.head.kind, "labels": list(run.task.labels),
                    "trainable_params": sum(t.numel() for t in run.model.trainable_state_dict().values()),
                    "template": spec.template.source, "endpoint": "generate"}
        return {**self.set.info(name), "endpoint": "predict"}

    @property
    def base_name(self) -> str | None:
        specs = self._specs()
        return specs[0][1].base.name if specs else None
