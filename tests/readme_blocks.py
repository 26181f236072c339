"""The README's code blocks, found by their marker comments, and a runner for their shell lines.

Every ```bash / ```sh / ```python block of README.md (and an unlabelled block that holds commands)
is either run by a test or marked why not, with an HTML comment on the line before its fence:

    <!-- NAME -->                 the block is named: COVERED[NAME] is the test that runs it
    <!-- not-tested: REASON -->   the block is not run, for REASON (name the test that covers it instead)

A ```python block without a marker is run as it stands by test_readme.py::test_python_block_runs; a named
one by its COVERED test (e.g. the OpenAI client block, against a server).
tests/test_readme.py::test_every_block_is_run_or_marked fails on any other block ("mark or cover this
block"), and on a name nobody covers. The shell lines of a named block run through ``run_lines``:
``ptune`` lines with shortening flags, in one fresh interpreter (the package imports once: ~6 s on the
2-core development machine; ``run_groups`` runs several tests' blocks in one), any other line only when a
rule of the test says what to do with it, else the test fails naming the line.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import subprocess
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
SHELL = {"bash", "sh", "shell", "console", "zsh"}
PYTHON = {"python", "py", "python3", "pycon"}
COMMAND_START = re.compile(r"^\s*(\$ |ptune |python3? |pip |\./|torchrun |accelerate |curl )")

# block name -> the test that runs it (that test must read the block by this name)
COVERED = {
    "quick-start": "tests/test_readme.py::test_quick_start_blocks",
    "quick-start-then": "tests/test_readme.py::test_quick_start_blocks",
    "gemma-verbalizer": "tests/test_readme.py::test_causal_lm_blocks",
    "gemma-probing": "tests/test_readme.py::test_causal_lm_blocks",
    "gemma-generate": "tests/test_readme.py::test_causal_lm_blocks",
    "multitask-recipe": "tests/engine/test_readme_recipes.py::test_multitask_recipe_runs_as_written",
    "resume": "tests/test_readme.py::test_resume_block",
    "export": "tests/test_readme.py::test_export_block",
    "speed-layers": "tests/test_readme.py::test_speed_layers_block",
    "openai-client": "tests/test_serve_openai.py::test_readme_openai_block_runs_against_a_server",
}

# what a user would add to try a line quickly: seconds per line on the packaged MiniLM (fp32: bf16 autocast
# is 2-3x slower on a CPU without native bf16, such as the development machine's)
SHORTEN = {
    "train": ["--max-steps", "2", "--limit-train", "24", "--limit-eval", "16", "--max-length", "64",
              "--batch-size", "8", "--eval-batch-size", "16", "--precision", "fp32", "--no-progress"],
    "eval": ["--limit", "16"],
}
AS_WRITTEN = {"predict", "generate", "export"}  # quick as they stand, on the runs the lines before made


@dataclasses.dataclass
class Block:
    lang: str
    line: int  # 1-based line of the opening fence
    text: str
    marker: str | None

    @property
    def name(self) -> str | None:
        return self.marker if self.marker and re.fullmatch(r"[a-z0-9][a-z0-9-]*", self.marker) else None

    @property
    def not_tested(self) -> str | None:
        m = re.fullmatch(r"not-tested:\s*(.*)", self.marker or "", flags=re.S)
        return m.group(1).strip() if m else None

    @property
    def runnable(self) -> bool:
        """A block a user is meant to paste: shell or Python, or an unlabelled one holding commands."""
        if self.lang in SHELL | PYTHON:
            return True
        return self.lang == "" and any(COMMAND_START.match(x) for x in self.text.splitlines())

    def where(self, path: Path = README) -> str:
        first = next((x for x in self.text.splitlines() if x.strip()), "")
        return f"{path.name}:{self.line} ```{self.lang} block starting {first.strip()[:70]!r}"


def blocks(path: Path = README) -> list[Block]:
    lines = path.read_text().splitlines()
    out, i = [], 0
    while i < len(lines):
        m = re.match(r"^```\s*([\w+-]*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        j = next((k for k in range(i + 1, len(lines)) if lines[k].strip() == "```"), len(lines))
        end = next((k for k in range(i - 1, -1, -1) if lines[k].strip()), -1)  # the line before the fence
        start = end  # ... where the comment ending there starts (it may span lines)
        if end >= 0 and lines[end].rstrip().endswith("-->"):
            start = next((k for k in range(end, -1, -1) if "<!--" in lines[k]), end)
        comment = "\n".join(lines[start:end + 1]).strip() if end >= 0 else ""
        marker = re.fullmatch(r"<!--\s*(.*?)\s*-->", comment, flags=re.S)
        out.append(Block(m.group(1).lower(), i + 1, "\n".join(lines[i + 1:j]) + "\n",
                         " ".join(marker.group(1).split()) if marker else None))
        i = j + 1
    return out


def block(name: str, path: Path = README) -> Block:
    found = [b for b in blocks(path) if b.marker == name]
    assert len(found) == 1, f"{path.name} has {len(found)} blocks marked <!-- {name} --> (expected 1)"
    return found[0]


def commands(b: Block) -> list[tuple[int, list[str]]]:
    """The block's commands as argument lists, with README line numbers: continuation lines joined,
    comments dropped, ``a && b`` split. Any other shell operator stays in as a token (the runner refuses it)."""
    out, pending, start = [], "", 0
    for k, raw in enumerate(b.text.splitlines()):
        if not pending:
            start = b.line + 1 + k
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        lex = shlex.shlex(pending + raw, posix=True, punctuation_chars=True)
        lex.whitespace_split = True
        tokens, pending = list(lex), ""
        cmd: list[str] = []
        for t in [*tokens, "&&"]:
            if t == "&&":
                if cmd:
                    out.append((start, cmd))
                cmd = []
            else:
                cmd.append(t)
    return out


DRIVER = r"""
import contextlib, io, json, os, sys, time
from ptune.cli import main
items = json.load(open(sys.argv[1]))
results, failed = [], set()
for item in items:
    if item.get("group", "") in failed:  # a failed line stops the rest of its group (of all lines, without groups)
        continue
    os.chdir(item["cwd"])
    out, err, t0 = io.StringIO(), io.StringIO(), time.perf_counter()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(item["argv"])
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else int(e.code is not None)
    results.append({**item, "rc": rc, "stdout": out.getvalue(), "stderr": err.getvalue(),
                    "seconds": round(time.perf_counter() - t0, 1)})
    json.dump(results, open(sys.argv[2], "w"))
    if rc:
        failed.add(item.get("group", ""))
"""


def run_lines(items: list[dict], tmp_path: Path, timeout: int = 600) -> list[dict]:
    """Run ``ptune`` argument lists (``{"argv", "cwd", "where"}``) in order, in ONE fresh interpreter
    (offline, its own cwd per item); stops at the first failure and asserts every line exited 0."""
    return check_lines(items, *_run(items, tmp_path, timeout))


def run_groups(groups: dict[str, list[dict]], tmp_path: Path, timeout: int = 900) -> dict[str, tuple[list, list]]:
    """Several blocks' lines (each group in its own cwd, as its test planned them) in ONE fresh interpreter, so
    the package imports once for all of them; a failing line stops its own group only. Returns, per group, its
    items and what :func:`check_lines` needs: ``check_lines(*result)`` asserts as :func:`run_lines` does."""
    items = [{**item, "group": name} for name, group in groups.items() for item in group]
    results, stderr = _run(items, tmp_path, timeout)
    return {name: (group, [r for r in results if r["group"] == name], stderr) for name, group in groups.items()}


def _run(items: list[dict], tmp_path: Path, timeout: int) -> tuple[list[dict], str]:
    (tmp_path / "lines.json").write_text(json.dumps(items))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1"}  # tiny batches gain nothing from a second thread; on a shared machine it costs ~3x
    proc = subprocess.run([sys.executable, "-c", DRIVER, str(tmp_path / "lines.json"), str(tmp_path / "out.json")],
                          cwd=tmp_path, capture_output=True, text=True, env=env, timeout=timeout)
    results = json.loads((tmp_path / "out.json").read_text()) if (tmp_path / "out.json").exists() else []
    return results, (proc.stderr or f"(exit {proc.returncode})") if proc.returncode else ""


def check_lines(items: list[dict], results: list[dict], stderr: str = "") -> list[dict]:
    """Every line ran and exited 0 (else the first failure, or how the runner died); returns the results."""
    for r in results:
        assert r["rc"] == 0, f"{r['where']}: ptune {shlex.join(r['argv'])} exited {r['rc']}:\n{r['stderr'][-2000:]}"
    assert not stderr and len(results) == len(items), \
        f"the README line runner stopped after {len(results)} of {len(items)} lines:\n{stderr[-3000:]}"
    return results


def plan(b: Block, cwd: Path, rules: list[tuple[str, object]], substitute=None) -> list[dict]:
    """The block's commands as runner items: ``ptune`` lines get SHORTEN's flags for their sub-command
    (``--help`` lines none); any other command must match a rule ``(regex, reason)`` or ``(regex,
    (reason, check))``: it is skipped with a warning giving the reason, after ``check(argv)`` checks
    what can be checked without running it. A command no rule names fails the test."""
    items = []
    for line, argv in commands(b):
        text = shlex.join(argv)
        where = f"README.md:{line}"
        if argv[0] == "ptune" and not set(argv) & {"|", ";", "||", "&", ">", ">>", "<"}:
            args = substitute(argv[1:]) if substitute else argv[1:]
            assert args and (args[0] in SHORTEN or args[0] in AS_WRITTEN or "--help" in args), (
                f"{where}: `{text}`: the runner does not know how to shorten `ptune {args[0] if args else ''}`: "
                "add it to tests/readme_blocks.py SHORTEN or AS_WRITTEN (a server, which never ends, cannot run "
                "here: mark its block <!-- not-tested: reason --> naming the test that covers it)")
            extra = [] if "--help" in args else SHORTEN.get(args[0], [])
            items.append({"argv": [*args, *extra], "cwd": str(cwd), "where": where})
            continue
        rule = next((r for pattern, r in rules if re.fullmatch(pattern, text)), None)
        assert rule is not None, (f"{where}: `{text}` is neither run nor skipped with a reason: mark or cover this "
                                  "line (a rule in tests/test_readme.py, or <!-- not-tested: reason --> on its block)")
        reason, check = rule if isinstance(rule, tuple) else (rule, None)
        if check:
            check(argv)
        warnings.warn(f"{where}: not run: `{text}`: {reason}", UserWarning, stacklevel=2)
    return items
