"""Command-line interface: parse options, call the Python API, print. Nothing else lives here.

The options of the verbs that take a config are built from the config's fields
(:mod:`embedcache.config`): their names, defaults, choices and help come from
the library, so the two cannot drift apart.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import click

from . import __version__
from .config import (
    EXCLUDE_HELP,
    AuditConfig,
    CompareConfig,
    ExportFeaturesConfig,
    ExtractConfig,
    FinetuneConfig,
    HeadConfig,
)
from .errors import EmbedcacheError
from .outputs import shown

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
    features go to an HDF5 file; heads then train on that file in seconds;
    finetune then trains the last blocks of the backbone with the head.

    \b
      embedcache extract DATA --backbone efficientnet_lite0 --out cache.h5
      embedcache train-head cache.h5 --head linear --out head.pt
      embedcache finetune DATA --head head.pt --unfreeze 2 --out model.pt
      embedcache evaluate model.pt DATA --split val
      embedcache predict model.pt photo.jpg
      embedcache compare DATA            (every approach side by side)
      embedcache audit cache.h5 --out audit/   (duplicates, leaks, label errors, outliers)
      embedcache info cache.h5 | embedcache backbones | embedcache demo
      embedcache export model.pt --out model.onnx   (serve it elsewhere)
      embedcache export-features cache.h5 --out feats/  (.npy + Parquet for other tools)
    """


# ---------------------------------------------------------------------------
# Option types and options built from config fields


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
    if isinstance(default, tuple):  # lists: repeat the option or separate by commas
        floats = all(isinstance(v, float) for v in default)
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


def settings(config: type, values: dict):
    """The config from parsed options: repeated list options flattened, empty lists left at their default."""
    out = {}
    for k, v in values.items():
        if isinstance(v, tuple) and v and isinstance(v[0], list):
            v = tuple(x for group in v for x in group)
        if isinstance(v, tuple) and not v:
            continue
        out[k] = v
    return config(**out)


def output_options(fn):
    """--quiet and --json, shared by every verb that prints results."""
    fn = click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")(fn)
    return click.option("--quiet", "-q", is_flag=True, help="No progress bars.")(fn)


def _out_option(help_text: str, *, folder: bool = False):
    """The required --out of a verb: a file, or with ``folder`` a folder."""
    kind = click.Path(file_okay=False) if folder else click.Path(dir_okay=False)
    return click.option("--out", "-o", required=True, type=kind, help=help_text)


def _emit_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))


def _say(quiet: bool):
    return None if quiet else (lambda line: click.echo(line, err=True))


# ---------------------------------------------------------------------------
# Verbs


def _fields(config: type) -> list[str]:
    """The fields of a config that are command-line options (those with help)."""
    return [f.name for f in dataclasses.fields(config) if f.metadata]


def data_verb(config: type, out_help: str):
    """A verb on DATA writing OUT, with every option of ``config``, --quiet and --json."""

    def decorate(fn):
        fn = output_options(fn)
        fn = options(config, *_fields(config))(fn)
        fn = _out_option(out_help)(fn)
        return main.command(fn.__name__)(click.argument("data", type=click.Path(path_type=str))(fn))

    return decorate


@data_verb(ExtractConfig, "HDF5 file to write (resumed or updated if it exists).")
def extract(data, out, quiet, as_json, **values):
    """Run BACKBONE once over DATA and cache its pooled features in OUT.

    DATA is a folder (root/train/<class>/*.jpg, root/<class>/*.jpg, or a flat
    folder of images) or a CSV manifest with path,label[,split] columns; or
    WebDataset tar shards ('shards/train-{000000..000099}.tar', globs, several
    patterns joined by ::) or Parquet files (a file, a folder, patterns) with
    image bytes, each shard a unit of resume, of incremental runs and of work
    under torchrun.
    Unreadable files are skipped and listed in the cache. An interrupted run
    resumes where it stopped; a re-run after adding images extracts only the
    new ones. Under torchrun (python -m embedcache) each rank extracts a shard
    and rank 0 joins them into one ordinary cache; OUT must be on a filesystem
    every rank sees.

    \b
    Example:
      embedcache extract photos/ --backbone efficientnet_lite0 --out cache.h5
      embedcache extract 'shards/train-{000..019}.tar' --out cache.h5
      torchrun --nproc-per-node 8 -m embedcache extract photos/ --out cache.h5
    """
    from .distributed import from_env
    from .extraction import extract as run

    cfg = settings(ExtractConfig, values)
    result = run(data, out=out, config=cfg, progress=not quiet and not as_json)
    if not from_env().is_main:  # under torchrun, rank 0 speaks for the job
        return
    if as_json:
        _emit_json({**vars(result), "images_per_s": result.images_per_s})
    else:
        click.echo(result.summary())


@main.command()
@click.argument("cache", type=click.Path(path_type=str))
@click.option("--json", "as_json", is_flag=True, help="Print everything as JSON.")
@click.option(
    "--verify",
    is_flag=True,
    help="Read every block and check it (checksums, finite values); exit 1 if any is damaged.",
)
def info(cache, as_json, verify):
    """Describe a cache: backbone, weights, splits, classes, skipped files.

    \b
    Example:
      embedcache info cache.h5 --verify
    """
    from .cache import open_cache

    with open_cache(cache) as c:
        s = c.summary()
        if verify:
            s["verify"] = c.verify()
    if as_json:
        _emit_json(s)
    else:
        _print_info(s)
    if verify and s["verify"]:
        sys.exit(1)


def _print_info(s: dict) -> None:
    t = s["transform"]
    click.echo(
        f"{s['path']}  ({s['file_bytes'] / 1e6:.1f} MB, format {s['format_version']}, created {s.get('created', '?')})"
    )
    if s["parts"]:
        click.echo(
            f"storage    virtual: features read from {len(s['parts'])} part files ({s['parts_bytes'] / 1e6:.1f} MB) in {Path(s['parts'][0]).parent}"
        )
    else:
        click.echo("storage    single file")
    click.echo(f"backbone   {s['backbone']}  weights {s['weights']}")
    click.echo(
        f"features   {s['feature_dim']}-d {s['dtype']} from a {s.get('precision', 'unrecorded')} forward pass; transform resize {t['resize']} crop {t['crop']} {t['interpolation']}"
    )
    if s.get("views"):
        click.echo(
            f"views      {s['views']} per train image, 1 per other image: {s['view_policy']}"
        )
    click.echo(f"source     {s['source']} ({s['layout']})")
    more = " ..." if len(s["classes"]) > 20 else ""
    click.echo(f"classes    {len(s['classes'])}: {', '.join(map(shown, s['classes'][:20]))}{more}")
    for name, sp in s["splits"].items():
        views = f"  views {tuple(sp['views_shape'])}" if "views_shape" in sp else ""
        click.echo(f"split      {name:<6} {sp['images']:>8} images  {tuple(sp['shape'])}{views}")
    click.echo(f"skipped    {len(s['skipped'])}")
    for sk in s["skipped"][:10]:  # paths are relative to the data root: they name the split already
        click.echo(f"  {shown(sk['path'])}: {shown(sk['reason'])}")
    if s["ignored"]:
        click.echo(f"ignored    {len(s['ignored'])} (not read as images)")
        for item in s["ignored"][:10]:
            click.echo(f"  {shown(item['path'])}: {item['reason']}")
    click.echo(f"checksums  {s['checksums']}")
    if "verify" in s:
        rows = sum(sp["images"] for sp in s["splits"].values())
        click.echo(
            f"verify     {len(s['verify'])} problem(s) in {rows} rows read"
            if s["verify"]
            else f"verify     every block of {rows} rows read back intact"
        )
        for line in s["verify"][:20]:
            click.echo(f"  {shown(line)}")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the table as JSON.")
def backbones(as_json):
    """List the backbones by name: provider, feature size, blocks, default weights.

    `--unfreeze N` counts the blocks from the end. Any timm model works as
    timm:NAME, and any torchvision ResNet, EfficientNet, MobileNet, ConvNeXt,
    VGG or ViT by its torchvision name.

    \b
    Example:
      embedcache backbones --json
    """
    from .backbones import list_backbones

    rows = list_backbones()
    if as_json:
        _emit_json([vars(r) for r in rows])
        return
    click.echo(
        f"{'name':<20} {'provider':<12} {'dim':>5} {'params':>8} {'size':>5}  {'blocks':<40} default weights"
    )
    for r in rows:
        blocks = f"{len(r.blocks)}: {r.blocks[0]} .. {r.blocks[-1]}"
        click.echo(
            f"{r.name:<20} {r.provider:<12} {r.feature_dim:>5} {r.params_m:>7.1f}M {r.input_size:>5}  {blocks:<40} {r.default_weights}"
        )


@main.command("train-head")
@click.argument("cache", type=click.Path(path_type=str))
@_out_option("Head checkpoint to write; metrics, plots and a report go next to it.")
@options(HeadConfig, *_fields(HeadConfig))
@output_options
def train_head_cmd(cache, out, quiet, as_json, **values):
    """Train a head on the cached features of CACHE and save it to OUT.

    The default head (--head auto) is a linear probe, an L2-regularised
    logistic regression fitted by L-BFGS with its strength chosen on
    validation loss, unless an MLP trained beside it is significantly more
    accurate on validation. Torch heads (linear, mlp) keep the epoch (and, in
    a sweep, the learning rate and weight decay) with the lowest validation
    loss. When validation was held out of train (no val split), the choice is
    then trained again on train + val (--no-refit keeps the head chosen);
    --refit does so with a val split too. On a cache made with `extract
    --views K` torch heads draw one picture per image and epoch from its plain
    features and views. Metrics JSON (top-1, balanced accuracy, top-5),
    curves, a confusion matrix and a classification report are written next
    to OUT.

    \b
    Example:
      embedcache train-head cache.h5 --out head.pt
      embedcache train-head cache.h5 --head linear --lr 1e-3,1e-2 --weight-decay 0,1e-3 --out head.pt
    """
    from .train import train_head

    r = train_head(
        cache, out=out, config=settings(HeadConfig, values), progress=not quiet and not as_json
    )
    m = r.metrics
    if as_json:
        _emit_json({**m, "files": {k: str(v) for k, v in r.files.items()}})
        return
    if m["val_source"] != "val split":
        click.echo(m["val_source"])
    if len(m.get("sweep", [])) > 1:
        for row in m["sweep"]:
            cells = (f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items())
            click.echo("  " + "  ".join(cells))
    best = ", ".join(f"{k} {v:g}" for k, v in m.get("best", {}).items())
    epochs = f", best epoch {m['best_epoch']} of {m['epochs_run']}" if "best_epoch" in m else ""
    views = f"; trained on {m['views']['used']} views per image too" if m["views"]["used"] else ""
    kind = f"{m['head']} head"
    if "auto" in m:
        kind = f"default head ({m['auto']['chosen']}, MLP p={m['auto']['mlp_p_value']:.3f})"
    more = f", balanced {m['val_balanced_acc']:.4f}" + (
        f", top-5 {m['val_top5']:.4f}" if "val_top5" in m else ""
    )
    click.echo(
        f"{kind}: val accuracy {m['val_acc']:.4f}{more} ({m['val_images']} images){epochs}; {best}{views}; {m['seconds']:.2f} s"
    )
    if "val_acc_tta" in m:
        click.echo(
            f"with test-time averaging (image and mirror): val accuracy {m['val_acc_tta']:.4f}"
        )
    if "refit" in m:
        rf = m["refit"]
        epochs = f" for {rf['epochs']} epochs" if "epochs" in rf else ""
        click.echo(
            f"refit on train + val ({rf['images']} images){epochs}: the saved head; the accuracies above are its configuration's before the refit"
        )
    click.echo(f"wrote {r.path} and {', '.join(str(p.name) for p in r.files.values())}")


def _more_scores(m: dict) -> str:
    """ ", balanced B, top-5 T" of a finetune's kept epoch (what it measured)."""
    out = f", balanced {m['val_balanced_acc']:.4f}" if "val_balanced_acc" in m else ""
    return out + (f", top-5 {m['val_top5']:.4f}" if "val_top5" in m else "")


def _tta_option(default: str):
    return click.option(
        "--tta/--no-tta",
        default=None,
        help=f"Test-time averaging: the mean of the logits of each image and its mirror [default: {default}].",
    )


@main.command()
@click.argument("model", type=click.Path(path_type=str))
@click.argument("data", type=click.Path(path_type=str))
@click.option("--split", default="test", show_default=True, help="train, val, test or all.")
@click.option(
    "--plot",
    default=None,
    type=click.Path(dir_okay=False),
    help="Confusion matrix PNG [default: MODEL.SPLIT.confusion.png next to MODEL].",
)
@_tta_option(
    "on when DATA is a cache that stores them (extract --views), or images and MODEL a head trained on views"
)
@click.option("--exclude", default=None, type=click.Path(dir_okay=False), help=EXCLUDE_HELP)
@options(ExtractConfig, "device", "batch_size", "num_workers")
@output_options
def evaluate(model, data, split, plot, tta, exclude, quiet, as_json, **run):
    """Accuracy, per-class precision/recall and confusion matrix of MODEL on DATA.

    MODEL is a head from train-head or a model from finetune. DATA is a cache
    (heads only) or an image folder / CSV, whose images then go through the
    backbone recorded in MODEL.

    \b
    Example:
      embedcache evaluate model.pt photos/ --split val
    """
    from .inference import evaluate as evaluate_model

    plot = plot or _default_plot(model, data, split)
    r = evaluate_model(
        model,
        data,
        split=split,
        plot=plot,
        tta=tta,
        exclude=exclude,
        progress=not quiet and not as_json,
        **run,
    )
    if as_json:
        _emit_json(r)
        return
    how = ", logits averaged over each image and its mirror" if r["tta"] else ""
    top5 = f", top-5 {r['top5']:.4f}" if "top5" in r else ""
    scores = f"accuracy {r['accuracy']:.4f}, balanced {r['balanced_accuracy']:.4f}{top5}"
    click.echo(f"{r['split']}: {scores} on {r['images']} images{how}")
    click.echo(r["report"].rstrip())
    classes = [shown(c) for c in r["classes"]]
    width = max(len(c) for c in classes)
    click.echo("confusion (rows true, columns predicted):")
    for c, row in zip(classes, r["confusion"], strict=True):
        click.echo(f"  {c:>{width}}  " + " ".join(f"{v:>5}" for v in row))
    if r["skipped"]:
        click.echo(f"skipped {len(r['skipped'])} unreadable images")
    if "plot" in r:
        click.echo(f"wrote {shown(r['plot'])}")


def _default_plot(model: str, data: str, split: str) -> str | None:
    """MODEL.SPLIT.confusion.png next to MODEL, unless that folder takes no new file or is
    inside the image folder: then no plot (with a note), the results are printed all the same."""
    from .outputs import inside, writable

    plot = Path(model).with_name(f"{Path(model).stem}.{split}.confusion.png")
    if writable(plot.parent) and not inside(plot, Path(data) if Path(data).is_dir() else None):
        return str(plot)
    click.echo(
        f"no confusion plot: {plot.parent} is read-only or holds the images; "
        "pass --plot to choose where",
        err=True,
    )
    return None


@main.command()
@click.argument("model", type=click.Path(path_type=str))
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=str))
@click.option("--top-k", default=3, show_default=True, type=click.IntRange(min=1))
@_tta_option("on when MODEL is a head trained on views (extract --views)")
@options(ExtractConfig, "device", "batch_size", "num_workers")
@output_options
def predict(model, images, top_k, tta, quiet, as_json, **run):
    """Top classes and probabilities of each image (files or folders).

    \b
    Example:
      embedcache predict model.pt photo.jpg more_photos/ --top-k 3
    """
    from .inference import predict as predict_images

    rows = predict_images(
        model, list(images), top_k=top_k, tta=tta, progress=not quiet and not as_json, **run
    )
    if as_json:
        _emit_json(rows)
        return
    for r in rows:
        if "error" in r:
            click.echo(f"{shown(r['path'])}: skipped ({r['error']})")
        else:
            best = ", ".join(
                f"{shown(p['class'])} {p['probability']:.3f}" for p in r["predictions"]
            )
            click.echo(f"{shown(r['path'])}: {best}")


@data_verb(
    FinetuneConfig, "Best model checkpoint; OUT.last.pt holds the latest epoch for --resume."
)
def finetune(data, out, quiet, as_json, **values):
    """Reattach a head to its backbone and train the last N blocks on DATA.

    Frozen blocks stay in eval mode. With no augmentation (or --views), the
    frozen prefix runs once and every epoch trains only the unfrozen tail.
    The best epoch on validation is kept in OUT; metrics JSON, curves, a
    confusion matrix and a report go next to it. Without a val split,
    validation is held out of train exactly as train-head holds it out.
    Under torchrun it trains with DistributedDataParallel; --batch-size stays
    the global batch, split across the ranks.

    \b
    Example:
      embedcache finetune photos/ --head head.pt --unfreeze 2 --out model.pt
      torchrun --nproc-per-node 8 -m embedcache finetune photos/ --head head.pt --out model.pt
    """
    from .distributed import from_env
    from .finetuning import finetune as run

    quiet = quiet or as_json
    cfg = settings(FinetuneConfig, values)
    r = run(data, out=out, config=cfg, progress=not quiet, log=_say(quiet))
    m = r.metrics
    if not from_env().is_main:  # under torchrun, rank 0 speaks for the job
        return
    if as_json:
        _emit_json({**m, "files": {k: str(v) for k, v in r.files.items()}})
        return
    pc, note = m["prefix_cache"], ""
    if pc["where"] in ("memory", "disk"):
        note = f"; prefix cache {pc['where']} {pc['bytes'] / 1e6:.1f} MB built in {pc['seconds']:.1f} s"
        if m["estimated_speedup"] is not None:  # None when a resumed run had no epoch left
            note += f", about {m['estimated_speedup']}x faster per epoch than running the frozen blocks every epoch"
    click.echo(
        f"best val accuracy {m['best_val_acc']:.4f}{_more_scores(m)} at epoch {m['best_epoch']} of {m['epochs_run']} ({m['seconds_per_epoch']:.2f} s per epoch{note})"
    )
    click.echo(
        f"wrote {r.path} and {', '.join(p.name for k, p in r.files.items() if k != 'model')}"
    )


@main.command()
@click.argument("data", type=click.Path(path_type=str))
@options(CompareConfig, *_fields(CompareConfig))
@output_options
def compare(data, quiet, as_json, **values):
    """Feature extraction or fine-tuning? Time and accuracy of each approach on DATA.

    Runs, on the same splits: the tutorial recipe (frozen backbone forwarded
    every epoch), extract + train-head (linear and a sweep), and finetune
    --unfreeze N from the cached head and from a fresh one. Writes a Markdown
    table, JSON and a plot of validation accuracy against wall time.

    \b
    Example:
      embedcache compare photos/ --unfreeze 1 --unfreeze 2 --workdir runs/photos
    """
    from .comparison import compare as run

    quiet = quiet or as_json
    r = run(data, config=settings(CompareConfig, values), progress=not quiet, log=_say(quiet))
    if as_json:
        _emit_json(json.loads(r.files["json"].read_text()))
        return
    click.echo(r.markdown)
    click.echo(f"\nwrote {', '.join(str(p) for p in r.files.values())}")


@main.command()
@click.argument("cache", type=click.Path(path_type=str))
@_out_option("Folder for the CSVs, summary.json and report.html.", folder=True)
@options(AuditConfig, *_fields(AuditConfig))
@output_options
def audit(cache, out, quiet, as_json, **values):
    """Check the images of CACHE: duplicates, leaks, likely label errors, outliers.

    \b
    exact_duplicates.csv  byte-identical files (content hashes recorded by extract)
    near_duplicates.csv   pairs at cosine similarity >= --near-threshold (exact search)
    leaks.csv             duplicates across train/val/test, or whose copies disagree on the label
    label_errors.csv      out-of-fold predictions that disagree with the label (confident
                          learning), ranked by the probability of the given label, lowest first
    outliers.csv          mean distance to the nearest neighbours far above the median

    OUT/report.html shows them with thumbnails and opens offline; OUT/summary.json counts them.
    Each CSV has a path column (the copy or image to leave out) that train-head, finetune,
    evaluate and compare take as --exclude FILE.csv.

    \b
    Example:
      embedcache audit cache.h5 --out audit/
      embedcache train-head cache.h5 --exclude audit/leaks.csv --out head.pt
    """
    from .auditing import audit as run

    r = run(
        cache,
        out=out,
        config=settings(AuditConfig, values),
        progress=not quiet and not as_json,
        log=_say(quiet or as_json),
    )
    if as_json:
        _emit_json(r.summary)
        return
    for name in ("exact_duplicates", "near_duplicates", "leaks", "label_errors", "outliers"):
        section = r.summary[name]
        count = "not checked" if section["count"] is None else section["count"]
        click.echo(f"{name.replace('_', ' '):<16} {count}  ({section['how']})")
    click.echo(f"wrote {r.files['report']}, {r.files['summary']} and one CSV per finding in {out}")


@main.command("export")
@click.argument("model", type=click.Path(path_type=str))
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["onnx", "torchscript"]),
    default="onnx",
    show_default=True,
    help="ONNX (onnxruntime, TensorRT, ...) or TorchScript (torch.jit.load).",
)
@click.option(
    "--out",
    "-o",
    required=True,
    type=click.Path(dir_okay=False),
    help="The file to write (OUT.json describes its input).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the description as JSON.")
def export_cmd(model, fmt, out, as_json):
    """Export a head (with its backbone) or a fine-tuned model for serving.

    The exported network takes float32 RGB images (N, 3, crop, crop) in [0, 1],
    resized and centre-cropped as the backbone's transform says; normalisation
    is inside it. It returns logits; the batch size is free. ONNX needs
    `pip install 'embedcache[export]'`.

    \b
    Example:
      embedcache export model.pt --format onnx --out model.onnx
    """
    from .exporting import export

    info = export(model, out=out, format=fmt)
    if as_json:
        _emit_json(info)
        return
    click.echo(
        f"wrote {info['path']} ({fmt}, from a {info['exported_from']}) and {info['path']}.json"
    )
    click.echo(f"input  images: float32 {info['input_shape']}, RGB in [0, 1]; {info['preprocess']}")
    click.echo(
        f"output logits over {len(info['classes'])} classes: {', '.join(info['classes'][:10])}"
    )


@main.command("export-features")
@click.argument("cache", type=click.Path(path_type=str))
@_out_option(
    "Folder to write: new, empty, or an earlier export-features output (replaced).", folder=True
)
@options(ExportFeaturesConfig, *_fields(ExportFeaturesConfig))
@output_options
def export_features_cmd(cache, out, quiet, as_json, **values):
    """Write the features of CACHE as .npy files and Parquet tables in OUT.

    The layout clip-retrieval writes, read as it is by autofaiss, numpy, pandas
    and cleanlab: per split, SPLIT/img_emb/img_emb_K.npy (N, D) in the cache's
    row order and SPLIT/metadata/metadata_K.parquet with image_path, key,
    label, class_name and split, row for row; OUT/export.json says what was
    exported. Needs `pip install 'embedcache[parquet]'`.

    \b
    Example:
      embedcache export-features cache.h5 --out feats/
      autofaiss build_index --embeddings feats/train/img_emb --index_path knn.index
    """
    from .feature_export import export_features

    cfg = settings(ExportFeaturesConfig, values)
    result = export_features(cache, out=out, config=cfg, progress=not quiet and not as_json)
    if as_json:
        _emit_json(vars(result))
    else:
        click.echo(result.summary())


@main.command()
@click.option(
    "--data",
    default=None,
    type=click.Path(exists=True),
    help="Run on your own folder instead of the built-in digits.",
)
@click.option(
    "--workdir",
    default="runs/demo",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Where the cache, heads, models and results go.",
)
@click.option(
    "--image-size",
    default=None,
    type=click.IntRange(min=16),
    help="[default: 64 for the digits, the weights' own otherwise]",
)
@click.option(
    "--tutorial-epochs",
    default=30,
    show_default=True,
    type=click.IntRange(min=1),
    help="At most this many epochs of the tutorial recipe.",
)
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
def demo(data, workdir, image_size, tutorial_epochs, quiet):
    """The whole flow on data that needs no download: extract, train-head, finetune, compare.

    The default data is scikit-learn's 1,797 handwritten digits, written as an
    image folder under data/digits; the backbone is efficientnet_lite0 with the
    offline weights package (random init, with a warning, if it is missing).
    Prints the comparison table; everything else goes to WORKDIR.

    \b
    Example:
      embedcache demo --workdir runs/demo
    """
    from .quickstart import demo as run

    r = run(
        data=data,
        workdir=workdir,
        image_size=image_size,
        tutorial_epochs=tutorial_epochs,
        progress=not quiet,
        log=_say(False),
    )
    click.echo(r.markdown)
    click.echo(f"\nwrote {', '.join(str(p) for p in r.files.values())}")


if __name__ == "__main__":  # pragma: no cover
    main()
