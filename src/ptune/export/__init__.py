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
front of every token (ptune puts them where the template says, e.g. after ``[CLS]``, unless the run was
trained with ``prompt_layout="peft"`` / ``--prompt-layout peft``, PEFT's placement) and feeds deep
prompts as a KV cache (its real tokens then take positions P..P+T-1, ptune's 0..T-1). Every export is
measured on a few probe inputs: the merged folder's model itself; for PEFT, ptune's model run on PEFT's
layout (the same computation, as ``tests/test_peft_parity.py`` checks). The verdict, the differences
and the largest logit difference go to ``ptune_export.json`` and :class:`ExportResult`, and an inexact
export warns (``strict=True`` / ``--strict`` refuses it instead).
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from ..adapter_io import find_adapter
from ..errors import ConfigError
from ..model import PtuneModel
from ..models import BASE_CLASSES  # noqa: F401  (re-exported: ptune.export.*)
from ..quantize import QUANTIZED_LAYERS  # noqa: F401  (re-exported)
from .client_head import TASK_CLASSES  # noqa: F401  (re-exported: ptune.export.*)
from .common import (FORMATS, HEAD_NAME, PROBE_TEXTS, REPORT_NAME, TOLERANCE,  # noqa: F401  (re-exported)
                     ExportResult, _check_output, _from_model, _from_path, _replace, _report)
from .merged import _export_merged
from .peft import PROMPT_TYPES, _export_peft  # noqa: F401  (PROMPT_TYPES re-exported)


class ExportWarning(UserWarning):
    """An export whose client does not reproduce ptune's outputs exactly (the message says why and how much)."""


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

    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # src/ptune (this is ptune/export/)
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
    adapter_dir, run_dir = find_adapter(run)
    if run_dir is not None:
        return run_dir / f"export-{format}"
    return adapter_dir.with_name(f"{adapter_dir.name}-{format}")


__all__ = ["FORMATS", "ExportResult", "ExportWarning", "default_output", "export", "export_merged", "export_peft"]
