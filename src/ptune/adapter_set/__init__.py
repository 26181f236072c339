"""Several saved adapters on one frozen base, a batch of mixed-adapter rows scored in one forward pass.

    s = ptune.AdapterSet.load({"bbc": "runs/bbc", "wnut": "runs/wnut"})   # run dirs or adapter folders
    s.predict([{"adapter": "bbc", "text": "the striker scored twice"},
               {"adapter": "wnut", "text": "John lives in Paris"}])
    # -> [{"label": ..., "probabilities": {...}}, {"tokens": [...], "tags": [...]}], as each Run.predict

The base is loaded once (from the first adapter's spec, or given) and every adapter is checked
against its fingerprint. Each row names its adapter and goes through that adapter's template, head
kind and head; the transformer body runs once for the whole batch. The set is one multi-adapter
model (:class:`~ptune.adapter_set.mixed.SetModel`): its adapter meets the same hooks a single method
does, per row (input prompts, deep prompts, low-rank branches, bias deltas: :mod:`.mixed`), and it is
scored by :func:`ptune.scoring.score_rows`, the path of ``Run`` and of evaluation in training. Heads
whose record is several rows (multiple choice, span QA) are served too, in forward passes of their own.

Refused, each with a one-line reason: full fine-tuning (it changes every weight of the base, so it
cannot act on some rows only), multi-task adapters and prompt ensembles (one adapter holding several
prompt tables: score them with ``Run``), a seq2seq (T5) adapter (an encoder-decoder generates one
request at a time: ``Run``), an adapter for another base (fingerprint) or another quantization of it,
and one that needs the base's LM head when the set's base was loaded without it. Causal-LM adapters
are held to generate: ``aset.generation`` decodes their requests (and the bare base's) together, step
by step (:mod:`.generation`, :mod:`ptune.decoding`); ``predict`` refuses their rows. The
set scores in fp32 unless every adapter is a run that trained in bf16 (then under bf16 autocast, as
``Run`` scores it; ``precision=`` decides otherwise).

``predict_batch`` is the path for a server that collects rows from many requests (dynamic batching):
a bad row gets ``{"error": ...}`` and never stops the others. ``predict`` validates every row first
and raises a :class:`~ptune.errors.DataError` naming the bad row.
"""

from __future__ import annotations

import dataclasses
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn

from ..adapter_io import WEIGHTS_NAME, check_fingerprint, find_adapter, load_base_for, read_spec, read_tensors
from ..data import load_records
from ..encoder_decoder import SEQ2SEQ_KIND
from ..errors import AdapterMismatchError, ConfigError, DataError, PtuneError
from ..heads import Example, head_kind
from ..methods.low_rank import LowRankLayer, MultiLowRankLayer
from ..models import fullest_base_kind, load_tokenizer
from ..scoring import PADDING_WASTE, score_rows
from .generation import SetGeneration
from .members import base_kind_of, build_member, check_base, set_module
from .mixed import Member, SetAdapter, SetModel


@dataclass
class _Row:
    index: int
    member: Member
    record: dict
    example: Example


class AdapterSet:
    """Saved adapters on one frozen base; a batch may mix rows of any of them (see the module doc).

    ``base``: a loaded base (default: the first adapter's, loaded as its spec says); ``tokenizer``:
    default the base's. ``trust_remote_code`` / ``allow_pickle``: the consent a base loaded that way
    for training needs again. ``precision``: ``fp32``, ``bf16`` (autocast) or ``auto``: bf16 autocast
    when every adapter of the set is a run that trained in bf16 (as ``Run`` scores such a run), else
    fp32. Adapters are frozen copies: retrain one and ``add`` it again. ``model`` is the set as one
    multi-adapter :class:`~ptune.adapter_set.mixed.SetModel` (None until a base is there).
    """

    def __init__(self, base: nn.Module | None = None, tokenizer: Any = None, *, trust_remote_code: bool = False,
                 allow_pickle: bool = False, precision: str = "auto") -> None:
        if precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"precision={precision!r} must be auto, fp32 or bf16")
        self.precision = precision
        self.tokenizer = tokenizer
        self._consent = {"trust_remote_code": trust_remote_code, "allow_pickle": allow_pickle}
        self._members: dict[str, Member] = {}
        self._adapter = SetAdapter(self._members)
        self.model: SetModel | None = None
        self._generation: SetGeneration | None = None
        self._lock = threading.RLock()
        if base is not None:
            self._use_base(base)

    def _use_base(self, base: nn.Module) -> None:
        for p in base.parameters():
            p.requires_grad_(False)
        self.model = SetModel(base.eval(), self._adapter)

    @property
    def base(self) -> nn.Module | None:
        return self.model.base if self.model is not None else None

    @classmethod
    def load(cls, adapters: Mapping[str, str | Path] | Sequence[str | Path], base: nn.Module | None = None,
             tokenizer: Any = None, **options: Any) -> "AdapterSet":
        """A set of ``{name: path}`` (or a list of paths, named by :func:`adapter_names`).

        Without ``base`` it is loaded once, as the adapters' specs say; where some adapters need the
        base's LM head (a verbalizer) and others its bare body, it is loaded with the LM head.
        """
        named = adapter_names(adapters)
        s = cls(base, tokenizer, **options)  # trust_remote_code, allow_pickle, precision
        if base is None and named:
            specs = [read_spec(find_adapter(p)[0]) for p in named.values()]
            kinds = [getattr(getattr(sp, "base", None), "kind", "backbone") for sp in specs]
            s._load_base(specs[kinds.index(fullest_base_kind(kinds))])
        for name, path in named.items():
            s.add(name, path)
        return s

    # ------------------------------------------------------------------ what the set holds

    @property
    def names(self) -> list[str]:
        return list(self._members)

    def __contains__(self, name: object) -> bool:
        return name in self._members

    def __len__(self) -> int:
        return len(self._members)

    def spec(self, name: str) -> Any:
        """The resolved spec of one adapter of the set."""
        return self._member(name).spec

    def info(self, name: str) -> dict[str, Any]:
        """method, task, head, labels, trainable parameter count and path of one adapter."""
        m = self._member(name)
        return {"name": m.name, "path": str(m.path), "method": m.spec.method, "task": getattr(m.task, "name", None),
                "head": m.spec.head.kind, "labels": list(m.task.labels), "trainable_params": m.trainable,
                "template": m.spec.template.source}

    def _member(self, name: str) -> Member:
        if name not in self._members:
            raise ConfigError(f"this set holds no adapter {name!r}; it holds {self.names}")
        return self._members[name]

    @property
    def device(self) -> torch.device:
        return next(self.base.parameters()).device

    # ------------------------------------------------------------------ adding and removing adapters

    def _load_base(self, spec: Any) -> None:
        self._use_base(load_base_for(spec, **self._consent))
        if self.tokenizer is None and spec.base.name:
            self.tokenizer = load_tokenizer(spec.base.name, trust_remote_code=self._consent["trust_remote_code"])

    def add(self, name: str, path: str | Path) -> None:
        """Load the adapter at ``path`` (a folder ``save_adapter`` wrote, or a run directory) as ``name``."""
        if not isinstance(name, str) or not name:
            raise ConfigError(f"an adapter's name must be a non-empty string, got {name!r}")
        with self._lock:
            if name in self._members:
                raise ConfigError(f"this set already holds an adapter named {name!r} ({self._members[name].path}); "
                                  "remove it first or pick another name")
            adapter_dir, run_dir = find_adapter(path)
            spec = read_spec(adapter_dir)
            where = f"adapter {name!r} ({adapter_dir})"
            if not hasattr(spec, "template") or getattr(spec, "ensemble", 1) != 1:
                raise ConfigError(f"{where} is a multi-task adapter or a prompt ensemble; an AdapterSet serves "
                                  "single-task adapters, score this one with ptune.engine.Run")
            if head_kind(spec.head.kind).generates and spec.base.kind == SEQ2SEQ_KIND:
                raise ConfigError(f"{where} has a {spec.head.kind} head on an encoder-decoder, which answers "
                                  "through generate() one request at a time; an AdapterSet decodes causal LMs "
                                  "together: generate with ptune.engine.Run")
            tensors = read_tensors(adapter_dir / WEIGHTS_NAME)
            if self.model is None:
                self._load_base(spec)
            if self.tokenizer is None:
                self.tokenizer = load_tokenizer(spec.base.name or self.base.config.name_or_path,
                                                trust_remote_code=self._consent["trust_remote_code"])
            check_base(self.base, spec, where)
            with self._plain_base():
                try:
                    check_fingerprint(spec.base.fingerprint, self.base)
                except AdapterMismatchError as e:
                    have = base_kind_of(self.base)
                    hint = (f"; it was trained on the {spec.base.kind.replace('_', ' ')} form of the model and this "
                            f"set's base is the {have.replace('_', ' ')} form, whose weights differ: put it in a "
                            "set of its own") if spec.base.kind != have else ""
                    raise AdapterMismatchError(f"{where} does not fit this set's base: {e}{hint}") from None
                try:
                    member = build_member(self.base, self.tokenizer, name, adapter_dir, run_dir, spec, tensors,
                                          self.device)
                except BaseException:
                    for layer_name, module in list(self.base.named_modules()):  # a build that failed half-way
                        if isinstance(module, LowRankLayer):
                            set_module(self.base, layer_name, module.base_layer)
                    raise
                finally:
                    for p in self.base.parameters():
                        p.requires_grad_(False)
            self._install(member)

    def _install(self, member: Member) -> None:
        wrappers = self._adapter.wrappers
        for layer_name, branch in member.branches.items():
            wrapper = wrappers.get(layer_name)
            if wrapper is None:
                wrapper = MultiLowRankLayer(self.base.get_submodule(layer_name))
                set_module(self.base, layer_name, wrapper)
                wrappers[layer_name] = wrapper
            wrapper.branches[member.name] = branch.eval()
        for module_name in member.bias_deltas:
            if module_name not in self._adapter.bias_hooks:  # on the plain layer, which outlives any wrapper around it
                wrapper = wrappers.get(module_name)
                module = wrapper.base_layer if wrapper is not None else self.base.get_submodule(module_name)
                self._adapter.bias_hooks[module_name] = module.register_forward_hook(self._adapter.bias_hook(module_name))
        member.head.to(self.device)
        member.adapter.to(self.device)
        member.bias_deltas = {k: v.to(self.device) for k, v in member.bias_deltas.items()}
        self._members[member.name] = member
        self.model.head[member.name] = member.head  # same order as the members: a row's head is its member's

    @property
    def generation(self) -> SetGeneration:
        """The set's generating adapters (and its bare base) decoded together in one running batch."""
        if self._generation is None:
            if self.model is None:
                raise ConfigError("this set holds no base yet: add an adapter first")
            self._generation = SetGeneration(self)
        return self._generation

    def remove(self, name: str) -> None:
        """Drop an adapter; layers no other adapter needs get their plain form back."""
        with self._lock:
            member = self._member(name)
            if self._generation is not None and self._generation.decoder.active:
                raise ConfigError(f"adapter {name!r} cannot be removed while this set is generating (rows are "
                                  "routed by their adapter's place in the set); try again when the requests finish")
            wrappers = self._adapter.wrappers
            for layer_name in member.branches:
                wrapper = wrappers[layer_name]
                wrapper.branches.pop(name, None)
                if not wrapper.branches:
                    set_module(self.base, layer_name, wrapper.base_layer)
                    del wrappers[layer_name]
            del self._members[name]
            del self.model.head[name]
            needed = {m for other in self._members.values() for m in other.bias_deltas}
            for module_name in [m for m in self._adapter.bias_hooks if m not in needed]:
                self._adapter.bias_hooks.pop(module_name).remove()

    @contextmanager
    def _plain_base(self) -> Iterator[None]:
        """The base without the set's wrappers (for fingerprints and for building an adapter on it)."""
        wrappers = self._adapter.wrappers
        for layer_name, wrapper in wrappers.items():
            set_module(self.base, layer_name, wrapper.base_layer)
        try:
            yield
        finally:
            for layer_name, wrapper in wrappers.items():
                set_module(self.base, layer_name, wrapper)

    @property
    def bf16(self) -> bool:
        """Whether scoring runs under bf16 autocast (see ``precision``)."""
        if self.precision != "auto":
            return self.precision == "bf16"
        return bool(self._members) and all(m.bf16 for m in self._members.values())

    # ------------------------------------------------------------------ rows

    def validate(self, rows: Sequence[Any]) -> list[_Row]:
        """Every row checked and encoded; a :class:`DataError` naming the first bad row (and how many are bad)."""
        out, errors = self._prepare(rows)
        if errors:
            first = next(iter(errors.values()))
            more = f" ({len(errors) - 1} more bad rows)" if len(errors) > 1 else ""
            raise DataError(f"{first}{more}")
        return [r for r in out if r is not None]

    def _prepare(self, rows: Sequence[Any]) -> tuple[list[_Row | None], dict[int, str]]:
        out: list[_Row | None] = []
        errors: dict[int, str] = {}
        for i, row in enumerate(rows):
            try:
                out.append(self._prepare_row(i, row))
            except (DataError, PtuneError) as e:
                out.append(None)
                errors[i] = str(e)
        return out, errors

    def _prepare_row(self, i: int, row: Any) -> _Row:
        where = f"row {i + 1}"
        if not isinstance(row, Mapping):
            raise DataError(f"{where}: expected an object naming its adapter ({{\"adapter\": ..., \"text\": ...}}), "
                            f"got {type(row).__name__}")
        name = row.get("adapter")
        if not isinstance(name, str) or name not in self._members:
            raise DataError(f"{where}: unknown adapter {name!r}; this set holds {self.names}")
        m = self._members[name]
        rec = {k: v for k, v in row.items() if k != "adapter"}
        text = rec.get("text")
        if isinstance(text, str):  # plain text, as Run.predict reads a string (tagging: split into words)
            rec.pop("text")
            rec.update(m.kind.record_from_text(m.task, text))
        where = f"{where} (adapter {name!r})"
        if m.kind.generates:
            raise DataError(f"{where}: a {m.spec.head.kind} adapter answers by generating text; generate with it "
                            "(AdapterSet.generation, ptune serve: POST /v1/completions)")
        m.task.validate_record(rec, where, allow_unlabeled=True)
        try:
            example = m.kind.encode(m.task, m.encoder, rec, False)
        except DataError as e:
            raise DataError(f"{where}: {e}") from None
        return _Row(i, m, rec, example)

    # ------------------------------------------------------------------ scoring

    def logits(self, rows: Sequence[Any], *, batch_size: int = 32) -> list[torch.Tensor]:
        """Each row's head scores (fp32, CPU: (C,) for a pooled head, (T, C) over the row's tokens for tagging)."""
        with self._lock:  # one call at a time: the tokenizer and the routing state are shared
            return self._score(self.validate(rows), batch_size)

    def predict(self, rows: Sequence[Any], *, batch_size: int = 32) -> list[dict[str, Any]]:
        """One result per row, as the row's adapter's ``Run.predict`` gives it: {"label", "probabilities"}
        (tagging: {"tokens", "tags"}). Every row is validated first (a bad row: :class:`DataError`)."""
        with self._lock:
            prepared = self.validate(rows)
            return [self._result(r, row) for r, row in zip(prepared, self._score(prepared, batch_size))]

    def predict_batch(self, rows: Sequence[Any], *, batch_size: int | None = None) -> list[dict[str, Any]]:
        """For a server's dynamic batching: rows collected from many requests, one result each, in order.

        Never raises for a row: a bad row's entry is ``{"error": "<message naming the row>"}`` and the
        good rows are scored together (``batch_size``: default all in one forward pass); a batch that fails
        as a whole is retried row by row, so one row cannot take the others down."""
        with self._lock:
            return self._predict_batch(rows, batch_size)

    def _predict_batch(self, rows: Sequence[Any], batch_size: int | None) -> list[dict[str, Any]]:
        prepared, errors = self._prepare(rows)
        good = [r for r in prepared if r is not None]
        results: dict[int, dict[str, Any]] = {i: {"error": msg} for i, msg in errors.items()}
        size = batch_size or max(len(good), 1)
        for start in range(0, len(good), size):
            part = good[start:start + size]
            try:
                scored = self._score(part, size)
                for r, row in zip(part, scored):
                    results[r.index] = self._result(r, row)
            except Exception:  # noqa: BLE001 - isolate the failing row
                for r in part:
                    try:
                        results[r.index] = self._result(r, self._score([r], 1)[0])
                    except Exception as e:  # noqa: BLE001
                        results[r.index] = {"error": f"row {r.index + 1} (adapter {r.member.name!r}): "
                                                     f"{type(e).__name__}: {e}"}
        return [results[i] for i in range(len(rows))]

    @staticmethod
    def _result(r: _Row, row: Any) -> dict[str, Any]:
        task = r.member.task
        prediction = task.kind.decode(task, r.example, row)
        return r.member.kind.result(task, r.record, prediction, row)

    def _score(self, prepared: Sequence[_Row], batch_size: int) -> list[Any]:
        """Each row's head scores, through the one scoring path (:func:`ptune.scoring.score_rows`)."""
        if batch_size < 1:
            raise ConfigError(f"batch_size={batch_size} must be >= 1")
        index = {name: t for t, name in enumerate(self._members)}  # a row's head: its member's place in the set
        examples = [dataclasses.replace(r.example, task=index[r.member.name]) for r in prepared]
        pad_id = prepared[0].member.encoder.placeholder_id if prepared else 0
        autocast = (lambda: torch.autocast(self.device.type, dtype=torch.bfloat16)) if self.bf16 else None
        with self._lock:
            rows = score_rows(self.model, examples, batch_size=batch_size, pad_id=pad_id, device=self.device,
                              autocast=autocast, waste=PADDING_WASTE)
        return [rows[i] for i in range(len(prepared))]


def adapter_names(adapters: Mapping[str, str | Path] | Sequence[str | Path]) -> dict[str, str | Path]:
    """``{name: path}`` from a mapping, or from a list of paths: ``name=path`` entries keep their name,
    others are named after their folder (a run directory's, for ``run/best``)."""
    if isinstance(adapters, Mapping):
        return dict(adapters)
    if isinstance(adapters, (str, Path)):
        adapters = [adapters]
    out: dict[str, str | Path] = {}
    for entry in adapters:
        text = str(entry)
        name, sep, path = text.partition("=")
        if not sep or not name or "/" in name:
            p = Path(text)
            name, path = (p.parent.name if p.name == "best" else p.name) or text, text
        if name in out:
            raise ConfigError(f"two adapters would both be named {name!r} ({out[name]}, {path}); "
                              "name them: --adapter NAME=PATH")
        out[name] = path
    return out


def predict_mixed(adapters: Mapping[str, str | Path] | Sequence[str | Path], input_path: str | Path, *,
                  batch_size: int = 32, base: nn.Module | None = None, tokenizer: Any = None,
                  trust_remote_code: bool = False, allow_pickle: bool = False, precision: str = "auto",
                  on_error: str = "raise") -> list[dict[str, Any]]:
    """Score a file whose rows each name their adapter (``{"adapter": "bbc", "text": ...}`` per JSONL
    line; CSV / JSON work too) with one :class:`AdapterSet`; one result per row, in file order, each
    ``{"adapter": name, **result}``. A row may name its adapter by name or by the path it was given as.

    ``on_error``: ``raise`` (default: a :class:`DataError` naming the first bad row, before anything is
    scored) or ``report`` (a bad row's result is ``{"adapter": ..., "error": ...}``, the others are scored).
    """
    if on_error not in ("raise", "report"):
        raise ConfigError(f"on_error={on_error!r} must be 'raise' or 'report'")
    named = adapter_names(adapters)
    aliases = {str(path): name for name, path in named.items() if str(path) not in named}
    s = AdapterSet.load(named, base=base, tokenizer=tokenizer, trust_remote_code=trust_remote_code,
                        allow_pickle=allow_pickle, precision=precision)
    rows = [{**r, "adapter": aliases.get(r.get("adapter"), r.get("adapter"))} if isinstance(r.get("adapter"), str)
            else r for r in load_records(input_path)]
    if on_error == "raise":
        results = s.predict(rows, batch_size=batch_size)
    else:
        results = s.predict_batch(rows, batch_size=batch_size)
    return [{"adapter": r.get("adapter"), **res} for r, res in zip(rows, results)]


__all__ = ["AdapterSet", "adapter_names", "predict_mixed"]
