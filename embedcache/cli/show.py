"""What the verbs print: a result of the Python API as lines for a person to read."""

from __future__ import annotations

from pathlib import Path

import click

from ..outputs import shown

ALL_IMAGES = "all"  # embedcache.inference.ALL_IMAGES: this module loads no torch (--help)
SHOWN_CLASSES = 20  # past this many classes the text matrix is unreadable: the PNG and JSON have it


def pct(x: float) -> str:
    """0.98612 -> '98.6%': people read percentages."""
    return f"{100 * x:.1f}%"


def wrote(paths) -> str:
    """'wrote a, b and c'."""
    names = [shown(p) for p in paths]
    return "wrote " + (", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else names[0])


def splits_of(cache) -> list[str]:
    """The splits of a cache (h5py only), or [] if it cannot be read."""
    import h5py

    try:
        with h5py.File(cache, "r") as h5:
            return [k for k in ("train", "val", "test", "all") if k in h5]
    except (OSError, TypeError):
        return []


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
    click.echo(f"labels     {labels_kind(s['labels'])}")
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


def labels_kind(labels: dict) -> str:
    """'one per image', 'multi-label, 1-3 per image (mean 2.1)' or 'none (unlabelled)'."""
    if labels["kind"] == "none":
        return "none (unlabelled)"
    if labels["kind"] == "single":
        return "one per image"
    low, high = labels["min"], labels["max"]
    span = f"{low}" if low == high else f"{low}-{high}"
    return f"multi-label, {span} per image (mean {labels['mean']:.1f})"


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


def _head_kind(m: dict) -> str:
    """The head in plain words: 'default head (linear probe and MLP blended)'."""
    if "auto" not in m:
        return f"{m['head']} head"
    if "val_map" in m["auto"]:  # several labels per image: chosen by val mAP
        kind = {"blend": "blend of a linear probe and an MLP", "mlp": "an MLP"}
        return f"{kind.get(m['auto']['chosen'], 'a linear probe')} (highest val mAP)"
    return {
        "blend": "blend of a linear probe and an MLP",
        "mlp": "an MLP (more accurate on validation than the linear probe)",
        "linear": "a linear probe (more accurate on validation than the MLP)",
    }.get(m["auto"]["chosen"], m["auto"]["chosen"])


SKEWED = 5.0  # embedcache.train.features.SKEW (this module loads no torch)


def _skewed(m: dict) -> bool:
    return m.get("class_weight", {}).get("skew", 1.0) > SKEWED


def _scores(m: dict, acc: str = "val_acc") -> str:
    """'val accuracy 98.6% (balanced 98.6%, top-5 100.0%; 153 images)'; on skewed classes
    balanced accuracy first: 'val balanced accuracy 61.0% (accuracy 80.2%, ...)'."""
    more = [f"top-5 {pct(m['val_top5'])}"] if "val_top5" in m else []
    more += [f"{m['val_images']} images"] if "val_images" in m else []
    if "val_map" in m:  # several labels per image
        f1 = f"micro F1 {pct(m['val_micro_f1'])}, macro F1 {pct(m['val_macro_f1'])}"
        return f"val mAP {pct(m['val_map'])} ({', '.join([f1, *more[-1:]])})"
    if "val_balanced_acc" in m and _skewed(m):
        more = [f"accuracy {pct(m[acc])}", *more]
        return f"val balanced accuracy {pct(m['val_balanced_acc'])} ({', '.join(more)})"
    more = ([f"balanced {pct(m['val_balanced_acc'])}"] if "val_balanced_acc" in m else []) + more
    return f"val accuracy {pct(m[acc])}" + (f" ({', '.join(more)})" if more else "")


def _weighting(m: dict) -> str | None:
    """'classes skewed 50:1; balanced class weights (val balanced accuracy 61.0% vs 55.2%
    without)' where the classes are skewed or weighted, else None."""
    w = m.get("class_weight")
    if not w or (not _skewed(m) and w["used"] == "none"):
        return None
    line = f"classes skewed {w['skew']:.0f}:1 (largest over smallest in train); "
    line += "balanced class weights" if w["used"] == "balanced" else "no class weights"
    tried = w.get("val_balanced_acc")
    if tried:
        other = "none" if w["used"] == "balanced" else "balanced"
        line += (
            f" (val balanced accuracy {pct(tried[w['used']])} against {pct(tried[other])} "
            f"{'without' if other == 'none' else 'with'} them)"
        )
    return line


def _calibration(c: dict, prefix: str = "") -> str:
    """'temperature 1.42, ECE 8.1% -> 3.2%': the temperature and the expected calibration error
    of the probabilities before and after dividing the logits by it."""
    before, after = c[f"{prefix}ece_before"], c[f"{prefix}ece_after"]
    return f"temperature {c['temperature']:.3g}, ECE {pct(before)} -> {pct(after)}"


def _head_details(m: dict) -> None:
    """--verbose: the working behind the head (the strengths or configurations tried)."""
    if "auto" in m and "val_map" in m["auto"]:
        maps = ", ".join(f"{k} {pct(v)}" for k, v in m["auto"]["val_map"].items())
        click.echo(f"  chose {m['auto']['chosen']} on validation mAP ({maps})")
    elif "auto" in m:
        a = m["auto"]
        click.echo(
            f"  chose {a['chosen']} on validation (McNemar: MLP better p={a['mlp_p_value']:.3f}, "
            f"probe better p={a['linear_p_value']:.3f}; significant below 0.05)"
        )
    for row in m.get("sweep", []) if len(m.get("sweep", [])) > 1 else []:
        cells = (f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items())
        click.echo("  " + "  ".join(cells))
    best = ", ".join(f"{k} {v:g}" for k, v in m.get("best", {}).items())
    epochs = f"best epoch {m['best_epoch']} of {m['epochs_run']}; " if "best_epoch" in m else ""
    click.echo(f"  {epochs}{best}; {m['seconds']:.2f} s; validation: {m['val_source']}")


def _tensorboard(log_dir: str | None) -> None:
    if log_dir:
        click.echo(f"wrote TensorBoard event files in {shown(log_dir)} (tensorboard --logdir)")


def head(r, *, verbose: bool = False, log_dir: str | None = None) -> None:
    """What train-head trained, how good it is on validation, what it wrote, what next."""
    m = r.metrics
    click.echo(f"{shown(r.path)}: {_head_kind(m)}, {_scores(m)}")
    if "val_acc_tta" in m:
        click.echo(f"  with test-time averaging (image and mirror): {pct(m['val_acc_tta'])}")
    if "calibration" in m:
        click.echo(f"  probabilities calibrated on val: {_calibration(m['calibration'], 'val_')}")
    if _weighting(m):
        click.echo(f"  {_weighting(m)}")
    missing = m.get("val_missing_classes") or []
    if missing:
        some = ", ".join(shown(c) for c in missing[:3]) + (", ..." if len(missing) > 3 else "")
        click.echo(
            f"  validation holds no image of {len(missing)} of the classes in train ({some}): "
            "its scores, choice and calibration say nothing of them"
        )
    if _skewed(m) and m.get("val_recall"):
        click.echo(f"  weakest: {_weakest({'per_class': m['val_recall']})}")
    if m["val_source"] != "val split":
        refit = " then trained again on train + val" if "refit" in m else ""
        click.echo(f"  validation held out of train (no val split){refit}")
    if "exclude" in m:
        click.echo(f"  {m['exclude']['note']}")
    if verbose:
        _head_details(m)
    click.echo(wrote([r.path, *(p.name for p in r.files.values())]))
    _tensorboard(log_dir)
    split = "test" if "test" in splits_of(m["cache"]) else None
    click.echo(
        f"next: embedcache evaluate {shown(r.path)} {shown(m['cache'])} --split test"
        if split
        else f"next: embedcache predict {shown(r.path)} photo.jpg"
    )


def finetuned(r, *, verbose: bool = False, log_dir: str | None = None) -> None:
    """What finetune trained, how good it is, what it cost, what it wrote, what next."""
    m = r.metrics
    click.echo(
        f"{shown(r.path)}: {m['config']['backbone']} with its last {m['config']['unfreeze']} "
        f"blocks fine-tuned, {_scores(m, 'best_val_acc')}, kept epoch {m['best_epoch']} "
        f"of {m['epochs_run']}"
    )
    pc, cost = m["prefix_cache"], f"  {m['seconds_per_epoch']:.2f} s per epoch"
    if pc["where"] in ("memory", "disk"):
        cost += f"; the frozen blocks ran once ({pc['bytes'] / 1e6:.1f} MB, {pc['seconds']:.1f} s)"
        if m["estimated_speedup"] is not None:  # None when a resumed run had no epoch left
            cost += f", about {m['estimated_speedup']}x faster per epoch than running them each"
    click.echo(cost)
    if "val_ece_before" in m.get("calibration", {}):
        click.echo(f"  probabilities calibrated on val: {_calibration(m['calibration'], 'val_')}")
    if verbose:
        click.echo(f"  validation: {m.get('val_source', 'val split')}")
    click.echo(wrote([r.path, *(p.name for k, p in r.files.items() if k != "model")]))
    _tensorboard(log_dir)
    data = shown(m["config"].get("data", "DATA"))
    click.echo(f"next: embedcache evaluate {shown(r.path)} {data} --split test")


def _weakest(r: dict, n: int = 3) -> str:
    """'weakest: dog 80.0% recall (20 images), ...' from evaluate's per-class rows."""
    rows = sorted(
        ((name, c) for name, c in r["per_class"].items() if c["support"] and c["recall"] < 1),
        key=lambda nc: (nc[1]["recall"], -nc[1]["support"]),
    )
    return ", ".join(
        f"{shown(name)} {pct(c['recall'])} recall ({c['support']} images)" for name, c in rows[:n]
    )


def _evaluation_multi_label(r: dict, split: str, how: str) -> None:
    """A multi-label model's scores: mAP and F1 first, then the classes of lowest AP."""
    click.echo(
        f"{shown(split)}: mAP {pct(r['map'])} (micro F1 {pct(r['micro_f1'])}, macro F1 "
        f"{pct(r['macro_f1'])} at the thresholds chosen on val) on {r['images']} images of "
        f"{shown(r['data'])}{how}"
    )
    rows = sorted(
        ((n, c) for n, c in r["per_class"].items() if c["ap"] is not None),
        key=lambda nc: nc[1]["ap"],
    )
    weakest = ", ".join(
        f"{shown(n)} AP {pct(c['ap'])} ({c['support']} images)" for n, c in rows[:3]
    )
    if weakest:
        click.echo(f"  weakest: {weakest}")


def evaluation(r: dict, *, verbose: bool = False) -> None:
    """Scores first, then the weakest classes; the report and matrix with ``verbose``."""
    how = ", logits averaged over each image and its mirror" if r["tta"] else ""
    split = r["split"]
    if split == ALL_IMAGES:
        split = f"all of {r['data']} (class folders, no split folders)"
    if r.get("multi_label"):
        _evaluation_multi_label(r, split, how)
    else:
        _evaluation_one_label(r, split, how)
    if "calibration" in r:
        click.echo(f"  probabilities: {_calibration(r['calibration'])} on {shown(r['split'])}")
    if "exclude" in r:
        click.echo(f"  {r['exclude']['note']}")
    if r["skipped"]:
        click.echo(f"  skipped {len(r['skipped'])} unreadable images")
    if verbose and "report" in r:
        _report_and_matrix(r)
    if "plot" in r:
        click.echo(wrote([r["plot"]]) + " (the confusion matrix)")


def _evaluation_one_label(r: dict, split: str, how: str) -> None:
    """Accuracy and balanced accuracy (balanced first on skewed classes), the weakest classes."""
    top5 = f", top-5 {pct(r['top5'])}" if "top5" in r else ""
    support = [c["support"] for c in r["per_class"].values() if c["support"]]
    if support and max(support) > SKEWED * min(support):  # skewed: balanced accuracy first
        scores = f"balanced accuracy {pct(r['balanced_accuracy'])} (accuracy {pct(r['accuracy'])}"
    else:
        scores = f"accuracy {pct(r['accuracy'])} (balanced {pct(r['balanced_accuracy'])}"
    click.echo(
        f"{shown(split)}: {scores}{top5}) on {r['images']} images of {shown(r['data'])}{how}"
    )
    if len(r["classes"]) > 2 and min(c["recall"] for c in r["per_class"].values()) < 1:
        click.echo(f"  weakest: {_weakest(r)}")


def _report_and_matrix(r: dict) -> None:
    click.echo(r["report"].rstrip())
    if len(r["classes"]) > SHOWN_CLASSES:
        click.echo(f"confusion: {len(r['classes'])} classes, in the plot and in --json")
        return
    classes = [shown(c) for c in r["classes"]]
    width = max(len(c) for c in classes)
    click.echo("confusion (rows true, columns predicted):")
    for c, row in zip(classes, r["confusion"], strict=True):
        click.echo(f"  {c:>{width}}  " + " ".join(f"{v:>5}" for v in row))


def predictions(rows: list[dict]) -> None:
    """One line per image of :func:`embedcache.predict`: its top classes, or why it was skipped."""
    for r in rows:
        name = shown(r.get("path", r.get("image", "")))
        if "error" in r:
            click.echo(f"{name}: skipped ({r['error']})")
        elif "labels" in r:  # several labels per image: every one above its threshold
            on = ", ".join(f"{shown(p['class'])} {pct(p['probability'])}" for p in r["labels"])
            click.echo(f"{name}: {on or 'no label above its threshold'}")
        else:
            best = ", ".join(
                f"{shown(p['class'])} {pct(p['probability'])}" for p in r["predictions"]
            )
            click.echo(f"{name}: {best}")


FOUND = {  # finding: (one, several) of what is counted: groups, images, entries
    "exact_duplicates": ("exact-duplicate group", "exact-duplicate groups"),
    "near_duplicates": ("near-duplicate group", "near-duplicate groups"),
    "leaks": ("image leaks across splits or labels", "images leak across splits or labels"),
    "label_errors": ("likely label error", "likely label errors"),
    "outliers": ("outlier", "outliers"),
}


def _found(name: str, section: dict) -> str:
    """One finding's count: duplicates as groups (their images), leaks as the images to drop."""
    one, several = FOUND[name]
    n = section["count"]
    if n is None:
        return f"{several} not checked"
    if name == "leaks":
        n = section["images_to_drop"]
    elif "groups" in section:
        n, images = section["groups"], section["images"]
        return f"{n} {one if n == 1 else several} ({images} image{'s' * (images != 1)})"
    return f"{n} {one if n == 1 else several}"


def audited(r, cache: str, *, verbose: bool = False) -> None:
    """What the audit found, in one line, then where to look and what next."""
    counts = [_found(name, r.summary[name]) for name in FOUND]
    click.echo(f"{shown(cache)}: {', '.join(counts)} among {r.summary['images']} images")
    search = r.summary.get("search") or {}
    if search.get("reused"):  # --reuse: the earlier index grown
        old, new = search["reused"]["old_rows"], search["reused"]["new_rows"]
        click.echo(
            f"  neighbours: reused the index of {shown(search['reused']['from'])} "
            f"({old} old images), added {new}"
        )
    elif search.get("reuse_skipped"):
        skipped = search["reuse_skipped"]
        click.echo(
            f"  neighbours: not reusing the index of {shown(skipped['from'])}: {skipped['why']}"
        )
    if search.get("index", "exact") != "exact":
        click.echo(f"  neighbours {search['how']}")
    if verbose:
        for name in (*FOUND, "groups"):
            click.echo(f"  {name}: {r.summary[name]['how']}")
    click.echo(
        f"wrote {shown(r.files['report'])} (open it in a browser), summary.json, one CSV per "
        f"finding and groups.csv in {shown(r.out)}"
    )
    leaks = r.summary["leaks"]["count"]
    exclude = f" --exclude {shown(r.files['leaks'])}" if leaks else ""
    click.echo(f"next: embedcache train-head {shown(cache)}{exclude} --out head.pt")


def exported(info: dict, fmt: str) -> None:
    """What export wrote, and the input and output of the exported network."""
    path = shown(info["path"])
    click.echo(f"wrote {path} ({fmt}, from a {info['exported_from']}) and {path}.json")
    click.echo(f"input  images: float32 {info['input_shape']}, RGB in [0, 1]; {info['preprocess']}")
    click.echo(
        f"output {info['output']} over {len(info['classes'])} classes: "
        f"{', '.join(map(shown, info['classes'][:10]))}"
    )
    if info.get("multi_label"):  # several labels per image: calibrated sigmoids
        t = info["temperature"]
        click.echo(
            f"       each class's sigmoid(logit / {t:.3g}), calibrated; thresholds in {path}.json"
        )
    elif info.get("temperature", 1.0) != 1.0:
        click.echo(f"       divided by the temperature {info['temperature']:.3g} (calibrated)")


def grid(r, *, verbose: bool = False) -> None:
    """A grid compare: the verdict per training share first, then the files."""
    for line in r.verdicts:
        click.echo(line)
    if verbose:
        click.echo(r.markdown)
    folder = Path(r.files["markdown"]).parent
    click.echo(
        f"wrote {shown(folder)}/grid.md (the table), grid.json (with intervals), "
        "grid_fractions.png (accuracy by share of train) and grid_time.png (by wall time)"
    )
