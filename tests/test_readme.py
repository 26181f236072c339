"""README.md's code runs as written, or says why not; the docs' links stay inside the repository.

The scheme (tests/readme_blocks.py): a ```python block runs as it stands, in a fresh interpreter in an
empty folder; a shell block is named by the marker comment before it (``<!-- quick-start -->``) and run
by the test COVERED names, line by line with shortening flags on the packaged MiniLM (a tiny random
GPT-2 where the README says ``--model gemma``), later lines using the runs earlier lines made; or it
is marked ``<!-- not-tested: reason -->``. A block that is neither fails test_every_block_is_run_or_marked.
"""

from __future__ import annotations

import functools
import json
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from readme_blocks import COVERED, PYTHON, README, ROOT, SHORTEN, Block, block, blocks, check_lines, plan, run_groups

BBC_LABELS = ("business", "entertainment", "politics", "sports", "tech")
DOCS = ("README.md", "BENCHMARKS.md", "ARCHITECTURE.md")


def uncovered(path: Path = README) -> list[str]:
    """Every runnable block that no test runs and no marker excuses, as one line each."""
    problems = []
    for b in blocks(path):
        if not b.runnable or b.lang in PYTHON and b.not_tested is None and b.name is None:  # test_python_block_runs
            continue
        if b.not_tested == "":
            problems.append(f"{b.where(path)}: its <!-- not-tested: --> marker gives no reason")
        elif b.not_tested is None and b.name not in COVERED:
            problems.append(f"{b.where(path)}: mark or cover this block: put <!-- not-tested: reason --> on the line "
                            "before its fence, or name it <!-- NAME --> there and run it in a test listed in "
                            "tests/readme_blocks.py COVERED" + (f" (its marker {b.marker!r} is not a covered name)"
                                                                if b.marker else ""))
    return problems


def test_every_block_is_run_or_marked():
    problems = uncovered()
    assert not problems, "\n".join(problems)


def test_each_covered_name_is_one_block_that_its_test_reads():
    names = [b.name for b in blocks() if b.name]
    for name, test in COVERED.items():
        assert names.count(name) == 1, f"README.md has {names.count(name)} blocks marked <!-- {name} --> ({test})"
        path, func = test.split("::")
        source = (ROOT / path).read_text()
        assert f"def {func}(" in source, f"{test} does not exist (it should run the README block {name!r})"
        assert f'"{name}"' in source, f"{test} never reads the README block {name!r}"


NEW_BLOCKS = """# x

```bash
ptune compare --methods lora,bitfit
```

<!-- not-tested: -->
```sh
ls
```

<!-- not-tested: needs a GPU,
     over two lines -->
```bash
nvidia-smi
```

<!-- some-new-name -->
```bash
ls
```

```python
print(1)
```

```
src/
  cli.py
```

```
$ ptune train
```
"""


def test_the_check_fails_on_a_new_block(tmp_path):
    doc = tmp_path / "README.md"
    doc.write_text(NEW_BLOCKS)
    assert blocks(doc)[2].not_tested == "needs a GPU, over two lines"
    problems = uncovered(doc)
    assert len(problems) == 4, problems
    assert "README.md:3 ```bash block starting 'ptune compare --methods lora,bitfit': mark or cover this block" \
        in problems[0]
    assert "gives no reason" in problems[1] and "'some-new-name' is not a covered name" in problems[2]
    assert "README.md:32 ``` block starting '$ ptune train'" in problems[3]
    with pytest.raises(AssertionError, match="`rm -rf runs` is neither run nor skipped with a reason: mark or cover"):
        plan(Block("bash", 1, "ptune eval runs/x\nrm -rf runs\n", "x"), tmp_path, [])
    with pytest.raises(AssertionError, match="does not know how to shorten `ptune compare`"):
        plan(blocks(doc)[0], tmp_path, [])


@pytest.mark.parametrize("index", [i for i, b in enumerate(blocks())  # named ones: their COVERED test runs them
                                   if b.lang in PYTHON and b.not_tested is None and b.name is None])
def test_python_block_runs(index, tmp_path):
    code = blocks()[index].text
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    if "model.spec.base.name" in code:
        assert "minilm [P:3] {text} [P:2] topic [P:1]" in proc.stdout


def test_readme_has_python_blocks():
    assert any(b.lang in PYTHON for b in blocks())


def test_import_ptune_reaches_every_name_the_docs_use():
    """``ptune.batching.collate``, ``ptune.engine.Run``, ``ptune.serve.create_app``, ... after a bare
    ``import ptune`` in a fresh interpreter (the README's API example once failed this way)."""
    names = sorted({m.rstrip(".") for doc in DOCS
                    for m in re.findall(r"\bptune\.[A-Za-z_][\w.]*", (ROOT / doc).read_text())})
    assert "ptune.batching.collate" in names and "ptune.serve.create_app" in names
    code = ("import functools, ptune, sys\nbad = []\nfor n in sys.argv[1:]:\n    try:\n"
            "        functools.reduce(getattr, n.split('.')[1:], ptune)\n    except Exception as e:\n"
            "        bad.append(f'{n}: {e!r}')\nprint('\\n'.join(bad))\n")
    proc = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True)
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr[-2000:]


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@functools.cache
def _anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {_slug(h) for h in re.findall(r"^#{1,6}\s+(.*?)\s*#*$", text, flags=re.M)}


def broken_links(path: Path, root: Path = ROOT) -> list[str]:
    """Relative links (markdown, reference-style, HTML src/href) that leave the repository or lead nowhere,
    and mentions of the ``../shared`` folder beside the checkout."""
    text = path.read_text()
    outside = r"[^\s()\[\]`'\"]*(?:\.\./shared|/work/shared)[^\s()`'\"]*"
    bad = [f"{m} (outside the repository)" for m in re.findall(outside, text)]
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    targets = re.findall(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", prose)
    targets += re.findall(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", prose, flags=re.M)
    targets += re.findall(r"(?:src|href)=\"([^\"]+)\"", prose)
    for target in targets:
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.is_relative_to(root) or not dest.exists():
            bad.append(f"{target} (no such file in the repository)")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            bad.append(f"{target} (no heading #{anchor} in {dest.name})")
    return bad


@pytest.mark.parametrize("doc", DOCS)
def test_links_resolve_inside_the_repository(doc):
    bad = broken_links(ROOT / doc)
    assert not bad, f"{doc}: broken links: {bad}"


def test_the_link_check_fails_on_a_broken_link(tmp_path):
    root = tmp_path / "repo"
    (root / "docs").mkdir(parents=True)
    (root / "docs" / "a.png").write_bytes(b"")
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "ASSETS.md").write_text("# Assets\n")
    doc = root / "README.md"
    doc.write_text("# Top\n\n## Quick start\n[ok](README.md#quick-start) [a](#top) [b](#nowhere) [c](nofile.md)\n"
                   "[d](../shared/ASSETS.md) ![e](docs/a.png) [f](https://example.com) <img src=\"docs/b.png\">\n")
    assert broken_links(doc, root) == ["../shared/ASSETS.md (outside the repository)", "#nowhere (no heading #nowhere "
                                       "in README.md)", "nofile.md (no such file in the repository)",
                                       "../shared/ASSETS.md (no such file in the repository)",
                                       "docs/b.png (no such file in the repository)"]


# --- the shell blocks, grouped so each group starts one interpreter ---------------------------------------------

def _install_extras_exist(argv: list[str]) -> None:
    section = (ROOT / "pyproject.toml").read_text().split("[project.optional-dependencies]")[1].split("\n[")[0]
    extras = set(re.findall(r"^([\w-]+)\s*=", section, flags=re.M))  # (tomllib is Python 3.11+)
    assert {"test", "gemma", "serve"} <= extras, extras
    asked = {e for a in argv[1:] for e in a.split(",")}
    assert (ROOT / "install.sh").stat().st_mode & 0o111, "install.sh is not executable"
    assert asked <= extras, f"./install.sh {' '.join(argv[1:])}: no extra {sorted(asked - extras)} in pyproject.toml"


SETUP_RULES = [
    (r"python3 -m venv \.venv", "creates a virtual environment (the suite already runs in one)"),
    (r"\. \.venv/bin/activate", "activates that environment"),
    (r"\./install\.sh( [\w,]+)?", ("pip-installs from PyPI (network, minutes); its extras are checked against "
                                   "pyproject.toml", _install_extras_exist)),
    (r"python -m pytest -q", "the test suite itself, which this test is part of"),
]


def _quick_start(cwd: Path, tiny_gpt2_dir: str) -> list[dict]:
    return plan(block("quick-start"), cwd, SETUP_RULES) + plan(block("quick-start-then"), cwd, SETUP_RULES)


def _causal_lm(cwd: Path, tiny_gpt2_dir: str) -> list[dict]:
    def substitute(args):
        args = [tiny_gpt2_dir if a == "gemma" and args[k - 1] == "--model" else a for k, a in enumerate(args)]
        return ["runs/probe-capital" if a == "RUN" else a for a in args]  # the README's placeholder run

    rules = [(r"python bench/gemma_tables\.py .*", "the real Gemma tables: ~25 minutes on 2 cores")]
    warnings.warn("README's `--model gemma` lines run on a tiny random GPT-2 (the Gemma extra is too slow here)",
                  UserWarning, stacklevel=1)
    return [i for name in ("gemma-verbalizer", "gemma-probing", "gemma-generate")
            for i in plan(block(name), cwd, rules, substitute)]


def _resume(cwd: Path, tiny_gpt2_dir: str) -> list[dict]:
    items = plan(block("resume"), cwd, [])
    if len(items) == 2:  # (test_resume_block checks the shape)
        items[1]["argv"] += ["--max-steps", "4"]
    return items


def _export(cwd: Path, tiny_gpt2_dir: str) -> list[dict]:
    setup = plan(Block("bash", 0, "ptune train --method lora --pooling pooler --output-dir runs/x\n", None), cwd, [])
    return setup + plan(block("export"), cwd, [])


def _speed_layers(cwd: Path, tiny_gpt2_dir: str) -> list[dict]:
    return plan(block("speed-layers"), cwd, SETUP_RULES)


SHELL_GROUPS = {"quick-start": _quick_start, "causal-lm": _causal_lm, "resume": _resume, "export": _export,
                "speed-layers": _speed_layers}


@pytest.fixture(scope="module")
def shell_runs(tmp_path_factory, tiny_gpt2_dir):
    """The shell blocks the tests below check, each group planned in its own empty folder (its runs/ where
    the README's lines put them), all run in ONE fresh interpreter: the package imports once instead of once
    per test; a failing line stops its own group only, a block that cannot be planned fails its own test only."""
    root = tmp_path_factory.mktemp("readme-shell")
    groups, refused = {}, {}
    for name, make in SHELL_GROUPS.items():
        (root / name).mkdir()
        try:
            groups[name] = make(root / name, tiny_gpt2_dir)
        except AssertionError as e:  # a line no rule covers: its test fails with the message
            refused[name] = e
    ran = run_groups(groups, root)
    return {name: refused.get(name) or (root / name, *ran[name]) for name in SHELL_GROUPS}


def _group(shell_runs, name: str) -> tuple[Path, list[dict], list]:
    """(its folder, its items, what check_lines takes) for one group of ``shell_runs``."""
    got = shell_runs[name]
    if isinstance(got, AssertionError):
        raise got
    folder, items, *ran = got
    return folder, items, ran


def test_quick_start_blocks(shell_runs):
    tmp_path, items, ran = _group(shell_runs, "quick-start")
    assert [i["argv"][0] for i in items] == ["train", "predict", "eval", *["train"] * 6], items
    out = check_lines(items, *ran)
    first = out[0]["stdout"]
    assert re.search(r"p_tuning_v2: [\d,]+ trainable of [\d,]+ parameters \([\d.]+%\)", first), first
    assert "ptune: adapter: runs/default/best" in first and "runs/default/metrics.jsonl" in first, first
    for f in ("best/adapter_config.json", "metrics.jsonl", "summary.json"):
        assert (tmp_path / "runs" / "default" / f).is_file(), f
    assert out[1]["stdout"].split("\t")[0] in BBC_LABELS, out[1]["stdout"]
    # `ptune eval --split test --limit 16` rebuilds the run from best/ alone; the training run scored the same
    # first 16 test records (--limit-eval 16) with the model it saved: the two numbers are one number
    summary = json.loads((tmp_path / "runs" / "default" / "summary.json").read_text())
    assert json.loads(out[2]["stdout"])["accuracy"] == pytest.approx(summary["test"]["accuracy"], abs=1e-9)
    configs = {run: json.loads((tmp_path / "runs" / run / "best" / "adapter_config.json").read_text())
               for run in ("pt", "pt1", "wnut", "lora", "adalora")}
    assert {run: c["method"] for run, c in configs.items()} == {
        "pt": "prompt_tuning", "pt1": "p_tuning", "wnut": "p_tuning_v2", "lora": "lora", "adalora": "adalora"}
    assert configs["pt"]["method_config"]["num_virtual_tokens"] == 20
    assert configs["pt"]["method_config"]["init"] == "labels"
    assert configs["pt1"]["template"] == "[P:3] {text} [P:3]" and configs["pt1"]["method_config"]["encoder"] == "lstm"
    assert "f1" in (tmp_path / "runs" / "wnut" / "summary.json").read_text()
    assert "--config" in out[-1]["stdout"] and "--num-virtual-tokens" in out[-1]["stdout"]


def _zero_shot_hit_rate(model: str, task: str, limit: int = SHORTEN["eval"][1]) -> float:
    """The hit rate of the zero-shot model's predictions on the first ``limit`` test records (as `eval --limit`)."""
    from ptune.engine import Run, TrainConfig

    run = Run.zero_shot(TrainConfig(model=model, task=task))
    records = run.splits["test"][:int(limit)]
    field = run.task.label_field
    hits = [p["label"] == r[field] for p, r in zip(run.predict(records), records)]
    assert len(hits) == int(limit)
    return sum(hits) / len(hits)


def test_causal_lm_blocks(shell_runs, tiny_gpt2_dir):
    """The Gemma lines with a tiny random GPT-2 for ``--model gemma`` (the Gemma extra, its one-minute
    conversion and its 270M parameters are too slow for the suite): the options, templates, tasks and the
    run each line makes are checked; the numbers are not."""
    tmp_path, items, ran = _group(shell_runs, "causal-lm")  # "gemma-verbalizer", "gemma-probing", "gemma-generate"
    assert [i["argv"][0] for i in items] == ["eval", "train", "eval", "train", "generate", "generate"], items
    out = check_lines(items, *ran)
    # the zero-shot numbers against a reference computed here: the share of the first 16 test records whose
    # label the same frozen model's predictions name (eval and predict are separate paths over one prompt)
    assert json.loads(out[0]["stdout"])["accuracy"] == pytest.approx(_zero_shot_hit_rate(tiny_gpt2_dir, "bbc"))
    assert json.loads(out[2]["stdout"])["precision_at_1"] == pytest.approx(
        _zero_shot_hit_rate(tiny_gpt2_dir, "lama-capital"))
    config = json.loads((tmp_path / "runs" / "gemma-bbc-pt" / "best" / "adapter_config.json").read_text())
    assert config["method"] == "p_tuning" and config["head"]["kind"] == "verbalizer", config["head"]
    assert len(out[4]["stdout"].strip().splitlines()) == 2, out[4]["stdout"]  # Peru, Canada


def test_resume_block(shell_runs):
    """Train, then ``--resume`` with a longer run (the length of a run may change freely on resume)."""
    tmp_path, items, ran = _group(shell_runs, "resume")  # the block "resume", its second line given --max-steps 4
    assert [("--resume" in i["argv"]) for i in items] == [False, True], items
    assert items[1]["argv"][-2:] == ["--max-steps", "4"]
    out = check_lines(items, *ran)
    assert "(step 2)" in out[0]["stdout"] and "--save-every" in " ".join(items[0]["argv"])
    run = tmp_path / "runs" / "x"
    assert json.loads((run / "summary.json").read_text())["steps"] == 4, out[1]["stdout"]
    history = json.loads((run / "config.json").read_text())["history"]  # the accepted change, with its step
    assert history[0]["step"] == 2 and history[0]["changed"]["max_steps"] == [2, 4], history


def test_export_block(shell_runs):
    """The block exports ``runs/x``, which it does not make: here a LoRA run with ``--pooling pooler``, the
    case the section's table shows exact in both formats (prompt methods cannot be merged)."""
    tmp_path, items, ran = _group(shell_runs, "export")  # a setup line, then the block "export"
    assert [i["argv"][0] for i in items] == ["train", "export", "export", "export"], items
    check_lines(items, *ran)
    assert (tmp_path / "runs/x/export-peft/adapter_config.json").is_file()
    assert (tmp_path / "runs/x/export-merged/config.json").is_file()
    report = json.loads((tmp_path / "my_peft" / "ptune_export.json").read_text())
    assert report["exact"] is True, report


def test_speed_layers_block(shell_runs):
    """The --layers lines: each run puts its method in the named layers and says what work it skips."""
    tmp_path, items, ran = _group(shell_runs, "speed-layers")  # the block "speed-layers"
    assert [i["argv"][0] for i in items] == ["train", "train"], items
    out = check_lines(items, *ran)
    configs = {run: json.loads((tmp_path / "runs" / run / "best" / "adapter_config.json").read_text())
               for run in ("top3", "lora-top")}
    assert configs["top3"]["method_config"]["layers"] == "top:3"
    assert configs["lora-top"]["method_config"]["layers"] == "4-6"
    for o in out:
        assert "skipped work: outputs of frozen layers 1-3 cached per row" in o["stdout"], o["stdout"]
    assert "bfloat16" in out[1]["stdout"]
    lora = json.loads((tmp_path / "runs" / "lora-top" / "summary.json").read_text())
    assert lora["frozen_work"]["computed_batches"] > 0
