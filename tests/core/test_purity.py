"""core/ must stay pure: no I/O, clocks, randomness, logging or async imports."""

import ast
from pathlib import Path

import earendil_py.core

FORBIDDEN = {
    "anyio",
    "asyncio",
    "trio",
    "socket",
    "time",
    "os",
    "random",
    "secrets",
    "logging",
    "structlog",
    "sqlite3",
    "threading",
    "subprocess",
    "selectors",
    "datetime",
}


def test_core_imports_nothing_impure() -> None:
    core_dir = Path(earendil_py.core.__file__).parent
    offenders = []
    files = sorted(core_dir.glob("*.py"))
    assert len(files) > 2
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            else:
                continue
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in FORBIDDEN]
    assert offenders == []
