"""The CLI is generated from the registries and the config fields: help lists from METHODS, the built-in
tasks and HEAD_KINDS; one option group per method; values typed by the field's annotation; ``ptune serve``'s
limit flags from :class:`Limits`."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

from ptune.cli import build_parser, main
from ptune.data.builtin import BUILTIN_TASKS
from ptune.errors import ConfigError
from ptune.heads import HEAD_KINDS
from ptune.methods import METHODS
from ptune.options import flag, parse_value

SRC = Path(__file__).resolve().parents[1] / "src" / "ptune"


@pytest.fixture(autouse=True)
def _wide_help(monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # argparse wraps at the terminal's width, hyphenated names too


def help_of(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as e:
        main([*args, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def groups(text: str) -> dict[str, str]:
    """The help's sections by title ("--method lora options"), each its text."""
    out: dict[str, str] = {}
    title = None
    for line in text.splitlines():
        if line and not line[0].isspace() and line.endswith(":"):
            title = line[:-1]
            out[title] = ""
        elif title is not None:
            out[title] += line + "\n"
    return out


def options_in(section: str) -> set[str]:
    return {word for line in section.splitlines() for word in line.split()[:1] if word.startswith("--")}


def action(subcommand: str, dest: str):
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices[subcommand]
    return next(a for a in sub._actions if a.dest == dest)


def test_help_lists_every_method_task_and_head_kind(capsys):
    text = help_of(capsys, "train")
    flat = " ".join(text.split())
    sections = groups(text)
    for method in METHODS:
        assert method in action("train", "method").help
        assert f"--method {method} options" in sections, method
    for task in BUILTIN_TASKS:
        assert task in action("train", "task").help
        assert task in flat
    for head in HEAD_KINDS:
        assert head in action("train", "head").help
        assert head in flat


def test_each_method_has_its_own_option_group(capsys):
    sections = groups(help_of(capsys, "train"))
    assert "--r" in options_in(sections["--method lora options"])
    assert "--r" in options_in(sections["--method qlora options"])
    assert "--r" not in options_in(sections["--method prompt_tuning options"])
    assert "--num-virtual-tokens" in options_in(sections["--method prompt_tuning options"])
    assert "--num-virtual-tokens" not in options_in(sections["--method lora options"])
    for method, (cls, _) in METHODS.items():  # every option of a method is in its group
        own = {flag(f.name) for f in dataclasses.fields(cls)} - {"--template", "--seed", "--num-tasks"}
        assert own <= options_in(sections[f"--method {method} options"]), method
    # a shared flag is described by each method in its own words
    assert "get LoRA" in sections["--method lora options"]
    assert "get deep prompts" in sections["--method p_tuning_v2 options"]


def test_method_help_shows_that_methods_group(capsys):
    sections = groups(help_of(capsys, "train", "--method", "lora"))
    assert [t for t in sections if t.startswith("--method ")] == ["--method lora options"]
    assert {"--r", "--alpha", "--lora-dropout", "--target-modules", "--layers"} == \
        options_in(sections["--method lora options"])
    assert "--num-virtual-tokens" not in options_in("\n".join(sections.values()))
    compare = groups(help_of(capsys, "compare", "--methods", "lora,bitfit:lr=1e-3"))
    assert [t for t in compare if t.startswith("--method ")] == ["--method lora options", "--method bitfit options"]


@pytest.mark.parametrize("args, expected", [
    (["--method", "lora", "--r", "2.5"], "argument --r: expected an integer, got '2.5'"),
    (["--method", "lora", "--alpha", "big"], "argument --alpha: expected a number, got 'big'"),
    (["--method", "p_tuning", "--residual", "maybe"], "argument --residual: expected true or false, got 'maybe'"),
    (["--lr", "fast"], "argument --lr: expected a number or none, got 'fast'"),
    (["--batch-size", "8.5"], "argument --batch-size: expected an integer, got '8.5'"),
])
def test_a_value_of_the_wrong_type_is_one_line_naming_the_flag(capsys, args, expected):
    with pytest.raises(SystemExit) as e:
        main(["train", *args])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert err.startswith("ptune: error: ") and expected in err
    assert len(err.strip().splitlines()) == 1


def test_values_are_typed_by_the_fields_annotation():
    args = build_parser().parse_args(["train", "--method", "lora", "--r", "16", "--alpha", "0.5", "--target-modules",
                                      "query,value", "--layers", "none", "--lr", "5e-3", "--init-text", "42",
                                      "--residual", "yes", "--template", "null", "--max-length", "none"])
    options = {k.split(".", 1)[1]: v for k, v in vars(args).items() if k.startswith("method.")}
    assert options == {"r": 16, "alpha": 0.5, "target_modules": ("query", "value"), "layers": None,
                       "init_text": "42", "residual": True}  # init_text is text: 42 stays a string
    assert args.lr == 0.005 and args.template is None and args.max_length is None
    assert parse_value(float, "3") == 3 and isinstance(parse_value(float, "3"), int)  # an int is a float
    assert parse_value(str, "none") == "none"  # None only where the field allows it


def test_serve_flags_are_the_limits_fields():
    pytest.importorskip("fastapi")
    from ptune.options import field_docs
    from ptune.serve.schemas import Limits

    args = build_parser().parse_args(["serve", "runs/a"])
    given = {k.split(".", 1)[1]: v for k, v in vars(args).items() if k.startswith("limit.")}
    assert given == {f.name: f.default for f in dataclasses.fields(Limits)}
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["serve"]
    section = groups(sub.format_help())["limits (ptune.serve.Limits)"]
    assert options_in(section) == {flag(f.name) for f in dataclasses.fields(Limits)}
    flat = " ".join(section.split())
    for name, doc in field_docs(Limits).items():
        assert doc in flat, name
    assert build_parser().parse_args(["serve", "a", "--max-wait-ms", "2.5"]).__dict__["limit.max_wait_ms"] == 2.5


def test_serve_refuses_a_limit_of_the_wrong_type(capsys):
    with pytest.raises(SystemExit) as e:
        main(["serve", "runs/a", "--max-batch-size", "1.5"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "argument --max-batch-size: expected an integer, got '1.5'" in err
    assert len(err.strip().splitlines()) == 1


def test_study_settings_are_typed_by_their_fields():
    from ptune.studies.plan import compare_plan, sweep_plan

    plan = compare_plan("lora:r=16:lr=1e-3", (1,), {"method_options": {}})
    assert plan.variants[0].method_options == {"r": 16} and plan.variants[0].options["lr"] == 0.001
    with pytest.raises(ConfigError, match="r expected an integer, got '2.5'"):
        compare_plan("lora:r=2.5", (1,), {"method_options": {}})
    with pytest.raises(ConfigError, match="num_virtual_tokens expected an integer, got 'many'"):
        sweep_plan("num_virtual_tokens=5,many", (1,), {"method": "p_tuning"})


def test_no_head_name_is_compared_outside_heads():
    """The CLI and the studies ask a head kind's capabilities; a comparison with a head's name or label form
    (``task_type in ("tagging", ...)``) is the drift this guards against."""
    words = set(HEAD_KINDS) | {h.label_form for h in HEAD_KINDS.values()}
    files = [SRC / "cli.py", SRC / "options.py", *sorted((SRC / "studies").glob("*.py"))]
    found = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Compare):
                continue
            operands = [node.left, *node.comparators]  # == "tagging", in ("tagging", ...); not a dict key test
            literals = [c for o in operands for c in (o.elts if isinstance(o, (ast.Tuple, ast.List, ast.Set)) else [o])]
            for c in literals:
                if isinstance(c, ast.Constant) and c.value in words:
                    if any(isinstance(o, (ast.Tuple, ast.List, ast.Set)) for o in operands) or \
                            any(isinstance(op, (ast.Eq, ast.NotEq)) for op in node.ops):
                        found.append(f"{path.name}:{node.lineno} {c.value!r}")
    assert found == []
