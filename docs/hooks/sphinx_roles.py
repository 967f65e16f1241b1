"""griffe extension: the docstrings' Sphinx roles (:func:`x`, :class:`~a.B`) as code spans.

The package's docstrings name other objects the way Sphinx and `help()` readers expect;
mkdocstrings would print the roles as they are written.
"""

from __future__ import annotations

import re

import griffe

ROLE = re.compile(r":(?:class|func|mod|meth|data|attr|exc|obj):`~?([^`]+)`")


class SphinxRoles(griffe.Extension):
    def on_instance(self, *, obj, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = ROLE.sub(r"`\1`", obj.docstring.value)
