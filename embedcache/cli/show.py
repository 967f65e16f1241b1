"""What the verbs print: a result of the Python API as lines for a person to read."""

from __future__ import annotations

from pathlib import Path

import click

from ..inference import ALL_IMAGES
from ..outputs import shown
from ..train import describe_choice


def info(s: dict) -> None:
    """A cache's summary (``Cache.summary()``, with ``verify`` when it was checked)."""
    t = s["transform"]
    click.echo(
        f"{shown(s['path'])}  ({s['file_bytes'] / 1e6:.1f} MB, format {s['format_version']}, "
        f"created {s.get('created', '?')})"
    )
    if s["parts"]:
        click.echo(
            f"storage    virtual: features read from {len(s['parts'])} part files "
            f"({s['parts_bytes'] / 1e6:.1f} MB) in {shown(Path(s['parts'][0]).parent)}"
        )
    else:
        click.echo("storage    single file")
    click.echo(f"backbone   {shown(s['backbone'])}  weights {shown(s['weights'])}")
    click.echo(
        f"features   {s['feature_dim']}-d {s['dtype']} from a "
        f"{s.get('precision', 'unrecorded')} forward pass; "
        f"transform resize {t['resize']} crop {t['crop']} {t['interpolation']}"
    )
    if s.get("views"):
        click.echo(
            f"views      {s['views']} per train image, 1 per other image: {s['view_policy']}"
        )
    click.echo(f"source     {shown(s['source'])} ({s['layout']})")
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


def backbones(rows: list) -> None:
    """The table of ``list_backbones()``."""
    click.echo(
        f"{'name':<20} {'provider':<12} {'dim':>5} {'params':>8} {'size':>5}  {'blocks':<40} "
        "default weights"
    )
    for r in rows:
        blocks = f"{len(r.blocks)}: {r.blocks[0]} .. {r.blocks[-1]}"
        click.echo(
            f"{r.name:<20} {r.provider:<12} {r.feature_dim:>5} {r.params_m:>7.1f}M "
            f"{r.input_size:>5}  {blocks:<40} {r.default_weights}"
        )


def head(r) -> None:
    """What train-head measured and wrote (a :class:`embedcache.train.HeadResult`)."""
    m = r.metrics
    if m["val_source"] != "val split":
        click.echo(m["val_source"])
    if "exclude" in m:
        click.echo(m["exclude"]["note"])
    if len(m.get("sweep", [])) > 1:
        for row in m["sweep"]:
            cells = (f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items())
            click.echo("  " + "  ".join(cells))
    best = ", ".join(f"{k} {v:g}" for k, v in m.get("best", {}).items())
    epochs = f", best epoch {m['best_epoch']} of {m['epochs_run']}" if "best_epoch" in m else ""
    views = f"; trained on {m['views']['used']} views per image too" if m["views"]["used"] else ""
    kind = f"{m['head']} head"
    if "auto" in m:
        kind = f"default head, {describe_choice(m['auto'])}"
    more = f", balanced {m['val_balanced_acc']:.4f}" + (
        f", top-5 {m['val_top5']:.4f}" if "val_top5" in m else ""
    )
    click.echo(
        f"{kind}: val accuracy {m['val_acc']:.4f}{more} ({m['val_images']} images){epochs}; "
        f"{best}{views}; {m['seconds']:.2f} s"
    )
    if "val_acc_tta" in m:
        click.echo(
            f"with test-time averaging (image and mirror): val accuracy {m['val_acc_tta']:.4f}"
        )
    if "refit" in m:
        rf = m["refit"]
        epochs = f" for {rf['epochs']} epochs" if "epochs" in rf else ""
        click.echo(
            f"refit on train + val ({rf['images']} images){epochs}: the saved head; "
            "the accuracies above are its configuration's before the refit"
        )
    click.echo(f"wrote {shown(r.path)} and {', '.join(shown(p.name) for p in r.files.values())}")


def _more_scores(m: dict) -> str:
    """ ", balanced B, top-5 T" of a finetune's kept epoch (what it measured)."""
    out = f", balanced {m['val_balanced_acc']:.4f}" if "val_balanced_acc" in m else ""
    return out + (f", top-5 {m['val_top5']:.4f}" if "val_top5" in m else "")


def finetuned(r) -> None:
    """What finetune measured and wrote (a :class:`embedcache.finetuning.FinetuneResult`)."""
    m = r.metrics
    pc, note = m["prefix_cache"], ""
    if pc["where"] in ("memory", "disk"):
        note = (
            f"; prefix cache {pc['where']} {pc['bytes'] / 1e6:.1f} MB built in "
            f"{pc['seconds']:.1f} s"
        )
        if m["estimated_speedup"] is not None:  # None when a resumed run had no epoch left
            note += (
                f", about {m['estimated_speedup']}x faster per epoch than running the frozen "
                "blocks every epoch"
            )
    click.echo(
        f"best val accuracy {m['best_val_acc']:.4f}{_more_scores(m)} at epoch {m['best_epoch']} "
        f"of {m['epochs_run']} ({m['seconds_per_epoch']:.2f} s per epoch{note})"
    )
    click.echo(
        f"wrote {shown(r.path)} and "
        f"{', '.join(shown(p.name) for k, p in r.files.items() if k != 'model')}"
    )


def evaluation(r: dict) -> None:
    """Scores, the per-class report and the confusion matrix of :func:`embedcache.evaluate`."""
    how = ", logits averaged over each image and its mirror" if r["tta"] else ""
    top5 = f", top-5 {r['top5']:.4f}" if "top5" in r else ""
    scores = f"accuracy {r['accuracy']:.4f}, balanced {r['balanced_accuracy']:.4f}{top5}"
    split = r["split"]
    if split == ALL_IMAGES:
        split = f"all of {r['data']} (class folders, no split folders)"
    click.echo(f"{shown(split)}: {scores} on {r['images']} images{how}")
    if "exclude" in r:
        click.echo(r["exclude"]["note"])
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


def predictions(rows: list[dict]) -> None:
    """One line per image of :func:`embedcache.predict`: its top classes, or why it was skipped."""
    for r in rows:
        if "error" in r:
            click.echo(f"{shown(r['path'])}: skipped ({r['error']})")
        else:
            best = ", ".join(
                f"{shown(p['class'])} {p['probability']:.3f}" for p in r["predictions"]
            )
            click.echo(f"{shown(r['path'])}: {best}")


def exported(info: dict, fmt: str) -> None:
    """What export wrote, and the input and output of the exported network."""
    path = shown(info["path"])
    click.echo(f"wrote {path} ({fmt}, from a {info['exported_from']}) and {path}.json")
    click.echo(f"input  images: float32 {info['input_shape']}, RGB in [0, 1]; {info['preprocess']}")
    click.echo(
        f"output logits over {len(info['classes'])} classes: "
        f"{', '.join(map(shown, info['classes'][:10]))}"
    )
