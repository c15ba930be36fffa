"""The dependency rule, checked on the source tree: imports point down.

    base       rto.errors, rto.registry, rto.schema, rto.rundir, rto.models, rto.generation,
               rto.forward, rto.progress, rto.runtime,
               rto.ray_env                                      import nothing of ours above them
    reward     reward.*                                         the base only
    prune      prune.*                                          the base only
    core       rto.ppo.*, rto.distributed.*                     the base, reward, prune
    pipelines  pipelines.*, rto.config (the job schema)         everything below
    app        rto.cli, rto.jobs, rto.report, rto.report_table,
               rto.cluster                                      everything

Every import counts, at module level or inside a function (a deferred import that climbs is still
an upward dependency). A deferred import of our own code is allowed only with a reason on its line
or the line above (start-up time), and never upward.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("rto", "reward", "prune", "pipelines")
LAYERS = {
    "base": 0,
    "reward": 1,
    "prune": 1,
    "core": 2,
    "pipelines": 3,
    "app": 4,
}
BASE = {"rto", "rto.errors", "rto.registry", "rto.schema", "rto.rundir", "rto.models", "rto.generation",
        "rto.forward", "rto.progress", "rto.runtime", "rto.ray_env"}  # fmt: skip
APP = {"rto.cli", "rto.jobs", "rto.report", "rto.report_table", "rto.cluster"}


def layer_of(module: str) -> str:
    if module in BASE:
        return "base"
    if module in APP:
        return "app"
    if module == "rto.config" or module.startswith("pipelines"):
        return "pipelines"
    if module.startswith(("rto.ppo", "rto.distributed")):
        return "core"
    top = module.split(".")[0]
    if top in ("reward", "prune"):
        return top
    raise AssertionError(f"{module} belongs to no layer: add it to tests/test_layers.py")


def modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported module, line, deferred) for every import of our packages in the file."""
    tree = ast.parse(path.read_text())
    found = []

    def visit(node: ast.AST, deferred: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = deferred or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            if isinstance(child, ast.Import):
                found.extend((a.name, child.lineno, deferred) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                found.append((child.module, child.lineno, deferred))
            visit(child, inner)

    visit(tree, False)
    return [(m, line, d) for m, line, d in found if m.split(".")[0] in PACKAGES]


def resolve(name: str, known: dict[str, Path]) -> str:
    while name not in known and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def test_every_module_belongs_to_a_layer():
    for name in modules():
        layer_of(name)


def test_no_import_climbs_a_layer():
    known = modules()
    upward = []
    for name, path in sorted(known.items()):
        here = layer_of(name)
        for imported, line, _ in imports(path):
            target = resolve(imported, known)
            there = layer_of(target)
            sideways = {here, there} == {"reward", "prune"}
            if LAYERS[there] > LAYERS[here] or sideways:
                upward.append(f"{path.relative_to(ROOT)}:{line} ({here}) imports {imported} ({there})")
    assert not upward, "imports that climb:\n" + "\n".join(upward)


def test_deferred_imports_of_our_code_say_why():
    """A function-level import of our own code must carry a comment saying why it is deferred."""
    unexplained = []
    for path in sorted(modules().values()):
        lines = path.read_text().splitlines()
        for imported, line, deferred in imports(path):
            if not deferred:
                continue
            if not _explained(lines, line):
                unexplained.append(f"{path.relative_to(ROOT)}:{line} defers {imported} without a reason")
    assert not unexplained, "\n".join(unexplained)


def _explained(lines: list[str], line: int) -> bool:
    """A comment on the import's line, or on the lines of the import block just above it."""
    if "#" in lines[line - 1]:
        return True
    for above in reversed(lines[: line - 1]):
        text = above.strip()
        if text.startswith("#"):
            return True
        if text and not text.startswith(("from ", "import ", ")")) and not text.endswith((",", "(")):
            return False
    return False


@pytest.mark.parametrize("module", ["rto.config", "rto.cli"])
def test_the_job_schema_and_the_cli_load_without_torch(module):
    import subprocess
    import sys

    code = f"import {module}, sys; heavy = [m for m in ('torch', 'transformers', 'ray', 'deepspeed', 'trl') if m in sys.modules]; print(heavy)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
