"""Command-line interface: parse options, call the Python API, print. Nothing else lives here."""

from __future__ import annotations

import json
import sys

import click

from . import __version__
from .errors import EmbedcacheError


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
    help="Where the cache and results go.",
)
@click.option(
    "--image-size",
    default=None,
    type=click.IntRange(min=16),
    help="Crop size [default: 64 for the digits, the weights' own otherwise].",
)
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
def demo(data, workdir, image_size, quiet):
    """Run the whole flow on data that needs no download.

    The default data is scikit-learn's 1,797 handwritten digits, written as an
    image folder under data/digits; the backbone is efficientnet_lite0 with the
    offline weights package (random init, with a warning, if it is missing).
    """
    from .quickstart import demo as run

    result = run(data=data, workdir=workdir, image_size=image_size, progress=not quiet)
    click.echo(result.summary)


if __name__ == "__main__":  # pragma: no cover
    main()
