"""The package tree reads as the pipeline and its modules import each other one way (no import circles)."""

import ast
import importlib
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "sae_toolkit"
STAGES = ["model", "activations", "sae", "training", "analysis", "baselines"]
TOP_LEVEL = {"__init__", "__main__", "cli", "demo", "errors", "files", "units", "process_group"}


def module_names() -> dict[str, Path]:
    names = {}
    for path in PKG.rglob("*.py"):
        parts = path.relative_to(PKG.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Every sae_toolkit module `path` imports, anywhere in the file (functions and TYPE_CHECKING blocks too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in known)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in known:
                    found.add(sub)
                elif base in known:
                    found.add(base)
    found.discard(name)
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_circles():
    names = module_names()
    graph = {n: imports_of(n, p, set(names)) for n, p in names.items()}
    assert cycles(graph) == []


def test_cycle_finder_sees_a_circle():
    # The checker itself must be able to fail: a two-module circle and a lazy import inside a function.
    assert cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]
    src = "def f():\n    from sae_toolkit.sae import base\n"
    tmp = PKG.parent / "tests" / "_layout_probe.py"
    try:
        tmp.write_text(src)
        assert imports_of("probe", tmp, {"sae_toolkit.sae", "sae_toolkit.sae.base"}) == {"sae_toolkit.sae.base"}
    finally:
        tmp.unlink()


def test_top_level_holds_only_the_stages_and_shared_helpers():
    modules = {p.stem for p in PKG.glob("*.py")}
    packages = {p.name for p in PKG.iterdir() if (p / "__init__.py").is_file()}
    assert modules == TOP_LEVEL
    assert packages == set(STAGES)


@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_says_what_it_takes_and_gives(stage):
    doc = importlib.import_module(f"sae_toolkit.{stage}").__doc__
    assert doc and len(doc.strip()) > 60


def test_public_names_still_import():
    import sae_toolkit

    for name in sae_toolkit.__all__:
        assert getattr(sae_toolkit, name) is not None, name
