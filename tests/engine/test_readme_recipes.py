"""The README's multi-task recipe runs as written, line by line, in fresh processes on the packaged MiniLM.

Each ``ptune`` line of the block after ``<!-- multitask-recipe -->`` runs with its own arguments;
training lines get ``--max-steps 2`` and small data limits appended (the options a user would
shorten a trial with), evaluation lines ``--limit``. Later lines use the runs earlier lines made, so
the recipe is checked as a sequence: train, eval, predict, warm start, ensemble, vote.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"
SHORT_TRAIN = ["--max-steps", "2", "--limit-train", "24", "--limit-eval", "16", "--batch-size", "8",
               "--eval-batch-size", "16", "--no-progress"]


def recipe_lines(marker: str) -> list[list[str]]:
    text = README.read_text()
    block = re.search(re.escape(marker) + r"\n```bash\n(.*?)```", text, flags=re.S)
    assert block, f"README lost its {marker} block"
    lines = []
    for line in block.group(1).splitlines():
        line = line.split(" #")[0].strip()
        if line.startswith("ptune "):
            lines.append(shlex.split(line)[1:])
    return lines


def test_multitask_recipe_runs_as_written(tmp_path):
    lines = recipe_lines("<!-- multitask-recipe -->")
    assert [a[0] for a in lines] == ["train", "eval", "eval", "predict", "train", "train", "train", "predict",
                                     "train", "predict"]
    mixed = re.search(r"<!-- mixed-jsonl -->\n```json\n(.*?)```", README.read_text(), flags=re.S)
    (tmp_path / "mixed.jsonl").write_text(mixed.group(1))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    for args in lines:
        extra = SHORT_TRAIN if args[0] == "train" else (["--limit", "16"] if args[0] == "eval" else [])
        r = subprocess.run([sys.executable, "-m", "ptune.cli", *args, *extra], cwd=tmp_path, capture_output=True,
                           text=True, env=env, timeout=300)
        assert r.returncode == 0, f"ptune {' '.join(args)}: {r.stderr[-2000:]}"
        if args[:2] == ["eval", "runs/mt"] and "--task" not in args:
            assert '"bbc/accuracy"' in r.stdout and '"wnut/f1"' in r.stdout and '"mean_score"' in r.stdout
        if "--init-from" in args:
            assert "warm start from runs/pre/best" in r.stdout
        if args[0] == "predict" and "--adapter" in args:  # one line per row: adapter, then its answer
            out = r.stdout.splitlines()
            assert [x.split("\t")[0] for x in out] == ["bbc", "wnut", "bbc"]
            assert "/" in out[1]  # the tagging adapter answers token/tag pairs
        elif args[0] == "predict":
            assert r.stdout.split("\t")[0] in ("business", "entertainment", "politics", "sports", "tech")
    assert (tmp_path / "runs" / "ens" / "best" / "adapter_config.json").is_file()
