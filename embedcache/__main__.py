"""``python -m embedcache``: the command line, also as torchrun's module entry point."""

from .cli import main

main(prog_name="embedcache")
