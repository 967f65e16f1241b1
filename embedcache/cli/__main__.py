"""``python -m embedcache.cli``: the command line."""

from . import main

main()
