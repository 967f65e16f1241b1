"""Check a package's shape: short functions and modules, few parameters, one-way imports.

Prints one ``path:line: message`` per violation and exits 1, or a one-line summary and exits 0.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path


class Verbs(tuple):
    """One rank of verbs in ORDER: each may import what comes before, none another verb.

    A verb is one command's work; what two verbs share (the forward pass, the model types)
    lives in a module below them, so that changing one verb cannot change another.
    """

    def __new__(cls, *names: str) -> Verbs:
        return super().__new__(cls, names)


# A module may import only modules earlier in this list (or itself).
# A tuple is one rank whose members may import each other; Verbs(...) one rank whose members
# may not.
ORDER = (
    "errors",
    "identity",
    "config",
    "folding",
    "runtime",
    "locks",
    "outputs",
    "tblog",
    "distributed",
    "report",
    "calibration",
    "multilabel",
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
    "forward",
    "models",
    Verbs("extraction", "train", "finetuning", "inference", "exporting", "auditing"),
    "ranking",
    "comparison",
    "quickstart",
    "cli",
    "__init__",
    "__main__",
)
MAX_LINES, MAX_PARAMS, MAX_MODULE_LINES = 80, 8, 700
README_BEGIN, README_END = "<!-- ORDER -->", "<!-- /ORDER -->"
FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef)


def ranks(order: tuple) -> tuple[dict[str, int], frozenset[str]]:
    """(module -> rank, the modules that are verbs) of an ORDER."""
    rank = {
        name: i
        for i, entry in enumerate(order)
        for name in (entry if isinstance(entry, tuple) else (entry,))
    }
    verbs = frozenset(name for entry in order if isinstance(entry, Verbs) for name in entry)
    return rank, verbs


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


def import_problems(trees: dict[tuple[str, ...], ast.Module], name: str, order: tuple):
    rank, verbs = ranks(order)
    modules = {parts[0] for parts in trees}
    for parts, tree in trees.items():
        module = parts[0]
        if module not in rank:
            yield parts, 1, f"{module} is not in ORDER (add it to ORDER in tools/code_shape.py)"
            continue
        for line, target in imported_modules(tree, parts[:-1], name, modules):
            if rank.get(target, -1) > rank[module]:
                yield parts, line, f"{module} imports {target}, which comes later in ORDER"
            elif module in verbs and target in verbs and target != module:
                yield (
                    parts,
                    line,
                    f"{module} imports {target}: verbs may not import each other "
                    "(move what they share to a module below the verbs in ORDER)",
                )


def module_problems(package_dir: Path, max_module_lines: int):
    """(path parts, 1, message) for every module longer than ``max_module_lines`` lines."""
    for path in sorted(package_dir.rglob("*.py")):
        lines = len(path.read_text().splitlines())
        if lines > max_module_lines:
            parts = path.relative_to(package_dir).with_suffix("").parts
            name = ".".join(parts)
            yield parts, 1, f"module {name} is {lines} lines (limit {max_module_lines})"


def rank_text(entry: str | tuple[str, ...]) -> str:
    """One ORDER entry as README writes it: ``a``, ``a/b`` (members may import each other) or
    ``{a, b}`` (verbs, which may not)."""
    if isinstance(entry, Verbs):
        return "{" + ", ".join(entry) + "}"
    return "/".join(entry) if isinstance(entry, tuple) else entry


def order_text(order: tuple = ORDER) -> str:
    """ORDER as README lists it, the dunder modules (last by nature) left out."""
    return ", ".join(rank_text(e) for e in order if not str(e).startswith("__")) + "."


def readme_problems(readme: Path, order: tuple = ORDER) -> list[str]:
    """A ``path:line: message`` line if README's module order (between README_BEGIN and
    README_END) is missing or differs from ``order``."""
    readme = Path(readme)
    text = readme.read_text()
    begin, end = text.find(README_BEGIN), text.find(README_END)
    if begin < 0 or end < begin:
        return [f"{readme}:1: no {README_BEGIN} ... {README_END} block with the module order"]
    line = text.count("\n", 0, begin) + 1
    listed = " ".join(text[begin + len(README_BEGIN) : end].split())
    if listed == order_text(order):
        return []
    return [
        f"{readme}:{line}: the module order differs from ORDER in tools/code_shape.py; "
        f"list it as: {order_text(order)}"
    ]


def check(
    package_dir: Path,
    max_lines: int = MAX_LINES,
    max_params: int = MAX_PARAMS,
    max_module_lines: int = MAX_MODULE_LINES,
    order: tuple = ORDER,
) -> list[str]:
    """Every violation in ``package_dir`` as a ``path:line: message`` line."""
    package_dir = Path(package_dir)
    trees = parse(package_dir)
    found = [
        (parts, line, message)
        for parts, tree in trees.items()
        for line, message in function_problems(tree, max_lines, max_params)
    ]
    found += import_problems(trees, package_dir.name, order)
    found += module_problems(package_dir, max_module_lines)
    return [
        f"{Path(package_dir.name, *parts).with_suffix('.py')}:{line}: {message}"
        for parts, line, message in sorted(found)
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = Path(__file__).resolve().parents[1] / "embedcache"
    parser.add_argument("package_dir", nargs="?", type=Path, default=default)
    parser.add_argument("--max-lines", type=int, default=MAX_LINES, help="per function")
    parser.add_argument("--max-params", type=int, default=MAX_PARAMS, help="per function")
    parser.add_argument(
        "--max-module-lines", type=int, default=MAX_MODULE_LINES, help="per module (file)"
    )
    parser.add_argument(
        "--readme", type=Path, help="also check that this file lists the module order of ORDER"
    )
    args = parser.parse_args(argv)
    problems = check(args.package_dir, args.max_lines, args.max_params, args.max_module_lines)
    problems += readme_problems(args.readme) if args.readme else []
    print("\n".join(problems) if problems else summary(args))
    return 1 if problems else 0


def summary(args: argparse.Namespace) -> str:
    trees = parse(args.package_dir)
    functions = sum(
        isinstance(node, FUNCTIONS) for tree in trees.values() for node in ast.walk(tree)
    )
    readme = f"; {args.readme} lists it" if args.readme else ""
    return (
        f"{functions} functions in {len(trees)} modules of at most {args.max_module_lines} "
        f"lines: all within {args.max_lines} lines and {args.max_params} parameters; "
        f"imports follow ORDER{readme}"
    )


if __name__ == "__main__":
    sys.exit(main())
