"""The ``embedcache`` command group: expected mistakes as one line, signals as a clean stop."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator

import click

from .. import __version__
from ..errors import EmbedcacheError
from ..outputs import shown

# What to do after Ctrl-C (or a scheduler's SIGTERM), per verb.
RESUME_HINTS = {
    "extract": "re-run the same command to resume",
    "train-head": "re-run the same command with --resume to continue",
    "finetune": "re-run the same command with --resume to continue from OUT.last.pt",
}


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP (a scheduler's preemption, a closed terminal): unwinds like Ctrl-C, so
    the partial work is flushed and closed on the way out."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _terminate(signum, frame) -> None:
    raise Terminated(signum)


@contextlib.contextmanager
def _stop_signals() -> Iterator[None]:
    """SIGTERM and SIGHUP raise :class:`Terminated` in the main thread while the body runs."""
    names = [n for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n)]
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {n: signal.signal(getattr(signal, n), _terminate) for n in names}
    try:
        yield
    finally:
        for n, handler in previous.items():
            signal.signal(getattr(signal, n), handler)


class _Group(click.Group):
    """Turns expected mistakes into one line on stderr and exit code 1 (no traceback)."""

    def invoke(self, ctx: click.Context):
        try:
            with _stop_signals():
                return super().invoke(ctx)
        except EmbedcacheError as e:
            raise click.ClickException(shown(e)) from None
        except KeyboardInterrupt as e:
            hint = RESUME_HINTS.get(ctx.invoked_subcommand or "")
            what = (
                f"stopped by {signal.Signals(e.signum).name}"
                if isinstance(e, Terminated)
                else "interrupted"
            )
            click.echo(f"{what}; {hint}" if hint else what, err=True)
            sys.exit(128 + e.signum if isinstance(e, Terminated) else 130)


@click.group(
    cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100}
)
@click.version_option(__version__, prog_name="embedcache")
def main() -> None:
    """Transfer learning on images with a feature cache.

    A frozen pretrained backbone runs once over your images and its pooled
    features go to an HDF5 file; heads train on that file in seconds;
    finetune then trains the last blocks of the backbone with the head.

    \b
      embedcache extract photos/ --out cache.h5        (efficientnet_lite0 by default)
      embedcache audit cache.h5 --out audit/           (duplicates, leaks, label errors)
      embedcache train-head cache.h5 --out head.pt     (the default head: probe + MLP)
      embedcache evaluate head.pt cache.h5 --split test
      embedcache predict head.pt photo.jpg
      embedcache finetune photos/ --head head.pt --unfreeze 2 --out model.pt
      embedcache compare photos/                       (feature extraction or fine-tuning?)
      embedcache export model.pt --out model.onnx      (serve it elsewhere)
      embedcache export-features cache.h5 --out feats/ (.npy + Parquet for other tools)
      embedcache info cache.h5 | embedcache backbones | embedcache demo

    Every verb has --help; the guides are in docs/ (mkdocs serve).
    """
