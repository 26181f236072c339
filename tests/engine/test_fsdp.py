"""FSDP on 2 CPU processes: refused, with the reason, instead of silently training under another engine.

accelerate shards (FSDP, DeepSpeed) on GPUs only. Launched on a CPU-only machine with an FSDP config,
ptune's Accelerator (``cpu=True``) came back with the model wrapped in plain DistributedDataParallel
(``DistributedType.MULTI_CPU``). (Its losses once seemed to differ from "a DDP launch": that launch,
``accelerate launch --cpu``, had run ONE process; real 2-process DDP with dropout differs from one
process the same way, see test_ddp.py.) Without
``cpu=True`` no process group forms at all and every process trains alone. So the FSDP check is
reduced to this: the launch fails at once, on every process, with one line saying why and what to
use. FSDP on GPUs (configs/accelerate/fsdp.yaml) is not tested here (no GPU).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

FSDP_CPU = """compute_environment: LOCAL_MACHINE
distributed_type: FSDP
num_machines: 1
num_processes: 2
machine_rank: 0
mixed_precision: "no"
use_cpu: true
fsdp_config:
  fsdp_version: 2
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_state_dict_type: FULL_STATE_DICT
  fsdp_use_orig_params: true
"""


def test_fsdp_without_gpu_is_refused_with_the_reason(tiny_model_dir, toy_task, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: FSDP would really shard here")
    (tmp_path / "fsdp.yaml").write_text(FSDP_CPU)
    launcher = os.path.join(os.path.dirname(sys.executable), "accelerate")
    proc = subprocess.run([launcher, "launch", "--config_file", str(tmp_path / "fsdp.yaml"), "-m", "ptune.cli", "train",
                           "--model", tiny_model_dir, "--task", toy_task["task"], "--train-file", toy_task["train_file"],
                           "--validation-file", toy_task["validation_file"], "--max-steps", "1", "--no-progress",
                           "--output-dir", str(tmp_path / "run")], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("ptune: error:")]
    assert errors and all("FSDP needs GPUs and this machine has none" in e and "torchrun --standalone" in e
                          for e in errors)
    assert not (tmp_path / "run").exists()  # refused before the run directory was touched
