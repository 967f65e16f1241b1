"""Using a trained head or fine-tuned model: evaluate on a cache or a folder, predict images."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .cache import open_cache
from .calibration import calibration_record
from .data import ImageSet, paths_digest, scan
from .errors import EmbedcacheError
from .exclusion import Exclusion, Matched, read_exclude
from .forward import image_features
from .models import Classifier, as_classifier, labelled, serving_run, split_mirrored
from .outputs import claim, kind_of, misplaced
from .runtime import Run


def _map_labels(data_classes: list[str], model_classes: list[str], source: str) -> np.ndarray:
    """Index map from the data's class order to the model's."""
    unknown = [c for c in data_classes if c not in model_classes]
    if unknown:
        raise EmbedcacheError(
            f"{source} has classes the model does not know ({', '.join(unknown[:5])}); "
            f"the model knows {', '.join(model_classes[:10])}"
        )
    return np.array([model_classes.index(c) for c in data_classes], dtype=np.int64)


def _cache_split(
    clf: Classifier, data: Path, split: str, tta: bool | None, drop: Exclusion | None = None
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, list[str], dict | None, list[str]]:
    """(features float32, mirrored features or None, labels, classes, what ``drop`` left out,
    the paths scored) of a cache split, checked against the head. The mirrors are read when
    ``tta``, or when None and the cache has them."""
    if clf.kind == "model":
        raise EmbedcacheError(
            f"{clf.path} is a fine-tuned model, whose features differ from any cache; "
            f"pass the image folder instead of {data}"
        )
    with open_cache(data) as c:
        clf.checkpoint.recorded.identity.check(
            c.features_identity,
            subject=f"{clf.path} was trained on other features than {data} holds",
            mine="head",
            theirs="cache",
            hint="evaluate a cache made with the head's backbone and weights",
        )
        if split not in c:
            raise EmbedcacheError(
                f"cache {data} has no {split!r} split (it has {', '.join(c.splits)}); pass --split"
            )
        _unseen(clf, c.paths(split), f"the {split} split of {data}")
        sd, views = c.split(split), c.views(split)
        if tta and views is None:
            raise EmbedcacheError(
                f"--tta needs the mirrored images, and cache {data} has none; "
                "extract it with --views 1 or more, or pass --no-tta"
            )
        mirror = views[:, 0].astype(np.float32) if views is not None and tta is not False else None
        keep, record = np.ones(len(sd), bool), None
        if drop is not None:
            matched = drop.match([p for s in c.splits for p in c.paths(s)], f"cache {data}")
            keep = matched.keep(sd.paths)
            record = _left_out(matched, split, len(keep), int(keep.sum()))
        mirror = mirror[keep] if mirror is not None else None
        scored = [p for p, k in zip(sd.paths, keep.tolist(), strict=True) if k]
        features = sd.features[keep].astype(np.float32)
        labels = c.label_matrix(split)[keep] if clf.multi_label else sd.labels[keep]
        return features, mirror, labels, c.classes, record, scored


def _left_out(matched: Matched, split: str, before: int, after: int) -> dict:
    """What evaluate reports of --exclude on ``split``; refuses one that leaves no image."""
    matched.check_left(split, before, after)
    return matched.record(before - after, split)


# The split evaluate scores in a folder of class folders with no split folders: all of it.
ALL_IMAGES = "all"


def _labelled_folder(data: Path, split: str) -> tuple[ImageSet, str]:
    """The folder's images and the split to score: ``split`` of a folder with split folders
    (or a CSV with a split column), ALL_IMAGES of a folder of class folders and nothing else
    (``evaluate MODEL photos/test``), whatever ``split`` asked for."""
    images = scan(data, val_fraction=0.0)
    if images.layout == "class-folders":
        images.splits = {ALL_IMAGES: images.splits.get("train", [])}
        return images, ALL_IMAGES
    if split not in images.splits:
        raise EmbedcacheError(
            f"{data} has no {split!r} split (it has {', '.join(images.splits)}); pass --split"
        )
    return images, split


def _folder_split(
    clf: Classifier, data: Path, split: str, run: Run, mirror: bool, drop: Exclusion | None = None
):
    """(features, mirrored or None, labels, classes, skipped, split, what ``drop`` left out, the
    paths scored) of an image folder's split, through the model's backbone, without the images
    ``drop`` lists."""
    images, split = _labelled_folder(data, split)
    samples, record = images.splits[split], None
    _unseen(clf, [s.path for s in samples], f"the {split} split of {data}")
    if drop is not None:
        matched = drop.match([s.path for v in images.splits.values() for s in v], str(data))
        kept = matched.filter({split: samples})[split]
        samples, record = kept, _left_out(matched, split, len(samples), len(kept))
    files = [images.root / s.path for s in samples]
    features, ok, failed = image_features(
        clf.backbone(run.device), files, run, desc=f"evaluate {split}", mirror=mirror
    )
    labels = np.array([samples[i].label for i in ok], dtype=np.int64)
    if clf.multi_label:  # (N, C) targets of each image's label set
        labels = np.zeros((len(ok), len(images.classes)), bool)
        for row, i in enumerate(ok):
            labels[row, list(samples[i].label_set)] = True
    skipped = {samples[i].path: reason for i, reason in failed.items()}
    scored = [samples[i].path for i in ok]
    return *split_mirrored(features, mirror), labels, images.classes, skipped, split, record, scored


def _unseen(clf: Classifier, paths: list[str], what: str) -> None:
    """Refuse to score a head or model on images it was trained on."""
    trained = clf.checkpoint.trained
    seen = trained.seen(paths_digest(paths)) if trained is not None else None
    if seen is not None:
        how = "refit on" if seen == "val" else "trained on"
        raise EmbedcacheError(
            f"{clf.path} was {how} these images ({what}); its accuracy there says nothing about "
            "new images: evaluate a split it has not seen (--split test or val)"
        )


def _is_cache(path: Path) -> bool:
    """Whether ``path`` names a cache: by its suffix, else by its bytes (see kind_of)."""
    return path.suffix in (".h5", ".hdf5", ".partial") or kind_of(path) == "cache"


def _check_data(data: Path) -> None:
    """Refuse a file of another kind passed as evaluate's DATA (a checkpoint, an image), saying
    where it goes."""
    wanted = "data to evaluate on (a cache, an image folder or a CSV manifest)"
    wrong = misplaced(data, wanted=wanted, accept=("cache", "manifest"))
    if wrong:
        raise EmbedcacheError(wrong)


def evaluate(
    model: str | Path | Classifier,
    data: str | Path,
    *,
    split: str = "test",
    plot: str | Path | None = None,
    progress: bool = True,
    tta: bool | None = None,
    exclude: str | Path | None = None,
    **run,
) -> dict:
    """Accuracy, per-class precision/recall and the confusion matrix of ``model`` on one split.

    ``data`` is a cache (a head uses its features directly, after checking they
    come from the same backbone, weights and transform) or an image folder / CSV
    (the backbone is rebuilt from the identity recorded in the checkpoint).
    ``tta`` averages the logits of each image and its mirror; None: on for a cache
    that stores the mirrors (extract --views), and for images with a head trained
    on views. ``run`` takes ``device``, ``batch_size`` and ``num_workers`` for images.
    ``exclude`` is a CSV of images to leave out (see :mod:`embedcache.exclusion`).
    ``result["scored"]`` lists each image scored (``paths``, relative to the data root as the
    cache writes them), its ``true`` and ``predicted`` class index, in the same order.
    ``result["calibration"]`` holds the model's ``temperature`` and the expected calibration
    error of its probabilities on the split, before (``ece_before``, plain softmax) and after
    (``ece_after``) dividing the logits by it.
    """
    from .report import classification_text, confusion, per_class, plot_confusion, scores

    unknown = set(run) - {"device", "batch_size", "num_workers"}
    if unknown:
        raise TypeError(f"evaluate() got unexpected keyword arguments {sorted(unknown)}")
    clf = as_classifier(model)
    data = Path(data)
    _check_data(data)
    if plot is not None:
        root = data if data.is_dir() else None
        inputs = [("the model", clf.path), ("the data", data)]
        claim(plot, kind="plot", verb="evaluate", inputs=inputs, data_root=root, option="--plot")
    skipped: dict[str, str] = {}
    drop = read_exclude(exclude)
    if _is_cache(data):
        features, mirror, labels, classes, excluded, paths = _cache_split(
            clf, data, split, tta, drop
        )
    else:
        on = serving_run(
            clf, run.get("device", "auto"), run.get("batch_size"), run.get("num_workers"), progress
        )
        features, mirror, labels, classes, skipped, split, excluded, paths = _folder_split(
            clf, data, split, on, clf.tta(tta), drop
        )
    if clf.multi_label:
        result = _evaluate_multi_label(clf, features, mirror, labels, classes, str(data))
        result.update(data=str(data), split=split, skipped=skipped)
        result["scored"]["paths"] = paths
        return result | ({"exclude": excluded} if excluded is not None else {})
    labelled(
        labels,
        empty=f"the {split} split of {data} has no readable images",
        unlabelled=f"the {split} split of {data} is unlabelled; "
        "evaluate needs labels (use predict)",
    )
    y = _map_labels(classes, clf.classes, str(data))[labels]
    logits = clf.logits(features, mirror).numpy()
    pred = logits.argmax(1)
    matrix = confusion(y, pred, len(clf.classes))
    result = {"model": str(clf.path), "data": str(data), "split": split, "images": int(len(y))}
    result.update(tta=mirror is not None, **scores(logits, y), classes=clf.classes)
    result.update(per_class=per_class(y, pred, clf.classes), confusion=matrix.tolist())
    result.update(report=classification_text(y, pred, clf.classes), skipped=skipped)
    # how well the probabilities predict shows (divided by the temperature) match the accuracy
    result["calibration"] = calibration_record(logits, y, clf.temperature)
    # image by image, for paired tests between models scored on the same images (compare)
    result["scored"] = {"paths": paths, "true": y.tolist(), "predicted": pred.tolist()}
    if excluded is not None:
        result["exclude"] = excluded
    if plot is not None:
        title = f"{clf.path.name} on {split}: accuracy {result['accuracy']:.3f}"
        result["plot"] = str(plot_confusion(matrix, clf.classes, Path(plot), title))
    return result


def _evaluate_multi_label(clf: Classifier, features, mirror, targets, classes, source) -> dict:
    """evaluate's scores of a multi-label model: mAP, micro and macro F1 at its thresholds,
    and per class AP, precision, recall, F1 and support; the calibration of its sigmoids."""
    from .multilabel import f1_scores, scores

    if len(targets) == 0:
        raise EmbedcacheError(f"{source} has no readable images to evaluate")
    y = np.zeros((len(targets), len(clf.classes)), bool)
    y[:, _map_labels(classes, clf.classes, source)] = targets
    logits = clf.logits(features, mirror)
    probs = clf.probabilities(logits).numpy()
    m = scores(probs, y, clf.thresholds)
    f1 = f1_scores(probs >= clf.thresholds, y)
    per = {
        name: {
            "ap": m["per_class_ap"][c],
            "precision": f1["precision"][c],
            "recall": f1["recall"][c],
            "f1": f1["f1"][c],
            "support": int(y[:, c].sum()),
        }
        for c, name in enumerate(clf.classes)
    }
    result = {"model": str(clf.path), "images": int(len(y)), "tta": mirror is not None}
    result.update(multi_label=True, map=m["map"], micro_f1=m["micro_f1"], macro_f1=m["macro_f1"])
    result.update(classes=clf.classes, per_class=per)
    result["calibration"] = calibration_record(logits.numpy(), y, clf.temperature)
    result["scored"] = {
        "true": [np.flatnonzero(r).tolist() for r in y],
        "predicted": [np.flatnonzero(r).tolist() for r in probs >= clf.thresholds],
    }
    return result


def predict(
    model: str | Path | Classifier,
    images,
    *,
    top_k: int = 3,
    device: str = "auto",
    batch_size: int | None = None,
    num_workers: int | None = None,
    progress: bool = False,
    tta: bool | None = None,
) -> list[dict]:
    """Top-k classes and probabilities of each image, by ``model`` (a head or fine-tuned model
    checkpoint, or what :func:`embedcache.load_model` returns).

    ``images`` is one image or a list: paths, folders (their images, sorted), PIL images,
    ndarrays (H, W, 3) or (H, W) uint8, tensors (3, H, W) uint8 or float in [0, 1].
    Returns one dict per image: ``{"path"}`` for a file, ``{"image"}`` (its place in the
    list) for an object, with ``"predictions": [{"class", "probability"}, ...]`` or
    ``"error"`` for one that cannot be decoded; see :meth:`embedcache.models.Classifier.predict`
    for every parameter, and what differs between an object and its file.
    """
    return as_classifier(model).predict(
        images,
        top_k=top_k,
        device=device,
        batch_size=batch_size,
        num_workers=num_workers,
        progress=progress,
        tta=tta,
    )
