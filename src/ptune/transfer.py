"""Warm start: begin a run from a saved adapter's prompts (P-Tuning v2's "pre-train on several tasks,
then adapt to one").

``warm_start(model, source, init_task)`` copies into a freshly built model, before its first step:

- the adapter's tensors: the prompt tables (every table of the new model takes the source's table
  for ``init_task``, or the source's only table; a multi-task source with the same tasks maps task to
  task), a prompt encoder (shared or per task, either way round) and any weight-side tensors (LoRA);
- a head, for each task of the new model that the source has a head for under the same task name
  and shape (so a warm start on the same task reproduces the source's scores exactly).

The method must be the same, the base must be the one the source was trained on, and every tensor
must fit: a shape that does not is refused naming both shapes and what to change. A damaged source
file (truncated, garbled, a tensor of a wrong dtype, or of a shape its own recorded settings rule out)
is refused with one line naming the file, before anything is copied.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import torch

from .adapter_io import CONFIG_NAME, WEIGHTS_NAME, check_fingerprint, read_spec, read_tensors
from .errors import AdapterMismatchError, ConfigError, PtuneError
from .model import PtuneModel
from .spec import MultiTaskSpec


def _adapter_dir(source: str | Path) -> Path:
    path = Path(source)
    for candidate in (path / "best", path):
        if (candidate / CONFIG_NAME).is_file():
            return candidate
    raise PtuneError(f"--init-from {source}: no adapter there (no {CONFIG_NAME} in it or in its best/); "
                     "pass a run directory or an adapter folder")


def _tables(spec: Any) -> dict[str, int]:
    """Task name -> prompt table of a saved spec."""
    if isinstance(spec, MultiTaskSpec):
        return dict(zip(spec.names, spec.prompt_index))
    return {spec.task.name: 0} if spec.task is not None else {}


def _head_of(spec: Any, task: str) -> Any:
    """A task's head config in a spec, without the settings that do not shape its tensors."""
    head = spec.task(task).head if isinstance(spec, MultiTaskSpec) else spec.head
    return dataclasses.replace(head, dropout=0.0)


def _same_options(a: Any, b: Any) -> bool:
    """Whether two method configs make tensors of the same shapes (the number of prompt tables aside)."""
    if type(a) is not type(b):
        return False
    fields = [f.name for f in dataclasses.fields(a) if f.name != "num_tasks"] if dataclasses.is_dataclass(a) else []
    return all(getattr(a, f) == getattr(b, f) for f in fields)


def _damaged(file: Path, detail: str) -> PtuneError:
    return PtuneError(f"{file}: {detail}; the file is damaged (its own adapter_config.json rules this out): "
                      "train the source run again, or copy its best/ folder over once more")


def _task_names(model: PtuneModel) -> list[str]:
    spec = model.spec
    if isinstance(spec, MultiTaskSpec):
        return list(spec.names)
    return [spec.task.name] if spec.task is not None else []


def _table_map(src_spec: Any, model: PtuneModel, init_task: str | None, source: str) -> Callable[[int], int]:
    """Which source table each of the new model's tables starts from."""
    n_src = getattr(src_spec.method_config, "num_tasks", 1)
    tables = _tables(src_spec)
    if init_task is not None:
        if init_task not in tables:
            raise ConfigError(f"--init-task {init_task}: {source} holds tasks {', '.join(tables) or '(none recorded)'}")
        return lambda _: tables[init_task]
    if n_src == 1:
        return lambda _: 0
    if isinstance(src_spec, MultiTaskSpec) and isinstance(model.spec, MultiTaskSpec) \
            and src_spec.names == model.spec.names and src_spec.prompt_index == model.spec.prompt_index:
        return lambda k: k
    raise ConfigError(f"{source} holds {n_src} prompt tables (tasks {', '.join(tables)}); pass --init-task NAME "
                      "to pick the one this run starts from")


def _source_key(name: str, src: dict[str, torch.Tensor], table: int) -> str | None:
    """The source tensor for one of the model's adapter tensors (per-task and shared encoders map both ways)."""
    if name in src:
        return name
    parts = name.split(".")
    if "encoders" in parts:  # adapter.encoders.<k>.rest <- adapter.encoder.rest / adapter.encoders.<t>.rest
        i = parts.index("encoders")
        rest = ".".join(parts[i + 2:])
        for key in (".".join(parts[:i] + ["encoders", str(table), rest]), ".".join(parts[:i] + ["encoder", rest])):
            if key in src:
                return key
    if "encoder" in parts:  # adapter.encoder.rest <- adapter.encoders.<t>.rest
        i = parts.index("encoder")
        key = ".".join(parts[:i] + ["encoders", str(table)] + parts[i + 1:])
        if key in src:
            return key
    return None


def warm_start(model: PtuneModel, source: str | Path, init_task: str | None = None,
               log: Callable[[str], None] | None = None) -> dict[str, list[str]]:
    """Copy a saved adapter's prompts, encoder and matching heads into ``model``; returns what was
    copied (``{"adapter": [...], "heads": [...]}``)."""
    folder = _adapter_dir(source)
    src_spec = read_spec(folder)
    where = str(source)
    if src_spec.method != model.method:
        raise ConfigError(f"--init-from {where} is a {src_spec.method} adapter; this run trains {model.method} "
                          "(start from an adapter of the same method)")
    check_fingerprint(src_spec.base.fingerprint, model.base)
    file = folder / WEIGHTS_NAME
    tensors = read_tensors(file, "--init-from adapter")
    for key, t in tensors.items():  # an adapter holds floats only: a copy_ would cast integers silently
        if not t.dtype.is_floating_point:
            raise _damaged(file, f"{key} holds {t.dtype} values where an adapter holds floats")
    table_of = _table_map(src_spec, model, init_task, where)
    table_names = {f"adapter.{n}" for n in getattr(model.adapter, "task_tables", ())}
    n_src = getattr(src_spec.method_config, "num_tasks", 1)
    same_options = _same_options(src_spec.method_config, model.spec.method_config)
    params = dict(model.named_parameters())
    plan: list[Callable[[], Any]] = []  # the copies, made once every tensor has been checked
    copied: dict[str, list[str]] = {"adapter": [], "heads": []}
    for name, p in params.items():
        if not p.requires_grad or name.startswith("head."):
            continue
        if name in table_names:
            src = tensors.get(name)
            if src is not None and src.dim() == p.dim() and src.shape[0] != n_src:
                raise _damaged(file, f"{name} holds {src.shape[0]} prompt tables where the source records {n_src}")
            if src is None or src.shape[1:] != p.shape[1:]:
                raise AdapterMismatchError(
                    f"--init-from {where}: {name} is {tuple(src.shape) if src is not None else 'missing'} "
                    f"there and {tuple(p.shape)} here (tables x tokens x width); use the same "
                    "num_virtual_tokens (and template) as the source")
            plan.extend(lambda p=p, src=src, k=k: p[k].copy_(src[table_of(k)]) for k in range(p.shape[0]))
        else:
            table = table_of(int(name.split("encoders.")[1].split(".")[0])) if "encoders." in name else table_of(0)
            key = _source_key(name, tensors, table)
            if key is None or tensors[key].shape != p.shape:
                got = tuple(tensors[key].shape) if key is not None else "missing"
                if key is not None and same_options:
                    raise _damaged(file, f"{key} is {got} where the source's settings make {tuple(p.shape)}")
                raise AdapterMismatchError(f"--init-from {where}: {name} is {got} there and {tuple(p.shape)} "
                                           "here; the method's options must match the source's")
            plan.append(lambda p=p, key=key: p.copy_(tensors[key]))
        copied["adapter"].append(name)
    src_tasks = _tables(src_spec)
    multi_src = isinstance(src_spec, MultiTaskSpec)
    multi_dst = isinstance(model.spec, MultiTaskSpec)
    for task in _task_names(model):
        if task not in src_tasks:
            continue
        src_prefix, dst_prefix = f"head.{task}." if multi_src else "head.", f"head.{task}." if multi_dst else "head."
        pairs = [(n, src_prefix + n[len(dst_prefix):]) for n in params if n.startswith(dst_prefix)]
        if pairs and all(s in tensors and tensors[s].shape == params[n].shape for n, s in pairs):
            plan.extend(lambda n=n, s=s: params[n].copy_(tensors[s]) for n, s in pairs)
            copied["heads"].append(task)
        elif pairs and _head_of(src_spec, task) == _head_of(model.spec, task):  # the same head: shapes must agree
            n, s = next((n, s) for n, s in pairs if s not in tensors or tensors[s].shape != params[n].shape)
            got = tuple(tensors[s].shape) if s in tensors else "missing"
            raise _damaged(file, f"{s} is {got} where the source's {task} head makes {tuple(params[n].shape)}")
    with torch.no_grad():
        for copy in plan:
            copy()
    if log is not None:
        heads = f" and the head of {', '.join(copied['heads'])}" if copied["heads"] else " (heads start fresh)"
        log(f"warm start from {folder}: {len(copied['adapter'])} adapter tensors{heads}")
    return copied
