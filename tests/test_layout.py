"""The repository's layout keeps its promises: one-way layers between the packages, no import circle (imports inside
functions counted), the study machinery importable without torch, and modules and functions small enough to read."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("study", "models", "training", "analysis")
# who may import whom: the study machinery is the bottom layer (the Snakefile imports it while it lays out the DAG),
# the networks build on it, the trainer on both, the measurements on everything
MAY_IMPORT = {
    "study": {"study"},
    "models": {"study", "models"},
    "training": {"study", "models", "training"},
    "analysis": {"study", "models", "training", "analysis"},
}
# the two look-ups of the study machinery into models/: the size table (torch-free, so the DAG checks arch names),
# and study/plan.py's parameter and FLOP counts on the meta device (models.family, imported inside a function only
# when a plan is made)
ALLOWED_EXCEPTIONS = {("study.*", "models.sizes"), ("study.plan", "models.family")}
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 72


def repo_modules() -> dict[str, Path]:
    """Every module of the packages (a package's __init__ under the package's name)."""
    return {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
            for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """Every repository module `name` imports, at the top or inside a function (`from pkg import mod` counts mod)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: resolve against the package
                base = name.rsplit(".", node.level)[0]
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
            found.add(mod)
            found.update(f"{mod}.{a.name}" for a in node.names)
    # `from models import family` names the package and the module: the module is what is imported (the
    # packages' __init__ files hold only their docstrings, which test_packages_hold_no_code checks)
    return {m for m in found if m in known and m != name and m not in PACKAGES}


@pytest.fixture(scope="module")
def graph():
    modules = repo_modules()
    return {name: imported_modules(name, path, set(modules)) for name, path in modules.items()}


def test_the_import_graph_is_found(graph):
    """The parser sees the imports it must (a check that finds nothing would pass every test below)."""
    assert "study.spec" in graph["study.checks"]
    assert "training.loop" in graph["training.train"]
    assert {"models.family", "study.integrity"} <= graph["models.denoiser"]


def test_layers_import_one_way(graph):
    def allowed(a, b):
        return (b.split(".")[0] in MAY_IMPORT[a.split(".")[0]] or (a, b) in ALLOWED_EXCEPTIONS
                or (a.split(".")[0] + ".*", b) in ALLOWED_EXCEPTIONS)

    wrong = sorted((a, b) for a, deps in graph.items() for b in deps if not allowed(a, b))
    assert not wrong, f"imports against the layers: {wrong}"


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == "open":
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_packages_hold_no_code():
    for pkg in PACKAGES:
        body = ast.parse((ROOT / pkg / "__init__.py").read_text()).body
        assert len(body) == 1 and isinstance(body[0], ast.Expr), f"{pkg}/__init__.py holds more than its docstring"


def test_no_import_circle(graph):
    assert find_cycle(graph) is None, " → ".join(find_cycle(graph))


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_study_machinery_imports_without_torch():
    """What the Snakefile imports to lay out the DAG stays cheap: no module of study/ pulls torch in."""
    names = [n for n in repo_modules() if n.split(".")[0] == "study"]
    code = f"import sys; import {', '.join(names)}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_the_dag_is_laid_out_without_torch():
    """`snakemake -n` imports only the study machinery (and the size table) while it lays out the DAG: torch's import
    alone costs more than the whole dry run."""
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "snakemake", "-n", "--configfile",
                          "workflow/config/smoke.yaml"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")}
    assert "snakemake" in imported and "study.spec" in imported  # the import log is read
    assert not {m for m in imported if m.split(".")[0] in ("torch", "training", "analysis")}


def test_no_module_is_too_long_to_read():
    long = {n: len(p.read_text().splitlines()) for n, p in repo_modules().items()}
    assert not {n: k for n, k in long.items() if k > MAX_MODULE_LINES}


def test_no_function_is_too_long_to_read():
    long = {}
    for name, path in repo_modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long[f"{name}.{node.name}"] = length
    assert not long


def test_every_module_says_what_it_holds():
    silent = [n for n, p in repo_modules().items() if not ast.get_docstring(ast.parse(p.read_text()))]
    assert not silent
