"""Command-line interface: parse options, call the Python API, print. Nothing else lives here."""

from __future__ import annotations

import json
import sys

import click

from . import __version__
from .errors import EmbedcacheError

# embedcache.data.AUGMENTS, spelled out here so that --help does not import torch.
AUGMENTS = ("none", "light", "strong")


class _Group(click.Group):
    """Turns expected mistakes into one line on stderr and exit code 1 (no traceback)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except EmbedcacheError as e:
            raise click.ClickException(str(e)) from None
        except KeyboardInterrupt:
            click.echo("interrupted; re-run the same command to resume", err=True)
            sys.exit(130)


@click.group(
    cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100}
)
@click.version_option(__version__, prog_name="embedcache")
def main() -> None:
    """Transfer learning on images with a feature cache.

    A frozen pretrained backbone runs once over your images and its pooled
    features go to an HDF5 file; heads then train on that file in seconds.

    \b
      embedcache extract DATA --backbone efficientnet_lite0 --out cache.h5
      embedcache info cache.h5
      embedcache backbones
    """


def _emit_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))


@main.command()
@click.argument("data", type=click.Path(path_type=str))
@click.option(
    "--out",
    "-o",
    required=True,
    type=click.Path(dir_okay=False),
    help="HDF5 file to write (resumed or updated if it exists).",
)
@click.option(
    "--backbone",
    "-b",
    default="efficientnet_lite0",
    show_default=True,
    help="torchvision name, efficientnet_lite0, or timm:NAME (see `embedcache backbones`).",
)
@click.option(
    "--weights",
    "-w",
    default="DEFAULT",
    show_default=True,
    help="DEFAULT, a torchvision weights name, none (random init) or a state-dict file.",
)
@click.option(
    "--batch-size",
    default=None,
    type=click.IntRange(min=1),
    help="Images per forward pass [default: 8 on CPU, 128 on GPU].",
)
@click.option(
    "--num-workers",
    default=None,
    type=click.IntRange(min=0),
    help="Decoders: threads on CPU, processes beside a GPU [default: one per core].",
)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option(
    "--dtype",
    default="float16",
    show_default=True,
    type=click.Choice(["float16", "float32"]),
    help="Stored feature precision.",
)
@click.option(
    "--image-size",
    default=None,
    type=click.IntRange(min=16),
    help="Crop size in pixels [default: the weights' own].",
)
@click.option(
    "--val-fraction",
    default=0.2,
    show_default=True,
    type=click.FloatRange(0, 1, max_open=True),
    help="Held-out fraction per class when DATA has no val/ folder.",
)
@click.option("--seed", default=0, show_default=True, help="Seed of that held-out split.")
@click.option("--unlabelled", is_flag=True, help="Treat sub-folders as plain folders, not classes.")
@click.option("--overwrite", is_flag=True, help="Replace a cache made with other settings.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def extract(
    data,
    out,
    backbone,
    weights,
    batch_size,
    num_workers,
    device,
    dtype,
    image_size,
    val_fraction,
    seed,
    unlabelled,
    overwrite,
    quiet,
    as_json,
):
    """Run BACKBONE once over DATA and cache its pooled features in OUT.

    DATA is a folder (root/train/<class>/*.jpg, root/<class>/*.jpg, or a flat
    folder of images) or a CSV manifest with path,label[,split] columns.
    Unreadable files are skipped and listed in the cache. An interrupted run
    resumes where it stopped; a re-run after adding images extracts only the
    new ones.
    """
    from .extraction import extract as run

    result = run(
        data, out=out, backbone=backbone, weights=weights, batch_size=batch_size,
        num_workers=num_workers, device=device, dtype=dtype, image_size=image_size,
        val_fraction=val_fraction, seed=seed, unlabelled=unlabelled, overwrite=overwrite,
        progress=not quiet and not as_json,
    )  # fmt: skip
    if as_json:
        _emit_json({**vars(result), "images_per_s": result.images_per_s})
    else:
        click.echo(result.summary())


@main.command()
@click.argument("cache", type=click.Path(path_type=str))
@click.option("--json", "as_json", is_flag=True, help="Print everything as JSON.")
def info(cache, as_json):
    """Describe a cache: backbone, weights, splits, classes, skipped files."""
    from .cache import open_cache

    with open_cache(cache) as c:
        s = c.summary()
    if as_json:
        _emit_json(s)
        return
    t = s["transform"]
    click.echo(
        f"{s['path']}  ({s['file_bytes'] / 1e6:.1f} MB, format {s['format_version']}, created {s.get('created', '?')})"
    )
    click.echo(f"backbone   {s['backbone']}  weights {s['weights']}")
    click.echo(
        f"features   {s['feature_dim']}-d {s['dtype']}; transform resize {t['resize']} crop {t['crop']} {t['interpolation']}"
    )
    click.echo(f"source     {s['source']} ({s['layout']})")
    click.echo(
        f"classes    {len(s['classes'])}: {', '.join(s['classes'][:20])}{' ...' if len(s['classes']) > 20 else ''}"
    )
    for name, sp in s["splits"].items():
        click.echo(f"split      {name:<6} {sp['images']:>8} images  {tuple(sp['shape'])}")
    click.echo(f"skipped    {len(s['skipped'])}")
    for sk in s["skipped"][:10]:
        click.echo(f"  {sk['split']}/{sk['path']}: {sk['reason']}")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the table as JSON.")
def backbones(as_json):
    """List the backbones by name: provider, feature size, blocks, default weights.

    `--unfreeze N` counts the blocks from the end. Any timm model works as
    timm:NAME, and any torchvision ResNet, EfficientNet, MobileNet, ConvNeXt,
    VGG or ViT by its torchvision name.
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


class _FloatList(click.ParamType):
    """'1e-3,3e-3' or a repeated option -> a list of floats."""

    name = "floats"

    def convert(self, value, param, ctx):
        if isinstance(value, list):
            return value
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
        text = str(value).strip().upper().replace(" ", "")
        number = text.rstrip("KMGTIB")
        try:
            return int(float(number) * self.UNITS[text[len(number) :]])
        except (ValueError, KeyError):
            self.fail(f"expected a size such as 2GB or 512MB, got {value!r}", param, ctx)


def _flatten(values) -> list[float]:
    return [v for group in values for v in group]


@main.command("train-head")
@click.argument("cache", type=click.Path(path_type=str))
@click.option(
    "--head",
    "kind",
    default="linear",
    show_default=True,
    type=click.Choice(["linear", "mlp", "logreg", "knn"]),
    help="linear/mlp train in torch; logreg (L-BFGS) and knn are references.",
)
@click.option(
    "--out",
    "-o",
    required=True,
    type=click.Path(dir_okay=False),
    help="Head checkpoint to write; metrics, plots and a report go next to it.",
)
@click.option("--epochs", default=100, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--batch-size",
    default=None,
    type=click.IntRange(min=1),
    help="[default: the whole split when it is under 64 MB, else 1024]",
)
@click.option(
    "--lr",
    multiple=True,
    type=_FloatList(),
    help="Learning rate(s), e.g. --lr 1e-3,3e-3,1e-2 [default: 1e-3].",
)
@click.option(
    "--weight-decay",
    multiple=True,
    type=_FloatList(),
    help="Weight decay(s); every (lr, weight decay) pair trains at once [default: 1e-4].",
)
@click.option(
    "--hidden", default=512, show_default=True, type=click.IntRange(min=1), help="MLP hidden width."
)
@click.option(
    "--dropout",
    default=0.2,
    show_default=True,
    type=click.FloatRange(0, 1, max_open=True),
    help="MLP dropout.",
)
@click.option(
    "--label-smoothing", default=0.1, show_default=True, type=click.FloatRange(0, 1, max_open=True)
)
@click.option(
    "--patience",
    default=10,
    show_default=True,
    type=click.IntRange(min=1),
    help="Stop after this many epochs without a better validation accuracy.",
)
@click.option(
    "--val-fraction",
    default=0.2,
    show_default=True,
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    help="Held out from train when the cache has no val split.",
)
@click.option(
    "--max-memory",
    default=None,
    type=_Bytes(),
    help="Stream features from the file past this size [default: half the available memory].",
)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--seed", default=0, show_default=True)
@click.option("--resume", is_flag=True, help="Continue the training saved in --out.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
def train_head_cmd(
    cache,
    kind,
    out,
    epochs,
    batch_size,
    lr,
    weight_decay,
    hidden,
    dropout,
    label_smoothing,
    patience,
    val_fraction,
    max_memory,
    device,
    seed,
    resume,
    quiet,
    as_json,
):
    """Train a head on the cached features of CACHE and save it to OUT.

    Trains on the train split and keeps the epoch (and, in a sweep, the
    learning rate and weight decay) with the best validation accuracy.
    Metrics JSON, loss/accuracy curves, a confusion matrix and a
    classification report are written next to OUT.
    """
    from .train import train_head

    r = train_head(
        cache, out=out, head=kind, epochs=epochs, batch_size=batch_size,
        lr=_flatten(lr) or 1e-3, weight_decay=_flatten(weight_decay) or 1e-4, hidden=hidden,
        dropout=dropout, label_smoothing=label_smoothing, patience=patience, device=device,
        seed=seed, val_fraction=val_fraction, max_memory=max_memory, resume=resume,
        progress=not quiet and not as_json,
    )  # fmt: skip
    m = r.metrics
    if as_json:
        _emit_json({**m, "files": {k: str(v) for k, v in r.files.items()}})
        return
    if m["val_source"] != "val split":
        click.echo(m["val_source"])
    if len(m.get("sweep", [])) > 1:
        for row in m["sweep"]:
            click.echo(
                "  "
                + "  ".join(
                    f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()
                )
            )
    best = ", ".join(f"{k} {v:g}" for k, v in m.get("best", {}).items())
    epochs_note = (
        f", best epoch {m['best_epoch']} of {m['epochs_run']}" if "best_epoch" in m else ""
    )
    click.echo(
        f"{kind} head: val accuracy {m['val_acc']:.4f} ({m['val_images']} images){epochs_note}; {best}; {m['seconds']:.2f} s"
    )
    click.echo(f"wrote {r.path} and {', '.join(str(p.name) for p in r.files.values())}")


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
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--batch-size", default=None, type=click.IntRange(min=1))
@click.option("--num-workers", default=None, type=click.IntRange(min=0))
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def evaluate(model, data, split, plot, device, batch_size, num_workers, quiet, as_json):
    """Accuracy, per-class precision/recall and confusion matrix of MODEL on DATA.

    MODEL is a head from train-head or a model from finetune. DATA is a cache
    (heads only) or an image folder / CSV, whose images then go through the
    backbone recorded in MODEL.
    """
    from pathlib import Path

    from .inference import evaluate as run

    plot = plot or str(Path(model).with_name(f"{Path(model).stem}.{split}.confusion.png"))
    r = run(
        model,
        data,
        split=split,
        device=device,
        batch_size=batch_size,
        num_workers=num_workers,
        plot=plot,
        progress=not quiet and not as_json,
    )
    if as_json:
        _emit_json(r)
        return
    click.echo(f"{r['split']}: accuracy {r['accuracy']:.4f} on {r['images']} images")
    click.echo(r["report"].rstrip())
    width = max(len(c) for c in r["classes"])
    click.echo("confusion (rows true, columns predicted):")
    for c, row in zip(r["classes"], r["confusion"], strict=True):
        click.echo(f"  {c:>{width}}  " + " ".join(f"{v:>5}" for v in row))
    if r["skipped"]:
        click.echo(f"skipped {len(r['skipped'])} unreadable images")
    click.echo(f"wrote {r['plot']}")


@main.command()
@click.argument("model", type=click.Path(path_type=str))
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=str))
@click.option("--top-k", default=3, show_default=True, type=click.IntRange(min=1))
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--json", "as_json", is_flag=True, help="Print the predictions as JSON.")
def predict(model, images, top_k, device, as_json):
    """Top classes and probabilities of each image (files or folders)."""
    from .inference import predict as run

    rows = run(model, list(images), top_k=top_k, device=device)
    if as_json:
        _emit_json(rows)
        return
    for r in rows:
        if "error" in r:
            click.echo(f"{r['path']}: skipped ({r['error']})")
        else:
            click.echo(
                f"{r['path']}: "
                + ", ".join(f"{p['class']} {p['probability']:.3f}" for p in r["predictions"])
            )


@main.command()
@click.argument("data", type=click.Path(path_type=str))
@click.option(
    "--out",
    "-o",
    required=True,
    type=click.Path(dir_okay=False),
    help="Best model checkpoint; OUT.last.pt holds the latest epoch for --resume.",
)
@click.option(
    "--head",
    default=None,
    type=click.Path(dir_okay=False),
    help="A head from train-head to reattach [default: a fresh linear head].",
)
@click.option("--backbone", "-b", default=None, help="[default: the head's backbone]")
@click.option("--weights", "-w", default=None, help="[default: the head's weights, else DEFAULT]")
@click.option(
    "--unfreeze",
    default="2",
    show_default=True,
    help="Blocks to train, counted from the end (see `embedcache backbones`); 0 = head only, all = everything.",
)
@click.option("--epochs", default=10, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--lr",
    default=None,
    type=float,
    help="Learning rate of the head [default: 3e-4 with --head, 1e-3 for a fresh head].",
)
@click.option(
    "--backbone-lr-mult",
    default=0.3,
    show_default=True,
    type=float,
    help="Unfrozen blocks learn at lr x this.",
)
@click.option(
    "--weight-decay",
    default=0.05,
    show_default=True,
    type=float,
    help="AdamW decay (not on biases and norms).",
)
@click.option(
    "--warmup",
    default=1.0,
    show_default=True,
    type=float,
    help="Epochs of linear warm-up before the cosine decay.",
)
@click.option("--batch-size", default=None, type=click.IntRange(min=1), help="[default: 32]")
@click.option(
    "--augment",
    "augment_kind",
    default="light",
    show_default=True,
    type=click.Choice(AUGMENTS),
    help="Train-time augmentation (light: random resized crop + flip).",
)
@click.option(
    "--views",
    default=4,
    show_default=True,
    type=click.IntRange(min=0),
    help="Augmented views per image computed once through the frozen prefix; epochs cycle through them (0: fresh augmentation every epoch, no prefix cache).",
)
@click.option(
    "--prefix-cache",
    default="auto",
    show_default=True,
    type=click.Choice(["auto", "memory", "disk", "off"]),
    help="Cache the frozen prefix's output (auto: whenever valid).",
)
@click.option("--patience", default=5, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--label-smoothing", default=0.1, show_default=True, type=click.FloatRange(0, 1, max_open=True)
)
@click.option(
    "--bn-stats",
    is_flag=True,
    help="Let unfrozen BatchNorm layers update their running statistics.",
)
@click.option("--resume", is_flag=True, help="Continue from OUT.last.pt.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option(
    "--precision",
    default="auto",
    show_default=True,
    type=click.Choice(["auto", "fp32", "bf16", "fp16"]),
    help="auto: bf16 autocast on GPU, fp32 on CPU.",
)
@click.option("--seed", default=0, show_default=True)
@click.option(
    "--image-size",
    default=None,
    type=click.IntRange(min=16),
    help="[default: the head's, else the weights' own]",
)
@click.option(
    "--val-fraction", default=0.2, show_default=True, type=click.FloatRange(0, 1, max_open=True)
)
@click.option("--num-workers", default=None, type=click.IntRange(min=0))
@click.option(
    "--max-memory",
    default=None,
    type=_Bytes(),
    help="Prefix cache on disk past this size [default: half the available memory].",
)
@click.option("--quiet", "-q", is_flag=True, help="No progress output.")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
def finetune(
    data,
    out,
    head,
    backbone,
    weights,
    unfreeze,
    epochs,
    lr,
    backbone_lr_mult,
    weight_decay,
    warmup,
    batch_size,
    augment_kind,
    views,
    prefix_cache,
    patience,
    label_smoothing,
    bn_stats,
    resume,
    device,
    precision,
    seed,
    image_size,
    val_fraction,
    num_workers,
    max_memory,
    quiet,
    as_json,
):
    """Reattach a head to its backbone and train the last N blocks on DATA.

    Frozen blocks stay in eval mode. With no augmentation (or --views), the
    frozen prefix runs once and every epoch trains only the unfrozen tail.
    The best epoch on validation is kept in OUT.
    """
    from .finetuning import finetune as run

    quiet_now = quiet or as_json
    r = run(
        data, out=out, head=head, backbone=backbone, weights=weights, unfreeze=unfreeze, epochs=epochs,
        lr=lr, backbone_lr_mult=backbone_lr_mult, weight_decay=weight_decay, warmup=warmup,
        batch_size=batch_size, augment_kind=augment_kind, views=views, prefix_cache=prefix_cache,
        patience=patience, label_smoothing=label_smoothing, resume=resume, device=device,
        precision=precision, seed=seed, image_size=image_size, val_fraction=val_fraction,
        num_workers=num_workers, max_memory=max_memory, bn_stats=bn_stats, progress=not quiet_now,
        log=None if quiet_now else (lambda line: click.echo(line, err=True)),
    )  # fmt: skip
    m = r.metrics
    if as_json:
        _emit_json(m)
        return
    pc = m["prefix_cache"]
    cache_note = ""
    if pc["where"] in ("memory", "disk"):
        cache_note = f"; prefix cache {pc['where']} {pc['bytes'] / 1e6:.1f} MB built in {pc['seconds']:.1f} s"
        if m["estimated_speedup"] is not None:  # None when a resumed run had no epoch left
            cache_note += f", about {m['estimated_speedup']}x faster per epoch than running the frozen blocks every epoch"
    click.echo(
        f"best val accuracy {m['best_val_acc']:.4f} at epoch {m['best_epoch']} of {m['epochs_run']} ({m['seconds_per_epoch']:.2f} s per epoch{cache_note})"
    )
    click.echo(f"wrote {r.path}")


@main.command()
@click.argument("data", type=click.Path(path_type=str))
@click.option("--backbone", "-b", default="efficientnet_lite0", show_default=True)
@click.option("--weights", "-w", default="DEFAULT", show_default=True)
@click.option(
    "--image-size", default=None, type=click.IntRange(min=16), help="[default: the weights' own]"
)
@click.option(
    "--unfreeze",
    multiple=True,
    default=["2"],
    show_default=True,
    help="finetune --unfreeze values to compare (repeat the option for several).",
)
@click.option(
    "--workdir",
    default="runs/compare",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Where the cache, heads, models and results go.",
)
@click.option(
    "--tutorial-epochs",
    default=30,
    show_default=True,
    type=click.IntRange(min=1),
    help="At most this many epochs of the tutorial recipe (early stopping, patience 5).",
)
@click.option("--finetune-epochs", default=10, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--augment",
    "augment_kind",
    type=click.Choice(AUGMENTS),
    default="light",
    show_default=True,
    help="finetune's train-time augmentation (light: random resized crop + flip; none for images that crops or flips would change the label of).",
)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--quiet", "-q", is_flag=True, help="No progress output.")
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON.")
def compare(
    data,
    backbone,
    weights,
    image_size,
    unfreeze,
    workdir,
    tutorial_epochs,
    finetune_epochs,
    augment_kind,
    device,
    quiet,
    as_json,
):
    """Feature extraction or fine-tuning? Time and accuracy of each approach on DATA.

    Runs, on the same splits: the tutorial recipe (frozen backbone forwarded
    every epoch), extract + train-head (linear and a sweep), and finetune
    --unfreeze N from the cached head and from a fresh one. Writes a Markdown
    table, JSON and a plot of validation accuracy against wall time.
    """
    from .comparison import compare as run

    r = run(
        data, backbone=backbone, weights=weights, image_size=image_size, unfreeze=tuple(unfreeze), workdir=workdir,
        tutorial_epochs=tutorial_epochs, finetune_epochs=finetune_epochs, augment_kind=augment_kind, device=device,
        progress=not quiet and not as_json, log=None if quiet or as_json else (lambda line: click.echo(line, err=True)),
    )  # fmt: skip
    if as_json:
        _emit_json(json.loads(r.files["json"].read_text()))
        return
    click.echo(r.markdown)
    click.echo(f"\nwrote {', '.join(str(p) for p in r.files.values())}")


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
    """
    from .quickstart import demo as run

    r = run(
        data=data,
        workdir=workdir,
        image_size=image_size,
        tutorial_epochs=tutorial_epochs,
        progress=not quiet,
        log=lambda line: click.echo(line, err=True),
    )
    click.echo(r.markdown)
    click.echo(f"\nwrote {', '.join(str(p) for p in r.files.values())}")


if __name__ == "__main__":  # pragma: no cover
    main()
