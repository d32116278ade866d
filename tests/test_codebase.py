"""Rules of the codebase that no linter checks: sizes, private names, page assets.

The import rules between layers are import-linter contracts (``make lint``); these are the rest
of "How we want the code" that can be checked mechanically.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "clipseg_cli"
MAX_CLASS_LINES = 200
MAX_FUNCTION_LINES = 120
# Typer command functions list every option in their signature; they are exempt.
COMMANDS = PACKAGE / "commands"


def _python_files(*roots: Path) -> list[Path]:
    return sorted(path for root in roots for path in root.rglob("*.py"))


def _parsed(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _command_functions() -> set[tuple[Path, str]]:
    """Functions registered with ``app.command(...)(module.function)`` in commands/app.py."""
    app = _parsed(COMMANDS / "app.py")
    registered = set()
    for node in ast.walk(app):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Call)
            and isinstance(node.func.func, ast.Attribute)
            and node.func.func.attr == "command"
            and node.args
            and isinstance(node.args[0], ast.Attribute)
            and isinstance(node.args[0].value, ast.Name)
        ):
            registered.add((node.args[0].value.id, node.args[0].attr))
    aliases = {"eval_commands": "eval", "train_commands": "train"}
    return {(COMMANDS / f"{aliases.get(module, module)}.py", name) for module, name in registered}


def test_no_class_or_function_is_too_long() -> None:
    commands = _command_functions()
    assert len(commands) >= 7, commands  # segment, matte, models, eval, calibrate, train, ...
    too_long = []
    for path in _python_files(PACKAGE):
        for node in ast.walk(_parsed(path)):
            lines = getattr(node, "end_lineno", 0) - getattr(node, "lineno", 0) + 1
            where = f"{path.relative_to(REPO)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.ClassDef) and lines > MAX_CLASS_LINES:
                too_long.append(f"class {node.name} ({lines} lines) {where}")
            elif (
                isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
                and lines > MAX_FUNCTION_LINES
                and (path, node.name) not in commands
            ):
                too_long.append(f"def {node.name} ({lines} lines) {where}")
    assert not too_long, "\n".join(too_long)


def _private_uses(path: Path) -> list[str]:
    """Imports of an underscore name from a clipseg_cli module, and ``module._name`` uses of
    an imported clipseg_cli module, in one file."""
    tree = _parsed(path)
    modules = set()  # local names bound to clipseg_cli modules
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("clipseg_cli"):
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append(f"from {node.module} import {alias.name}")
                modules.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("clipseg_cli"):
                    modules.add(alias.asname or alias.name.split(".")[0])
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
            and isinstance(node.value, ast.Name)
            and node.value.id in modules
        ):
            found.append(f"{node.value.id}.{node.attr}")
    return [f"{path.relative_to(REPO)}: {use}" for use in found]


@pytest.mark.parametrize("root", ["clipseg_cli", "tests", "bench", "scripts"])
def test_no_module_or_test_uses_another_modules_private_names(root: str) -> None:
    uses = [use for path in _python_files(REPO / root) for use in _private_uses(path)]
    assert not uses, "\n".join(uses)


def test_no_page_asset_lives_in_a_python_string() -> None:
    """HTML, CSS and JavaScript are files of the package (io/report), not string constants."""
    markers = ("<!DOCTYPE", "<html", "</script>", "addEventListener(", "font-family:")
    offenders = []
    for path in _python_files(PACKAGE):
        tree = _parsed(path)
        docstrings = {
            id(node.body[0].value)
            for node in ast.walk(tree)
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef)
            and node.body
            and isinstance(node.body[0], ast.Expr)
        }
        for node in ast.walk(tree):
            if id(node) in docstrings:
                continue
            text = node.value if isinstance(node, ast.Constant) else None
            if isinstance(text, str) and any(marker in text for marker in markers):
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not offenders, offenders
