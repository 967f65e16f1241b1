"""Check a package's shape: short functions, few parameters, imports in one direction.

Prints one ``path:line: message`` per violation and exits 1, or a one-line summary and exits 0.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

# A module may import only modules earlier in this list (or itself).
# A tuple is one rank: its members may import each other.
ORDER = (
    "errors",
    "identity",
    "config",
    "runtime",
    "locks",
    "outputs",
    "distributed",
    "report",
    "data",
    "exclusion",
    "sources",
    "weights",
    "backbones",
    "feed",
    "cache",
    "feature_export",
    "heads",
    "probe",
    "checkpoint",
    ("extraction", "train"),
    "finetuning",
    "inference",
    "exporting",
    "auditing",
    "comparison",
    "quickstart",
    "cli",
    "__init__",
    "__main__",
)
RANK = {
    name: rank
    for rank, entry in enumerate(ORDER)
    for name in (entry if isinstance(entry, tuple) else (entry,))
}
FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef)


def parse(package_dir: Path) -> dict[tuple[str, ...], ast.Module]:
    """Syntax trees keyed by the file's dotted path inside the package, e.g. ("cli",)."""
    return {
        path.relative_to(package_dir).with_suffix("").parts: ast.parse(path.read_text(), str(path))
        for path in sorted(package_dir.rglob("*.py"))
    }


def function_problems(tree: ast.Module, max_lines: int, max_params: int):
    for node in ast.walk(tree):
        if not isinstance(node, FUNCTIONS):
            continue
        lines = node.end_lineno - node.lineno + 1
        if lines > max_lines:
            yield node.lineno, f"{node.name} is {lines} lines (limit {max_lines})"
        args = node.args
        params = [a.arg for a in [*args.posonlyargs, *args.args, *args.kwonlyargs]]
        if params[:1] in (["self"], ["cls"]):
            params = params[1:]
        if len(params) > max_params:
            yield node.lineno, f"{node.name} takes {len(params)} parameters (limit {max_params})"


def from_target(node: ast.ImportFrom, package: tuple[str, ...], name: str) -> list[str] | None:
    """The dotted path inside the package that ``from ... import`` reads, or None if outside."""
    if not node.level:
        parts = (node.module or "").split(".")
        return parts[1:] if parts[0] == name else None
    if node.level > len(package) + 1:
        return None
    base = list(package[: len(package) - node.level + 1])  # each extra dot climbs one package
    return base + (node.module.split(".") if node.module else [])


def imported_modules(tree: ast.Module, package: tuple[str, ...], name: str, modules: set[str]):
    """(line, top-level module) for every import of the package's own modules, lazy ones too."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == name:
                    yield node.lineno, parts[1] if len(parts) > 1 else "__init__"
        elif isinstance(node, ast.ImportFrom):
            target = from_target(node, package, name)
            if target:
                yield node.lineno, target[0]
            elif target is not None:  # `from . import x`: x is a module, or a name in __init__
                for alias in node.names:
                    if alias.name != "__version__":  # the one constant any module may take
                        yield node.lineno, alias.name if alias.name in modules else "__init__"


def import_problems(trees: dict[tuple[str, ...], ast.Module], name: str):
    modules = {parts[0] for parts in trees}
    for parts, tree in trees.items():
        module = parts[0]
        if module not in RANK:
            yield parts, 1, f"{module} is not in ORDER (add it to ORDER in tools/code_shape.py)"
            continue
        for line, target in imported_modules(tree, parts[:-1], name, modules):
            if RANK.get(target, -1) > RANK[module]:
                yield parts, line, f"{module} imports {target}, which comes later in ORDER"


def check(package_dir: Path, max_lines: int = 80, max_params: int = 8) -> list[str]:
    """Every violation in ``package_dir`` as a ``path:line: message`` line."""
    package_dir = Path(package_dir)
    trees = parse(package_dir)
    found = [
        (parts, line, message)
        for parts, tree in trees.items()
        for line, message in function_problems(tree, max_lines, max_params)
    ]
    found += import_problems(trees, package_dir.name)
    return [
        f"{Path(package_dir.name, *parts).with_suffix('.py')}:{line}: {message}"
        for parts, line, message in sorted(found)
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = Path(__file__).resolve().parents[1] / "embedcache"
    parser.add_argument("package_dir", nargs="?", type=Path, default=default)
    parser.add_argument("--max-lines", type=int, default=80)
    parser.add_argument("--max-params", type=int, default=8)
    args = parser.parse_args(argv)
    problems = check(args.package_dir, args.max_lines, args.max_params)
    print("\n".join(problems) if problems else summary(args))
    return 1 if problems else 0


def summary(args: argparse.Namespace) -> str:
    trees = parse(args.package_dir)
    functions = sum(
        isinstance(node, FUNCTIONS) for tree in trees.values() for node in ast.walk(tree)
    )
    return (
        f"{functions} functions in {len(trees)} modules: all within {args.max_lines} lines "
        f"and {args.max_params} parameters; imports follow ORDER"
    )


if __name__ == "__main__":
    sys.exit(main())
