"""The package's shape, read from the source with ``ast`` (nothing is imported): model
differences are config fields, not name checks; the modules form no import cycle; the model
does not reach into the inference speed-ups. Each failure names file:line."""

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "llmarch"
FAMILY_NAME = re.compile(r"gemma|llama|qwen|mistral|deepseek|olmo|smollm|kimi|gpt2", re.IGNORECASE)
# values of config fields that merely contain a family name: transformers' rope_type "llama3"
# names a RoPE scaling kind, and branching on a config field is the rule, not an exception to it
FIELD_VALUES = {"llama3"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _where(path: Path, node: ast.AST) -> str:
    return f"{path.relative_to(SRC.parent)}:{node.lineno}"


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


# ---------------------------------------------------------------------------------------
# no family name in a condition
# ---------------------------------------------------------------------------------------


def _conditions(tree: ast.AST):
    """Every expression that decides a branch: if/elif/while tests, ternaries, comprehension
    filters, match patterns, and every comparison or boolean operation wherever it stands
    (``return "gemma" in name`` decides as much as an ``if`` does). A call in one of them,
    such as ``name.startswith("qwen")``, is part of that expression."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.If, ast.While, ast.IfExp)):
            yield node.test
        elif isinstance(node, ast.comprehension):
            yield from node.ifs
        elif isinstance(node, (ast.Compare, ast.BoolOp)):
            yield node
        elif isinstance(node, ast.MatchValue):
            yield node.value


def family_names_in_conditions(path: Path, shown_as: Path | None = None) -> list[str]:
    """file:line and literal of each family name in a condition of path (shown as shown_as)."""
    found = set()
    for cond in _conditions(_tree(path)):
        for node in ast.walk(cond):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and FAMILY_NAME.search(node.value) \
                    and node.value not in FIELD_VALUES:
                found.add((node.lineno, f"{_where(shown_as or path, node)}: {node.value!r}"))
    return [text for _, text in sorted(found)]


def test_no_family_name_in_a_condition_outside_families():
    """What differs between families is a config field or the family's own file under
    src/llmarch/families/, never ``if "gemma" in name`` in shared code."""
    families = PACKAGE / "families"
    offenders = [hit for path in MODULES.values() if families not in path.parents
                 for hit in family_names_in_conditions(path)]
    assert not offenders, "a model family's name decides a branch outside families/:\n" + "\n".join(offenders)


def test_the_family_name_check_finds_each_kind_of_condition(tmp_path):
    """The check above sees every form of condition (and ignores names that decide nothing)."""
    flagged = {
        'if arch == "llama": pass': 1,
        'if ok:\n    pass\nelif name.startswith(("Qwen2", "x")):\n    pass': 3,
        'while "DeepSeek" not in s: pass': 1,
        'x = 1 if "gemma3n" in kind else 2': 1,
        'keys = [k for k in ks if k.endswith("olmo_norm")]': 1,
        'def f(t):\n    return t in {"kimi_k2", "gpt2"}': 2,
        'ok = a and b.lower().find("smollm") >= 0': 1,
        'match kind:\n    case "mistral":\n        pass': 2,
    }
    for i, (code, line) in enumerate(flagged.items()):
        path = PACKAGE / f"case{i}.py"  # a path inside the package, for the location shown
        (tmp_path / "case.py").write_text(code)
        hits = family_names_in_conditions(tmp_path / "case.py", path)
        assert hits and all(f"case{i}.py:{line}:" in h for h in hits), (code, hits)
    quiet = ('NAME = "gemma"\nraise ValueError(f"not a llama checkpoint: {path}")\nf(model="qwen3")\n'
             'if rope.rope_type == "llama3": pass\n')
    (tmp_path / "case.py").write_text(quiet)
    assert family_names_in_conditions(tmp_path / "case.py", PACKAGE / "quiet.py") == []


# ---------------------------------------------------------------------------------------
# imports between llmarch's modules
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the imported llmarch module (a package's __init__ under the package's name)
    where: str  # file:line
    module_level: bool  # runs when the module is imported (not inside a function body)


def _resolve(module: str, node: ast.ImportFrom | ast.Import) -> list[str]:
    """The llmarch modules an import statement loads: ``from pkg import name`` loads pkg.name
    when that is a module, else pkg itself."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name in MODULES]
    if node.level:
        is_package = MODULES[module].name == "__init__.py"
        base = module.split(".")[: len(module.split(".")) - node.level + is_package]
        pkg = ".".join(base + ([node.module] if node.module else []))
    else:
        pkg = node.module or ""
    if pkg not in MODULES:
        return []
    return [f"{pkg}.{a.name}" if f"{pkg}.{a.name}" in MODULES else pkg for a in node.names]


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def imports(module: str) -> list[Import]:
    """Every import of an llmarch module in ``module``. Module level means executed when the
    module is imported: statements of the module and class bodies, in if/try/with blocks too,
    but not in function bodies nor under ``if TYPE_CHECKING:``."""
    path = MODULES[module]
    out = []

    def visit(node: ast.AST, module_level: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                out.extend(Import(module, t, _where(path, child), module_level)
                           for t in dict.fromkeys(_resolve(module, child)))
            inside = module_level and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.If) and _is_type_checking(child):
                for stmt in child.body:
                    visit(stmt, False)
                for stmt in child.orelse:
                    visit(stmt, inside)
                continue
            visit(child, inside)

    visit(_tree(path), True)
    return out


def import_cycles(edges: list[Import]) -> list[list[Import]]:
    """One shortest cycle through each strongly connected group of modules, as its imports."""
    graph: dict[str, list[Import]] = {}
    for e in edges:
        if e.source != e.target:
            graph.setdefault(e.source, []).append(e)
    cycles, seen = [], set()
    for start in sorted(graph):
        if start in seen:
            continue
        # breadth-first from start: the shortest path back to start, if any
        paths, frontier = {start: []}, [start]
        while frontier and start not in {e.target for m in frontier for e in graph.get(m, [])}:
            nxt = []
            for m in frontier:
                for e in graph.get(m, []):
                    if e.target not in paths:
                        paths[e.target] = paths[m] + [e]
                        nxt.append(e.target)
            frontier = nxt
        back = [paths[m] + [e] for m in frontier for e in graph.get(m, []) if e.target == start]
        if back:
            cycle = back[0]
            seen.update(e.source for e in cycle)
            cycles.append(cycle)
    return cycles


def _show(cycle: list[Import]) -> str:
    return " -> ".join(f"{e.source} ({e.where}{'' if e.module_level else ', in a function'})" for e in cycle) + (
        f" -> {cycle[0].source}")


def test_no_import_cycle():
    """No cycle among llmarch's imports, counting every import: module level and inside
    functions alike (not under ``if TYPE_CHECKING:``). An import deferred into a function is how
    a cycle usually hides; the layers (model <- families <- checkpoints <- inference, ...)
    should need none of them to break a loop. Each edge of a cycle says whether it is deferred."""
    cycles = import_cycles([e for m in MODULES for e in imports(m)])
    assert not cycles, "import cycles between llmarch modules:\n" + "\n".join(map(_show, cycles))


def test_the_cycle_check_reports_the_path():
    def imp(a, b, line):
        return Import(a, b, f"{a}.py:{line}", True)

    edges = [imp("a", "b", 1), imp("b", "c", 2), imp("c", "a", 3), imp("c", "d", 4), imp("d", "d", 5)]
    (cycle,) = import_cycles(edges)
    assert _show(cycle) == "a (a.py:1) -> b (b.py:2) -> c (c.py:3) -> a"
    assert "c.py:3, in a function" in _show(import_cycles(edges[:2] + [Import("c", "a", "c.py:3", False)])[0])
    assert import_cycles(edges[:2] + edges[3:]) == []


def test_model_does_not_import_inference():
    """The decoder reads as the math; speed-ups (packing, offloading, generation) wrap it from
    llmarch.inference, never the other way round, not even inside a function."""
    offenders = [f"{e.where}: {e.source} imports {e.target}" for m in MODULES if m.startswith("llmarch.model.")
                 for e in imports(m) if e.target == "llmarch.inference" or e.target.startswith("llmarch.inference.")]
    assert not offenders, "llmarch.model imports llmarch.inference:\n" + "\n".join(offenders)


@pytest.mark.parametrize("module,target", [("llmarch.model.decoder", "llmarch.model.config"),
                                           ("llmarch.checkpoints.hf", "llmarch.families"),
                                           ("llmarch", "llmarch.model.decoder")])
def test_imports_are_resolved(module, target):
    """Relative, package and ``from package import module`` imports all land on a module."""
    assert target in {e.target for e in imports(module)}
