"""Exports that their real clients reproduce: an HF PEFT adapter, or a merged transformers model.

    ptune export RUN --format peft   [--output DIR]   # PeftModel.from_pretrained(<base>, DIR)
    ptune export RUN --format merged [--output DIR]   # AutoModelFor...from_pretrained(DIR), no ptune needed

``peft`` writes PEFT's own files (``adapter_config.json``, ``adapter_model.safetensors``) for every
method PEFT has (prompt tuning, P-Tuning, P-Tuning v2 / prefix tuning, LoRA, AdaLoRA, QLoRA), with
``base_model_name_or_path`` the base's absolute folder (demo names resolved) or its hub id. A task
head becomes the client model's own head where transformers has one of the same form: the weights go
where PEFT's ``modules_to_save`` reads them (``AutoModelForSequenceClassification`` /
``AutoModelForTokenClassification``). Whether a head has the same form is not guessed: the
transformers head is built, loaded with ptune's weights and run on the body's hidden states, and must
give ptune's logits. A BERT classifier with ``pooling="pooler"`` passes; ``pooling="cls"`` does not
(``BertForSequenceClassification`` puts its pooler, dense + tanh, in between), nor does a decoder's
classifier (transformers' ``score`` layer has no bias). Such heads are exported as PEFT's
``FEATURE_EXTRACTION`` (the body) plus ``ptune_head.safetensors``, and the report says so.

``merged`` writes a plain transformers folder (safetensors, ``config.json``, tokenizer files) for the
weight-side methods (LoRA, AdaLoRA, QLoRA dequantized to its compute dtype, BitFit, full): low-rank
updates merged into their layers, the head as the model's own head as above, a verbalizer or
causal-LM head as the masked / causal LM itself. Prompt methods cannot be merged into weights and are
refused with a pointer to ``--format peft``.

Where the client cannot compute what ptune computes, the export says so: PEFT prepends prompts in
front of every token (ptune puts them where the template says, e.g. after ``[CLS]``) and feeds deep
prompts as a KV cache (its real tokens then take positions P..P+T-1, ptune's 0..T-1). Every export is
measured on a few probe inputs: the merged folder's model itself; for PEFT, ptune's model run on PEFT's
layout (the same computation, as ``tests/test_peft_parity.py`` checks). The verdict, the differences
and the largest logit difference go to ``ptune_export.json`` and :class:`ExportResult`, and an inexact
export warns (``strict=True`` / ``--strict`` refuses it instead).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors.torch import save_file
from torch import nn

from . import __version__
from .api import CONFIG_NAME, WEIGHTS_NAME
from .batching import collate
from .errors import ConfigError, PtuneError
from .heads import head_kind
from .methods.base import PeftExportable
from .methods.lora import LowRankLayer, is_linear_like
from .model import PtuneModel
from .models import arch_facts, load_tokenizer, resolve_model_path
from .templates import Encoded, TemplateEncoder

FORMATS = ("peft", "merged")
REPORT_NAME = "ptune_export.json"
HEAD_NAME = "ptune_head.safetensors"
TOLERANCE = 1e-4  # largest |logit difference| (relative to the logits' scale, at least 1) still counted as equal
PROBE_TEXTS = ("the team won the match after extra time", "stir gently",
               "a late goal in the final minute won them the cup", "prices rose again this quarter")
PROMPT_TYPES = ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING")
TASK_CLASSES = {"SEQ_CLS": "AutoModelForSequenceClassification", "TOKEN_CLS": "AutoModelForTokenClassification"}
BASE_CLASSES = {"backbone": "AutoModel", "masked_lm": "AutoModelForMaskedLM", "causal_lm": "AutoModelForCausalLM"}
QUANTIZED_LAYERS = ("Linear4bit", "Linear8bitLt")


class ExportWarning(UserWarning):
    """An export whose client does not reproduce ptune's outputs exactly (the message says why and how much)."""


@dataclass
class ExportResult:
    """What an export wrote and how faithfully its client reproduces ptune (also in ``ptune_export.json``)."""

    path: Path
    format: str  # peft | merged
    client: str  # how to load it
    exact: bool  # the client computes ptune's outputs with no extra step
    differences: list[str] = field(default_factory=list)  # why not, each with what the user must know
    max_abs_diff: float | None = None  # largest |logit difference| measured on the probe inputs (None: not measured)
    notes: list[str] = field(default_factory=list)  # what the client needs to know that is not a difference
    auto_class: str = ""  # the transformers class the client loads (AutoModelForSequenceClassification, ...)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "path": str(self.path)}

    def message(self) -> str:
        measured = "" if self.max_abs_diff is None else \
            f"; largest logit difference on {len(PROBE_TEXTS)} probe inputs: {self.max_abs_diff:.3g}"
        return f"{self.format} export {self.path} is not exact: " + "; ".join(self.differences) + measured


@dataclass
class _Source:
    model: PtuneModel
    tokenizer: Any  # None: no tokenizer could be loaded (no probe texts, random ids instead)
    task: Any
    encoder: TemplateEncoder | None


@dataclass
class _ClientHead:
    """Which transformers class the client loads, and where ptune's head goes in it."""

    auto_class: str  # AutoModelForSequenceClassification | AutoModel | AutoModelForCausalLM | ...
    task_type: str  # PEFT's task type
    body_prefix: str = ""  # the body's name inside the client model ("bert."), "" when ptune's base is the client
    head_module: str | None = None  # the client's head module (PEFT's modules_to_save)
    head_tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # relative to the client model
    class_name: str = ""
    module_names: frozenset[str] = frozenset()  # the client model's linear layers (target_modules check)
    reason: str | None = None  # why ptune's head could not become the client's own


# ---------------------------------------------------------------------------------------------- the API


def export(model_or_path: PtuneModel | str | os.PathLike, output: str | os.PathLike | None = None,
           format: str = "peft", *, overwrite: bool = False, strict: bool = False, tokenizer: Any = None,
           trust_remote_code: bool = False, allow_pickle: bool = False, warn: bool = True) -> ExportResult:
    """Export a model (or a run directory / adapter folder) for PEFT (``format="peft"``) or as a
    merged transformers model (``"merged"``); returns the report, also written to ``ptune_export.json``.

    ``output``: the folder to write (default for a run: ``<run>/export-<format>``); an existing
    non-empty folder is refused unless ``overwrite`` (and only a previous export is ever replaced).
    ``strict``: refuse an export whose client would not reproduce ptune's outputs, instead of warning.
    ``tokenizer``: for a model given in memory whose base name does not load one (the probe inputs and,
    for ``merged``, the tokenizer files).
    """
    if format not in FORMATS:
        raise ConfigError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    if isinstance(model_or_path, PtuneModel):
        if output is None:
            raise ConfigError("give the folder to export to (output=...)")
        source = _from_model(model_or_path, tokenizer)
    elif isinstance(model_or_path, (str, os.PathLike)):
        if output is None:
            output = default_output(model_or_path, format)
        _check_output(Path(output), overwrite)  # before the model loads: a refusal costs nothing
        source = _from_path(model_or_path, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    else:
        raise ConfigError(f"export takes a ptune model, a run directory or an adapter folder, not a "
                          f"{type(model_or_path).__name__}")
    output = Path(output)
    _check_output(output, overwrite)
    model = source.model
    was_training = model.training
    model.eval()
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with torch.no_grad():
            result = (_export_peft if format == "peft" else _export_merged)(source, tmp, output)
        if strict and not result.exact:
            raise ConfigError(result.message() + "; drop --strict (Python: strict=False) to write it anyway")
        (tmp / REPORT_NAME).write_text(json.dumps(_report(result, model), indent=2))
        _replace(tmp, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        model.train(was_training)
    if warn and not result.exact:
        warnings.warn(result.message(), ExportWarning, stacklevel=_outside_ptune())
    return result


def _outside_ptune() -> int:
    """The ``stacklevel`` of export's first caller outside ptune (the warning points at the user's line)."""
    import sys

    package = os.path.dirname(os.path.abspath(__file__))
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package + os.sep):
        frame, level = frame.f_back, level + 1
    return level


def export_peft(model_or_path: PtuneModel | str | os.PathLike, path: str | os.PathLike | None = None,
                **kwargs: Any) -> Path:
    """Write the adapter in HF PEFT's layout (``PeftModel.from_pretrained`` reads it); returns the folder.

    See :func:`export` for the options and what the report (``ptune_export.json``) says.
    """
    return export(model_or_path, path, "peft", **kwargs).path


def export_merged(model_or_path: PtuneModel | str | os.PathLike, path: str | os.PathLike | None = None,
                  **kwargs: Any) -> Path:
    """Write a plain transformers model folder with the update merged in (weight-side methods only)."""
    return export(model_or_path, path, "merged", **kwargs).path


def default_output(run: str | os.PathLike, format: str) -> Path:
    """``<run>/export-<format>`` for a run directory; ``<adapter>-<format>`` beside a bare adapter folder."""
    from .engine.inference import _find_adapter

    adapter_dir, run_dir = _find_adapter(Path(run))
    if run_dir is not None:
        return run_dir / f"export-{format}"
    return adapter_dir.with_name(f"{adapter_dir.name}-{format}")


# ------------------------------------------------------------------------------------- sources, output


def _from_model(model: PtuneModel, tokenizer: Any) -> _Source:
    if tokenizer is None and model.spec.base.name:
        try:
            tokenizer = load_tokenizer(model.spec.base.name, trust_remote_code=model.spec.base.trust_remote_code)
        except PtuneError:
            tokenizer = None
    encoder = None
    if tokenizer is not None:
        try:
            encoder = TemplateEncoder(model.template, tokenizer, max_length=model.spec.max_length or 128,
                                      causal=model.spec.causal)
        except PtuneError:
            encoder = None
    return _Source(model, tokenizer, model.spec.task, encoder)


def _from_path(path: str | os.PathLike, *, trust_remote_code: bool, allow_pickle: bool) -> _Source:
    from .engine.inference import Run

    run = Run(path, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    if not isinstance(run.model, PtuneModel):
        raise ConfigError(f"{path} is a multi-task run; export exports one model of one task, and a multi-task "
                          "adapter has no single PEFT or transformers counterpart")
    return _Source(run.model, run.tokenizer, run.task, run.encoder)


def _check_output(output: Path, overwrite: bool) -> None:
    if output.exists() and not output.is_dir():
        raise ConfigError(f"{output} is a file; give a folder to export to")
    if output.is_dir() and any(output.iterdir()):
        if not overwrite:
            raise ConfigError(f"{output} already exists and is not empty; pass --overwrite (Python: overwrite=True) "
                              "to replace it, or choose another --output")
        if not (output / REPORT_NAME).is_file():
            raise ConfigError(f"{output} is not a ptune export (no {REPORT_NAME}); --overwrite replaces only a "
                              "previous export, so choose another --output")


def _replace(tmp: Path, output: Path) -> None:
    """Put the finished export in place; a previous export there is removed only once the new one is in."""
    old = output.with_name(f".{output.name}.old-{os.getpid()}")
    if output.exists():
        os.replace(output, old)
    os.replace(tmp, output)
    shutil.rmtree(old, ignore_errors=True)


def _report(result: ExportResult, model: PtuneModel) -> dict[str, Any]:
    spec = model.spec
    return {"ptune_version": __version__, **result.to_dict(), "method": spec.method,
            "base": spec.base.name, "template": spec.template.source,
            "head": {**asdict(spec.head), "labels": list(spec.labels), "label_words": list(spec.label_words)}}


# ---------------------------------------------------------------------------------------- probe inputs


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _probe_examples(source: _Source) -> list[Encoded] | None:
    """The probe texts through the model's template, as ptune encodes them (None without a tokenizer)."""
    if source.encoder is None:
        return None
    model, task = source.model, source.task
    kind = head_kind(model.head_config.kind)
    out = []
    for text in PROBE_TEXTS:
        rec = kind.record_from_text(task, text) if task is not None else {}
        for name in model.template.fields:
            rec.setdefault(name, text)
        out.append(kind.encode(task, source.encoder, rec, False).encoded if task is not None
                   else source.encoder.encode(rec))
    return out


def _reordered(e: Encoded, order: Sequence[int]) -> Encoded:
    """``e`` with its positions in ``order`` (a subset: the others dropped)."""
    def pick(xs: Sequence[int] | None) -> list[int] | None:
        return None if xs is None else [xs[i] for i in order]

    label_position = order.index(e.label_position) if e.label_position in order else -1
    return Encoded(pick(e.input_ids), pick(e.virtual_index), pick(e.labels), label_position,
                   pick(e.word_ids) if e.word_ids else [], e.num_words)


def _batch(rows: list[Encoded], source: _Source) -> dict[str, torch.Tensor]:
    pad = source.encoder.placeholder_id if source.encoder is not None else 0
    dev = _device(source.model)
    return {k: v.to(dev) for k, v in collate(rows, pad_id=pad).items() if k != "labels"}


def _plain_probe(source: _Source) -> dict[str, torch.Tensor]:
    """Real tokens only (virtual ones dropped), right-padded: what a client without prompts is fed."""
    examples = _probe_examples(source)
    if examples is not None:
        rows = [_reordered(e, [i for i, v in enumerate(e.virtual_index) if v < 0]) for e in examples]
        return _batch(rows, source)
    vocab = arch_facts(source.model.base).vocab_size
    gen = torch.Generator().manual_seed(0)
    lengths = (12, 5, 9, 7)
    rows = [Encoded(torch.randint(vocab // 4, vocab // 2, (n,), generator=gen).tolist(), [-1] * n) for n in lengths]
    return _batch(rows, source)


def _scale_tol(reference: torch.Tensor) -> float:
    return TOLERANCE * max(1.0, float(reference.abs().max()))


def _gap(ours: torch.Tensor, theirs: torch.Tensor, pairs: list[tuple[list[int], list[int]]] | None,
         mask: torch.Tensor | None = None) -> float:
    """Largest |difference|: pooled (B, C) directly; per token at each row's real positions (``pairs``:
    ptune's positions and the client's for the same tokens; else ``mask``)."""
    ours, theirs = ours.float().cpu(), theirs.float().cpu()
    if ours.dim() == 2:
        return float((ours - theirs).abs().max())
    if pairs is None:
        keep = mask.bool().cpu()
        return float((ours[keep] - theirs[keep]).abs().max())
    return max(float((ours[b, src] - theirs[b, dst]).abs().max()) for b, (src, dst) in enumerate(pairs))


# ------------------------------------------------------------------------------- the client's own head


def _client_head(source: _Source, body_state: dict[str, torch.Tensor] | None) -> _ClientHead:
    """The transformers class that loads the export, with ptune's head mapped into it where it fits."""
    model = source.model
    spec = model.spec
    kind = head_kind(spec.head.kind)
    if spec.base.kind != "backbone":  # ptune's base is the masked / causal LM itself, with its own LM head
        task_type = kind.peft_task_type(spec.base.is_encoder) or "FEATURE_EXTRACTION"
        return _ClientHead(BASE_CLASSES[spec.base.kind], task_type, class_name=type(model.base).__name__,
                           module_names=frozenset(_linear_names(model.base)))
    plain = _ClientHead("AutoModel", "FEATURE_EXTRACTION", class_name=type(model.base).__name__,
                        module_names=frozenset(_linear_names(model.base)))
    wanted = kind.peft_task_type(spec.base.is_encoder)
    if not dict(model.head.state_dict()):
        return plain
    if wanted not in TASK_CLASSES:
        plain.reason = f"PEFT has no task type for a {spec.head.kind} head"
        return plain
    mapped, reason = _map_head(source, TASK_CLASSES[wanted], wanted, body_state)
    if mapped is None:
        plain.reason = reason
        return plain
    return mapped


def _linear_names(model: nn.Module) -> list[str]:
    """Names of the linear layers (a low-rank layer under the name of the layer it wraps)."""
    return [n for n, m in model.named_modules() if (is_linear_like(m) or isinstance(m, LowRankLayer))
            and not n.endswith(".base_layer")]


def _linear_of(state: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight, bias) when ``state`` is one linear layer's parameters, under any prefix."""
    weights = [k for k in state if k.endswith("weight")]
    if len(weights) != 1 or len(state) > 2 or state[weights[0]].dim() != 2:
        return None
    biases = [k for k in state if k.endswith("bias")]
    return state[weights[0]], state[biases[0]] if biases else None


def _map_head(source: _Source, auto_class: str, task_type: str,
              body_state: dict[str, torch.Tensor] | None) -> tuple[_ClientHead | None, str]:
    """ptune's head as the head of ``auto_class``, checked by running both on the same hidden states."""
    import transformers

    model = source.model
    ours = {k: v.detach() for k, v in model.head.state_dict().items()}
    cfg = copy.deepcopy(model.base.config)
    cfg.num_labels = model.head_config.num_labels
    try:
        with torch.device("meta"):
            client = getattr(transformers, auto_class).from_config(cfg)
    except Exception as e:  # noqa: BLE001 - transformers raises ValueError, KeyError, ...
        return None, f"transformers has no {auto_class} for {cfg.model_type} ({type(e).__name__})"
    name = type(client).__name__
    prefix = client.base_model_prefix
    if not isinstance(getattr(client, prefix, None), nn.Module):
        return None, f"{name} keeps its body under no '{prefix}' attribute"
    module_names = frozenset(_linear_names(client))
    children = [(n, m) for n, m in client.named_children() if n != prefix]
    with_params = [(n, m) for n, m in children if any(True for _ in m.parameters())]
    linear = _linear_of(ours)
    if len(with_params) != 1 or linear is None:
        return None, f"{name}'s head and ptune's {model.head_config.kind} head have different parts"
    head_name, head = with_params[0]
    shapes = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    w, b = linear
    if set(shapes) == {"weight", "bias"} and shapes["weight"] == tuple(w.shape) and b is not None:
        tensors = {"weight": w, "bias": b}
    elif set(shapes) == {"weight"} and shapes["weight"] == tuple(w.shape):
        return None, (f"{name}'s {head_name} layer has no bias and ptune's classifier has one"
                      if b is not None else f"{name}'s {head_name} layer differs")
    elif (set(shapes) == {"dense.weight", "dense.bias", "out_proj.weight", "out_proj.bias"} and b is not None
          and body_state is not None and "pooler.dense.weight" in body_state
          and shapes["out_proj.weight"] == tuple(w.shape)):
        # RoBERTa-style head: dense + tanh + out_proj on the first token, which is ptune's "pooler" pooling
        tensors = {"dense.weight": body_state["pooler.dense.weight"], "dense.bias": body_state["pooler.dense.bias"],
                   "out_proj.weight": w, "out_proj.bias": b}
    else:
        return None, f"{name}'s {head_name} ({', '.join(sorted(shapes))}) has no counterpart in ptune's head"
    # the check: the client's head on ptune's body (shared, not copied) against ptune's head
    dev = _device(model)
    head.to_empty(device=dev)
    head.load_state_dict({k: v.to(dev) for k, v in tensors.items()})
    for _, child in children:
        child.to(dev).eval()
    setattr(client, prefix, model.backbone)
    batch = _plain_probe(source)
    switch = nullcontext() if model.adapter.trains_base else model.disable_adapter()  # no prompts: same inputs
    try:
        with switch:
            want = model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            got = client(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    except Exception as e:  # noqa: BLE001 - e.g. a decoder without a pad token id for its last-token pooling
        return None, f"{name} could not run on ptune's body ({type(e).__name__}: {e})"
    diff = _gap(want, got, None, batch["attention_mask"])
    if diff > _scale_tol(want):
        pooling = getattr(model.head, "pooling", None)
        how = f" (ptune pools with pooling={pooling!r}" + (
            "; BertForSequenceClassification-style heads read the pooler's dense + tanh output: train with "
            "--pooling pooler for a head they reproduce)" if pooling == "cls" else ")") if pooling else ""
        return None, f"{name}'s head computes other logits than ptune's on the same hidden states, by up to " \
                     f"{diff:.3g}{how}"
    return _ClientHead(auto_class, task_type, body_prefix=prefix + ".", head_module=head_name,
                       head_tensors={f"{head_name}.{k}": v.detach().cpu().clone() for k, v in tensors.items()},
                       class_name=name, module_names=module_names), ""


def _base_path(model: PtuneModel) -> str:
    """Where the client finds the base: the absolute local folder (demo names resolved), or the hub id."""
    name = model.spec.base.name
    try:
        path = resolve_model_path(name)
    except PtuneError:
        return name
    return str(Path(path).resolve()) if path and os.path.isdir(path) else path


# ------------------------------------------------------------------------------------------- PEFT


def _export_peft(source: _Source, tmp: Path, output: Path) -> ExportResult:
    model = source.model
    if not isinstance(model.adapter, PeftExportable):
        merged = " (use --format merged: it merges this method's weights into a plain transformers model)" \
            if model.adapter.trains_base else ""
        raise ConfigError(f"{model.method} has no HF PEFT equivalent to export to{merged}")
    facts = arch_facts(model.base)
    extra, tensors = model.adapter.peft_export(facts)
    peft_type = extra["peft_type"]
    prompt_learning = peft_type in PROMPT_TYPES
    client = _client_head(source, _backbone_state(model))
    differences: list[str] = []
    notes: list[str] = []
    base_path = _base_path(model)
    cfg: dict[str, Any] = {"base_model_name_or_path": base_path, "revision": None, "inference_mode": True,
                           **extra, "task_type": client.task_type}
    if prompt_learning:  # they describe the model they prompt
        cfg.update(num_transformer_submodules=1, token_dim=facts.hidden_size,
                   num_attention_heads=facts.num_attention_heads, num_layers=facts.num_layers)
    else:
        tensors, cfg = _reroot(tensors, cfg, client)
    if client.head_module is not None:
        cfg["modules_to_save"] = [client.head_module]
        where = "base_model." if prompt_learning else "base_model.model."
        tensors.update({where + k: v for k, v in client.head_tensors.items()})
    elif client.reason:
        differences.append(f"head: {client.reason}; PEFT gets the transformer body only (task type "
                           f"FEATURE_EXTRACTION), and ptune's head is in {HEAD_NAME} for you to apply to its "
                           f"hidden states{_head_use(model)}")
    head_state = {k: v.detach().contiguous().cpu() for k, v in model.head.state_dict().items()}
    if client.head_module is None and head_state:
        save_file(head_state, str(tmp / HEAD_NAME))
    tables = getattr(model.method_config, "num_tasks", 1)
    ensemble = getattr(model.spec, "ensemble", 1)
    if prompt_learning and (tables > 1 or ensemble > 1):
        what = f"a prompt ensemble of {ensemble}" if ensemble > 1 else f"{tables} prompt tables"
        differences.append(f"{what}: PEFT's layout holds one prompt, so only table 0 is exported (the measured "
                           "difference below does not include this)")
    max_diff = None
    if prompt_learning:
        max_diff, layout = _layout_gap(source, peft_type)
        differences += layout
    if model.spec.base.quantize:
        notes.append(f"the base was trained loaded with quantize={model.spec.base.quantize!r}: load it the same "
                     "way for PEFT (BitsAndBytesConfig, see ptune.quantize.bnb_config)")
    if not os.path.isdir(base_path):
        notes.append(f"base_model_name_or_path {base_path!r} is not a local folder: PEFT looks it up on the hub")
    notes += _lm_notes(model)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / WEIGHTS_NAME),
              metadata={"format": "pt"})
    (tmp / CONFIG_NAME).write_text(json.dumps(cfg, indent=2))
    labels = f", num_labels={model.head_config.num_labels}" if client.head_module else ""
    how = (f"PeftModel.from_pretrained(transformers.{client.auto_class}.from_pretrained({base_path!r}{labels}), "
           f"{str(output)!r})")
    return ExportResult(output, "peft", how, not differences, differences, max_diff, notes, client.auto_class)


def _backbone_state(model: PtuneModel) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in model.backbone.state_dict().items()}


def _reroot(tensors: dict[str, torch.Tensor], cfg: dict[str, Any],
            client: _ClientHead) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """LoRA / AdaLoRA tensors and targets, named for the client model (its body may sit under ``bert.``)."""
    lead = "base_model.model."
    prefix = client.body_prefix
    names = sorted({k[len(lead):].rsplit(".lora_", 1)[0] for k in tensors if k.startswith(lead) and ".lora_" in k})
    full = [prefix + n for n in names]
    missing = [n for n in full if n not in client.module_names]
    if missing:
        raise PtuneError(f"the exported layers {missing[:3]} do not exist in {client.class_name}; export "
                         "cannot place this adapter")
    if prefix:
        tensors = {(lead + prefix + k[len(lead):] if k.startswith(lead) else k): v for k, v in tensors.items()}
        if cfg.get("rank_pattern"):
            cfg["rank_pattern"] = {prefix + k: v for k, v in cfg["rank_pattern"].items()}
    targets = cfg.get("target_modules")
    if isinstance(targets, list):  # suffixes: they must select exactly these layers in the client too
        hits = {n for n in client.module_names if any(n == s or n.endswith("." + s) for s in targets)}
        if hits != set(full):
            targets = None
    if not isinstance(targets, list):
        import re

        targets = "(" + "|".join(re.escape(n) for n in full) + ")"
    return tensors, {**cfg, "target_modules": targets}


def _layout_gap(source: _Source, peft_type: str) -> tuple[float | None, list[str]]:
    """Where PEFT's layout differs from ptune's, and by how much the logits move (ptune's model run on
    PEFT's layout: prompts before every token; prefixes with the real tokens at positions P..P+T-1)."""
    model = source.model
    examples = _probe_examples(source)
    if peft_type == "PREFIX_TUNING":
        P = model.method_config.num_virtual_tokens
        start = _position_start(model)
        what = (f"positions: PEFT feeds the {P} prefix vectors as a KV cache, so the real tokens take positions "
                f"{start + P}..{start + P}+T-1 (ptune's take {start}..{f'{start}+' if start else ''}T-1); call the "
                f"PEFT model with position_ids=torch.arange(T){start - P:+d} (PEFT adds {P}) for ptune's outputs exactly")
    else:
        n = model.template.num_virtual_tokens
        what = (f"prompt position: ptune's template {model.template.source!r} places the {n} virtual tokens "
                f"where it says; PEFT prepends them before every token")
        if examples is not None:
            first = examples[0]
            where = [i for i, v in enumerate(first.virtual_index) if v >= 0]
            if all(e.virtual_index[:n] == list(range(n)) for e in examples):
                what = ""  # already in front, in order: PEFT's layout
            else:
                before = source.tokenizer.convert_ids_to_tokens(first.input_ids[:where[0]]) if where[0] else []
                what = (f"prompt position: ptune's template {model.template.source!r} puts the {n} virtual tokens at "
                        f"positions {_spans(where)}" + (f" (after {' '.join(before)})" if before else "")
                        + f"; PEFT prepends all {n} before the first token")
    if examples is None:
        return None, [what + " (not measured: no tokenizer to encode probe texts with)"] if what else []
    ours = model(**_batch(examples, source)).logits
    orders = []
    for e in examples:
        virtual = sorted((v, i) for i, v in enumerate(e.virtual_index) if v >= 0)
        orders.append([i for _, i in virtual] + [i for i, v in enumerate(e.virtual_index) if v < 0])
    batch = _batch([_reordered(e, o) for e, o in zip(examples, orders)], source)
    if peft_type == "PREFIX_TUNING":
        batch["position_ids"] = _shifted_positions(model, batch["attention_mask"], model.method_config.num_virtual_tokens)
    theirs = model(**batch).logits
    pairs = [([i for i, v in enumerate(e.virtual_index) if v < 0],
              [o.index(i) for i, v in enumerate(e.virtual_index) if v < 0]) for e, o in zip(examples, orders)]
    diff = _gap(ours, theirs, pairs)
    if diff <= _scale_tol(ours):
        return diff, []
    return diff, [what or "the outputs differ under PEFT's layout"]


def _spans(positions: list[int]) -> str:
    runs, start = [], positions[0]
    for a, b in zip(positions, positions[1:] + [None]):
        if b != a + 1:
            runs.append(str(start) if a == start else f"{start}..{a}")
            start = b
    return ", ".join(runs)


def _position_start(model: PtuneModel) -> int:
    """The first position id a model gives (RoBERTa-family models count from their padding index + 1)."""
    emb = getattr(model.backbone, "embeddings", None)
    return emb.padding_idx + 1 if hasattr(emb, "create_position_ids_from_input_ids") else 0


def _shifted_positions(model: PtuneModel, mask: torch.Tensor, P: int) -> torch.Tensor:
    """The position ids a model gives real tokens that follow a P-long cache."""
    T = mask.shape[1]
    return (torch.arange(T, device=mask.device) + _position_start(model) + P).expand(mask.shape[0], T)


def _head_use(model: PtuneModel) -> str:
    """How ptune applies its head file, where it pools (the measured difference applies it so)."""
    pooling = getattr(model.head, "pooling", None)
    where = {"cls": "the first position's hidden state", "last": "the last real token's hidden state",
             "mean": "the mean over real tokens", "pooler": "the model's pooler output"}.get(pooling)
    return f" (logits = classifier(dropout(pooled)), pooled = {where} of the output sequence)" if where else ""


def _lm_notes(model: PtuneModel) -> list[str]:
    ids = model.head_config.label_word_ids
    if not ids:
        return []
    slot = "the last token" if model.spec.causal else "the [MASK] token"
    return [f"the client returns vocabulary logits; ptune's verbalizer reads them at {slot} for the label words' "
            f"first tokens {list(ids)} (labels {list(model.labels)}, in {REPORT_NAME})"]


# ----------------------------------------------------------------------------------------- merged


def _export_merged(source: _Source, tmp: Path, output: Path) -> ExportResult:
    import transformers

    model = source.model
    if not model.adapter.trains_base:
        if isinstance(model.adapter, PeftExportable) or model.template.num_virtual_tokens:
            raise ConfigError(f"{model.method} cannot be merged into weights: its prompts are extra inputs or "
                              "attention keys/values that no plain transformers model takes; use --format peft")
        raise ConfigError(f"{model.method} trains nothing: the base model is unchanged, so use it as it is")
    state, dtype, quantized = _merged_state(model)
    client = _client_head(source, state)
    cfg = copy.deepcopy(model.base.config)
    for attr in ("quantization_config", "_pre_quantization_dtype", "_ptune_source"):
        if hasattr(cfg, attr):
            delattr(cfg, attr)
    if client.head_module is not None:
        labels = list(model.labels) or [str(i) for i in range(model.head_config.num_labels)]
        cfg.num_labels = len(labels)
        cfg.id2label = dict(enumerate(labels))
        cfg.label2id = {x: i for i, x in enumerate(labels)}
    # built in its dtype (not cast after): buffers such as rotary frequencies stay as from_pretrained makes them
    merged = getattr(transformers, client.auto_class).from_config(cfg, dtype=dtype)
    tensors = {client.body_prefix + k: v for k, v in state.items()}
    tensors.update(client.head_tensors)
    expected = set(merged.state_dict())
    missing = sorted(expected - set(tensors))
    if missing:
        raise PtuneError(f"cannot build {type(merged).__name__} from the merged weights: {missing[:3]} missing")
    merged.load_state_dict({k: v for k, v in tensors.items() if k in expected})
    merged.eval()
    merged.save_pretrained(str(tmp))
    differences: list[str] = []
    notes: list[str] = []
    if source.tokenizer is not None:
        source.tokenizer.save_pretrained(str(tmp))
    else:
        differences.append("no tokenizer files: the base's tokenizer could not be loaded (pass tokenizer=)")
    if client.reason:
        differences.append(f"head: {client.reason}; the folder holds the transformer body ({client.class_name}, "
                           f"AutoModel), and ptune's head is in {HEAD_NAME} for you to apply to its hidden "
                           f"states{_head_use(model)}")
        head_state = {k: v.detach().contiguous().cpu() for k, v in model.head.state_dict().items()}
        if head_state:
            save_file(head_state, str(tmp / HEAD_NAME))
    notes += _lm_notes(model)
    diff, tol = _merged_gap(source, merged, client)
    if quantized:
        short = str(dtype).removeprefix("torch.")
        what = (f"quantized base: its {model.spec.base.quantize or '4/8-bit'} weights are dequantized to {short} "
                f"(the compute dtype) and the low-rank update merged in, so the folder computes in plain {short} "
                "where ptune computes from the quantized weights")
        if diff > tol:
            differences.append(what)
        else:
            notes.append(what)
    elif diff > tol and not client.reason:
        differences.append(f"the merged model's logits differ from ptune's by up to {diff:.3g}")
    how = f"transformers.{client.auto_class}.from_pretrained({str(output)!r})"
    return ExportResult(output, "merged", how, not differences, differences, diff, notes, client.auto_class)


def _dequantized(layer: nn.Module) -> torch.Tensor:
    if type(layer).__name__ not in QUANTIZED_LAYERS:
        return layer.weight.detach()
    from transformers.integrations.bitsandbytes import dequantize_bnb_weight

    return dequantize_bnb_weight(layer.weight, state=getattr(layer, "state", None)).detach()


def _merged_state(model: PtuneModel) -> tuple[dict[str, torch.Tensor], torch.dtype, bool]:
    """The base's weights with every low-rank update merged in and quantized layers dequantized,
    under the plain layers' names; the dtype they share; whether the base was quantized. ptune's model
    is left as it is."""
    base = model.base
    low = {n: m for n, m in base.named_modules() if isinstance(m, LowRankLayer)}
    quant = {n: m for n, m in base.named_modules() if type(m).__name__ in QUANTIZED_LAYERS}
    quantized = bool(quant)
    if quantized:
        first = next(iter(quant.values()))
        dtype = getattr(first, "compute_dtype", None) or torch.float16
    else:
        dtype = next(p.dtype for p in base.parameters() if p.is_floating_point())
    inside = tuple(n + "." for n in list(low) + list(quant))
    state = {k: v.detach() for k, v in base.state_dict().items() if not k.startswith(inside)}
    for name, layer in low.items():
        inner = layer.base_layer
        weight = _dequantized(inner).float()
        if not layer.merged:
            delta = layer.delta_weight().detach().float()
            weight = weight + (delta.T if layer.transposed else delta)
        state[name + ".weight"] = weight
        if inner.bias is not None:
            state[name + ".bias"] = inner.bias.detach()
    for name, layer in quant.items():
        if name.startswith(tuple(n + "." for n in low)):
            continue  # a LoRA layer's own base layer: merged above
        state[name + ".weight"] = _dequantized(layer)
        if layer.bias is not None:
            state[name + ".bias"] = layer.bias.detach()
    state = {k: (v.to(dtype) if v.is_floating_point() else v).cpu().contiguous() for k, v in state.items()}
    return state, dtype, quantized


def _merged_gap(source: _Source, merged: nn.Module, client: _ClientHead) -> tuple[float, float]:
    """Largest |logit difference| between the merged model and ptune's on the probe inputs, and the
    tolerance for them."""
    model = source.model
    examples = _probe_examples(source)
    batch = _batch(examples, source) if examples is not None else _plain_probe(source)
    ours = model(**batch).logits
    inputs = {"input_ids": batch["input_ids"].cpu(), "attention_mask": batch["attention_mask"].cpu()}
    out = merged(**inputs)
    if client.auto_class == "AutoModel":  # the body alone: ptune's head applied to its hidden states
        dtype = next((p.dtype for p in model.head.parameters()), ours.dtype)
        theirs = model.head(out.last_hidden_state.to(_device(model), dtype), batch)
    else:
        theirs = out.logits
        ids = model.head_config.label_word_ids
        if ours.dim() == 2 and theirs.dim() == 3 and ids:  # a verbalizer: the label words at the label slot
            rows = torch.arange(theirs.shape[0])
            theirs = theirs[rows, batch["label_position"].cpu()][:, list(ids)]
    return _gap(ours, theirs, None, batch["attention_mask"]), _scale_tol(ours)


__all__ = ["FORMATS", "ExportResult", "ExportWarning", "default_output", "export", "export_merged", "export_peft"]
