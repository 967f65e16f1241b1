"""Command-line interface: parse options, call the Python API, print. Nothing else lives here.

:mod:`.group` is the ``embedcache`` command group (one-line errors, signals), :mod:`.options`
builds click options from the config fields of :mod:`embedcache.config`, :mod:`.commands`
holds the verbs and :mod:`.show` what they print.
"""

from . import commands  # noqa: F401 - defining the verbs adds them to main
from .group import RESUME_HINTS, Terminated, _stop_signals, main

__all__ = ["RESUME_HINTS", "Terminated", "_stop_signals", "main"]
