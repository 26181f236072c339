"""Several `ptune` commands in ONE fresh process, each as `ptune.cli.main(argv)` with its own stdout, stderr
and exit code, so a test suite pays Python + torch + transformers' start-up (~5 s here) once per stage
instead of once per command.

What stays true to a user's shell: the process is fresh (it never held the models or runs its commands
read, so `ptune eval` still rebuilds every run from its saved files alone); each command runs through the
same `main` that the `ptune` script calls, with the same argument parsing, error handling and exit codes
(`SystemExit` from argparse is caught and its code kept). What is shared between the commands of one batch:
imported modules and torch's global state. Logging handlers that hold the process's stderr / stdout
(transformers' own, made at import) are pointed at the command's buffers while it runs. Tests that need a command alone in its process (signals,
crashes, environment, start-up itself) keep using `subprocess` directly.

    results = run_batch([["train", ...], ["train", ...]])      # one process, commands in order
    results[0].check()                                         # rc 0, else the command's stderr tail
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

_RUNNER = r"""
import contextlib, io, json, os, sys, traceback
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
from ptune.cli import main
commands = json.load(open(sys.argv[1]))
results = []
import logging
def stream_handlers(stream):  # logging handlers made before a redirect keep the real stream: point them too
    loggers = [logging.getLogger()] + [v for v in logging.Logger.manager.loggerDict.values()
                                       if isinstance(v, logging.Logger)]
    return [h for lg in loggers for h in lg.handlers
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging._StderrHandler)
            and getattr(h, "stream", None) is stream]  # (_StderrHandler follows sys.stderr by itself)
for argv in commands:
    out, err = io.StringIO(), io.StringIO()
    real_err, real_out = sys.stderr, sys.stdout
    moved = [(h, err) for h in stream_handlers(real_err)] + [(h, out) for h in stream_handlers(real_out)]
    for h, s in moved:
        h.setStream(s)
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as e:  # argparse errors and --help, as the shell would see them
            rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if not isinstance(e.code, (int, type(None))):
                print(e.code, file=sys.stderr)
        except BaseException:  # an unexpected exception: exit 1 with the traceback, as python would print it
            traceback.print_exc()
            rc = 1
    for h, s in moved:
        h.setStream(real_err if s is err else real_out)
    results.append({"argv": argv, "rc": int(rc or 0), "stdout": out.getvalue(), "stderr": err.getvalue()})
json.dump(results, open(sys.argv[2], "w"))
"""

ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PATH": "/usr/bin:/bin"}


@dataclass
class Result:
    argv: list[str]
    rc: int
    stdout: str
    stderr: str

    def check(self) -> "Result":
        assert self.rc == 0, f"ptune {' '.join(self.argv[:2])} failed (exit {self.rc}):\n{self.stderr[-2000:]}"
        return self


def run_batch(commands: Sequence[Sequence[str]], workdir: str | Path | None = None,
              env: dict[str, str] | None = None, timeout: float = 900) -> list[Result]:
    """Run each argv (without the leading `ptune`) through `ptune.cli.main` in one new Python process, in
    order; returns one Result per command. `workdir`: the process's working directory (default: the test's)."""
    import os
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        cmd_file, res_file = Path(tmp) / "commands.json", Path(tmp) / "results.json"
        cmd_file.write_text(json.dumps([list(map(str, a)) for a in commands]))
        full_env = dict(ENV)
        if "PYTHONPATH" in os.environ:  # a checkout under test (e.g. a worktree) stays the one imported
            full_env["PYTHONPATH"] = os.environ["PYTHONPATH"]
        full_env.update(env or {})
        proc = subprocess.run([sys.executable, "-c", _RUNNER, str(cmd_file), str(res_file)], cwd=workdir,
                              capture_output=True, text=True, env=full_env, timeout=timeout)
        assert proc.returncode == 0 and res_file.exists(), f"the batch process died:\n{proc.stderr[-3000:]}"
        return [Result(**r) for r in json.loads(res_file.read_text())]


def ptune(*args: str, workdir: str | Path | None = None) -> str:
    """One command alone in its own fresh process (the batch of one); returns stdout, asserting exit 0."""
    return run_batch([args], workdir=workdir)[0].check().stdout
