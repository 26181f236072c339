"""The package's imports go down the stack only: no cycles, no module importing a floor above its own.

The import graph of ``src/ptune`` is built with ``ast`` from every ``import`` statement, those inside
functions included (an import inside a function that points up the stack is the same knot, hidden);
imports under ``if TYPE_CHECKING:`` are annotations only and are left out. ``FLOORS`` is the picture in
ARCHITECTURE.md ("Layers"): a module may import modules of its own floor or below.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "src" / "ptune"

# lowest first; a module's floor is that of the longest prefix listed (ptune.methods.lora -> "ptune.methods")
FLOORS: list[tuple[str, ...]] = [
    ("ptune.errors", "ptune.version", "ptune.yamlfile", "ptune.fields", "ptune.metrics", "ptune.templates", "ptune.batching",
     "ptune.models", "ptune.encoder_decoder", "ptune.gemma", "ptune.quantize", "ptune.quantized_embedding"),
    ("ptune.methods", "ptune.attention", "ptune.frozen"),   # methods change inputs, attention or weights
    ("ptune.heads",),                                        # head kinds: hidden states -> a task's answers
    ("ptune.data", "ptune.spec"),                            # tasks name their head; a spec holds method + head + task
    ("ptune.model",),                                        # PtuneModel: the one forward path
    ("ptune.assembly", "ptune.multitask", "ptune.scoring", "ptune.decoding"),  # apply(); several heads; scoring; decoding
    ("ptune.adapter_io", "ptune.transfer"),                  # adapter files; warm starts from them
    ("ptune.engine",),                                       # training, evaluation, Run
    ("ptune.adapter_set",),                                  # many saved runs / adapters on one base
    ("ptune.export",),                                       # PEFT / merged exports (of models or runs)
    ("ptune.serve", "ptune.options", "ptune.studies"),       # the server; options; compare / sweep / ablate
    ("ptune.cli", "ptune.api"),                              # the fronts
    ("ptune",),                                              # the package's own namespace
]


def _modules() -> dict[str, Path]:
    mods = {}
    for f in PKG.rglob("*.py"):
        parts = list(f.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = f
    return mods


def _imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    def resolve(module: str, name: str | None, level: int, cur: str, is_pkg: bool) -> str | None:
        if level:
            anchor = cur.split(".") if is_pkg else cur.split(".")[:-1]
            anchor = anchor[: len(anchor) - (level - 1)]
            module = ".".join(anchor + ([module] if module else []))
        for cand in (f"{module}.{name}" if name else None, module):
            while cand and cand not in mods:
                cand = cand.rpartition(".")[0]
            if cand:
                return cand
        return None

    class Visitor(ast.NodeVisitor):
        def __init__(self, cur: str, is_pkg: bool) -> None:
            self.cur, self.is_pkg, self.edges = cur, is_pkg, set()

        def visit_If(self, node: ast.If) -> None:
            t = node.test
            if (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or \
                    (isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"):
                for n in node.orelse:
                    self.visit(n)
                return
            self.generic_visit(node)

        def visit_Import(self, node: ast.Import) -> None:
            for a in node.names:
                if a.name.split(".")[0] == "ptune":
                    target = resolve(a.name, None, 0, self.cur, self.is_pkg)
                    if target:
                        self.edges.add(target)

        def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
            if node.level == 0 and (node.module or "").split(".")[0] != "ptune":
                return
            for a in node.names:
                target = resolve(node.module or "", a.name, node.level, self.cur, self.is_pkg)
                if target:
                    self.edges.add(target)

    graph = {}
    for m, f in mods.items():
        v = Visitor(m, f.name == "__init__.py")
        v.visit(ast.parse(f.read_text()))
        graph[m] = v.edges - {m}
    return graph


def _floor(module: str) -> int:
    best, floor = -1, None
    for i, names in enumerate(FLOORS):
        for name in names:
            inside = module == name or (name != "ptune" and module.startswith(name + "."))  # "ptune": the package only
            if inside and len(name) > best:
                best, floor = len(name), i
    if floor is None:
        raise AssertionError(f"{module} is on no floor of FLOORS; add it to tests/test_layers.py and ARCHITECTURE.md")
    return floor


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return _imports(_modules())


def test_the_graph_sees_function_level_imports(graph):
    # the checker is only as good as its parser: these edges exist today and must be seen
    assert "ptune.adapter_io" in graph["ptune.api"]
    assert "ptune.heads.registry" in graph["ptune.heads.config"]
    fake = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(fake) == [["a", "b", "c"]]


def test_no_import_cycles(graph):
    cycles = _cycles(graph)
    assert not cycles, "import cycles in src/ptune (imports must go down the stack):\n" + "\n".join(
        " <-> ".join(c) for c in cycles)


def test_imports_only_go_down_the_floors(graph):
    up = sorted(f"{m} (floor {_floor(m)}) imports {t} (floor {_floor(t)})"
                for m, targets in graph.items() for t in targets if _floor(t) > _floor(m))
    assert not up, "imports pointing up the stack (see FLOORS):\n" + "\n".join(up)


def test_no_code_outside_heads_compares_head_names_or_label_forms():
    """What a head kind can do is read from its typed capabilities (``HeadKind.multi_row``, ``generates``, ...);
    a comparison with a head's name (``== "causal_lm"``, ``in ("tagging", ...)``) or with ``.label_form``
    outside ``ptune/heads/`` is the drift this guards against (base kinds: ``ptune.models.BASE_KINDS``)."""
    from ptune.heads import HEAD_KINDS

    found = []
    for path in sorted(PKG.rglob("*.py")):
        if "heads" in path.relative_to(PKG).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Compare) or not any(isinstance(op, (ast.Eq, ast.NotEq, ast.In, ast.NotIn))
                                                            for op in node.ops):
                continue
            operands = [node.left, *node.comparators]
            items = [c for o in operands for c in (o.elts if isinstance(o, (ast.Tuple, ast.List, ast.Set)) else [o])]
            if any(isinstance(o, ast.Attribute) and o.attr == "label_form" for o in operands):
                found.append(f"{path.relative_to(PKG)}:{node.lineno} compares label_form")
            for c in items:
                if isinstance(c, ast.Constant) and c.value in HEAD_KINDS:
                    found.append(f"{path.relative_to(PKG)}:{node.lineno} compares with {c.value!r}")
    assert found == [], "\n".join(found)
