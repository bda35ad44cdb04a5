"""The package's shape: imports run one way (import-linter's contracts in pyproject.toml), no import circles at all
(imports inside functions included), the shells use the public API only, and small commands stay small."""

from __future__ import annotations

import ast
import logging
import subprocess
import sys
from pathlib import Path

import grimp
import pytest
from importlinter.cli import lint_imports

from conftest import ROOT

SHELL_IMPORTS = ("simimg", "simimg.errors", "simimg.app")  # what app.py may import from simimg


def test_import_linter_contracts_are_kept(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture):
    monkeypatch.chdir(ROOT)
    monkeypatch.syspath_prepend(str(ROOT))
    loggers = [logger for logger in logging.root.manager.loggerDict.values() if isinstance(logger, logging.Logger)]
    enabled = [logger for logger in loggers if not logger.disabled]
    try:
        code = lint_imports(no_cache=True, no_logo=True)
    finally:  # its logging.config.dictConfig disables every logger that exists: simimg's, for the tests after this
        for logger in enabled:
            logger.disabled = False
    assert code == 0, capsys.readouterr().out[-4000:]


def test_no_module_imports_itself_through_others(monkeypatch: pytest.MonkeyPatch):
    """Tarjan's strongly connected components over every simimg module: each must stand alone."""
    monkeypatch.syspath_prepend(str(ROOT))
    graph = grimp.build_graph("simimg", cache_dir=None)
    edges = {m: graph.find_modules_directly_imported_by(m) for m in graph.modules if m.startswith("simimg")}
    circles = [c for c in strongly_connected(edges) if len(c) > 1]
    assert circles == []


def strongly_connected(edges: dict[str, set[str]]) -> list[list[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:  # recursion depth is the import chain's length: a few dozen at most
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in edges.get(node, ()):
            if nxt not in edges:
                continue
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == node:
                    break
            found.append(component)

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_the_cycle_check_finds_a_circle():
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["c", "b", "a"], ["d"]]


def test_app_py_imports_the_public_api_only():
    """import-linter sees packages; app.py is a script, so its imports are read here."""
    tree = ast.parse((ROOT / "app.py").read_text())
    imported = [
        alias.name if isinstance(node, ast.Import) else node.module or ""
        for node in ast.walk(tree)
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in node.names
    ]
    ours = [m for m in imported if m.split(".")[0] == "simimg"]
    assert ours and all(m in SHELL_IMPORTS or m.startswith("simimg.app.") for m in ours), ours


def test_every_public_name_resolves():
    import simimg

    missing = [name for name in simimg.PUBLIC if not hasattr(simimg, name)]
    assert missing == []
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = simimg.nope


CLI = "from simimg.cli import main\nsys.exit(main(sys.argv[1:]))"  # `simimg ARGV` for imports_of


def imports_of(code: str, *argv: str) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Run `code` (with `argv`) in a fresh interpreter; return its result and the top-level packages imported by
    the time it exits."""
    report = (
        "import atexit, sys\natexit.register(lambda: print('\\nIMPORTED', "
        "' '.join(sorted({m.split('.')[0] for m in sys.modules})), file=sys.stderr))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", report + code, *argv], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    line = next((x for x in done.stderr.splitlines() if x.startswith("IMPORTED ")), "IMPORTED")
    return done, set(line.split()[1:])


@pytest.fixture
def built_index(shapes_index) -> Path:
    """The session's index folder 'shapes' (read-only)."""
    return shapes_index.home / shapes_index.name


def test_small_commands_import_neither_torch_nor_openvino(built_index: Path):
    """`simimg --help`, `simimg models` and `simimg info` read files; they load no model (python -X importtime
    gives the figures: see the README)."""
    home = str(built_index.parent)
    for argv in (
        ["models", "--name", built_index.name, "--home", home],
        ["info", "--name", built_index.name, "--home", home],
    ):
        done, imported = imports_of(CLI, *argv)
        assert done.returncode == 0 and "simimg" in imported, done.stderr
        assert not imported & {"torch", "openvino", "torchvision", "sklearn"}, (argv, imported & {"torch", "openvino"})
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from simimg.cli import main\ntry: main(['--help'])\nexcept SystemExit: pass\n"
            "print(sorted(m for m in ('torch', 'openvino', 'faiss') if m in sys.modules))",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert done.stdout.strip().endswith("[]"), done.stdout[-500:]


def test_the_ray_engines_cpu_tasks_import_neither_torch_nor_faiss():
    """Ray imports jobs/ray_tasks.py in every worker that decodes or writes a shard: those processes never run a
    model, so they skip torch's import (~3.5 s each) and its memory."""
    done, imported = imports_of("import simimg.jobs.ray_tasks")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "simimg" in imported and not imported & {"torch", "torchvision", "faiss", "openvino"}, imported


def test_the_layers_are_documented():
    """docs/ARCHITECTURE.md draws the layers the contracts enforce: every subpackage and module has its line."""
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    modules = sorted(
        str(p.relative_to(ROOT / "simimg")).removesuffix(".py").removesuffix("/__init__")
        for p in (ROOT / "simimg").rglob("*.py")
        if p.name != "__init__.py" or p.parent != ROOT / "simimg"
    )
    missing = [m for m in modules if f"`{Path(m).name}" not in text and f"`{m}" not in text]
    assert missing == [], missing
