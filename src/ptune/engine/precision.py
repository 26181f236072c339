"""The precision a run computes at: bf16 autocast where the machine has bf16 arithmetic, else fp32.

Read by training (accelerate's ``mixed_precision``), by ``Run`` and ``AdapterSet`` (they score a run
at the precision it trained and reported its metrics at) and by the benchmarks.
"""

from __future__ import annotations

from typing import Any

import torch

from .config import TrainConfig


def run_precision(cfg: TrainConfig) -> str:
    """accelerate's mixed_precision for a run: "bf16" (autocast) or "no"."""
    return "bf16" if cfg.precision == "bf16" or (cfg.precision == "auto" and bf16_available()) else "no"


def bf16_autocast() -> Any:
    """bf16 autocast on the device the run scores on (what accelerate's autocast() gives a bf16 run)."""
    return torch.autocast("cuda" if torch.cuda.is_available() else "cpu", dtype=torch.bfloat16)


def bf16_available() -> bool:
    """Whether bf16 autocast pays here: a GPU with bf16, or a CPU with bf16 arithmetic of its own
    (AVX512-BF16 or AMX). Without it oneDNN emulates bf16 through conversions: a MiniLM training step
    measured 2.5x slower than fp32 on an AVX512 CPU without AVX512-BF16 (see BENCHMARKS.md)."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            return set(next((line for line in f if line.startswith("flags")), "").split())
    except OSError:
        return set()
