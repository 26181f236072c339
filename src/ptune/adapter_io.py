"""Adapter files: save a model's trainable tensors with its resolved spec, read them back, check them.

An adapter folder holds ``adapter_config.json`` (the resolved spec, see :mod:`ptune.spec`) and
``adapter_model.safetensors`` (the trainable tensors: adapter and head). Nothing is ever unpickled;
the base model's fingerprint is stored and checked on load; a damaged file (truncated, garbled, a
tensor of the wrong dtype or shape) is refused with one line naming the file and what to do
(:func:`read_tensors`). :func:`find_adapter` finds the adapter of a run directory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .assembly import apply
from .errors import AdapterMismatchError, ConfigError, PtuneError
from .methods.base import ReloadHook
from .model import PtuneModel
from .models import describe, fingerprint, load_base, load_tokenizer
from .multitask import multitask_from_spec
from .spec import FORMAT_VERSION, MultiTaskSpec, spec_from_dict
from .version import __version__

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
RUN_CONFIG_NAME = "config.json"  # a run directory's TrainConfig (ptune.engine.run_dir)


def find_adapter(path: str | Path) -> tuple[Path, Path | None]:
    """(adapter folder, run directory or None) for a run directory, its ``best/`` or a bare adapter folder."""
    path = Path(path)
    if (path / "best" / CONFIG_NAME).is_file():
        return path / "best", path if (path / RUN_CONFIG_NAME).is_file() else None
    if (path / CONFIG_NAME).is_file():
        return path, path.parent if (path.parent / RUN_CONFIG_NAME).is_file() else None
    raise PtuneError(f"{path} is not a finished ptune run (no {RUN_CONFIG_NAME} with best/{CONFIG_NAME}) nor an "
                     "adapter folder; pass the --output-dir of a completed `ptune train`")


def read_tensors(path: str | Path, what: str = "adapter", fix: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, or one :class:`PtuneError` line naming the file when it is
    missing, truncated or garbled (safetensors' own errors say neither which file nor what to do).
    ``fix``: what to do about it (default: save or train it again)."""
    path = Path(path)
    if not path.is_file():
        raise PtuneError(f"{path} is missing; the {what} is incomplete: {fix or 'save or train it again'}")
    try:
        return load_file(str(path))
    except Exception as e:  # noqa: BLE001 - safetensors raises SafetensorError, OSError, ValueError...
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PtuneError(f"{path} is damaged ({reason}); the {what} cannot be read: "
                         f"{fix or 'save or train it again, or copy the file over once more'}") from None


def from_spec(spec: Any, base: nn.Module, tokenizer: Any = None) -> PtuneModel:
    """A fresh model (untrained adapter) built from a resolved spec on ``base`` (a multi-task spec
    gives a :class:`ptune.multitask.MultiTaskModel`)."""
    if isinstance(spec, MultiTaskSpec):
        return multitask_from_spec(spec, base, tokenizer)
    return apply(base, spec.method_config, head=spec.head, template=spec.template.source, tokenizer=tokenizer,
                 labels=spec.labels, label_words=spec.label_words or None, task=spec.task,
                 max_length=spec.max_length, ensemble=spec.ensemble)


def _atomic_write(path: Path, write: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def adapter_config(model: PtuneModel) -> dict:
    return {**model.spec.to_dict(), "ptune_version": __version__}


def save_adapter(model: PtuneModel, path: str | Path) -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` (trainable tensors only)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous().cpu() for k, v in model.trainable_state_dict().items()}
    _atomic_write(path / WEIGHTS_NAME, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    text = json.dumps(adapter_config(model), indent=2)
    _atomic_write(path / CONFIG_NAME, lambda p: p.write_text(text))
    return path


def read_adapter_config(path: str | Path) -> dict:
    cfg_path = Path(path) / CONFIG_NAME
    if not cfg_path.is_file():
        raise PtuneError(f"{path} holds no ptune adapter ({CONFIG_NAME} missing); pass the folder save_adapter wrote")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PtuneError(f"{cfg_path} is not valid JSON ({e}); the adapter is damaged") from e
    version = cfg.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise PtuneError(f"{cfg_path} has format_version {version!r}, newer than this ptune reads "
                         f"({FORMAT_VERSION}); upgrade ptune")
    return cfg


def check_fingerprint(saved: dict, base: nn.Module) -> None:
    actual = fingerprint(base)
    keys = [k for k in saved if k != "name"]
    diff = [k for k in keys if saved.get(k) != actual.get(k)]
    if diff:
        raise AdapterMismatchError(
            f"adapter was trained on {describe(saved)} but the base is {describe(actual)} "
            f"(differs in {', '.join(diff)}); load it onto the model it was trained on")


def read_spec(path: str | Path) -> Any:
    """The resolved spec saved with an adapter: a :class:`RunSpec` (formats 1-3), or a
    :class:`MultiTaskSpec` for an adapter trained on several tasks."""
    return spec_from_dict(read_adapter_config(path), str(path))


def load_base_for(spec: Any, *, trust_remote_code: bool = False, allow_pickle: bool = False,
                  base_name: str | None = None, dtype: torch.dtype | None = None) -> nn.Module:
    """Load the base a spec names, the way it was loaded for training (quantization included).

    Remote code and pickle files stay the caller's decision: a spec that needed them is refused
    unless the caller passes the same consent, so a saved file never switches them on by itself.
    """
    b = spec.base
    for option, given in (("trust_remote_code", trust_remote_code), ("allow_pickle", allow_pickle)):
        if getattr(b, option) and not given:
            flag = "--" + option.replace("_", "-")
            raise ConfigError(f"this adapter's base {b.name!r} was loaded with {option} (it runs or unpickles "
                              f"code from the model folder); pass {flag} (Python: {option}=True) to load it again")
    return load_base(base_name or b.name, b.kind, quantize=b.quantize, trust_remote_code=trust_remote_code,
                     allow_pickle=allow_pickle, dtype=dtype)


def load_adapter(path: str | Path, base: nn.Module | None = None, *, tokenizer: Any = None,
                 base_name: str | None = None, trust_remote_code: bool = False,
                 allow_pickle: bool = False, dtype: torch.dtype | None = None) -> PtuneModel:
    """Rebuild a saved adapter on ``base`` (default: the base its spec names, loaded as it was for
    training, e.g. 4-bit, computing in ``dtype`` when given) and check that the base is the one it
    was trained on."""
    spec = read_spec(path)
    name = base_name or spec.base.name
    if base is None:
        base = load_base_for(spec, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle, base_name=name,
                             dtype=dtype)
    check_fingerprint(spec.base.fingerprint, base)
    if tokenizer is None and name:
        tokenizer = load_tokenizer(name, trust_remote_code=trust_remote_code)
    model = from_spec(spec, base, tokenizer)
    load_trainable(model, read_tensors(Path(path) / WEIGHTS_NAME), Path(path) / WEIGHTS_NAME)
    return model


def load_trainable(model: PtuneModel, tensors: dict[str, torch.Tensor], source: str | Path) -> None:
    """Copy ``tensors`` (read from ``source``: the safetensors file, or the folder holding
    ``adapter_model.safetensors``) into ``model``'s trainable parameters. Every tensor is checked before
    any is copied: a missing or unexpected name, a wrong shape, or a non-float dtype (a damaged file)
    is refused with one :class:`AdapterMismatchError` line naming the file, and the model is left as it was."""
    source = Path(source)
    if source.is_dir() and (source / WEIGHTS_NAME).is_file():
        source = source / WEIGHTS_NAME  # name the file that holds the tensors, not its folder
    expected = set(model.trainable_state_dict())
    missing, unexpected = expected - set(tensors), set(tensors) - expected
    if missing or unexpected:
        raise AdapterMismatchError(
            f"{source} does not fit this {model.method} adapter: missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}")
    params = dict(model.named_parameters())
    for k, v in tensors.items():
        if v.dtype.is_floating_point != params[k].dtype.is_floating_point or v.dtype.is_complex:
            raise AdapterMismatchError(f"{source}: {k} holds {v.dtype} values where the model has "
                                       f"{params[k].dtype}; the file is damaged or not a ptune adapter: "
                                       "save or train it again")
        if params[k].shape != v.shape:
            raise AdapterMismatchError(f"{source}: {k} has shape {tuple(v.shape)}, the model expects "
                                       f"{tuple(params[k].shape)}; the file is damaged or the adapter was made "
                                       "with other settings: save or train it again")
    with torch.no_grad():
        for k, v in tensors.items():
            params[k].copy_(v)
    if isinstance(model.adapter, ReloadHook):  # state derived from the tensors (AdaLoRA's rank pattern)
        model.adapter.after_load()


__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "find_adapter", "read_tensors", "from_spec", "save_adapter",
           "load_adapter", "read_spec", "read_adapter_config", "check_fingerprint", "load_base_for", "load_trainable"]
