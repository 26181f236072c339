"""The adapters a server holds, all on one base, in one ``AdapterSet``: the labelling ones (scored together,
mixed batches) and the causal-LM ones (decoded together: ``aset.generation``). Only an encoder-decoder's
(T5 seq2seq) adapters are held apart, each as a ``Run`` with its own copy of the base, generating one
request at a time."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ..adapter_io import find_adapter, load_base_for, read_spec
from ..adapter_set import AdapterSet, adapter_names
from ..adapter_set.members import base_kind_of
from ..encoder_decoder import SEQ2SEQ_KIND
from ..errors import AdapterMismatchError, ConfigError, PtuneError
from ..heads import head_kind
from ..models import GENERATIVE_BASE_KINDS, describe, fullest_base_kind, load_tokenizer


DTYPES = ("auto", "float32", "bfloat16", "saved")


def _generates(spec: Any) -> bool:
    """Whether an adapter answers by generating (causal_lm, seq2seq heads) rather than labelling its inputs."""
    head = getattr(spec, "head", None)
    return head is not None and head_kind(head.kind).generates


def _own_run(spec: Any) -> bool:
    """Whether an adapter is held as a ``Run`` of its own: a generating head on an encoder-decoder."""
    return _generates(spec) and getattr(spec.base, "kind", None) == SEQ2SEQ_KIND


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


def _refuse_other_base(name: str, spec: Any, other: str, have: Any) -> None:
    raise ConfigError(
        f"adapter {name!r} needs the base {describe(spec.base.fingerprint or {'name': spec.base.name})} "
        f"but {other!r} needs {describe(have.base.fingerprint or {'name': have.base.name})}; one server "
        "serves one base: start one server per base")


class Adapters:
    """The adapters in one :class:`AdapterSet` (labelling and causal-LM ones), and encoder-decoder generating
    adapters as ``runs`` (one ``Run`` each), all on one base."""

    def __init__(self, aset: AdapterSet, runs: Mapping[str, Any] | None = None, *, trust_remote_code: bool = False,
                 allow_pickle: bool = False) -> None:
        self.set = aset
        self.runs: dict[str, Any] = dict(runs or {})
        self.consent = {"trust_remote_code": trust_remote_code, "allow_pickle": allow_pickle}

    @classmethod
    def load(cls, adapters: Mapping[str, str | Path] | Sequence[str | Path], *, dtype: str = "auto",
             **consent: Any) -> "Adapters":
        """``dtype`` (the base's weights): ``auto``: float32 on a CPU where the base or an adapter generates (so a
        greedy answer does not depend on which requests share its decoding step: bf16 rounds differently at
        other batch shapes), else as saved; ``float32`` / ``bfloat16``; ``saved``: as the base's folder holds it.
        A quantized base (QLoRA) is always loaded as saved; a base saved in float32 served in bfloat16 changes its
        weights, so the adapters' fingerprint check refuses it."""
        if dtype not in DTYPES:
            raise ConfigError(f"--dtype={dtype!r} must be one of {', '.join(DTYPES)}")
        named = adapter_names(adapters)
        specs = {name: _read(name, path) for name, path in named.items()}  # a missing run fails here, first
        in_set = {n: p for n, p in named.items() if not _own_run(specs[n][0])}
        first = next(iter(specs), None)
        for name in specs:  # one base for all, checked before any is loaded
            if not _same_base(specs[name][0].base, specs[first][0].base):
                _refuse_other_base(name, specs[name][0], first, specs[first][0])
        base = tokenizer = None
        if in_set:
            set_specs = [specs[n][0] for n in in_set]
            kinds = [getattr(sp.base, "kind", "backbone") for sp in set_specs]
            spec = set_specs[kinds.index(fullest_base_kind(kinds))]  # the base AdapterSet.load would load
            generates = spec.base.kind in GENERATIVE_BASE_KINDS or any(_generates(sp) for sp in set_specs)
            torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "saved": None,
                           "auto": torch.float32 if generates and not torch.cuda.is_available() else None}[dtype]
            if torch_dtype is not None:
                base = load_base_for(spec, dtype=torch_dtype, **consent)
                tokenizer = load_tokenizer(spec.base.name, trust_remote_code=consent.get("trust_remote_code", False))
        try:
            out = cls(AdapterSet.load(in_set, base=base, tokenizer=tokenizer, **consent), **consent)
        except AdapterMismatchError as e:
            kinds = {n: getattr(specs[n][0].base, "kind", None) for n in in_set}
            if len(set(kinds.values())) < 2:
                raise
            raise AdapterMismatchError(
                f"{e}; these adapters were trained on different forms of the base ({kinds}) and share one copy of "
                "it here, loaded in the fullest form: an adapter whose tensors are named after the base's modules "
                "(LoRA, AdaLoRA, BitFit) loads only on the form it was trained on: train it on that form, or "
                "serve it from a server of its own") from None
        for name, path in named.items():
            if name not in in_set:
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
        specs = self._specs()
        if not specs:
            return
        other, have = specs[0]  # every adapter held already shares one base
        if not _same_base(spec.base, have.base):
            _refuse_other_base(name, spec, other, have)

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
        if _own_run(spec):
            self.runs[name] = self._run(name, path)
        else:
            self.set.add(name, path)  # fingerprint-checked against the set's base
        return self.info(name)

    def remove(self, name: str) -> None:
        if name in self.runs:
            del self.runs[name]
        else:
            self.set.remove(name)

    def generates(self, name: str) -> bool:
        """Whether the adapter ``name`` answers by generating text (in the set's decoder, or as a Run)."""
        return name in self.runs or head_kind(self.set.spec(name).head.kind).generates

    def decodes(self, name: str | None) -> bool:
        """Whether ``name`` is decoded in the set's running batch (a causal-LM adapter; None: the bare base)."""
        if name is None:
            return self.base_generates
        return name in self.set and head_kind(self.set.spec(name).head.kind).generates

    @property
    def base_generates(self) -> bool:
        """Whether the set's base has its LM head (a causal LM), so the bare base can generate."""
        return self.set.base is not None and base_kind_of(self.set.base) in GENERATIVE_BASE_KINDS \
            and not self.set.base.config.is_encoder_decoder

    def info(self, name: str) -> dict[str, Any]:
        if name in self.runs:
            run = self.runs[name]
            spec = run.model.spec
            return {"name": name, "path": str(run.path), "method": spec.method, "task": getattr(run.task, "name", None),
                    "head": spec.head.kind, "labels": list(run.task.labels),
                    "trainable_params": sum(t.numel() for t in run.model.trainable_state_dict().values()),
                    "template": spec.template.source, "endpoint": "generate"}
        return {**self.set.info(name), "endpoint": "generate" if self.generates(name) else "predict"}

    @property
    def base_name(self) -> str | None:
        specs = self._specs()
        return specs[0][1].base.name if specs else None
