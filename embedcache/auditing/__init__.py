"""`embedcache audit`: dataset checks on a cache, with CSVs, a JSON summary and an HTML report.

Findings (:mod:`.findings`): exact duplicates (content hashes recorded at extract), near
duplicates (exact cosine kNN over the cached features and over the pixel codes of the grey
thumbnails recorded at extract, :mod:`.search`; a pair is one when features and thumbnails both
agree, :func:`.findings.pixel_similarity`), leaks
(duplicates across splits or with different labels), likely label errors (out-of-fold
probabilities ranked by self-confidence, :mod:`.labels`) and outliers (mean kNN distance, robust
threshold). Each is a CSV in OUT, a section of OUT/summary.json and of OUT/report.html
(:mod:`.page`). The exact and near duplicates join images into groups (:mod:`.groups`): each
pair's CSV row names its group, groups.csv lists every image of each, and the counts are of
images and groups as well as of pairs.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import html
import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..cache import open_cache
from ..config import APPROX_FROM_ROWS, AuditConfig
from ..errors import EmbedcacheError
from ..feed import memory_budget
from ..outputs import claim_folder, folder_output
from ..runtime import resolve_device, returning_memory
from . import page, reuse
from .findings import (
    CROPS,
    WINDOW,
    Leaks,
    NearRule,
    Outliers,
    Pairs,
    Pool,
    adapted_rule,
    exact_pairs,
    leaks,
    near_pairs,
    outliers,
)
from .groups import Groups, duplicate_groups, group_rows
from .labels import LabelIssues, calibrated, label_issues, out_of_fold_logits
from .rows import DiskRows
from .search import nearest, unit_rows

FINDINGS = ("exact_duplicates", "near_duplicates", "leaks", "label_errors", "outliers")
GROUPS = "groups"  # groups.csv and summary.json's section: not a finding, the duplicates joined
MULTI_LABEL_SKIP = (
    "skipped: the label-error check needs one label per image and this cache is multi-label "
    "(several labels per image)"
)
NO_HASHES = "no hashes (cache written before format 3); re-extract with --overwrite to check"
NO_THUMBNAILS = (
    "no thumbnails (cache written before format 4): the features alone, which pair 0.5x copies "
    "and same-class look-alikes poorly; re-extract with --overwrite to confirm by pixels"
)


@dataclass
class AuditResult:
    """What :func:`audit` found and wrote.

    tables : finding -> its CSV rows (dicts), in file order
    ranking : paths of the labelled images by self-confidence, lowest (likeliest error) first
    paths : every image of the cache (train, val, test order); nearest : (n,) float32, each
        image's highest cosine similarity to another; distance : (n,) float32, the outlier score
    """

    out: Path
    summary: dict
    files: dict[str, Path]
    tables: dict[str, list[dict]] = field(default_factory=dict)
    ranking: list[str] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    nearest: np.ndarray | None = None
    distance: np.ndarray | None = None


def _pair_rows(pool: Pool, pairs: Pairs, extra=None, drop: str = "b") -> list[dict]:
    """CSV rows of pairs; ``path`` names the copy to leave out (``drop``: a or b)."""
    rows = []
    for i, (a, b, s) in enumerate(
        zip(pairs.a.tolist(), pairs.b.tolist(), pairs.score.tolist(), strict=True)
    ):
        px = float(pairs.pixel[i]) if len(pairs.pixel) else float("nan")
        row = {"similarity": round(s, 4), "pixel_similarity": "" if px != px else round(px, 4)}
        for side, r in (("a", a), ("b", b)):
            row |= {
                f"path_{side}": pool.paths[r],
                f"split_{side}": pool.split_name(r),
                f"label_{side}": pool.label_name(r),
            }
        row |= extra(i) if extra else {}
        rows.append({**row, "path": row[f"path_{drop}"]})
    return rows


def _label_rows(pool: Pool, rows: np.ndarray, issues: LabelIssues, probs: np.ndarray) -> list[dict]:
    flagged = [int(i) for i in issues.order if issues.flagged[i]]
    return [
        {
            "rank": rank + 1,
            "self_confidence": float(f"{issues.self_confidence[i]:.4g}"),
            "path": pool.paths[rows[i]],
            "split": pool.split_name(rows[i]),
            "given": pool.label_name(rows[i]),
            "suggested": pool.classes[int(issues.suggested[i])],
            "suggested_probability": round(float(probs[i, issues.suggested[i]]), 4),
        }
        for rank, i in enumerate(flagged)
    ]


def _outlier_rows(pool: Pool, found: Outliers) -> list[dict]:
    return [
        {
            "score": round(float(s), 4),
            "robust_z": round(float(z), 2),
            "path": pool.paths[r],
            "split": pool.split_name(r),
            "label": pool.label_name(r),
        }
        for r, s, z in zip(found.rows.tolist(), found.score, found.z, strict=True)
    ]


def _labelled(pool: Pool, cfg: AuditConfig) -> tuple[np.ndarray, str | None]:
    """Rows the label check scores, or none and why."""
    rows = np.flatnonzero(pool.labels >= 0)
    if pool.multi_label:
        return rows[:0], MULTI_LABEL_SKIP
    counts = np.bincount(pool.labels[rows], minlength=max(1, len(pool.classes)))
    if len(np.flatnonzero(counts)) < 2:
        return rows[:0], "skipped: needs labelled images of at least two classes"
    if len(rows) < 2 * cfg.folds:
        return rows[:0], f"skipped: {len(rows)} labelled images are too few for {cfg.folds} folds"
    return rows, None


def _check_labels(pool: Pool, cfg: AuditConfig, say):
    """(CSV rows, the ranking, how it was found, the calibration record or None)."""
    rows, why = _labelled(pool, cfg)
    if why == MULTI_LABEL_SKIP:
        say(f"label errors: {why}")
    if why:
        return [], [], why, None
    say(f"label errors: {cfg.folds}-fold out-of-fold probabilities on {len(rows)} images")
    labels = pool.labels[rows]
    on_disk = isinstance(pool.features, DiskRows)
    logits = out_of_fold_logits(
        pool.features
        if len(rows) == len(pool)
        else (pool.features.subset(rows) if on_disk else pool.features[rows]),
        labels,
        folds=cfg.folds,
        seed=cfg.seed,
    )
    probs, calibration = calibrated(logits, labels, out=logits)  # one (n, C) array
    issues = label_issues(probs, labels)
    ranking = [pool.paths[rows[i]] for i in issues.order]
    how = (
        f"{cfg.folds}-fold out-of-fold logistic regression, its probabilities calibrated by a "
        f"temperature of {calibration['temperature']:.3g} fitted on the out-of-fold logits; "
        "confident learning flags, ranked by self-confidence"
    )
    return _label_rows(pool, rows, issues, probs), ranking, how, calibration


def _findings(pool: Pool, cfg: AuditConfig, progress: bool, say, features=None) -> tuple:
    """Every finding's CSV rows and how it was found; the label ranking; (nearest similarities,
    mean kNN distances); the label check's calibration record (None where it was skipped); the
    approximate index to save (:class:`.reuse.Searched`, None for exact search).

    features : the cache's :func:`.reuse.features_of`, which --reuse checks the index against
    """
    exact, groups = exact_pairs(pool)
    device = resolve_device(cfg.device)
    # scaled in place: the search and the label check both use the unit rows, one copy in memory
    # (read from the file, they are scaled as they are read)
    unit = pool.features
    if isinstance(unit, np.ndarray):
        unit = unit_rows(pool.features, out=pool.features)
    # before the search: its (n, classes) probabilities are gone before the index is built
    with returning_memory():  # its blocks' memory is the search's once freed
        label_rows, ranking, label_how, calibration = _check_labels(pool, cfg, say)
    # near-duplicate candidates reach deeper than the outlier score's neighbours: a zoomed or
    # re-cropped copy of a product shot had 10 other images nearer than it (audit_quality.md)
    deep = cfg.replace(neighbours=max(cfg.neighbours, NEAR_CANDIDATES))
    earlier, skipped = _earlier(deep, pool, unit, features, say)
    index, sims, search, searched = _neighbours(
        unit, deep, device, progress, say, earlier, cfg.reuse is not None, cfg.neighbours
    )  # the recall floor holds at the outlier score's --neighbours; the rest recorded
    if skipped:  # --reuse given, a fresh index built instead
        search["reuse_skipped"] = {"from": str(cfg.reuse), "why": skipped}
    candidates = [index]
    if pool.codes is not None:  # the copies whose features moved, found by their pixels
        candidates.append(_neighbours(pool.codes, cfg, device, False, lambda line: None)[0])
    rule = NearRule(cfg.near_threshold, cfg.near_confirmed, cfg.pixel_threshold)
    rule, adapted = adapted_rule(pool, index[:, : cfg.neighbours], rule, seed=cfg.seed)
    near = near_pairs(pool, unit, candidates, rule, exact, [sims] + [None] * (len(candidates) - 1))
    leak: Leaks = leaks(pool, exact, near)
    joined = duplicate_groups(pool, exact, near)  # exact and near pairs together
    found, distance = outliers(sims[:, : cfg.neighbours], z=cfg.outlier_z)
    tables = _pair_tables(pool, exact, near, leak, joined)
    tables |= {"label_errors": label_rows, "outliers": _outlier_rows(pool, found)}
    how = {
        "exact_duplicates": NO_HASHES
        if pool.hashes is None
        else f"identical blake2b-128 content hashes, {groups} group(s)",
        "near_duplicates": _near_how(pool, cfg, rule, adapted),
        "leaks": "exact or near duplicates across splits or with different labels; "
        "path is the copy in the earlier split",
        "label_errors": label_how,
        "outliers": f"mean cosine distance to the {cfg.neighbours} nearest neighbours above "
        f"median + {cfg.outlier_z} x 1.4826 MAD = {found.threshold:.4f}",
    }
    how["search"] = search  # not a finding: how the neighbours of every one were found
    how["pixel_rule"] = adapted  # the pixel threshold this cache's images were held to
    how[GROUPS] = _group_record(joined, exact, near, leak)  # counts of images and groups
    top = sims[:, 0] if sims.shape[1] else np.zeros(len(pool), np.float32)
    return tables, how, ranking, (top, distance), calibration, searched


def _earlier(cfg: AuditConfig, pool: Pool, unit, features, say):
    """The earlier audit's index to grow (--reuse), or None; and why it is not (None: it is,
    or there is no --reuse)."""
    if cfg.reuse is None:
        return None, None
    if isinstance(unit, DiskRows):
        why = "the features are read from the file (past --max-memory); an index grows in memory"
        say(f"neighbours: not reusing the index of {cfg.reuse}: {why}")
        return None, why
    if cfg.index == "exact":
        raise EmbedcacheError(
            "--reuse grows the approximate index of an earlier audit, and --index exact uses "
            "none: pass --index approx (or auto), or leave out --reuse"
        )
    earlier, why = reuse.load(cfg.reuse, pool, unit, features, cfg.neighbours)
    if why:
        say(f"neighbours: not reusing the index of {cfg.reuse}: {why}")
    return earlier, why


def _pair_tables(pool: Pool, exact: Pairs, near: Pairs, leak: Leaks, groups: Groups) -> dict:
    """The CSV rows of the duplicates, the leaks (each pair with its group) and the groups."""

    def group(pairs: Pairs):  # both rows of a pair are in one group
        return lambda i: {"group": int(groups.of[pairs.a[i]])}

    tables = {
        "exact_duplicates": _pair_rows(pool, exact, group(exact)),
        "near_duplicates": _pair_rows(pool, near, group(near)),
        "leaks": _pair_rows(
            pool,
            leak.pairs,
            lambda i: {"kind": leak.kind[i], "reason": leak.reason[i]} | group(leak.pairs)(i),
            drop="a",
        ),
        GROUPS: group_rows(pool, groups),
    }
    for row in tables["exact_duplicates"]:
        row.pop("similarity"), row.pop("pixel_similarity")
    return tables


def _group_record(groups: Groups, exact: Pairs, near: Pairs, leak: Leaks) -> dict:
    """For summary.json: the images and groups of each duplicate finding, and of all groups."""
    found = (("exact_duplicates", exact), ("near_duplicates", near), ("leaks", leak.pairs))
    record = {name: groups.reach(pairs) for name, pairs in found}
    how = (
        "images joined by exact or near duplicate pairs (connected components), largest first; "
        "keep (path empty) marks the image in the earliest split, the first row, of each group, "
        "and path names the others, so --exclude groups.csv leaves one image of each group"
    )
    return {**record, GROUPS: {**groups.summary(), "how": how}}


def _approximate(cfg: AuditConfig, rows: int) -> bool:
    """Whether the neighbour search goes through the faiss index (--index)."""
    if cfg.index != "auto":
        return cfg.index == "approx"
    if rows < APPROX_FROM_ROWS:
        return False
    import importlib.util

    return importlib.util.find_spec("faiss") is not None


NEAR_CANDIDATES = 30  # feature neighbours searched per image for near duplicates


def _neighbours(
    unit, cfg: AuditConfig, device, progress: bool, say, earlier=None, indexed=False, checked=None
):
    """Each image's nearest neighbours: (index, similarity, the search's record for the
    summary: its kind, and for the index its recall; the index to save, None for exact).
    ``earlier``: an earlier audit's index to grow (--reuse); ``indexed``: the faiss index
    whatever the size; ``checked``: the first neighbours the recall floor holds at (default:
    all)."""
    if earlier is not None:
        return reuse.search(unit, earlier, cfg, progress, say, checked=checked)
    indexed = indexed or isinstance(unit, DiskRows)  # rows on disk: exact search is N passes
    if not indexed and not _approximate(cfg, len(unit)):
        say(f"neighbours: exact cosine search over {len(unit)} images on {device}")
        index, sims = nearest(unit, k=cfg.neighbours, device=device, progress=progress)
        return index, sims, {"index": "exact", "rows": len(unit)}, None
    from .index import approximate, build

    say(f"neighbours: faiss index over {len(unit)} images, recall checked on a sample")
    built = build(unit, seed=cfg.seed, progress=progress)
    index, sims, record = approximate(
        unit,
        k=cfg.neighbours,
        floor=cfg.recall_floor,
        seed=cfg.seed,
        progress=progress,
        index=built,
        checked=checked,
    )
    say(f"neighbours: {record.describe()}")
    searched = reuse.Searched(built, np.arange(len(unit)), index, reuse.sketch(unit))
    return index, sims, {**record.to_dict(), "how": record.describe()}, searched


def _near_how(pool: Pool, cfg: AuditConfig, rule: NearRule, adapted: dict | None) -> str:
    deep = max(cfg.neighbours, NEAR_CANDIDATES)
    searched = f"each image's {deep} nearest neighbours by features"
    exact = "byte copies are under exact duplicates"
    if pool.codes is None:
        return f"{NO_THUMBNAILS}: {searched}; a pair at cosine >= {cfg.near_threshold}; {exact}"
    side = "x".join(map(str, pool.thumbnails.shape[1:]))  # codes are made from the thumbnails
    how = (
        f"{searched} and {cfg.neighbours} by pixel codes; a pair at feature cosine >= "
        f"{cfg.near_confirmed} and pixel similarity >= {rule.pixel:.4g} (correlation of "
        f"band-passed {side} grey thumbnails, best of the whole image, {len(CROPS)} crops, "
        f"mirrored or not, and a {WINDOW:.0%} window anywhere, between whole pixels); {exact}"
    )
    if adapted and adapted["raised"]:
        how += (
            f"; the pixel threshold raised from {cfg.pixel_threshold} because different images "
            f"here are alike: {adapted['sample']} images' similarity to their "
            f"{_ordinal(adapted['neighbour'])} nearest neighbour reached "
            f"{adapted['different_images_p99']:.4g} at the 99th percentile"
        )
    unknown = int(np.count_nonzero(~pool.codes.any(1)))
    if unknown:
        how += (
            f"; {unknown} image(s) without a thumbnail (rows reused from an older cache, or "
            f"flat images) pair by feature cosine >= {cfg.near_threshold} alone"
        )
    return how


def _ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 < 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


def _write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        w.writerows(rows)


PAIR = ["path_a", "split_a", "label_a", "path_b", "split_b", "label_b", "path"]  # a pair's rows
SCORES = ["similarity", "pixel_similarity"]
COLUMNS = {
    "exact_duplicates": ["group", *PAIR],
    "near_duplicates": ["group", *SCORES, *PAIR],
    "leaks": ["group", "kind", "reason", *SCORES, *PAIR],
    "label_errors": [
        "rank",
        "self_confidence",
        "path",
        "split",
        "given",
        "suggested",
        "suggested_probability",
    ],
    "outliers": ["score", "robust_z", "path", "split", "label"],
    GROUPS: ["group", "size", "image", "split", "label", "keep", "path"],
}
TITLES = {
    "exact_duplicates": "Exact duplicates",
    "near_duplicates": "Near duplicates",
    "leaks": "Leaks across splits and label conflicts",
    "label_errors": "Likely label errors",
    "outliers": "Outliers",
    GROUPS: "Duplicate groups",
}


def audit(
    cache: str | Path,
    *,
    out: str | Path,
    config: AuditConfig | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    **options,
) -> AuditResult:
    """Check the images of a cache: duplicates, leaks, likely label errors, outliers.

    ``options`` are the fields of :class:`embedcache.config.AuditConfig` (or pass ``config``).
    Writes to the folder ``out``: one CSV per finding (``exact_duplicates``, ``near_duplicates``,
    ``leaks``, ``label_errors``, ``outliers``; one row per pair or image, paths relative to the
    data root as in the cache, ``path`` naming the copy or image to leave out, so each CSV can
    be passed as ``--exclude`` to the other verbs), ``groups.csv`` (every image of each group
    of duplicates, ``path`` empty on the one to keep), ``summary.json`` and ``report.html``.

    Returns
    -------
    AuditResult : the summary, the files, every finding's rows and the label ranking.
    """
    cfg = AuditConfig.build(config, **options)
    say = log or (lambda line: None)
    claim_folder(out, verb="audit", inputs=[("the cache", cache)], legacy=_earlier_audit)
    out = Path(out)
    # the cache open while the findings are made: they may read its rows
    with open_cache(cache) as c, contextlib.ExitStack() as scratch:
        pool = Pool.read(c, on_disk=_on_disk(c, cfg, say))
        if isinstance(pool.features, DiskRows):
            pool.features = _scratch(pool.features, out, scratch, progress, say)
        root = Path(str(c.attrs["source"])) if c.attrs.get("source") else None
        identity = f"{c.backbone}, weights {c.weights}"
        features = reuse.features_of(c)
        if not len(pool):
            raise EmbedcacheError(f"cache {cache} holds no images to audit")
        found = _findings(pool, cfg, progress, say, features)
    tables, how, ranking, (top, distance), calibration, searched = found
    # the N x D features are not read again: freed before the files are made
    pool.features = np.zeros((0, pool.features.shape[1]), pool.features.dtype)
    summary = _summary(cache, pool, cfg, tables, how, identity)
    if calibration is not None:  # the temperature the ranked probabilities were divided by
        summary["label_errors"]["calibration"] = calibration
    with folder_output(
        out, verb="audit", last=SUMMARY, inputs=[("the cache", cache)], legacy=_earlier_audit
    ) as staging:
        for name in (*FINDINGS, GROUPS):
            _write_csv(staging / f"{name}.csv", tables[name], COLUMNS[name])
        report = page.page(*_report(Path(out), root, summary, tables, cfg))
        (staging / REPORT).write_text(report, encoding="utf-8")
        if searched is not None:  # what a later audit of the grown cache reuses (--reuse)
            reuse.write(staging, searched, pool, features)
        (staging / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    files = {name: out / f"{name}.csv" for name in (*FINDINGS, GROUPS)}
    files |= {"report": out / REPORT, "summary": out / SUMMARY}
    if searched is not None:
        files |= {"index": out / reuse.INDEX, "index_json": out / reuse.META}
    return AuditResult(out, summary, files, tables, ranking, list(pool.paths), top, distance)


def _on_disk(cache, cfg: AuditConfig, say) -> bool:
    """Whether the features stay in the file: more bytes than --max-memory (default: half the
    memory available). Exact search then cannot run (a pass of the file per block of rows)."""
    sizes = [(cache.num_images(s), cache.features(s).dtype.itemsize) for s in cache.splits]
    need = sum(n * size for n, size in sizes) * cache.feature_dim
    budget = memory_budget(cfg.max_memory)
    if need <= budget:
        return False
    if cfg.index == "exact":
        raise EmbedcacheError(
            f"--index exact needs the features in memory ({need / 1e9:.1f} GB, over "
            f"--max-memory {budget / 1e9:.1f} GB): pass --index approx, or a larger --max-memory"
        )
    say(
        f"features: {need / 1e9:.1f} GB, over --max-memory {budget / 1e9:.1f} GB: read from the "
        "file when needed, the neighbours re-scored in passes of it"
    )
    return True


def _scratch(rows: DiskRows, out: Path, stack: contextlib.ExitStack, progress: bool, say):
    """``rows`` scaled once into a scratch folder beside ``out`` (deleted on leaving ``stack``)
    and read from there; ``rows`` as they are where the disk lacks the room."""
    parent = out.resolve().parent
    if shutil.disk_usage(parent).free < rows.nbytes * 1.1:
        say(f"features: no room in {parent} for a scaled copy: scaled on every read (slower)")
        return rows
    folder = stack.enter_context(tempfile.TemporaryDirectory(prefix=".audit-rows-", dir=parent))
    say(f"features: scaled to unit length once, into {folder} (deleted at the end)")
    copied = rows.scratch(Path(folder), progress)
    stack.callback(copied.close)
    return copied


SUMMARY, REPORT = "summary.json", "report.html"  # summary.json last: it says the audit finished


def _earlier_audit(out: Path) -> set[str] | None:
    """The files of an audit written before folder markers (its summary.json names them)."""
    try:
        summary = json.loads((out / SUMMARY).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(summary, dict) or not all(n in summary for n in (*FINDINGS, "settings")):
        return None
    names = [f"{n}.csv" for n in FINDINGS] + [SUMMARY, REPORT]
    return {*names, *(f"{n}.tmp" for n in names)}  # .tmp: what a failed write of it left


def _summary(cache, pool: Pool, cfg: AuditConfig, tables: dict, how: dict, identity: str) -> dict:
    splits = {s: int(np.count_nonzero(pool.split == i)) for i, s in enumerate(pool.splits)}
    sections = {
        name: {"count": len(tables[name]), "how": how[name], "csv": f"{name}.csv"}
        for name in FINDINGS
    }
    for name, counts in how[GROUPS].items():
        if name != GROUPS:
            sections[name] |= counts
    if pool.hashes is None:
        sections["exact_duplicates"].update(count=None, images=None, groups=None)
    if pool.multi_label:  # not checked, rather than none found
        sections["label_errors"].update(count=None, skipped=MULTI_LABEL_SKIP)
    if how.get("pixel_rule"):
        sections["near_duplicates"]["pixel_rule"] = how["pixel_rule"]
    leak_rows = tables["leaks"]
    sections["leaks"]["cross_split"] = sum("cross-split" in r["reason"] for r in leak_rows)
    sections["leaks"]["different_labels"] = sum(
        "different labels" in r["reason"] for r in leak_rows
    )
    sections["leaks"]["images_to_drop"] = len({r["path"] for r in leak_rows})
    return {
        "cache": str(cache),
        "features": identity,
        "images": len(pool),
        "splits": splits,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(cfg).items()},
        "search": how["search"],
        **sections,
        GROUPS: {**how[GROUPS][GROUPS], "csv": f"{GROUPS}.csv"},
    }


def _many(n: int, word: str) -> str:
    return f"{n} {word}{'s' * (n != 1)}"


def _tally(name: str, section: dict) -> str:
    """The report's count of a finding: images and groups first, pairs after."""
    n = section["count"]
    if n is None:
        return "&ndash;"
    if name == GROUPS:
        return f"{_many(n, 'group')}, {_many(section['images'], 'image')}"
    groups = (
        f"{_many(section['groups'], 'group')} ({_many(n, 'pair')})" if "groups" in section else ""
    )
    if name == "leaks":
        return f"{_many(section['images_to_drop'], 'image')} to drop, {groups}"
    if groups:
        return f"{_many(section['images'], 'image')}, {groups}"
    return str(n)


def _report(out: Path, root: Path | None, summary: dict, tables: dict, cfg: AuditConfig):
    """The arguments of :func:`.page.page` for an audit whose report goes to ``out``."""
    images = page.Images(root, out)
    cards = {
        "exact_duplicates": page.pair_cards,
        "near_duplicates": page.pair_cards,
        "leaks": page.pair_cards,
        GROUPS: page.group_cards,
        "label_errors": page.label_cards,
        "outliers": page.outlier_cards,
    }
    counts, sections = [], []
    for name in cards:  # the groups after the pairs that make them
        n = summary[name]["count"]
        counts.append(
            (TITLES[name], _tally(name, summary[name]), html.escape(summary[name]["how"]))
        )
        total = n if name == GROUPS else len(tables[name])  # groups.csv: a row per image
        shown = min(cfg.report_rows, total)
        more = f"; the first {shown} shown, all in {name}.csv" if shown < total else ""
        count = "&ndash;" if n is None else n
        note = html.escape(summary[name]["how"])
        head = f'<h2>{TITLES[name]} ({count})</h2><div class="note">{note}{more}</div>'
        sections.append((name, head, cards[name](images, tables[name], cfg.report_rows)))
    splits = ", ".join(f"{s} {n}" for s, n in summary["splits"].items())
    meta = html.escape(
        f"{summary['cache']}: {summary['images']} images ({splits}); "
        f"{summary['features']}; {summary['created']}"
    )
    return "embedcache audit", meta, counts, sections
