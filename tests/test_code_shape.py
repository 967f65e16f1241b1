"""tools/code_shape.py: the real package passes it, and the checker itself finds what it should."""

from __future__ import annotations

import importlib.util
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("code_shape", ROOT / "tools" / "code_shape.py")
code_shape = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(code_shape)


def test_embedcache_has_short_functions_and_modules_few_params_and_one_way_imports():
    problems = code_shape.check(ROOT / "embedcache")
    assert not problems, "tools/code_shape.py found:\n" + "\n".join(problems)


def test_the_development_page_lists_the_module_order_of_order():
    problems = code_shape.readme_problems(ROOT / "docs" / "development.md")
    assert not problems, "\n".join(problems)


def make_package(tmp_path: Path, **modules: str) -> Path:
    package = tmp_path / "pkg"
    package.mkdir()
    for name, source in modules.items():
        (package / f"{name}.py").write_text(textwrap.dedent(source))
    return package


def function_of(lines: int) -> str:
    """A function spanning ``lines`` lines, def line included."""
    return "def f():\n" + "    x = 1\n" * (lines - 1)


def test_function_length_limit_is_inclusive(tmp_path):
    package = make_package(tmp_path, errors="@staticmethod\n" + function_of(80))
    assert code_shape.check(package) == []
    (package / "errors.py").write_text(function_of(81))
    assert code_shape.check(package) == ["pkg/errors.py:1: f is 81 lines (limit 80)"]


def test_nested_and_async_functions_are_measured(tmp_path):
    source = "class C:\n    async def g(self):\n        def inner():\n" + "            x = 1\n" * 81
    package = make_package(tmp_path, errors=source)
    assert code_shape.check(package) == [
        "pkg/errors.py:2: g is 83 lines (limit 80)",
        "pkg/errors.py:3: inner is 82 lines (limit 80)",
    ]


def test_parameter_limit(tmp_path):
    package = make_package(
        tmp_path,
        errors="""
        def eight(a, b, /, c, d, *, e, f, g, h): ...
        def nine(a, b, /, c, d, *, e, f, g, h, i): ...
        class C:
            def method(self, a, b, c, d, e, f, g, h, *args, **options): ...
            @classmethod
            def build(cls, a, b, c, d, e, f, g, h): ...
        """,
    )
    assert code_shape.check(package) == ["pkg/errors.py:3: nine takes 9 parameters (limit 8)"]
    assert code_shape.check(package, max_params=9) == []


@pytest.mark.parametrize(
    "statement",
    [
        "from .cache import x",
        "from . import cache",
        "from .cache.sub import x",
        "import pkg.cache",
        "from pkg import cache",
        "def lazy():\n    from .cache import x",
    ],
)
def test_importing_a_later_module_is_reported(tmp_path, statement):
    package = make_package(tmp_path, errors="", data=statement + "\n", cache="")
    line = statement.count("\n") + 1
    assert code_shape.check(package) == [
        f"pkg/data.py:{line}: data imports cache, which comes later in ORDER"
    ]


def test_importing_earlier_modules_itself_or_a_group_member_is_allowed(tmp_path):
    package = make_package(
        tmp_path,
        errors="",
        cache="from .errors import E\nfrom . import errors\nimport pkg.errors\n",
        reader="from .writer import t\nfrom .reader import e\n",
        writer="def lazy():\n    from .reader import e\n",
    )
    order = ("errors", "cache", ("reader", "writer"))
    assert code_shape.check(package, order=order) == []


@pytest.mark.parametrize(
    "statement",
    ["from .train import t", "from . import train", "def lazy():\n    import pkg.train"],
)
def test_a_verb_importing_another_verb_is_reported(tmp_path, statement):
    package = make_package(tmp_path, errors="", extraction=statement + "\n", train="")
    line = statement.count("\n") + 1
    assert code_shape.check(package) == [
        f"pkg/extraction.py:{line}: extraction imports train: verbs may not import each other "
        "(move what they share to a module below the verbs in ORDER)"
    ]


def test_a_verb_may_import_itself_and_what_is_below_the_verbs(tmp_path):
    package = make_package(
        tmp_path,
        errors="",
        forward="from .errors import E\n",
        models="from .forward import f\n",
        train="from .forward import f\nfrom .models import m\nfrom .train import t\n",
        comparison="from .train import t\nfrom .extraction import e\n",
        extraction="",
    )
    (package / "auditing").mkdir()
    (package / "auditing" / "__init__.py").write_text(
        "from . import page\nfrom ..models import m\n"
    )
    (package / "auditing" / "page.py").write_text("from ..errors import E\n")
    assert code_shape.check(package) == []


def test_a_custom_order_may_name_its_own_verbs(tmp_path):
    package = make_package(tmp_path, a="", b="from .a import x\n")
    assert code_shape.check(package, order=(code_shape.Verbs("a", "b"),)) == [
        "pkg/b.py:1: b imports a: verbs may not import each other "
        "(move what they share to a module below the verbs in ORDER)"
    ]
    assert code_shape.check(package, order=(("a", "b"),)) == []


def test_module_length_limit_is_inclusive(tmp_path):
    package = make_package(tmp_path, errors="x = 1\n" * 700)
    assert code_shape.check(package) == []
    (package / "errors.py").write_text("x = 1\n" * 701)
    assert code_shape.check(package) == ["pkg/errors.py:1: module errors is 701 lines (limit 700)"]
    assert code_shape.check(package, max_module_lines=701) == []
    (package / "auditing").mkdir()
    (package / "auditing" / "page.py").write_text("# a comment\n" * 702)
    assert code_shape.check(package, max_module_lines=701) == [
        "pkg/auditing/page.py:1: module auditing.page is 702 lines (limit 701)"
    ]


def test_version_is_the_only_name_any_module_may_take_from_init(tmp_path):
    package = make_package(tmp_path, __init__="__version__ = '1'\nX = 1\n", data="")
    (package / "data.py").write_text("from . import __version__\n")
    assert code_shape.check(package) == []
    (package / "data.py").write_text("from . import X\n")
    assert code_shape.check(package) == [
        "pkg/data.py:1: data imports __init__, which comes later in ORDER"
    ]


def test_a_module_missing_from_order_is_reported(tmp_path):
    package = make_package(tmp_path, errors="", helpers="from .errors import E\n")
    assert code_shape.check(package) == [
        "pkg/helpers.py:1: helpers is not in ORDER (add it to ORDER in tools/code_shape.py)"
    ]


def test_cli_prints_violations_or_a_summary(tmp_path, capsys):
    package = make_package(tmp_path, errors=function_of(81), data="def g(self, a): ...\n")
    assert code_shape.main([str(package)]) == 1
    assert capsys.readouterr().out == "pkg/errors.py:1: f is 81 lines (limit 80)\n"
    assert code_shape.main([str(package), "--max-lines", "81"]) == 0
    assert capsys.readouterr().out == (
        "2 functions in 2 modules of at most 700 lines: all within 81 lines and 8 parameters; "
        "imports follow ORDER\n"
    )
    assert code_shape.main([str(package), "--max-lines", "81", "--max-module-lines", "80"]) == 1
    assert capsys.readouterr().out == "pkg/errors.py:1: module errors is 81 lines (limit 80)\n"


def readme_with(tmp_path: Path, listed: str) -> Path:
    readme = tmp_path / "README.md"
    readme.write_text(f"# pkg\n\nThe order:\n\n<!-- ORDER -->\n{listed}\n<!-- /ORDER -->\n")
    return readme


def test_readme_order_is_checked_against_order(tmp_path):
    order = ("errors", ("reader", "writer"), code_shape.Verbs("extract", "train"), "cli")
    expected = "errors, reader/writer, {extract, train}, cli."
    assert code_shape.order_text(order) == expected
    assert code_shape.order_text(ORDER_WITH_DUNDERS) == "errors, cli."
    wrapped = readme_with(tmp_path, "errors, reader/writer,\n{extract,\ntrain}, cli.")
    assert code_shape.readme_problems(wrapped, order) == []  # line breaks are free
    stale = readme_with(tmp_path, "errors, reader/writer, extract/train, cli.")
    assert code_shape.readme_problems(stale, order) == [
        f"{stale}:5: the module order differs from ORDER in tools/code_shape.py; "
        f"list it as: {expected}"
    ]
    stale.write_text("# pkg\n")
    assert code_shape.readme_problems(stale, order) == [
        f"{stale}:1: no <!-- ORDER --> ... <!-- /ORDER --> block with the module order"
    ]


ORDER_WITH_DUNDERS = ("errors", "cli", "__init__", "__main__")


def test_cli_checks_the_readme_when_asked(tmp_path, capsys):
    package = make_package(tmp_path, errors="")
    readme = readme_with(tmp_path, "errors.")
    assert code_shape.main([str(package), "--readme", str(readme)]) == 1
    assert capsys.readouterr().out.startswith(f"{readme}:5: the module order differs")
    readme.write_text(f"<!-- ORDER -->{code_shape.order_text()}<!-- /ORDER -->")
    assert code_shape.main([str(package), "--readme", str(readme)]) == 0
    assert capsys.readouterr().out.endswith(f"imports follow ORDER; {readme} lists it\n")
