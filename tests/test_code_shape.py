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


def test_embedcache_has_short_functions_few_params_and_one_way_imports():
    problems = code_shape.check(ROOT / "embedcache")
    assert not problems, "tools/code_shape.py found:\n" + "\n".join(problems)


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
        extraction="from .train import t\nfrom .extraction import e\n",
        train="def lazy():\n    from .extraction import e\n",
    )
    assert code_shape.check(package) == []


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
        "2 functions in 2 modules: all within 81 lines and 8 parameters; imports follow ORDER\n"
    )
