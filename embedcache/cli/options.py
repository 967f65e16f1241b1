"""Click options built from config fields, and the helpers every verb shares to print."""

from __future__ import annotations

import dataclasses
import json

import click

from .group import main


class _IntOrAuto(click.ParamType):
    """A whole number (at least ``low``) or the word auto."""

    name = "integer|auto"

    def __init__(self, low: int | None):
        self.low = low

    def convert(self, value, param, ctx):
        if value is None or value == "auto" or isinstance(value, int):
            return value
        try:
            n = int(value)
        except ValueError:
            self.fail(f"expected a whole number or auto, got {value!r}", param, ctx)
        if self.low is not None and n < self.low:
            self.fail(f"{n} is smaller than the minimum {self.low}", param, ctx)
        return n


class _FloatList(click.ParamType):
    """'1e-3,3e-3' or a repeated option -> a list of floats."""

    name = "floats"

    def convert(self, value, param, ctx):
        if isinstance(value, list | tuple):
            return list(value)
        try:
            return [float(v) for v in str(value).split(",") if v.strip()]
        except ValueError:
            self.fail(f"expected numbers separated by commas, got {value!r}", param, ctx)


class _Bytes(click.ParamType):
    """'2GB', '512MB' or a number of bytes."""

    name = "size"
    UNITS = {
        "": 1,
        "B": 1,
        "KB": 1e3,
        "MB": 1e6,
        "GB": 1e9,
        "TB": 1e12,
        "KIB": 2**10,
        "MIB": 2**20,
        "GIB": 2**30,
    }

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        text = str(value).strip().upper().replace(" ", "")
        number = text.rstrip("KMGTIB")
        try:
            return int(float(number) * self.UNITS[text[len(number) :]])
        except (ValueError, KeyError):
            self.fail(f"expected a size such as 2GB or 512MB, got {value!r}", param, ctx)


# The path kinds of config fields (see embedcache.config.setting): what click checks first.
PATHS = {
    "file": click.Path(dir_okay=False),
    "folder": click.Path(file_okay=False),
    "existing": click.Path(exists=True),
}


def _click_type(f: dataclasses.Field, default) -> dict:
    """click's type (and flag or multiple) for a config field, from its metadata."""
    m = f.metadata
    if m["choices"]:
        return {"type": click.Choice(m["choices"])}
    if m["kind"] is bool:
        return {"is_flag": True}
    if m["kind"] == "bytes":
        return {"type": _Bytes()}
    if m["kind"] == "int-or-auto":
        return {"type": _IntOrAuto(m["low"])}
    if m["kind"] in PATHS:
        return {"type": PATHS[m["kind"]]}
    if isinstance(default, tuple):  # lists: repeat the option or separate by commas
        floats = m["kind"] is float or (
            m["kind"] is tuple and bool(default) and all(isinstance(v, float) for v in default)
        )
        return {"multiple": True, "type": _FloatList() if floats else str}
    if m["kind"] is int:
        return {"type": click.IntRange(min=m["low"]) if m["low"] is not None else int}
    if m["kind"] is float:
        return {
            "type": click.FloatRange(min=m["low"], max=m["high"], max_open=m["high"] is not None)
        }
    return {"type": str}


def _option(config: type, name: str):
    """A click option for one field of a config dataclass."""
    f = {f.name: f for f in dataclasses.fields(config)}[name]
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    flags = ("--" + name.replace("_", "-"), *f.metadata["flags"])
    kw = _click_type(f, default)
    # a flag on by default, or decided when unset (None), needs its off switch: --no-tutorial
    if default is True or (default is None and f.metadata["kind"] is bool):
        flags = (f"{flags[0]}/--no-{flags[0][2:]}", *flags[1:])
        kw.pop("is_flag")
    shown = default is not None and default is not False and not isinstance(default, tuple)
    help_text = f.metadata["help"]
    if isinstance(default, tuple):
        help_text += f" [default: {','.join(str(v) for v in default)}]"
    return click.option(*flags, name, default=default, show_default=shown, help=help_text, **kw)


def options(config: type, *names: str):
    """Decorate a command with the options of ``names`` (fields of ``config``), in that order."""

    def decorate(fn):
        for name in reversed(names):
            fn = _option(config, name)(fn)
        return fn

    return decorate


def all_options(config: type):
    """Decorate a command with an option for every field of ``config`` that has help."""
    return options(config, *option_fields(config))


def settings(config: type, values: dict):
    """The config from parsed options: repeated list options flattened, empty lists left at
    their default."""
    out = {}
    for k, v in values.items():
        if isinstance(v, tuple) and v and isinstance(v[0], list):
            v = tuple(x for group in v for x in group)
        if isinstance(v, tuple) and not v:
            continue
        out[k] = v
    return config(**out)


def output_options(fn):
    """--quiet, --verbose and --json, shared by every verb that prints results."""
    fn = click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")(fn)
    fn = click.option(
        "--verbose", "-v", is_flag=True, help="Also print the working: tables, choices, timings."
    )(fn)
    return click.option("--quiet", "-q", is_flag=True, help="No progress bars.")(fn)


def out_option(help_text: str, *, folder: bool = False):
    """The required --out of a verb: a file, or with ``folder`` a folder."""
    kind = click.Path(file_okay=False) if folder else click.Path(dir_okay=False)
    return click.option("--out", "-o", required=True, type=kind, help=help_text)


def emit_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))


def emit_metrics(r) -> None:
    """A training result as JSON: its metrics and the files it wrote."""
    emit_json({**r.metrics, "files": {k: str(v) for k, v in r.files.items()}})


def say(quiet: bool):
    return None if quiet else (lambda line: click.echo(line, err=True))


def option_fields(config: type) -> list[str]:
    """The fields of a config that are command-line options (those with help)."""
    return [f.name for f in dataclasses.fields(config) if f.metadata]


def data_verb(config: type, out_help: str):
    """A verb on DATA writing OUT, with every option of ``config``, --quiet and --json."""

    def decorate(fn):
        fn = output_options(fn)
        fn = all_options(config)(fn)
        fn = out_option(out_help)(fn)
        return main.command(fn.__name__)(click.argument("data", type=click.Path(path_type=str))(fn))

    return decorate
