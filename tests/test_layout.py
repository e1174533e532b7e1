"""The layout: imports flow one way (no module reaches itself through its imports, those inside
functions included), model.py imports nothing of the project, and runs.py sits below the scripts."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODULES = {p.stem: p for p in ROOT.glob("*.py")} | {"data": ROOT / "data" / "__init__.py"}


def project_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names & set(MODULES)


GRAPH = {m: project_imports(p) - {m} for m, p in MODULES.items()}


def reaches(a: str, b: str, seen: tuple = ()) -> bool:
    return any(c == b or (c not in seen and reaches(c, b, (*seen, c))) for c in GRAPH[a])


def test_no_module_reaches_itself_through_its_imports():
    assert [m for m in sorted(GRAPH) if reaches(m, m)] == []


def test_the_model_imports_nothing_of_the_project():
    assert GRAPH["model"] == set()


def test_the_run_formats_sit_below_the_scripts():
    assert not any(reaches("runs", script) for script in ("train", "evaluate", "router", "report"))
