"""TensorBoard event files of the training runs (``--log-dir``), for ``tensorboard --logdir``.

A run is one folder LOG_DIR/RUN of event files written by torch's SummaryWriter: a scalar per
epoch for each of ``loss/train``, ``loss/val``, ``accuracy/train`` and ``accuracy/val`` (one
chart per tag, every run's curve on it), and the run's settings, as a text table and as
hparams. Without a log dir nothing is imported or written. Event files are always new files
(TensorBoard names them by time, host, process and a counter); a run written again adds one
beside the earlier run's, as TensorBoard does.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import EmbedcacheError
from .outputs import shown, write_error

INSTALL = "--log-dir writes TensorBoard files: pip install 'embedcache[tensorboard]'"
# the training histories' names (train_head's, finetune's) -> TensorBoard tags
TAGS = {
    "train_loss": "loss/train",
    "val_loss": "loss/val",
    "train_acc": "accuracy/train",
    "val_acc": "accuracy/val",
    "val_map": "mAP/val",  # several labels per image
}


def _summary_writer() -> type:
    """torch's SummaryWriter, or the one-line error that says what to install."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch raises it when the tensorboard package is missing
        raise EmbedcacheError(INSTALL) from None
    return SummaryWriter


def check_log_dir(log_dir: str | Path | None) -> Path | None:
    """``log_dir`` as a Path once it is known that event files can go there; None: no logs.

    Refuses an empty name and an existing file, and says what to install when the
    tensorboard package is missing.
    """
    if log_dir is None:
        return None
    if str(log_dir).strip() == "":
        raise EmbedcacheError("--log-dir is empty; give a folder, e.g. runs/logs")
    path = Path(log_dir)
    if path.exists() and not path.is_dir():
        raise EmbedcacheError(
            f"--log-dir {shown(path)} is a file; pass a folder, e.g. {shown(path)}-logs"
        )
    _summary_writer()
    return path


def number(v: float) -> str:
    """A number as run names write it: 1e-3, 1.5e-3, 1e-2, 0.1, 0.5, 0, 300, 1e5 (powers of ten
    under 0.1 or from 10,000 in the e notation, so a sweep's names read alike)."""
    if v == 0 or 0.1 <= abs(v) < 1e4:
        return f"{v:g}"
    mantissa, exponent = f"{v:e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def run_name(*parts: object) -> str:
    """The parts (empty ones left out) joined by ``-``, safe as one folder name:
    ``run_name("head", "auto", "mlp")`` is ``head-auto-mlp``; ``:`` and ``/`` become ``_``."""
    text = "-".join(str(p) for p in parts if p is not None and str(p) != "")
    return re.sub(r"[^\w.=+-]", "_", text)


def sub_log_dir(log_dir: str | Path | None, *parts: object) -> str | None:
    """LOG_DIR/NAME (NAME: :func:`run_name` of ``parts``), or None without a log dir: the
    ``log_dir`` to give one cell of a grid (compare: backbone and fraction), whose runs then
    show in TensorBoard as ``NAME/head-linear``."""
    return None if log_dir is None else str(Path(log_dir) / run_name(*parts))


class RunLog:
    """One run's event files; without a writer (no log dir) every call does nothing."""

    def __init__(self, writer=None):
        self.writer = writer

    def scalars(self, step: int, values: dict) -> None:
        """Write ``values`` (history names such as ``val_acc``, or tags) at ``step``; None is
        left out (finetune's epoch 0 has no training loss)."""
        if self.writer is None:
            return
        for name, value in values.items():
            if value is not None:
                self.writer.add_scalar(TAGS.get(name, name), float(value), step)

    def close(self, ok: bool = True) -> None:
        if self.writer is None:
            return
        if ok:  # the hparams dashboard shows the run as finished
            from torch.utils.tensorboard.summary import hparams

            self.writer.file_writer.add_summary(hparams({}, {})[2])
        self.writer.close()

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, kind, value, tb) -> None:
        self.close(ok=kind is None)


@dataclass(frozen=True)
class Runs:
    """Where a verb's runs go: LOG_DIR/PREFIX-NAME, each with the verb's settings and its own."""

    log_dir: Path | None = None
    prefix: str = ""
    settings: dict = field(default_factory=dict)

    @classmethod
    def of(cls, log_dir: str | Path | None, prefix: str, settings: dict) -> Runs:
        """Runs under ``log_dir`` (checked: see :func:`check_log_dir`); none if it is None."""
        return cls(check_log_dir(log_dir), prefix, dict(settings))

    def sub(self, name: str) -> Runs:
        """These runs with ``name`` added to their prefix (``head`` -> ``head-auto``)."""
        return dataclasses.replace(self, prefix=run_name(self.prefix, name))

    def open(self, name: str = "", **settings) -> RunLog:
        """The run PREFIX-NAME, its settings (these runs' updated by ``settings``) written."""
        if self.log_dir is None:
            return RunLog()
        folder = self.log_dir / run_name(self.prefix, name)
        if folder.exists() and not folder.is_dir():
            raise EmbedcacheError(
                f"--log-dir {shown(self.log_dir)} holds a file {folder.name} where the run "
                f"{folder.name} goes; move it, or pass another --log-dir"
            )
        SummaryWriter = _summary_writer()
        every = {**self.settings, **settings}
        try:
            writer = SummaryWriter(log_dir=str(folder))
        except OSError as e:
            raise write_error(folder, e) from None
        writer.add_text("settings", _table(every))
        _hparams(writer, every)
        return RunLog(writer)


def _plain(v: object) -> object:
    """A setting as a number, bool or string (lists joined by commas)."""
    if isinstance(v, bool | int | float | str):
        return v
    if isinstance(v, list | tuple):
        return ",".join(str(x) for x in v)
    return str(v)


def _table(settings: dict) -> str:
    """The settings as a Markdown table (TensorBoard's text dashboard renders it)."""
    cells = [(k, str(_plain(v)).replace("|", "\\|")) for k, v in settings.items() if v is not None]
    rows = [f"| {k} | {v} |" for k, v in cells]  # a | in a value, escaped, stays in its cell
    return "\n".join(["| setting | value |", "| --- | --- |", *rows])


def _hparams(writer, settings: dict) -> None:
    """The settings as the hparams dashboard's session start: only that, so that the
    dashboard builds its table from every run's sessions and the scalars they hold."""
    from torch.utils.tensorboard.summary import hparams

    values = {k: _plain(v) for k, v in settings.items() if v is not None}
    writer.file_writer.add_summary(hparams(values, {})[1])
