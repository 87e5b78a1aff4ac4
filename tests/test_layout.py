"""The library's wings: every module of `pipeline/` imports only its own wing and the wings below it, with no circle.

Wings, ground up (docs/concepts/architecture.md): `pipeline/config.py`; `pipeline/data/`; `pipeline/compute/`;
`pipeline/method/`; `pipeline/run/`. Above the library: `stages/`, then `flows/`. Imports are read from the source
(every `import`, at module level or inside a function), so a lazy import cannot hide an upward edge.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FLOORS = {"pipeline.config": 0, "pipeline.data": 1, "pipeline.compute": 2, "pipeline.method": 3, "pipeline.run": 4,
          "stages": 5, "flows": 6}  # fmt: skip


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def floor(module: str) -> int | None:
    """The floor of `module`: that of the longest prefix in FLOORS (None: not ours)."""
    hits = [prefix for prefix in FLOORS if module == prefix or module.startswith(prefix + ".")]
    return FLOORS[max(hits, key=len)] if hits else None


def imports(path: Path) -> set[str]:
    """Every module `path` imports (absolute names; `from a import b` counts as a.b when a.b is a module)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                if (REPO / (sub.replace(".", "/") + ".py")).is_file() or (REPO / sub.replace(".", "/")).is_dir():
                    out.add(sub)
    return out


def graph() -> dict[str, set[str]]:
    files = [p for top in ("pipeline", "stages", "flows") for p in (REPO / top).rglob("*.py")]
    names = {module_name(p): p for p in files}
    return {name: {m for m in imports(p) if m in names and m != name} for name, p in names.items()}


def test_every_pipeline_module_has_a_wing():
    for p in (REPO / "pipeline").rglob("*.py"):
        name = module_name(p)
        if name in ("pipeline", "pipeline.config") or p.name == "__init__.py":
            continue
        assert floor(name) is not None and name.count(".") == 2, f"{p}: put it in a wing ({', '.join(FLOORS)})"


def test_imports_only_go_down():
    upward = []
    for name, deps in graph().items():
        own = floor(name)
        if own is None:
            continue
        for dep in deps:
            if floor(dep) is not None and floor(dep) > own:
                upward.append(f"{name} (floor {own}) imports {dep} (floor {floor(dep)})")
    assert not upward, "imports that go up a wing:\n" + "\n".join(sorted(upward))


def test_no_import_circle():
    g = graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for d in sorted(g[n]):
            if state.get(d) == 1:
                pytest.fail("import circle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[n] = 2

    for n in sorted(g):
        if n not in state:
            visit(n)


def test_the_library_knows_no_orchestrator():
    """`pipeline/` and `stages/` never import Prefect or the CLI: stages run without the flow."""
    for top in ("pipeline", "stages"):
        for p in (REPO / top).rglob("*.py"):
            bad = {m for m in imports(p) if m.split(".")[0] in ("prefect", "typer", "flows")}
            assert not bad, f"{p} imports {sorted(bad)}"


def test_the_checker_sees_an_upward_import(tmp_path):
    """The rule can fail: a data-wing module importing the planner is caught."""
    src = "from pipeline.run import rounds\n\ndef f():\n    from pipeline.method.losses import dpo_loss\n"
    p = tmp_path / "x.py"
    p.write_text(src)
    found = imports(p)
    assert {"pipeline.run.rounds", "pipeline.method.losses"} <= found
    assert floor("pipeline.run.rounds") > floor("pipeline.data.artifacts")
