"""Several saved adapters on one frozen base, a batch of mixed-adapter rows scored in one forward pass.

    s = ptune.AdapterSet.load({"bbc": "runs/bbc", "wnut": "runs/wnut"})   # run dirs or adapter folders
    s.predict([{"adapter": "bbc", "text": "the striker scored twice"},
               {"adapter": "wnut", "text": "John lives in Paris"}])
    # -> [{"label": ..., "probabilities": {...}}, {"tokens": [...], "tags": [...]}], as each Run.predict

The base is loaded once (from the first adapter's spec, or given) and every adapter is checked
against its fingerprint. Each row names its adapter and goes through that adapter's template, head
kind and head; the transformer body runs once for the whole batch:

- input prompts (prompt tuning, P-Tuning): each adapter fills the placeholders of its own rows;
- deep prompts (P-Tuning v2, prefix tuning): every row's prefix is padded to the batch's longest and
  the padded prefix keys are masked per row (``ptune_prefix_mask`` of ``prefix_attention``); rows
  of other methods get an all-masked prefix, i.e. exactly the base's attention;
- LoRA / AdaLoRA / QLoRA: each targeted layer is wrapped once by a
  :class:`~ptune.methods.lora.MultiLowRankLayer`; every adapter's branch runs on its own rows
  (y = W x + sum_a mask_a * scale_a B_a A_a x, as batched multi-LoRA serving does);
- BitFit: the trained biases are kept as per-row deltas (trained minus the base's), added to the
  output of their layer (linear or LayerNorm) on that adapter's rows only; the base stays untouched;
- heads: each adapter's rows go through its own head (classification, tagging, verbalizer side by side).

Refused, each with a one-line reason: full fine-tuning (it changes every weight of the base),
multi-task adapters and prompt ensembles (score them with ``Run``), causal-LM heads (they answer
through ``generate``), an adapter for another base (fingerprint) or another quantization of it, and
one that needs the base's LM head when the set's base was loaded without it. The
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn

from .errors import AdapterMismatchError, ConfigError, DataError, PtuneError
from .methods.lora import LowRankLayer, MultiLowRankLayer, WeightAdapter
from .methods.prompt_tuning import InputPrompts, scatter_prompts
from .models import LOAD_OPTIONS, arch_facts, backbone_of, load_tokenizer

BASE_KINDS = ("backbone", "masked_lm", "causal_lm")  # an LM class also holds the bare body
BIAS_LAYERS = ("Linear", "Conv1D", "LayerNorm", "Linear4bit", "Linear8bitLt")  # output = ... + bias, last
QUANTIZED_LAYERS = ("Linear4bit", "Linear8bitLt")


@dataclass
class _Member:
    """One adapter of the set: its spec and task, template encoder, head, and what it routes per row."""

    name: str
    path: Path
    spec: Any
    task: Any
    kind: Any  # the head kind
    encoder: Any  # TemplateEncoder
    adapter: nn.Module
    head: nn.Module
    trainable: int
    bf16: bool = False  # its run trained (and Run scores it) under bf16 autocast
    prompts: torch.Tensor | None = None  # (num_tasks, N, d) input prompts, computed once
    prefix: torch.Tensor | None = None  # (L, 2, Hkv, P, D) deep prompts, computed once
    prefix_layers: torch.Tensor | None = None  # (L,) bool: the layers holding a prefix (a layer range); None: all
    branches: dict[str, LowRankLayer] = field(default_factory=dict)  # layer name -> low-rank branch
    bias_deltas: dict[str, torch.Tensor] = field(default_factory=dict)  # module name -> trained - base bias


@dataclass
class _Row:
    index: int
    member: _Member
    record: dict
    example: Any  # heads.Example


PADDING_WASTE = 0.3  # a forward pass may compute at most 1.3x the positions its rows really have


def length_chunks(order: list[int], sizes: list[int], batch_size: int,
                  waste: float | None = None) -> list[list[int]]:
    """Split rows sorted by length (``sizes``, ascending, aligned with ``order``) into forward passes of at
    most ``batch_size`` rows whose padded positions stay under ``1 + waste`` times the real ones: short rows of one task
    are not padded to another task's long ones (on a CPU every padded position costs as much as a real one)."""
    waste = PADDING_WASTE if waste is None else waste
    chunks: list[list[int]] = []
    cur: list[int] = []
    real = 0
    for i, n in zip(order, sizes):
        if cur and (len(cur) >= batch_size or n * (len(cur) + 1) > (1 + waste) * (real + n)):
            chunks.append(cur)
            cur, real = [], 0
        cur.append(i)
        real += n
    if cur:
        chunks.append(cur)
    return chunks


class AdapterSet:
    """Saved adapters on one frozen base; a batch may mix rows of any of them (see the module doc).

    ``base``: a loaded base (default: the first adapter's, loaded as its spec says); ``tokenizer``:
    default the base's. ``trust_remote_code`` / ``allow_pickle``: the consent a base loaded that way
    for training needs again. ``precision``: ``fp32``, ``bf16`` (autocast) or ``auto``: bf16 autocast
    when every adapter of the set is a run that trained in bf16 (as ``Run`` scores such a run), else
    fp32. Adapters are frozen copies: retrain one and ``add`` it again.
    """

    def __init__(self, base: nn.Module | None = None, tokenizer: Any = None, *, trust_remote_code: bool = False,
                 allow_pickle: bool = False, precision: str = "auto") -> None:
        if precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"precision={precision!r} must be auto, fp32 or bf16")
        self.precision = precision
        self.base = base.eval() if base is not None else None
        self.tokenizer = tokenizer
        self._consent = {"trust_remote_code": trust_remote_code, "allow_pickle": allow_pickle}
        self._members: dict[str, _Member] = {}
        self._wrappers: dict[str, MultiLowRankLayer] = {}  # layer name -> the one wrapper on it
        self._bias_hooks: dict[str, Any] = {}  # module name -> forward hook handle
        self._bias_route: dict[str, list[tuple[slice | None, torch.Tensor]]] = {}
        self._lock = threading.RLock()
        if base is not None:
            for p in base.parameters():
                p.requires_grad_(False)

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
            from .adapter_io import read_spec
            from .engine.inference import _find_adapter

            specs = [read_spec(_find_adapter(Path(p))[0]) for p in named.values()]
            kinds = [getattr(getattr(sp, "base", None), "kind", "backbone") for sp in specs]
            first = max(range(len(specs)), key=lambda i: BASE_KINDS.index(kinds[i]) if kinds[i] in BASE_KINDS else 0)
            s._load_base(specs[first])
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

    def info(self, name: str) -> dict[str, Any]:
        """method, task, head, labels, trainable parameter count and path of one adapter."""
        m = self._member(name)
        return {"name": m.name, "path": str(m.path), "method": m.spec.method, "task": getattr(m.task, "name", None),
                "head": m.spec.head.kind, "labels": list(m.task.labels), "trainable_params": m.trainable,
                "template": m.spec.template.source}

    def _member(self, name: str) -> _Member:
        if name not in self._members:
            raise ConfigError(f"this set holds no adapter {name!r}; it holds {self.names}")
        return self._members[name]

    @property
    def device(self) -> torch.device:
        return next(self.base.parameters()).device

    # ------------------------------------------------------------------ adding and removing adapters

    def _load_base(self, spec: Any) -> None:
        from .adapter_io import load_base_for

        self.base = load_base_for(spec, **self._consent).eval()
        if self.tokenizer is None and spec.base.name:
            self.tokenizer = load_tokenizer(spec.base.name, trust_remote_code=self._consent["trust_remote_code"])

    def add(self, name: str, path: str | Path) -> None:
        """Load the adapter at ``path`` (a folder ``save_adapter`` wrote, or a run directory) as ``name``."""
        from .adapter_io import WEIGHTS_NAME, check_fingerprint, from_spec, load_trainable, read_spec
        from .engine.inference import _find_adapter
        from safetensors.torch import load_file

        if not isinstance(name, str) or not name:
            raise ConfigError(f"an adapter's name must be a non-empty string, got {name!r}")
        with self._lock:
            if name in self._members:
                raise ConfigError(f"this set already holds an adapter named {name!r} ({self._members[name].path}); "
                                  "remove it first or pick another name")
            adapter_dir, run_dir = _find_adapter(Path(path))
            spec = read_spec(adapter_dir)
            where = f"adapter {name!r} ({adapter_dir})"
            if not hasattr(spec, "template") or getattr(spec, "ensemble", 1) != 1:
                raise ConfigError(f"{where} is a multi-task adapter or a prompt ensemble; an AdapterSet serves "
                                  "single-task adapters, score this one with ptune.engine.Run")
            from .heads import head_kind

            if head_kind(spec.head.kind).label_form in ("choice", "span"):  # several rows per input
                raise ConfigError(f"{where} has a {spec.head.kind} head, which scores several rows per input; an "
                                  "AdapterSet scores one row per input: score it with ptune.engine.Run")
            if head_kind(spec.head.kind).label_form == "text":
                raise ConfigError(f"{where} has a {spec.head.kind} head, which answers through generate(); an "
                                  "AdapterSet scores heads that label their inputs (classification, tagging, "
                                  "verbalizer): generate with ptune.engine.Run")
            if self.base is None:
                self._load_base(spec)
            if self.tokenizer is None:
                self.tokenizer = load_tokenizer(spec.base.name or self.base.config.name_or_path,
                                                trust_remote_code=self._consent["trust_remote_code"])
            self._check_base(spec, where)
            with self._plain_base():
                try:
                    check_fingerprint(spec.base.fingerprint, self.base)
                except AdapterMismatchError as e:
                    have = self._base_kind()
                    hint = (f"; it was trained on the {spec.base.kind.replace('_', ' ')} form of the model and this "
                            f"set's base is the {have.replace('_', ' ')} form, whose weights differ: put it in a "
                            "set of its own") if spec.base.kind != have else ""
                    raise AdapterMismatchError(f"{where} does not fit this set's base: {e}{hint}") from None
                try:
                    member = self._build(name, adapter_dir, run_dir, spec,
                                         load_file(str(adapter_dir / WEIGHTS_NAME)), from_spec, load_trainable)
                except BaseException:
                    for layer_name, module in list(self.base.named_modules()):  # a build that failed half-way
                        if isinstance(module, LowRankLayer):
                            _set_module(self.base, layer_name, module.base_layer)
                    raise
                finally:
                    for p in self.base.parameters():
                        p.requires_grad_(False)
            self._install(member)
            self._members[name] = member

    def _build(self, name: str, adapter_dir: Path, run_dir: Path | None, spec: Any, tensors: dict, from_spec: Any,
               load_trainable: Any) -> _Member:
        """The adapter built on the (plain) shared base and loaded; its per-row parts taken out of the base."""
        where = f"adapter {name!r} ({adapter_dir})"
        try:
            model = from_spec(spec, self.base, self.tokenizer)
        except PtuneError as e:
            raise type(e)(f"{where}: {e}") from None
        adapter = model.adapter
        branches: dict[str, LowRankLayer] = {}
        trained_base: dict[str, nn.Parameter] = {}  # the base's own weights this adapter trains (BitFit)
        biased = self._bias_modules()
        if isinstance(adapter, WeightAdapter):
            branches = dict(adapter.layers())  # the low-rank tensors live in wrappers, not in the base's weights
        else:
            trained_base = {n: p for n, p in self.base.named_parameters() if p.requires_grad}
            other = [n for n in trained_base if n not in biased]
            if other:
                raise ConfigError(f"{where}: {spec.method} changes the base's own weights ({other[0]} and "
                                  f"{len(other) - 1} more) for every row, so a set cannot apply it per row; "
                                  "score it with ptune.engine.Run (or ptune.load_adapter) on a base of its own")
        original = {n: p.detach().clone() for n, p in trained_base.items()}
        try:
            load_trainable(model, tensors, str(adapter_dir))
            deltas = {biased[n]: (p.detach() - original[n]).clone() for n, p in trained_base.items()}
        finally:
            with torch.no_grad():  # the base keeps its own values: BitFit's biases become per-row deltas
                for n, p in trained_base.items():
                    p.copy_(original[n])
            for layer_name, layer in branches.items():  # the plain layer back; the branch keeps its tensors
                _set_module(self.base, layer_name, layer.base_layer)
        model.eval()
        member = _Member(name=name, path=adapter_dir, spec=spec, task=self._task(spec, run_dir, where),
                         kind=None, encoder=None, adapter=adapter, head=model.head.eval(),
                         trainable=sum(t.numel() for t in tensors.values()), branches=branches, bias_deltas=deltas,
                         bf16=self._run_bf16(run_dir))
        from .engine.build import make_encoder
        from .heads import head_kind

        member.kind = head_kind(spec.head.kind)
        member.encoder = make_encoder(model, self.tokenizer, spec.max_length or self._run_max_length(run_dir)
                                      or member.task.max_length)
        with torch.no_grad():
            if isinstance(adapter, InputPrompts):
                member.prompts = adapter.prompts().detach().to(self.device)
            extra = adapter.attention_kwargs(1, None)
            if set(extra) - {"ptune_prefix", "ptune_prefix_layers"}:
                raise ConfigError(f"{where}: {spec.method} passes {sorted(extra)} to the attention layers; a set "
                                  "can route only ptune_prefix (and its layer range) per row")
            if "ptune_prefix" in extra:
                member.prefix = extra["ptune_prefix"][0].detach().to(self.device)  # (L, 2, Hkv, P, D)
            if "ptune_prefix_layers" in extra:
                member.prefix_layers = extra["ptune_prefix_layers"][0].to(self.device)  # (L,) bool
        return member

    def _task(self, spec: Any, run_dir: Path | None, where: str) -> Any:
        if spec.task is not None:
            return spec.task
        if run_dir is None:
            raise PtuneError(f"{where} records no task and has no run directory around it; pass the run directory")
        from .engine.build import load_task
        from .engine.run_dir import read_run_config

        task, _ = load_task(read_run_config(run_dir), self.tokenizer, need_train=False,
                            encoder_model=spec.base.is_encoder)
        return task

    @staticmethod
    def _run_max_length(run_dir: Path | None) -> int | None:
        if run_dir is None:
            return None
        from .engine.run_dir import read_run_config

        return read_run_config(run_dir).max_length

    @staticmethod
    def _run_bf16(run_dir: Path | None) -> bool:
        """Whether ``Run`` scores this run under bf16 autocast (it trained so)."""
        if run_dir is None:
            return False
        from .engine.precision import run_precision
        from .engine.run_dir import read_run_config

        return run_precision(read_run_config(run_dir)) == "bf16"

    @property
    def bf16(self) -> bool:
        """Whether scoring runs under bf16 autocast (see ``precision``)."""
        if self.precision != "auto":
            return self.precision == "bf16"
        return bool(self._members) and all(m.bf16 for m in self._members.values())

    def _base_kind(self) -> str:
        kind = LOAD_OPTIONS.get(self.base, {}).get("kind")
        if kind:
            return kind
        if backbone_of(self.base) is self.base:
            return "backbone"
        return "masked_lm" if arch_facts(self.base).is_encoder else "causal_lm"

    def _check_base(self, spec: Any, where: str) -> None:
        need, have = spec.base.kind, self._base_kind()
        if need != "backbone" and need != have:
            raise ConfigError(
                f"{where} ({spec.head.kind} head) needs the base loaded as a {need.replace('_', ' ')} (with its LM "
                f"head) but this set's base is a {have.replace('_', ' ')}; build the set with AdapterSet.load(...) "
                f"(it loads the LM head when any adapter needs it) or pass base=ptune.load_base(name, {need!r})")
        loaded = LOAD_OPTIONS.get(self.base)
        quantized = any(type(m).__name__ in QUANTIZED_LAYERS for m in self.base.modules())
        if loaded is not None:
            have_q = loaded.get("quantize")
            mismatch = (spec.base.quantize or None) != (have_q or None)
        else:  # a base built in code records no load options: only a quantized adapter on a plain base shows
            have_q = "4/8-bit" if quantized else None
            mismatch = bool(spec.base.quantize) and not quantized
        if mismatch:
            trained = f"a {spec.base.quantize}" if spec.base.quantize else "an unquantized"
            raise ConfigError(f"{where} was trained on {trained} base but this set's base is "
                              f"{have_q or 'unquantized'}; the adapters of one set share one base, so they must agree "
                              "on its quantization: put it in a set of its own")

    def _bias_modules(self) -> dict[str, str]:
        """Bias parameter name -> the name of a layer whose output ends by adding it (tied names included)."""
        out: dict[str, str] = {}
        owners = {id(m.bias): n for n, m in self.base.named_modules()
                  if type(m).__name__ in BIAS_LAYERS and isinstance(getattr(m, "bias", None), nn.Parameter)}
        for n, p in self.base.named_parameters():
            if n.rsplit(".", 1)[-1] == "bias" and id(p) in owners:
                out[n] = owners[id(p)]
        return out

    def _install(self, member: _Member) -> None:
        for layer_name, branch in member.branches.items():
            wrapper = self._wrappers.get(layer_name)
            if wrapper is None:
                wrapper = MultiLowRankLayer(self.base.get_submodule(layer_name))
                _set_module(self.base, layer_name, wrapper)
                self._wrappers[layer_name] = wrapper
            wrapper.branches[member.name] = branch.eval()
        for module_name in member.bias_deltas:
            if module_name not in self._bias_hooks:  # on the plain layer, which outlives any wrapper around it
                wrapper = self._wrappers.get(module_name)
                module = wrapper.base_layer if wrapper is not None else self.base.get_submodule(module_name)
                self._bias_hooks[module_name] = module.register_forward_hook(self._bias_hook(module_name))
        member.head.to(self.device)
        member.adapter.to(self.device)
        member.bias_deltas = {k: v.to(self.device) for k, v in member.bias_deltas.items()}

    def _bias_hook(self, module_name: str) -> Any:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            route = self._bias_route.get(module_name)
            if not route:
                return None
            for rows, delta in route:
                d = delta.to(output.dtype)
                if rows is None:
                    output = output + d
                elif torch.is_grad_enabled():
                    index = torch.arange(output.shape[0], device=output.device)[rows]
                    output = output.index_add(0, index, d.expand(len(index), *output.shape[1:]))
                else:
                    output[rows] += d  # the layer's fresh output: add in place on the rows' view
            return output
        return hook

    def remove(self, name: str) -> None:
        """Drop an adapter; layers no other adapter needs get their plain form back."""
        with self._lock:
            member = self._member(name)
            for layer_name in member.branches:
                wrapper = self._wrappers[layer_name]
                wrapper.branches.pop(name, None)
                if not wrapper.branches:
                    _set_module(self.base, layer_name, wrapper.base_layer)
                    del self._wrappers[layer_name]
            del self._members[name]
            needed = {m for other in self._members.values() for m in other.bias_deltas}
            for module_name in [m for m in self._bias_hooks if m not in needed]:
                self._bias_hooks.pop(module_name).remove()

    @contextmanager
    def _plain_base(self) -> Iterator[None]:
        """The base without the set's wrappers (for fingerprints and for building an adapter on it)."""
        for layer_name, wrapper in self._wrappers.items():
            _set_module(self.base, layer_name, wrapper.base_layer)
        try:
            yield
        finally:
            for layer_name, wrapper in self._wrappers.items():
                _set_module(self.base, layer_name, wrapper)

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
        from .batching import collate

        if batch_size < 1:
            raise ConfigError(f"batch_size={batch_size} must be >= 1")
        out: list[Any] = [None] * len(prepared)
        order = sorted(range(len(prepared)), key=lambda i: len(prepared[i].example.encoded.input_ids))
        pad_id = prepared[0].member.encoder.placeholder_id if prepared else 0
        rank = {name: k for k, name in enumerate(self._members)}
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)
        sizes = [len(prepared[i].example.encoded.input_ids) for i in order]
        with self._lock, torch.no_grad(), autocast:
            for idx in length_chunks(order, sizes, batch_size):
                idx.sort(key=lambda i: rank[prepared[i].member.name])  # each adapter's rows side by side
                # labels dropped: rows of tagging and class heads share a batch, and scoring needs none
                batch = collate([dataclasses.replace(prepared[i].example.encoded, labels=None) for i in idx],
                                pad_id=pad_id)
                batch = {k: v.to(self.device) for k, v in batch.items()}
                groups: dict[str, list[int]] = {}
                for j, i in enumerate(idx):
                    groups.setdefault(prepared[i].member.name, []).append(j)
                lengths = [len(prepared[i].example.encoded.input_ids) for i in idx]
                for name, rows in self._forward(batch, groups, lengths).items():
                    for j, row in zip(groups[name], rows):
                        out[idx[j]] = row
        return out

    def _forward(self, batch: dict[str, torch.Tensor], groups: dict[str, list[int]],
                 lengths: list[int]) -> dict[str, list[Any]]:
        """One pass of the body over a mixed batch; each group of rows through its adapter's head."""
        ids, mask, vindex = batch["input_ids"], batch["attention_mask"], batch["virtual_index"]
        B = ids.shape[0]
        whole = len(groups) == 1  # rows are grouped by adapter: each group is a slice of the batch
        index = {name: None if whole else slice(rows[0], rows[-1] + 1) for name, rows in groups.items()}
        members = {name: self._members[name] for name in groups}
        body = backbone_of(self.base)
        embeds = body.get_input_embeddings()(ids)
        for name, m in members.items():
            if m.prompts is None:
                continue
            rows = index[name]
            vi = vindex if rows is None else vindex[rows]
            if bool((vi >= 0).any()):
                e = scatter_prompts(embeds if rows is None else embeds[rows], vi, m.prompts, None)
                if rows is None:
                    embeds = e
                else:
                    embeds[rows] = e  # the embedding's fresh output, under no_grad
        extra = self._prefix_kwargs(B, members, index)
        with self._routed({name: index[name] for name in members}):
            hidden = body(inputs_embeds=embeds, attention_mask=mask, use_cache=False, **extra).last_hidden_state
        out = {}
        for name, m in members.items():
            rows = index[name]
            take = (lambda t: t) if rows is None else (lambda t: t[rows])
            with self._routed({name: None}):  # a head on the base's own layers (a verbalizer's LM head)
                logits = m.head(take(hidden), {"attention_mask": take(mask), "label_position": take(batch["label_position"])})
            out[name] = m.kind.rows(logits, None, [lengths[j] for j in groups[name]])
        return out

    def _prefix_kwargs(self, B: int, members: dict[str, _Member],
                       index: dict[str, slice | None]) -> dict[str, torch.Tensor]:
        parts = [(index[name], m.prefix) for name, m in members.items() if m.prefix is not None]
        if not parts:
            return {}
        longest = max(p.shape[-2] for _, p in parts)
        ranged = [(index[name], m.prefix_layers) for name, m in members.items() if m.prefix_layers is not None]
        if len(parts) == 1 and parts[0][0] is None:  # one adapter for the whole batch
            prefix = parts[0][1]
            extra = {"ptune_prefix": prefix.unsqueeze(0).expand(B, *prefix.shape)}
            if ranged:
                extra["ptune_prefix_layers"] = ranged[0][1].unsqueeze(0).expand(B, -1)
            return extra
        L, two, H, _, D = parts[0][1].shape
        prefix = parts[0][1].new_zeros(B, L, two, H, longest, D)
        keep = torch.zeros(B, longest, dtype=torch.bool, device=prefix.device)
        for rows, p in parts:
            P = p.shape[-2]
            prefix[rows, :, :, :, :P] = p
            keep[rows, :P] = True
        extra = {"ptune_prefix": prefix}
        if not bool(keep.all()):
            extra["ptune_prefix_mask"] = keep
        if ranged:  # rows of a layer-ranged adapter see no prefix outside its layers
            on = torch.ones(B, L, dtype=torch.bool, device=prefix.device)
            for rows, layers in ranged:
                on[rows] = layers
            extra["ptune_prefix_layers"] = on
        return extra

    @contextmanager
    def _routed(self, assign: dict[str, slice | None]) -> Iterator[None]:
        """Route rows to the adapters' low-rank branches and bias deltas for one forward call."""
        for wrapper in self._wrappers.values():
            wrapper.route = [(name, rows) for name, rows in assign.items() if name in wrapper.branches]
        route: dict[str, list] = {}
        for name, rows in assign.items():
            for module_name, delta in self._members[name].bias_deltas.items():
                route.setdefault(module_name, []).append((rows, delta))
        self._bias_route = route
        try:
            yield
        finally:
            for wrapper in self._wrappers.values():
                wrapper.route = []
            self._bias_route = {}


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


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
    from .data import load_records

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
