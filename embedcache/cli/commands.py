"""The verbs: each parses its options, calls the Python API and prints what it returned.

The options of the verbs come from the fields of their configs (:mod:`embedcache.config`):
names, defaults, choices and help are the library's, so the two cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import click

from ..config import (
    AuditConfig,
    CompareConfig,
    DemoConfig,
    EvaluateConfig,
    ExportConfig,
    ExportFeaturesConfig,
    ExtractConfig,
    FinetuneConfig,
    HeadConfig,
    PredictConfig,
)
from ..outputs import shown
from . import show
from .group import main
from .options import (
    all_options,
    data_verb,
    emit_json,
    emit_metrics,
    out_option,
    output_options,
    say,
    settings,
)


@data_verb(ExtractConfig, "HDF5 file to write (resumed or updated if it exists).")
def extract(data, out, quiet, as_json, verbose, **values):
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
    from ..distributed import from_env
    from ..extraction import extract as run

    cfg = settings(ExtractConfig, values)
    result = run(data, out=out, config=cfg, progress=not quiet and not as_json)
    if not from_env().is_main:  # under torchrun, rank 0 speaks for the job
        return
    if as_json:
        pace = result.pace.as_dict() if result.pace else None
        emit_json({**vars(result), "images_per_s": result.images_per_s, "pace": pace})
    else:
        click.echo(result.summary())
        c = shown(result.path)
        click.echo(
            f"next: embedcache train-head {c} --out head.pt  "
            f"(or check the data first: embedcache audit {c} --out audit/)"
        )


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
    from ..cache import open_cache

    with open_cache(cache) as c:
        s = c.summary()
        if verify:
            s["verify"] = c.verify()
    if as_json:
        emit_json(s)
    else:
        show.info(s)
    if verify and s["verify"]:
        sys.exit(1)


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
    from ..backbones import list_backbones

    rows = list_backbones()
    if as_json:
        emit_json([vars(r) for r in rows])
    else:
        show.backbones(rows)


@main.command("train-head")
@click.argument("cache", type=click.Path(path_type=str))
@out_option("Head checkpoint to write; metrics, plots and a report go next to it.")
@all_options(HeadConfig)
@output_options
def train_head_cmd(cache, out, quiet, as_json, verbose, **values):
    """Train a head on the cached features of CACHE and save it to OUT.

    The default head (--head auto) trains a linear probe (an L2-regularised
    logistic regression fitted by L-BFGS, its strength chosen on validation
    loss) and an MLP, and saves their blend (the mean of their class
    probabilities) unless one of them is significantly more accurate on
    validation, which is then kept alone. Torch heads (linear, mlp) keep the epoch (and, in
    a sweep, the learning rate and weight decay) with the lowest validation
    loss. When validation was held out of train (no val split), the choice is
    then trained again on train + val (--no-refit keeps the head chosen);
    --refit does so with a val split too. On a cache made with `extract
    --views K` torch heads draw one picture per image and epoch from its plain
    features and views. A temperature fitted on validation calibrates the
    probabilities that predict shows (the predicted class never changes).
    Metrics JSON (top-1, balanced accuracy, top-5, ECE), curves, a confusion
    matrix, a reliability diagram and a classification report are written
    next to OUT.

    \b
    Example:
      embedcache train-head cache.h5 --out head.pt
      embedcache train-head cache.h5 --head linear --lr 1e-3,1e-2 \\
        --weight-decay 0,1e-3 --out head.pt
    """
    from ..train import train_head

    cfg = settings(HeadConfig, values)
    r = train_head(cache, out=out, config=cfg, progress=not quiet and not as_json)
    if as_json:
        emit_metrics(r)
    else:
        show.head(r, verbose=verbose, log_dir=cfg.log_dir)


@main.command()
@click.argument("model", type=click.Path(path_type=str))
@click.argument("data", type=click.Path(path_type=str))
@all_options(EvaluateConfig)
@output_options
def evaluate(model, data, quiet, as_json, verbose, **values):
    """Accuracy, per-class precision/recall and confusion matrix of MODEL on DATA.

    MODEL is a head from train-head or a model from finetune. DATA is a cache
    (heads only) or an image folder / CSV, whose images then go through the
    backbone recorded in MODEL. The expected calibration error (ECE) of its
    probabilities there is given before and after its temperature.

    \b
    Example:
      embedcache evaluate model.pt photos/ --split val
    """
    from ..inference import evaluate as evaluate_model

    values["plot"] = values["plot"] or _default_plot(model, data, values["split"])
    cfg = settings(EvaluateConfig, values)
    r = evaluate_model(model, data, **dataclasses.asdict(cfg), progress=not quiet and not as_json)
    if as_json:
        emit_json(r)
    else:
        show.evaluation(r, verbose=verbose)


def _default_plot(model: str, data: str, split: str) -> str | None:
    """MODEL.SPLIT.confusion.png next to MODEL, unless that folder takes no new file or is
    inside the image folder: then no plot (with a note), the results are printed all the same."""
    from ..outputs import inside, writable

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
@all_options(PredictConfig)
@output_options
def predict(model, images, quiet, as_json, verbose, **values):
    """Top classes and calibrated probabilities of each image (files or folders).

    \b
    Example:
      embedcache predict model.pt photo.jpg more_photos/ --top-k 3
    """
    from ..inference import predict as predict_images

    cfg = settings(PredictConfig, values)
    progress = not quiet and not as_json
    rows = predict_images(model, list(images), **dataclasses.asdict(cfg), progress=progress)
    if as_json:
        emit_json(rows)
    else:
        show.predictions(rows)


@data_verb(
    FinetuneConfig, "Best model checkpoint; OUT.last.pt holds the latest epoch for --resume."
)
def finetune(data, out, quiet, as_json, verbose, **values):
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
    from ..distributed import from_env
    from ..finetuning import finetune as run

    quiet = quiet or as_json
    cfg = settings(FinetuneConfig, values)
    r = run(data, out=out, config=cfg, progress=not quiet, log=say(quiet))
    if not from_env().is_main:  # under torchrun, rank 0 speaks for the job
        return
    if as_json:
        emit_metrics(r)
    else:
        show.finetuned(r, verbose=verbose, log_dir=cfg.log_dir)


@main.command()
@click.argument("data", type=click.Path(path_type=str))
@all_options(CompareConfig)
@output_options
def compare(data, quiet, as_json, verbose, **values):
    """Feature extraction or fine-tuning, which backbone, at what data size? On DATA.

    With one backbone on all of train it runs, on the same splits: the tutorial
    recipe (frozen backbone forwarded every epoch), extract + train-head (the
    default head and a sweep), and finetune --unfreeze N from the cached head and
    from a fresh one; a Markdown table, JSON and a plot of validation accuracy
    against wall time.

    With --backbones and --fractions it runs the grid: each backbone extracted
    once; at each share of train (nested subsets) the default head and finetune
    from it, scored on the test images (else validation) with 95% intervals; one
    verdict line per share says whether fine-tuning's gain is significant on the
    same images (paired test) and at what cost. --rank-only ranks the backbones
    in seconds instead, by cross-validated kNN and probe accuracy on a few images
    per class.

    \b
    Example:
      embedcache compare photos/ --unfreeze 1 --unfreeze 2 --workdir runs/photos
      embedcache compare photos/ --backbones efficientnet_lite0,efficientnet_lite1 \\
        --fractions 0.01,0.1,1
    """
    from ..comparison import compare as run

    quiet = quiet or as_json
    r = run(data, config=settings(CompareConfig, values), progress=not quiet, log=say(quiet))
    if as_json:
        emit_json(json.loads(r.files["json"].read_text()))
    elif hasattr(r, "verdicts"):
        show.grid(r, verbose=verbose)
    elif hasattr(r, "summary_lines"):  # --rank-only
        click.echo("\n".join(r.summary_lines()))
        click.echo(f"wrote {shown(r.files['markdown'])} and {shown(r.files['json'].name)}")
    else:
        click.echo(r.markdown)
        click.echo(f"\nwrote {', '.join(shown(p) for p in r.files.values())}")


@main.command()
@click.argument("cache", type=click.Path(path_type=str))
@out_option("Folder for the CSVs, summary.json and report.html.", folder=True)
@all_options(AuditConfig)
@output_options
def audit(cache, out, quiet, as_json, verbose, **values):
    """Check the images of CACHE: duplicates, leaks, likely label errors, outliers.

    \b
    exact_duplicates.csv  byte-identical files (content hashes recorded by extract)
    near_duplicates.csv   pairs whose features and grey thumbnails both agree (exact search)
    leaks.csv             duplicates across train/val/test, or whose copies disagree on the label
    groups.csv            every image of each group of duplicates (the images the exact and
                          near pairs join, whose group the pair CSVs name), one kept per group
    label_errors.csv      out-of-fold predictions that disagree with the label (confident
                          learning), ranked by the probability of the given label, lowest first
    outliers.csv          mean distance to the nearest neighbours far above the median
    index.faiss           the approximate search's index (--index approx), with index.json and
                          index_rows.npz: a later audit of the grown cache takes --reuse OUT

    OUT/report.html shows them with thumbnails and opens offline; OUT/summary.json counts them
    (duplicates as groups and images, besides pairs). Each CSV has a path column (the copy or
    image to leave out) that train-head, finetune, evaluate and compare take as --exclude
    FILE.csv; --exclude groups.csv leaves one image of each group, its earliest split's.

    \b
    Example:
      embedcache audit cache.h5 --out audit/
      embedcache train-head cache.h5 --exclude audit/leaks.csv --out head.pt
    """
    from ..auditing import audit as run

    r = run(
        cache,
        out=out,
        config=settings(AuditConfig, values),
        progress=not quiet and not as_json,
        log=say(quiet or as_json),
    )
    if as_json:
        emit_json(r.summary)
        return
    show.audited(r, cache, verbose=verbose)


@main.command("export")
@click.argument("model", type=click.Path(path_type=str))
@all_options(ExportConfig)
@out_option("The file to write (OUT.json describes its input).")
@click.option("--json", "as_json", is_flag=True, help="Print the description as JSON.")
def export_cmd(model, out, as_json, **values):
    """Export a head (with its backbone) or a fine-tuned model for serving.

    The exported network takes float32 RGB images (N, 3, crop, crop) in [0, 1],
    resized and centre-cropped as the backbone's transform says; normalisation
    is inside it. It returns logits divided by the model's temperature (their
    softmax is the calibrated probabilities predict shows); the batch size is
    free. A multi-label model returns scores instead: each class's calibrated
    sigmoid, its threshold in OUT.json. ONNX needs `pip install 'embedcache[export]'`.

    \b
    Example:
      embedcache export model.pt --format onnx --out model.onnx
    """
    from ..exporting import export

    cfg = settings(ExportConfig, values)
    info = export(model, out=out, **dataclasses.asdict(cfg))
    if as_json:
        emit_json(info)
    else:
        show.exported(info, cfg.format)


@main.command("export-features")
@click.argument("cache", type=click.Path(path_type=str))
@out_option(
    "Folder to write: new, empty, or an earlier export-features output (replaced).", folder=True
)
@all_options(ExportFeaturesConfig)
@output_options
def export_features_cmd(cache, out, quiet, as_json, verbose, **values):
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
    from ..feature_export import export_features

    cfg = settings(ExportFeaturesConfig, values)
    result = export_features(cache, out=out, config=cfg, progress=not quiet and not as_json)
    if as_json:
        emit_json(vars(result))
    else:
        click.echo(result.summary())


@main.command()
@all_options(DemoConfig)
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
def demo(quiet, **values):
    """The whole flow on data that needs no download: extract, train-head, finetune, compare.

    The default data is scikit-learn's 1,797 handwritten digits, written as an
    image folder under data/digits; the backbone is efficientnet_lite0 with the
    offline weights package (random init, with a warning, if it is missing).
    Prints the comparison table; everything else goes to WORKDIR.

    \b
    Example:
      embedcache demo --workdir runs/demo
    """
    from ..quickstart import demo as run

    cfg = settings(DemoConfig, values)
    r = run(**dataclasses.asdict(cfg), progress=not quiet, log=say(False))
    click.echo(r.markdown)
    click.echo(f"\nwrote {', '.join(str(p) for p in r.files.values())}")
