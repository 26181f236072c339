"""FSDP on 2 CPU processes (gloo): ptune's own ``--sharding fsdp`` (torch's ``fully_shard``) shards the
frozen base and trains as the unsharded run does; accelerate's FSDP launch on a CPU is refused.

``--sharding fsdp``: one torchrun launch of 2 processes trains prompt tuning, P-Tuning v2 and LoRA in turn
(one launch, three runs: ``ptune.cli.main`` called three times, the way ``ptune train`` runs, with torch's
collectives counted). Each rank must say it holds half the frozen weights' bytes (its DTensor shards,
``to_local()``), every forward must all-gather them, and each run's losses must follow the single-process
run's within 1e-5 (measured: 1.2e-7 at most), its best adapter too. The trainable weights are not FSDP's
(kept whole, DDP all-reduces their gradients), so no reduce-scatter runs.

accelerate's FSDP (a launch config) shards on GPUs only. Launched on a CPU-only machine with an FSDP config,
ptune's Accelerator (``cpu=True``) came back with the model wrapped in plain DistributedDataParallel
(``DistributedType.MULTI_CPU``); without ``cpu=True`` no process group forms at all and every process trains
alone. So that launch fails at once, on every process, with one line saying why and what to use. FSDP on
GPUs (configs/accelerate/fsdp.yaml) is not tested here (no GPU).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from test_ddp import ENV, TORCHRUN, assert_follows_single, read_run, single_run, toy_files, train_args

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
                          and "--sharding fsdp" in e for e in errors)
    assert not (tmp_path / "run").exists()  # refused before the run directory was touched


DRIVER = """
import json, os, sys
import torch.distributed as dist

calls = {}
for name in ("all_gather_single", "reduce_scatter_single", "all_reduce"):  # what FSDP2 and DDP call on gloo
    real = getattr(dist, name)

    def counted(*args, _real=real, _name=name, **kwargs):
        calls[_name] = calls.get(_name, 0) + 1
        return _real(*args, **kwargs)

    setattr(dist, name, counted)

from ptune.cli import main

out, runs = sys.argv[1], json.loads(sys.argv[2])
for method, args in runs.items():
    calls.clear()
    code = main(args)
    if code:
        sys.exit(code)
    with open(os.path.join(out, f"{method}-calls-rank{os.environ['RANK']}.json"), "w") as f:
        json.dump(calls, f)
"""
METHODS = ("prompt_tuning", "p_tuning_v2", "lora")
HELD = re.compile(r"ptune: sharded \(FSDP, 2 processes, (\d+) units\): rank (\d) holds ([\d,]+) of the frozen "
                  r"weights' ([\d,]+) bytes")


def test_fsdp_on_two_cpu_processes_shards_the_base_and_follows_the_unsharded_run(tiny_model_dir, tmp_path_factory,
                                                                                 tmp_path):
    task = toy_files(tmp_path_factory)
    runs = {m: [*train_args(tiny_model_dir, task, m), "--sharding", "fsdp", "--output-dir", str(tmp_path / m)]
            for m in METHODS}
    (tmp_path / "driver.py").write_text(DRIVER)
    proc = subprocess.run([*TORCHRUN, str(tmp_path / "driver.py"), str(tmp_path), json.dumps(runs)],
                          capture_output=True, text=True, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("ptune: 2 processes") == len(METHODS), proc.stdout
    held = HELD.findall(proc.stdout)
    assert len(held) == 2 * len(METHODS), proc.stdout
    for i, method in enumerate(METHODS):
        ranks = {int(r): (int(local.replace(",", "")), int(full.replace(",", ""))) for _, r, local, full in
                 held[2 * i:2 * i + 2]}
        assert sorted(ranks) == [0, 1] and all(units == "3" for units, *_ in held[2 * i:2 * i + 2])  # 2 layers + root
        full = ranks[0][1]
        assert full == ranks[1][1] > 3_900_000  # the tiny BERT's frozen weights, fp32
        assert ranks[0][0] + ranks[1][0] == full  # each weight's dim-0 slices, between them the whole
        assert all(0.45 * full <= local <= 0.55 * full for local, _ in ranks.values())
        for rank in (0, 1):  # every forward all-gathered the shards; the trainable weights were not reduce-scattered
            calls = json.loads((tmp_path / f"{method}-calls-rank{rank}.json").read_text())
            assert calls.get("all_gather_single", 0) >= 10 * 3 and calls.get("reduce_scatter_single", 0) == 0, calls

        single = single_run(tiny_model_dir, tmp_path_factory, method)
        assert_follows_single(tmp_path / method, single, 1e-5)
        s1, s2 = read_run(single)[1], read_run(tmp_path / method)[1]
        assert s1["best_step"] == s2["best_step"] and s1["test"] == s2["test"]
        a1, a2 = (load_file(str(d / "best" / "adapter_model.safetensors")) for d in (single, tmp_path / method))
        assert a1.keys() == a2.keys()
        worst = max(float((a1[k] - a2[k]).abs().max()) for k in a1)
        assert worst < 1e-4, (method, worst)  # saved whole, as trained (Adam's first steps: a 1e-7 loss gap, 1e-5 here)


def test_fsdp_needs_several_processes(tiny_model_dir, toy_task, tmp_path, capsys):
    from ptune.cli import main

    code = main(["train", "--model", tiny_model_dir, "--task", toy_task["task"], "--train-file",
                 toy_task["train_file"], "--validation-file", toy_task["validation_file"], "--max-steps", "1",
                 "--no-progress", "--sharding", "fsdp", "--output-dir", str(tmp_path / "run")])
    assert code == 2
    err = capsys.readouterr().err
    assert "ptune: error: --sharding fsdp shards the frozen base across the processes of a launch and this run " \
           "has one" in err, err
    assert not (tmp_path / "run").exists()
