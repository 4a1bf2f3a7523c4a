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


# The shape of issue 30: each main() is its method's textbook algorithm, every variant one call away.
BUDGETS = {"common.py": 900, "opsd.py": 400, "engine.py": 400}  # non-blank lines (common: +150 in issue 31)
README_LINES = 480
MAIN_LINES = 50  # each script's main(), from `def main` to its last line


def top_level_functions(name):
    """{function name: (first line, last line)} of the top-level functions of `name`.py, in order."""
    tree = ast.parse((REPO / f"{name}.py").read_text())
    return {node.name: (node.lineno, node.end_lineno) for node in tree.body
            if isinstance(node, ast.FunctionDef)}


def test_the_files_keep_to_their_budgets():
    over = {file: count for file, limit in BUDGETS.items()
            if (count := sum(bool(line.strip()) for line in (REPO / file).read_text()
                             .splitlines())) > limit}
    assert over == {}, f"non-blank lines over budget {BUDGETS}: {over}"
    assert len((REPO / "README.md").read_text().splitlines()) <= README_LINES


def test_each_main_is_short_and_comes_before_the_variants_with_the_command_line_last():
    for method in sorted(METHODS):
        functions = top_level_functions(method)
        first, last = functions["main"]
        assert last - first + 1 <= MAIN_LINES, f"{method}.main() has {last - first + 1} lines"
        assert list(functions)[-1] == "parse_args", f"{method}.py: the command line is not last"
        assert len([name for name in functions if functions[name][0] < first]) <= 8, \
            f"{method}.py: main() comes after more than its formulas"


def test_no_main_holds_an_inline_variant_block():
    """A variant enters main() as one call of its own function, not as `if args.flag:` with a
    block under it (a one-line conditional expression choosing a call is fine)."""
    for method in sorted(METHODS):
        tree = ast.parse((REPO / f"{method}.py").read_text())
        main = next(node for node in tree.body if getattr(node, "name", None) == "main")
        inline = [node.lineno for node in ast.walk(main) if isinstance(node, ast.If)
                  and "args." in ast.unparse(node.test)]
        assert inline == [], f"{method}.main() branches on a flag at lines {inline}"


def test_the_toy_builder_imports_no_method_and_lines_stay_readable():
    source = (REPO / "toy" / "build.py").read_text()
    assert not any(f"import {method}" in source or f"from {method} " in source
                   for method in METHODS)
    long_lines = [f"{path.name}:{number}" for path in REPO.glob("*.py")
                  for number, line in enumerate(path.read_text().splitlines(), start=1)
                  if len(line) > 110]
    assert long_lines == []
