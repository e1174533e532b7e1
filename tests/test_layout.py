"""The layout: imports flow one way (no module reaches itself through its imports, those inside
functions included), model.py imports nothing of the project, runs.py sits below the scripts, and
README's map of the papers names code that exists."""
import ast
import re
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


def test_every_name_in_the_readme_map_of_the_papers_is_defined_where_it_says():
    table = (ROOT / "README.md").read_text().split("Where the papers live")[1].split("\n\n")[1]
    named = re.findall(r"`(\w+)\.(\w+)`", table)
    defined = {m: {n.name for n in ast.walk(ast.parse(p.read_text()))
                   if isinstance(n, (ast.FunctionDef, ast.ClassDef))} for m, p in MODULES.items()}
    assert len(named) >= 10
    assert [f"{m}.{n}" for m, n in named if n not in defined.get(m, ())] == []
