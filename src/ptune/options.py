"""Command-line options generated from the config dataclasses: one flag per field, named after the
field, typed by its annotation and described by its docstring.

The ``ptune`` command (``cli.py``) and the study commands (``studies/``) build their flags here, so a
YAML key, a flag and a Python field share one name, one type and one description, and the lists in
the help (methods, built-in tasks, head kinds) are read from their registries. Each method's options
form one argument group (``ptune.methods.METHODS``); a flag shared by several methods (``--r``: LoRA
and QLoRA) is one flag, listed in each of their groups. A value that does not fit the field's type
(``--r 2.5``) is refused by argparse with one line naming the flag and the type it wants. Values are
only converted here; ranges and choices are checked by the configs themselves. Not handled: dict-valued
fields (``method_options`` is gathered from the method flags; multi-task entries come from ``--config``).
"""

from __future__ import annotations

import argparse
import ast
import copy
import dataclasses
import functools
import types
import typing
from pathlib import Path
from typing import Any, Callable, Sequence

from .data.builtin import BUILTIN_TASKS
from .engine.config import TrainConfig
from .errors import ConfigError
from .heads import HEAD_KINDS
from .methods import METHODS, method_entry

NONE_WORDS = ("null", "none", "~")  # an Optional field given one of these is None
BOOL_WORDS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}
NOT_METHOD_FLAGS = ("num_tasks",)  # follows from --task a,b / --ensemble, never given by hand


# ------------------------------------------------------------------------------- values, by annotation

def _unwrap(annotation: Any) -> tuple[Any, bool]:
    """(the annotation without ``None``, whether ``None`` is allowed): ``int | None`` -> (int, True)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        rest = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(rest) != 1:
            raise TypeError(f"no flag type for {annotation}: one type, optionally with None")
        return rest[0], True
    return annotation, False


def _is_str_tuple(kind: Any) -> bool:
    return typing.get_origin(kind) is tuple and typing.get_args(kind) == (str, ...)


def describe(annotation: Any) -> str:
    """What a value of the type looks like, for errors: ``int | None`` -> 'an integer or none'."""
    kind, optional = _unwrap(annotation)
    if _is_str_tuple(kind):
        text = "a comma-separated list"
    else:
        text = {int: "an integer", float: "a number", bool: "true or false", str: "text"}.get(kind)
        if text is None:
            raise TypeError(f"no flag type for {annotation}")
    return text + (" or none" if optional else "")


def metavar(annotation: Any) -> str:
    kind, _ = _unwrap(annotation)
    return "A,B,..." if _is_str_tuple(kind) else {int: "INT", float: "NUMBER", bool: "BOOL"}.get(kind, "TEXT")


def parse_value(annotation: Any, text: str) -> Any:
    """``text`` as a value of ``annotation`` (int, float, bool, str, tuple[str, ...], or one of them | None);
    ValueError('expected ...') when it is not one. An integer given for a float field stays an int (an int
    is a float in Python's numeric tower), so names and saved configs read as the user wrote them."""
    kind, optional = _unwrap(annotation)
    word = text.strip().lower()
    if optional and word in NONE_WORDS:
        return None
    try:
        if kind is bool:
            return BOOL_WORDS[word]
        if kind is int:
            return int(text)
        if kind is float:
            try:
                return int(text)
            except ValueError:
                return float(text)
        if kind is str:
            return text
        if _is_str_tuple(kind):
            items = [s.strip() for s in text.strip().removeprefix("[").removesuffix("]").split(",")]
            if not all(items):
                raise ValueError(text)
            return tuple(items)
    except (KeyError, ValueError):
        raise ValueError(f"expected {describe(annotation)}, got {text!r}") from None
    raise TypeError(f"no flag type for {annotation}")


def flag_type(annotation: Any) -> Callable[[str], Any]:
    """An argparse ``type=``: a bad value becomes argparse's one-line error naming the flag."""
    describe(annotation)  # an annotation with no flag type fails when the parser is built

    def convert(text: str) -> Any:
        try:
            return parse_value(annotation, text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return convert


# ----------------------------------------------------------------------------------- fields and docs

def type_hints(cls: type) -> dict[str, Any]:
    """``typing.get_type_hints(cls)``, evaluated once per class and process (the annotations are strings, and
    building the parser asks TrainConfig's 17 times); a copy, free to change."""
    return dict(_type_hints(cls))


@functools.lru_cache(maxsize=None)
def _type_hints(cls: type) -> tuple[tuple[str, Any], ...]:
    return tuple(typing.get_type_hints(cls).items())


def field_docs(cls: type) -> dict[str, str]:
    """Each field's attribute docstring (the string under it), read by docstring_parser: the docs live
    next to the field once, and --help, the API and the YAML keys share them. Inherited fields too."""
    return dict(_field_docs(cls))


@functools.lru_cache(maxsize=None)
def _field_docs(cls: type) -> tuple[tuple[str, str], ...]:
    """field_docs, read once per class and process: building the parser asks TrainConfig's and each method's
    docs once per subcommand, and each read parses the class's module source (~15 ms)."""
    import docstring_parser  # reads the class's source: only when a parser is built

    out: dict[str, str] = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):
        for param in docstring_parser.parse_from_object(klass).params:
            if param.description:
                out[param.arg_name] = " ".join(param.description.split())
    return tuple(out.items())


@dataclasses.dataclass(frozen=True)
class SourceField:
    """One dataclass field as its source declares it."""

    name: str
    annotation: Any
    default: Any
    doc: str


SOURCE_TYPES = {"int": int, "float": float, "bool": bool, "str": str}


def fields_in_source(path: Path, class_name: str) -> list[SourceField]:
    """The fields of dataclass ``class_name`` in the file ``path`` (name, a builtin type, a literal default,
    the docstring under it), read with ``ast`` without importing the module: ``ptune serve --help`` works
    without the serve extra that ``ptune.serve`` imports."""
    tree = ast.parse(Path(path).read_text(), str(path))
    cls = next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == class_name), None)
    if cls is None:
        raise TypeError(f"{path} defines no class {class_name}")
    out = []
    for node, after in zip(cls.body, [*cls.body[1:], None]):
        if not isinstance(node, ast.AnnAssign) or not isinstance(node.target, ast.Name) or node.value is None:
            continue
        doc = after.value.value if isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) else ""
        out.append(SourceField(node.target.id, SOURCE_TYPES[ast.unparse(node.annotation)],
                               ast.literal_eval(node.value), " ".join(str(doc).split())))
    return out


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def with_default(text: str, default: Any) -> str:
    """A help text ending with the default as a flag would take it (a tuple as A,B)."""
    shown = ",".join(default) if isinstance(default, tuple) else default
    return f"{text} (default {shown})".strip()


def add_field_flag(container: Any, name: str, annotation: Any, default: Any, text: str, *, dest: str | None = None,
                   keep_default: bool = False) -> argparse.Action:
    """``--NAME`` for one field: a plain bool is ``--name / --no-name``, anything else takes a value of the
    field's type. Unless ``keep_default``, an absent flag leaves no value (the config's default applies)."""
    text = with_default(text, default)
    value = default if keep_default else argparse.SUPPRESS
    if annotation is bool:
        return container.add_argument(flag(name), dest=dest or name, action=argparse.BooleanOptionalAction,
                                      default=value, help=text)
    return container.add_argument(flag(name), dest=dest or name, type=flag_type(annotation), default=value,
                                  metavar=metavar(annotation), help=text)


# --------------------------------------------------------------------------------- training options

def train_help() -> dict[str, str]:
    """Help for the TrainConfig fields whose text lists a registry (the rest is the field's docstring)."""
    return {
        "task": f"a built-in task ({', '.join(BUILTIN_TASKS)}) or a task YAML file; several comma-separated "
                "(bbc,wnut) train one multi-task adapter; with a run (eval/predict): one task of a multi-task run",
        "method": " | ".join(METHODS),
        "head": f"auto: the task's own head; or a head kind of the same label form ({', '.join(HEAD_KINDS)})",
    }


def train_fields() -> dict[str, Any]:
    """TrainConfig's fields set by flags (all but ``method_options``), with their annotations."""
    hints = type_hints(TrainConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(TrainConfig) if f.name != "method_options"}


def add_config_flags(container: Any, names: Sequence[str], dest_prefix: str = "") -> None:
    """One flag per named TrainConfig field, help from the registries or the field's docstring."""
    hints, docs, generated = train_fields(), field_docs(TrainConfig), train_help()
    for f in dataclasses.fields(TrainConfig):
        if f.name in names:
            add_field_flag(container, f.name, hints[f.name], f.default, generated.get(f.name) or docs.get(f.name, ""),
                           dest=dest_prefix + f.name)


@dataclasses.dataclass(frozen=True)
class MethodOption:
    """A method option: one flag for every method whose config has a field of this name."""

    name: str
    annotation: Any
    methods: tuple[str, ...]
    docs: tuple[str, ...]  # each method's own description of it (LoRA's --layers is not P-Tuning v2's)


def _widen(name: str, a: Any, b: Any) -> Any:
    """The one type of an option two methods share; ``int`` and ``int | None`` give ``int | None``."""
    (ka, na), (kb, nb) = _unwrap(a), _unwrap(b)
    if ka != kb:
        raise TypeError(f"method option {name} is {a} in one method and {b} in another: one flag name must mean "
                        "one thing (rename one of them)")
    return typing.Optional[ka] if na or nb else ka


def method_options() -> dict[str, MethodOption]:
    """Every method option of ``METHODS`` (not TrainConfig's fields), in registry order."""
    train = train_fields()
    out: dict[str, MethodOption] = {}
    for method, (cls, _) in METHODS.items():
        hints, docs = type_hints(cls), field_docs(cls)
        for f in dataclasses.fields(cls):
            if f.name in train or f.name in NOT_METHOD_FLAGS:
                continue
            seen = out.get(f.name)
            if seen is None:
                out[f.name] = MethodOption(f.name, hints[f.name], (method,), (docs.get(f.name, ""),))
            else:
                out[f.name] = dataclasses.replace(seen, annotation=_widen(f.name, seen.annotation, hints[f.name]),
                                                  methods=(*seen.methods, method),
                                                  docs=(*seen.docs, docs.get(f.name, "")))
    return out


def group_title(method: str) -> str:
    return f"--method {method} options"


def add_method_options(p: argparse.ArgumentParser, shown: Sequence[str] | None = None) -> None:
    """One argument group per method with its options (dest ``method.NAME``): every method's, or only
    those of ``shown`` (``ptune train --method lora --help``). Every flag parses either way; a flag of a
    method not shown is hidden from the help, and the method config refuses an option it lacks."""
    options = method_options()
    actions: dict[str, argparse.Action] = {}
    for method, (cls, _) in METHODS.items():
        if shown is not None and method not in shown:
            continue
        own = [(options[f.name], f) for f in dataclasses.fields(cls) if f.name in options]
        group = p.add_argument_group(group_title(method), None if own else f"{method} has no options of its own")
        for option, f in own:
            doc = option.docs[option.methods.index(method)]
            if f.default is not dataclasses.MISSING:
                doc = with_default(doc, f.default)
            if option.name not in actions:
                actions[option.name] = group.add_argument(
                    flag(option.name), dest=f"method.{option.name}", type=flag_type(option.annotation),
                    default=argparse.SUPPRESS, metavar=metavar(option.annotation), help=doc)
            else:
                # One flag, listed under every method that has it, with that method's description and default:
                # a copy for the help only (parsing and the usage line use the action registered once).
                listed = copy.copy(actions[option.name])
                listed.help = doc
                group._group_actions.append(listed)  # argparse has no public way to list an action twice
    for option in options.values():
        if option.name not in actions:  # its methods' groups are not shown: it still parses
            p.add_argument(flag(option.name), dest=f"method.{option.name}", type=flag_type(option.annotation),
                           default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def add_train_options(p: argparse.ArgumentParser, exclude: Sequence[str] = (),
                      shown: Sequence[str] | None = None) -> None:
    """One flag per TrainConfig field (but ``exclude``), then the method options (:func:`add_method_options`)."""
    add_config_flags(p, [name for name in train_fields() if name not in exclude])
    add_method_options(p, shown)


def methods_named(argv: Sequence[str] | None) -> tuple[str, ...] | None:
    """The known methods that ``--method X`` or ``--methods A,B:lr=...`` name in ``argv`` (for the help to
    show their groups alone); None when none is named."""
    argv = list(argv or ())
    named: list[str] = []
    for k, word in enumerate(argv):
        for name in ("--method", "--methods"):
            if word == name and k + 1 < len(argv):
                named += argv[k + 1].split(",")
            elif word.startswith(name + "="):
                named += word.split("=", 1)[1].split(",")
    found = tuple(m for m in (item.split(":")[0].strip() for item in named) if m in METHODS)
    return found or None


def train_values(args: argparse.Namespace, skip: Sequence[str] = ()) -> dict[str, Any]:
    """The TrainConfig values given as flags, method options gathered under ``method_options``."""
    values = {k: v for k, v in vars(args).items() if k not in ("command", "config", "func", *skip)}
    options = {k.split(".", 1)[1]: v for k, v in values.items() if k.startswith("method.")}
    plain = {k: v for k, v in values.items() if not k.startswith("method.")}
    return {**plain, "method_options": options}


def setting_value(name: str, text: str, method: str | None, where: str) -> Any:
    """A training option's or a method option's value from text (``lora:r=16``, ``--sweep lr=1e-3,3e-3``),
    typed by its field; ConfigError naming ``where`` when it is neither or the value does not fit."""
    annotation = train_fields().get(name)
    if annotation is None and method is not None:
        annotation = type_hints(method_entry(method)[0]).get(name)
    if annotation is None:
        raise ConfigError(f"{where}: {name} is neither a training option nor an option of {method}")
    try:
        return parse_value(annotation, text)
    except ValueError as e:
        raise ConfigError(f"{where}: {name} {e}") from None
