"""Imports point down: no module under allocation/, solvers/ or models/ imports engine, api or cli; no import circle
anywhere in the package (function-level imports count too); no model type or module name outside models/; the bench
scripts share bench/common.py and use only public names of the package. Read from the source (ast)."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from layerprune.models.adapters import ADAPTERS

REPO = Path(__file__).resolve().parents[1]
LOWER = ("allocation", "solvers", "models")  # the floors that must not reach the top
TOP = ("engine", "api", "cli")


def modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the package at `root`."""
    out = {}
    for p in sorted(root.rglob("*.py")):
        parts = list(p.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = p
    return out


def imported(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """The package's modules that `name` imports, anywhere in its file. ``from X import y`` is module X.y when that is
    a module, else X; the parent packages Python runs on the way are not counted."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names}
    return {m for m in found if m in mods and m != name}


def graph(root: Path) -> dict[str, set[str]]:
    mods = modules(root)
    return {name: imported(name, path, mods) for name, path in mods.items()}


def circles(g: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(g[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while not comp or comp[-1] != v:
                comp.append(stack.pop())
                on.discard(comp[-1])
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def upward(g: dict[str, set[str]]) -> list[tuple[str, str]]:
    """(module, import) pairs where a module under allocation/, solvers/ or models/ imports engine, api or cli."""
    floor = lambda m: m.split(".")[1] if m.count(".") else ""  # noqa: E731
    return sorted((m, i) for m, deps in g.items() if floor(m) in LOWER for i in deps if floor(i) in TOP)


def test_lower_floors_do_not_import_engine_api_or_cli():
    assert upward(graph(REPO / "layerprune")) == []


def test_no_import_circle():
    assert circles(graph(REPO / "layerprune")) == []


def units(g: dict[str, set[str]]) -> dict[str, set[str]]:
    """The graph between the package's top-level units (a subpackage or a top-level module): layerprune.models,
    layerprune.config, ..."""
    unit = lambda m: ".".join(m.split(".")[:2])  # noqa: E731
    out: dict[str, set[str]] = {}
    for m, deps in g.items():
        out.setdefault(unit(m), set()).update(unit(d) for d in deps if unit(d) != unit(m))
    return out


def test_no_import_circle_between_top_level_units():
    """allocation, config, evaluation, models, offload, outputs, passes, quant, solvers, search, ...: each unit's
    imports (function-level ones too) point one way; the searches (search/) run the engine, allocation/ keeps the
    rules."""
    assert circles(units(graph(REPO / "layerprune"))) == []


def test_allocation_keeps_only_rules():
    """allocation/ evaluates and searches nothing: it imports neither evaluation, the engine, the searches nor a model
    loader (its dense statistics pass runs through passes/)."""
    g = graph(REPO / "layerprune")
    bad = sorted((m, d) for m, deps in g.items() if m.startswith("layerprune.allocation") for d in deps
                 if d.startswith(("layerprune.evaluation", "layerprune.search", "layerprune.engine",
                                  "layerprune.models.loading", "layerprune.checkpoint")))
    assert bad == []


def test_the_checks_catch_a_circle_and_an_upward_import(tmp_path):
    """The detectors themselves: a package with apps <-> run (one import inside a function) and models -> engine."""
    pkg = tmp_path / "pkg"
    for f, text in {"__init__.py": "", "engine.py": "from .models import adapters\n",
                    "models/__init__.py": "", "models/adapters.py": "def f():\n    from ..engine import x\n",
                    "fed/__init__.py": "", "fed/apps.py": "def g():\n    from .run import serve\n",
                    "fed/run.py": "from . import apps\nimport pkg.engine\n"}.items():
        (pkg / f).parent.mkdir(parents=True, exist_ok=True)
        (pkg / f).write_text(text)
    g = graph(pkg)
    assert g["pkg.fed.run"] == {"pkg.fed.apps", "pkg.engine"}
    assert upward(g) == [("pkg.models.adapters", "pkg.engine")]
    assert circles(g) == [["pkg.engine", "pkg.models.adapters"], ["pkg.fed.apps", "pkg.fed.run"]]
    assert circles(units(g)) == [["pkg.engine", "pkg.models"]]  # fed's circle is inside one unit


def architecture_words() -> tuple[set[str], set[str]]:
    """The adapters' model types and module names: identifiers (q_proj, c_attn, lm_head, ...) and dotted paths."""
    generic = {"model", "transformer", "decoder", "attn", "mlp", "norm", "layers", "h"}
    paths = {p for a in ADAPTERS for p in (a.blocks_path, *a.embedding_paths, a.final_norm_path, a.lm_head_path,
                                           *a().linear_names()) if p}
    words = {w for p in paths for w in p.split(".")} - generic
    return {t for a in ADAPTERS for t in a.model_types} | words, paths


# prose that names a module as an example for the user (help and error texts), not code that relies on it
PROSE = ("e.g. mlp.down_proj", "pass the o_proj weight", "llama.cpp")  # llama.cpp: the runtime's name


def test_no_model_type_or_module_name_outside_models():
    """Every string literal of the package outside models/ (docstrings aside) is free of the adapters' model types and
    module names; only the adapters know them."""
    words, paths = architecture_words()
    hits = []
    for p in sorted((REPO / "layerprune").rglob("*.py")):
        if "models" in p.relative_to(REPO / "layerprune").parts:
            continue
        tree = ast.parse(p.read_text())
        docs = {id(n.body[0].value) for n in ast.walk(tree)
                if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef))
                and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        for n in ast.walk(tree):
            if not (isinstance(n, ast.Constant) and isinstance(n.value, str)) or id(n) in docs:
                continue
            found = (set(re.findall(r"\w+", n.value)) & words) | {q for q in paths if "." in q and q in n.value}
            if found and not any(x in n.value for x in PROSE):
                hits.append(f"{p.relative_to(REPO)}:{n.lineno}: {sorted(found)}")
    assert hits == []


@pytest.mark.parametrize("script", sorted(p.name for p in (REPO / "bench").glob("*.py")))
def test_bench_scripts_share_common_and_use_public_names(script):
    """No sys.path edits, no bare-name imports of sibling scripts, no private names of the package."""
    path = REPO / "bench" / script
    siblings = {p.stem for p in (REPO / "bench").glob("*.py")}
    assert "sys.path" not in path.read_text()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, (ast.Import, ast.ImportFrom)) else []
        if isinstance(node, ast.Import):
            assert not {n.split(".")[0] for n in names} & siblings, f"{script} imports a bench script by bare name"
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            assert node.level or module.split(".")[0] not in siblings, f"{script} imports {module} by bare name"
            assert not any(part.startswith("_") for part in module.split(".") + names if part != "__future__"), \
                f"{script} imports a private name: from {module} import {', '.join(names)}"
