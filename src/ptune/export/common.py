"""What every export shares: the report (:class:`ExportResult`) and its constants, the source model
(a :class:`~ptune.model.PtuneModel` given in memory, or one loaded from a run directory / adapter
folder), the output folder's checks and its atomic replacement, the probe inputs every export is
measured on, and the measure itself (the largest logit difference, against a tolerance scaled to the
logits).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ..version import __version__
from ..batching import collate
from ..errors import ConfigError, PtuneError
from ..heads import head_kind
from ..model import PtuneModel
from ..models import arch_facts, load_tokenizer
from ..templates import Encoded, TemplateEncoder

FORMATS = ("peft", "merged")
REPORT_NAME = "ptune_export.json"
HEAD_NAME = "ptune_head.safetensors"
TOLERANCE = 1e-4  # largest |logit difference| (relative to the logits' scale, at least 1) still counted as equal
PROBE_TEXTS = ("the team won the match after extra time", "stir gently",
               "a late goal in the final minute won them the cup", "prices rose again this quarter")


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
    from ..engine.inference import Run

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
