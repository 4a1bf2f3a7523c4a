"""The import rules of README's "How the code is laid out", read from the files themselves."""
import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROJECT = {path.stem for path in REPO.glob("*.py")}  # engine, common, lora, sft, grpo, opsd
METHODS = {"sft", "grpo", "opsd"}


def project_imports(name):
    """The project files that the top-level file `name`.py imports, anywhere in it."""
    tree = ast.parse((REPO / f"{name}.py").read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            imported.add(node.module.split(".")[0])
    return imported & PROJECT


def test_the_files_are_the_ones_the_rules_name():
    assert PROJECT == {"engine", "common", "lora"} | METHODS


def test_engine_and_lora_import_no_project_file():
    assert project_imports("engine") == set()
    assert project_imports("lora") == set()


def test_common_imports_no_method():
    assert project_imports("common") & METHODS == set()


def test_at_most_one_method_imports_another_and_nothing_imports_back():
    method_to_method = [(method, other) for method in METHODS
                        for other in project_imports(method) & METHODS]
    assert len(method_to_method) <= 1, method_to_method
    graph = {name: project_imports(name) for name in PROJECT}

    def reaches(start, goal, seen=()):
        return any(node == goal or (node not in seen and reaches(node, goal, (*seen, node)))
                   for node in graph[start])
    cycles = [name for name in PROJECT if reaches(name, name)]
    assert cycles == [], f"files that import themselves through others: {cycles}"
