"""The Python API: put a method on a base model, save it, load it back.

    base = ptune.load_base("minilm")
    tok = ptune.load_tokenizer("minilm")
    model = ptune.apply(base, ptune.PTuningV2Config(num_virtual_tokens=16),
                        head=ptune.HeadConfig("classification", num_labels=5), tokenizer=tok)
    print(model.describe())          # trainable parameters and their share
    ptune.save_adapter(model, "out/adapter")
    model = ptune.load_adapter("out/adapter")  # loads the base its spec names, as it was loaded; checks it

A front over the floors below it (model assembly in :mod:`ptune.assembly`, adapter files in
:mod:`ptune.adapter_io`, exports in :mod:`ptune.export`); nothing in the package imports this module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .adapter_io import (CONFIG_NAME, WEIGHTS_NAME, adapter_config, check_fingerprint, find_adapter,  # noqa: F401
                         from_spec, load_adapter, load_base_for, load_trainable, read_adapter_config, read_spec,
                         read_tensors, save_adapter)
from .assembly import apply, attach_adapter, base_spec_of, build_head, resolve_spec  # noqa: F401
from .model import PtuneModel
from .models import backbone_of  # noqa: F401


def export_peft(model: PtuneModel | str | Path, path: str | Path | None = None, **kwargs: Any) -> Path:
    """Write the adapter in HF PEFT's layout (``PeftModel.from_pretrained`` reads it); returns the folder.

    A thin front for :func:`ptune.export.export_peft` (options, the head as the client's own head
    where transformers has one of the same form, and the exactness report: see :mod:`ptune.export`).
    """
    from .export import export_peft as _export_peft  # the export floor loads the engine for run folders

    return _export_peft(model, path, **kwargs)


__all__ = ["apply", "from_spec", "save_adapter", "load_adapter", "read_spec", "load_base_for", "export_peft",
           "read_adapter_config", "backbone_of", "find_adapter", "read_tensors"]
