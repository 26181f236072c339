"""Sharded training (``--sharding fsdp``): torch's own FSDP (``fully_shard``, FSDP2) over the frozen base.

accelerate's FSDP plugin shards on GPUs only; this path runs wherever torch.distributed does, gloo on
CPU included, under a plain ``torchrun`` launch. What it does to the built model, on every process:

- every transformer layer of the base (each ``layer`` / ``layers`` / ``h`` / ``block`` list's items, so
  both stacks of an encoder-decoder) becomes an FSDP unit, and the whole :class:`PtuneModel` the root
  unit (embeddings, final norms, frozen head parts): each process keeps a 1/N slice (dim 0) of every
  frozen weight, all-gathered for a unit's forward (and again for its backward) and freed after;
- the trainable parameters (prompts, prefixes, LoRA's pairs, the head) are left out of
  FSDP (``ignored_params``): they stay whole on every process and DDP (the ordinary accelerate wrapper,
  told to ignore the sharded weights) all-reduces their gradients, so the optimizer, clipping, saving,
  checkpoints and resume are the unsharded run's, unchanged;
- the skipped work of :mod:`ptune.frozen` is off: a cache hit on one process and a miss on another would
  all-gather a layer on one side only, and every process must run every unit's collectives in step.

Evaluation follows from the last point: each process scores every example (``engine/tasks.py``), so the
processes run the same forward passes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..errors import ConfigError
from .config import TrainConfig

SHARDINGS = ("none", "fsdp")
LAYER_LISTS = ("layer", "layers", "h", "block", "blocks")


def check_sharding(cfg: TrainConfig, num_processes: int) -> None:
    """Refuse, before the run directory exists, what ``--sharding fsdp`` cannot run (one line each)."""
    if cfg.sharding == "none":
        return
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true"):
        raise ConfigError("--sharding fsdp is ptune's own FSDP under a torchrun launch; do not launch it with an "
                          "accelerate FSDP config as well")
    if num_processes < 2:
        raise ConfigError("--sharding fsdp shards the frozen base across the processes of a launch and this run has "
                          "one: launch it with `torchrun --nproc_per_node N -m ptune.cli train --sharding fsdp ...` "
                          "(N >= 2)")
    if cfg.multi_task:
        raise ConfigError("--sharding fsdp trains one task (a multi-task model's per-task views would bypass the "
                          "sharded root); train the tasks without --sharding, or one at a time")
    if cfg.quantize:
        raise ConfigError(f"--sharding fsdp shards full-precision weights; a --quantize {cfg.quantize} base's "
                          "bitsandbytes weights cannot be sharded: drop one of the two")
    if cfg.eval_generate:
        raise ConfigError("--sharding fsdp does not generate text at evaluations (generate() bypasses the sharded "
                          "model's forward); drop --eval-generate")


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` went through :func:`shard_model` (its forward then runs collectives on every process)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def layer_units(base: nn.Module) -> list[nn.Module]:
    """The base's transformer layers, each to be one FSDP unit: the items of every module list named like a
    layer stack (``encoder.layer``, ``layers``, ``h``, ``block``), outermost lists only."""
    units: list[nn.Module] = []
    taken: list[str] = []
    for name, module in base.named_modules():
        if any(name.startswith(t + ".") for t in taken):
            continue  # inside a unit already (T5's block[i].layer)
        if isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] in LAYER_LISTS and len(module):
            units.extend(module)
            taken.append(name)
    return units


@dataclass(frozen=True)
class ShardReport:
    """What one process holds after sharding: its slice of the frozen weights, and the whole trainable ones."""

    rank: int
    processes: int
    units: int  # FSDP units: the layers, plus the root
    local_bytes: int  # this process's share of the frozen weights
    full_bytes: int  # the frozen weights, whole
    trainable_bytes: int  # whole on every process

    def line(self) -> str:
        return (f"sharded (FSDP, {self.processes} processes, {self.units} units): rank {self.rank} holds "
                f"{self.local_bytes:,} of the frozen weights' {self.full_bytes:,} bytes "
                f"({100 * self.local_bytes / max(self.full_bytes, 1):.1f}%); the {self.trainable_bytes:,} trainable "
                "bytes are whole on every rank")


def held_bytes(model: nn.Module) -> tuple[int, int, int]:
    """(this process's bytes of the frozen weights, their full bytes, the trainable weights' bytes); a sharded
    weight is a DTensor whose ``to_local()`` is this process's slice."""
    from torch.distributed.tensor import DTensor

    local = full = trainable = 0
    seen: set[int] = set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        size = p.element_size()
        if p.requires_grad:
            trainable += p.numel() * size
            continue
        full += p.numel() * size
        local += (p.to_local().numel() if isinstance(p, DTensor) else p.numel()) * size
    return local, full, trainable


def shard_model(model: nn.Module, acc: Any) -> ShardReport:
    """Shard ``model``'s frozen weights over ``acc``'s processes with ``fully_shard`` (in place: the same
    object, now an FSDP module), and tell DDP to leave them alone; returns what this process holds."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    trainable = {p for p in model.parameters() if p.requires_grad}
    if not any(not p.requires_grad for p in model.parameters()):
        raise ConfigError("--sharding fsdp shards the frozen base and this method trains every weight (nothing is "
                          "frozen): use a parameter-efficient method, or accelerate's FSDP on GPUs")
    model.frozen = None  # every process must run every layer (see the module's docstring)
    mesh = init_device_mesh(acc.device.type, (acc.num_processes,))
    units = layer_units(model.base)
    for unit in units:
        fully_shard(unit, mesh=mesh, ignored_params=trainable)
    fully_shard(model, mesh=mesh, ignored_params=trainable)
    frozen_names = [name for name, p in model.named_parameters() if not p.requires_grad]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, frozen_names)
    local, full, train_bytes = held_bytes(model)
    return ShardReport(acc.process_index, acc.num_processes, len(units) + 1, local, full, train_bytes)
