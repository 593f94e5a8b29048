"""Every public function of the package is annotated: its arguments here, its return type by ruff (ANN201).

ruff's argument rule (ANN001) also covers private helpers, so the arguments of public functions are checked
here instead: module-level functions and the methods of public classes whose names do not start with `_`,
in the repository root's modules and every subpackage (tests/, scripts/ and space/ aside). `self`, `cls`,
`*args` and `**kwargs` need no annotation.
"""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def package_files():
    files = sorted(REPO.glob("*.py"))
    for init in sorted(REPO.glob("*/__init__.py")):
        files += sorted(init.parent.rglob("*.py"))
    return files


def unannotated(tree):
    """(line, qualified name, missing argument names) of each public function with unannotated arguments."""
    found = []

    def visit(node, prefix, in_class):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef) and not child.name.startswith("_"):
                visit(child, f"{prefix}{child.name}.", True)
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) and not child.name.startswith("_"):
                args = [*child.args.posonlyargs, *child.args.args, *child.args.kwonlyargs]
                static = any(isinstance(d, ast.Name) and d.id == "staticmethod" for d in child.decorator_list)
                if in_class and not static and args:
                    args = args[1:]  # self or cls
                missing = [a.arg for a in args if a.annotation is None]
                if missing:
                    found.append((child.lineno, prefix + child.name, missing))

    visit(tree, "", False)
    return found


def test_the_check_sees_unannotated_arguments():
    source = "def f(a, b: int, *args, **kwargs) -> None: ...\nclass C:\n    def m(self, x) -> None: ...\n"
    assert unannotated(ast.parse(source)) == [(1, "f", ["a"]), (3, "C.m", ["x"])]
    private = "def _f(a): ...\nclass _C:\n    def m(self, x): ...\n"
    assert unannotated(ast.parse(private)) == []


def test_public_functions_annotate_their_arguments():
    files = package_files()
    assert {"modeling_mqwen.py", "runtime.py"} <= {f.name for f in files} and len(files) > 50
    problems = [
        f"{path.relative_to(REPO)}:{line} {name}({', '.join(missing)})"
        for path in files
        for line, name, missing in unannotated(ast.parse(path.read_text(), str(path)))
    ]
    assert not problems, "public functions with unannotated arguments:\n" + "\n".join(problems)
