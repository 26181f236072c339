"""A multi-node launch on one host: two torchrun launchers (``--nnodes 2 --nproc-per-node 1``) meet in a
c10d rendezvous on 127.0.0.1, as two machines would, and train one run whose losses follow the
single-process run (the same reference as test_ddp.py's).

c10d assigns the node ranks itself (``--node-rank`` is read by the static rendezvous only); the test
reads what each launcher's agent was given (``group_rank`` in its log) and checks that the two
launchers are node 0 and node 1 of a group of 2, and that the main process alone writes the run's files.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import uuid

from test_ddp import ENV, assert_follows_single, single_run, toy_files, train_args


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_node_launch_matches_single(tiny_model_dir, tmp_path_factory, tmp_path):
    single = single_run(tiny_model_dir, tmp_path_factory)
    args = train_args(tiny_model_dir, toy_files(tmp_path_factory))
    port, run_id = free_port(), f"ptune-{uuid.uuid4().hex[:8]}"

    def launcher(host: bool) -> list[str]:
        return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", run_id,
                # the first launcher hosts the rendezvous store; both give up after 60 s without the other
                "--rdzv-conf", f"is_host={int(host)},join_timeout=60",
                "-m", "ptune.cli", *args, "--output-dir", str(tmp_path / "run")]

    env = {**ENV, "LOGLEVEL": "INFO"}  # the agents log the node rank the rendezvous gave them
    nodes = [subprocess.Popen(launcher(i == 0), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for i in range(2)]
    try:
        outs = [p.communicate(timeout=300) for p in nodes]
    finally:
        for p in nodes:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(nodes, outs):
        assert p.returncode == 0, err[-3000:]
    ranks = sorted(int(re.search(r"group_rank=(\d+)", err).group(1)) for _, err in outs)
    assert ranks == [0, 1]
    assert all(re.search(r"group_world_size=2\b", err) for _, err in outs)
    stdout = "".join(out for out, _ in outs)
    assert "ptune: 2 processes" in stdout, stdout  # one process per node, one process group
    for line in ("ptune: done.", "ptune: adapter:", "ptune: metrics:"):  # the main process (node 0) alone says it
        assert stdout.count(line) == 1, stdout
    assert_follows_single(tmp_path / "run", single, 1e-5)
