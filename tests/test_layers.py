"""The layers of DESIGN.md, enforced: the core (`ckpt_daemon`) imports no other package of ours; `trainer`
and `maintenance` import only the core; and nothing the daemon process loads imports torch, numpy,
safetensors, transformers or lightning, neither directly nor through the modules it imports.

The imports are read from the source (ast), not by importing it, so a violation is found whichever
code path a test happens to run. Why not import-linter: its graph counts an import inside a function
the same as one at the top of a module, and the daemon's command line rightly imports
`maintenance.consolidate` (whose functions import torch when a user consolidates): the contract would need
exemptions on exactly the edges where a regression would hide. Here an import inside a function counts
where that function runs: all of the daemon's own code runs in the daemon process, so every import in
`daemon/` is followed; of the modules it reaches, what runs at import time (module level and class
bodies) is followed. `tests/test_daemon.py::test_the_daemon_never_imports_torch` and the real daemon's
own check (`tests/test_memory.py`) keep the same promise at run time."""

from __future__ import annotations

import ast
import collections
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import REPO

OURS = ("ckpt_daemon", "daemon", "trainer", "maintenance", "benchmarks", "tests")
# What each of our packages may import of ours (besides itself); benchmarks and tests may import any.
MAY_IMPORT = {
    "ckpt_daemon": set(),
    "trainer": {"ckpt_daemon"},
    "maintenance": {"ckpt_daemon"},
    "daemon": {"ckpt_daemon", "maintenance", "trainer"},  # the jobs run maintenance; `ckpt-daemon train` is a command
}
TORCH_LIKE = {"torch", "numpy", "safetensors", "transformers", "lightning", "pytorch_lightning", "accelerate"}


@dataclass(frozen=True)
class Import:
    importer: str
    target: str  # a module of ours, or the top-level name of an external package
    line: int
    eager: bool  # runs when the importer is imported (module level or a class body), not inside a function


def find_modules(root: Path, packages=OURS) -> dict[str, Path]:
    out = {}
    for pkg in packages:
        for p in sorted((root / pkg).rglob("*.py")):
            parts = p.relative_to(root).with_suffix("").parts
            if any(not part.isidentifier() for part in parts):
                continue  # a script beside the package (tests/byo/*.py are importable anyway; hyphens are not)
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = p
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> list[Import]:
    """Every import statement of one module, each resolved to the modules of ours it loads (the target
    and every package above it) or to the external top-level package."""
    is_pkg = path.name == "__init__.py"
    found: list[Import] = []

    def add(target: str, line: int, eager: bool):
        top = target.split(".")[0]
        if top not in OURS:
            found.append(Import(name, top, line, eager))
            return
        parts = target.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__, a/b/__init__, a/b/c
            if ".".join(parts[:i]) in modules:
                found.append(Import(name, ".".join(parts[:i]), line, eager))

    def visit(node: ast.AST, eager: bool):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                for c in child.orelse:
                    visit_stmt(c, eager)
                continue
            visit_stmt(child, eager)

    def visit_stmt(node: ast.AST, eager: bool):
        if isinstance(node, ast.Import):
            for a in node.names:
                add(a.name, node.lineno, eager)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            add(mod, node.lineno, eager)
            for a in node.names:
                if f"{mod}.{a.name}" in modules:  # `from pkg import module`
                    add(f"{mod}.{a.name}", node.lineno, eager)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            visit(node, False)
        else:
            visit(node, eager)

    visit(ast.parse(path.read_text(), str(path)), True)
    return found


def graph(modules: dict[str, Path]) -> dict[str, list[Import]]:
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def layer_violations(g: dict[str, list[Import]]) -> list[str]:
    worst: dict[tuple[str, int, str], str] = {}  # (module, line, package) -> the deepest module imported there
    for name, imps in sorted(g.items()):
        pkg = name.split(".")[0]
        if pkg not in MAY_IMPORT:
            continue
        for i in imps:
            other = i.target.split(".")[0]
            if other in OURS and other != pkg and other not in MAY_IMPORT[pkg]:
                key = (name, i.line, other)
                worst[key] = max(worst.get(key, ""), i.target, key=len)
    allowed = {pkg: " and ".join(sorted(may)) if may else "none" for pkg, may in MAY_IMPORT.items()}
    return [f"{name} (line {line}) imports {target}: {name.split('.')[0]} may import {allowed[name.split('.')[0]]} of our "
            "packages" for (name, line, _), target in sorted(worst.items())]


def daemon_process_torch_chains(g: dict[str, list[Import]], roots: str = "daemon") -> list[str]:
    """Breadth-first from every module of `roots`: the chains by which the daemon process would load a
    torch-like package. In the daemon's own modules every import counts (their functions run in the
    daemon); in the modules they reach, those that run at import time."""
    def follows(i: Import) -> bool:
        return i.eager or i.importer.split(".")[0] == roots

    start = sorted(n for n in g if n.split(".")[0] == roots)
    parent: dict[str, Import | None] = {n: None for n in start}
    queue = collections.deque(start)
    bad = []
    while queue:
        m = queue.popleft()
        for i in g.get(m, []):
            if not follows(i) or i.target in parent:
                continue
            parent[i.target] = i
            if i.target in TORCH_LIKE:
                bad.append(i.target)
            elif i.target in g:
                queue.append(i.target)

    def chain(target: str) -> str:
        steps, t = [], target
        while parent[t] is not None:
            i = parent[t]
            steps.append(f"{i.importer} (line {i.line}{'' if i.eager else ', in a function'}) -> {t}")
            t = i.importer
        return "; ".join(reversed(steps))

    return [chain(t) for t in bad]


@pytest.fixture(scope="module")
def our_graph() -> dict[str, list[Import]]:
    return graph(find_modules(REPO))


@pytest.mark.slow
def test_the_core_and_the_roles_import_only_what_their_layer_may(our_graph):
    problems = layer_violations(our_graph)
    assert not problems, "layering violated:\n" + "\n".join(problems)


@pytest.mark.slow
def test_nothing_the_daemon_process_loads_imports_torch(our_graph):
    problems = daemon_process_torch_chains(our_graph)
    assert not problems, "the daemon process would import a torch-like package:\n" + "\n".join(problems)


def _tree(root: Path, files: dict[str, str]) -> dict[str, list[Import]]:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return graph(find_modules(root))


def test_the_checks_find_what_they_are_for(tmp_path):
    """The checks above pass on our tree; here they must fail on a tree built to break each rule."""
    g = _tree(tmp_path, {
        "ckpt_daemon/__init__.py": "",
        "ckpt_daemon/lazy.py": "def f():\n    import torch\n",           # the core may use torch lazily
        "ckpt_daemon/eager.py": "import numpy as np\n",
        "ckpt_daemon/role.py": "def f():\n    from daemon import jobs\n",  # but never a role, even lazily
        "trainer/__init__.py": "from maintenance import x\n",
        "maintenance/__init__.py": "",
        "maintenance/x.py": "from ckpt_daemon import lazy\n",
        "maintenance/y.py": "from ckpt_daemon.eager import np\n",
        "daemon/__init__.py": "",
        "daemon/jobs.py": "from maintenance import x\n\ndef g():\n    from maintenance import y\n",
        "daemon/typed.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import torch\n",
    })
    layers = layer_violations(g)
    assert any(v.startswith("ckpt_daemon.role (line 2) imports daemon") for v in layers), layers
    assert any(v.startswith("trainer (line 1) imports maintenance") for v in layers), layers
    assert len(layers) == 2, layers
    chains = daemon_process_torch_chains(g)
    # daemon.jobs's function runs in the daemon: y loads the core module that imports numpy at import time
    assert chains == ["daemon.jobs (line 4, in a function) -> maintenance.y; maintenance.y (line 1) -> ckpt_daemon.eager; "
                      "ckpt_daemon.eager (line 1) -> numpy"], chains
    # a torch import in the daemon's own code counts even inside a function
    (tmp_path / "daemon" / "late.py").write_text("def h():\n    import safetensors.torch\n")
    assert "daemon.late (line 2, in a function) -> safetensors" in daemon_process_torch_chains(graph(find_modules(tmp_path)))


def test_test_modules_share_helpers_only_through_tests_helpers(our_graph):
    """A test module imported by another is collected again under the importer, and its fixtures leak into
    the importer's namespace: shared code lives in tests/helpers.py, fixtures in conftest.py."""
    bad = sorted({f"{name} (line {i.line}) imports {i.target}" for name, imps in our_graph.items()
                  if name.startswith("tests.") for i in imps
                  if i.target != name and i.target.rsplit(".", 1)[-1].startswith(("test_", "conftest"))})
    assert not bad, "import shared test code from tests.helpers instead:\n" + "\n".join(bad)
