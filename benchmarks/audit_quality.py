"""Does `audit` find what is wrong? Seeded corruptions on real photo sets, scored per finding.

    python benchmarks/audit_quality.py --work /tmp/audit_work            (every set)
    python benchmarks/audit_quality.py --work /tmp/audit_work --only digits

For each data set (flowers12, hymenoptera, grocery81, scikit-learn's digits written as 8x8 PNGs,
and "forms": 480 generated scans of four kinds of form, alike but for their fields) a CSV
manifest lists the clean images, and a second one the same images with seeded corruptions
(seed 0), every new file written under WORK, the user's data only read:

- 5% of the training labels flipped to another class (label errors);
- byte-for-byte copies of 5% of the images put into another split (exact duplicates, leaks);
- re-encoded (JPEG quality 60), resized (0.5x), centre-cropped (90%), mirrored (left-right),
  zoomed (the centre two thirds blown up 1.5x) and re-cropped (70% of each side, placed by a seed)
  copies of 5% of the images each, into another split (near duplicates, leaks);
- 1% foreign images (from another of the sets) with random labels in train (outliers).

Both manifests are extracted with efficientnet_lite0 (offline weights; digits at 64 px), the
corrupted cache reusing the clean one's rows, and audited with the default settings. Reported:
precision and recall of each finding against what was seeded, and on the clean data the false
alarms (the copies, flips and foreign images that the data already holds count as found there:
flowers12 has two byte-identical iris photos). The similarities of the seeded copies and of each
clean image's nearest neighbour are reported too: they are what the default threshold is chosen on.

What the sets hold already: flowers12 (from Oxford 17 Flowers) has many near-identical photos
of its own, some across train and test: 12.9% of its images have a twin whose 32x32 grey
thumbnail correlates at 0.9 or more, so most near pairs on clean flowers12 are real findings,
counted here as false. The digits are 8x8 pixels: a 0.5x copy is 4x4, and pooled ImageNet
features of such images cannot tell a copy from another digit of the same class.
"""

from __future__ import annotations

import argparse
import csv
import io
import shutil
import zlib
from pathlib import Path

import numpy as np
from common import save
from PIL import Image, ImageDraw, ImageFont

from embedcache import extract, open_cache, scan
from embedcache.quickstart import write_digits

SETS = {
    "flowers12": ("/work/shared/data/flowers12", None),
    "hymenoptera": ("/work/shared/data/hymenoptera", None),
    "digits": (None, 64),
    "grocery81": ("/work/shared/data/grocery81", None),
    "forms": (None, None),
}
FOREIGN = {
    "flowers12": "hymenoptera",
    "hymenoptera": "flowers12",
    "digits": "flowers12",
    "grocery81": "flowers12",
    "forms": "flowers12",
}
COPY_KINDS = ("exact", "jpeg60", "half", "crop90", "mirror", "zoom150", "crop70")
FRACTION, FOREIGN_FRACTION = 0.05, 0.01


def _source_rows(name: str, work: Path) -> list[tuple[Path, str, str]]:
    """(absolute path, class, split) of every image of a set; the generated sets (digits, forms)
    get a seeded 80/20 split."""
    root = SETS[name][0]
    if root is None:
        root = (
            write_digits(work / "digits_src")
            if name == "digits"
            else write_forms(work / "forms_src")
        )
    images = scan(root)
    rows = []
    for split, samples in images.splits.items():
        for s in samples:
            rows.append((Path(images.root) / s.path, images.classes[s.label], split))
    if SETS[name][0] is None:  # a class-folder set: scan held val out; call it test, keep 80/20
        rows = [(p, c, "test" if split == "val" else split) for p, c, split in rows]
    return [r for r in rows if _readable(r[0])]


# the words and layouts of the "forms" set: scanned forms of four kinds, alike but for their
# filled-in fields (where a threshold tuned on photos pairs different images)
_WORDS = "total amount date invoice number customer address account paid due item quantity price "
WORDS = tuple((_WORDS + "tax north street road order ship bill name city code ref balance").split())
FORM_KINDS = ("invoice", "receipt", "order", "statement")


def _form(kind: int, rng) -> Image.Image:
    """One scanned form: the layout of its kind, fields filled at random."""
    w, h = 240, 320
    img = Image.new("L", (w, h), 255)
    d = ImageDraw.Draw(img)
    big, small = ImageFont.load_default(size=16), ImageFont.load_default(size=10)
    title = ("INVOICE", "RECEIPT", "ORDER FORM", "STATEMENT")[kind]  # one of FORM_KINDS
    d.text((20, 14), title, fill=0, font=big)
    d.line((16, 40, w - 16, 40), fill=0, width=2)
    rows = (6, 10, 4, 8)[kind]
    top = 52
    for r in range(rows):
        y = top + r * (230 // rows)
        d.rectangle((16, y, w - 16, y + 230 // rows - 4), outline=80)
        words = " ".join(rng.choice(WORDS, rng.integers(1, 4)))
        d.text((22, y + 3), words, fill=20, font=small)
        d.text(
            (w - 70, y + 3),
            f"{rng.integers(1, 9999):>5}.{rng.integers(0, 99):02d}",
            fill=20,
            font=small,
        )
    if kind % 2:
        d.rectangle((w - 90, h - 40, w - 16, h - 16), outline=0, width=2)
    # the scan: shifted and turned a little, paper grey and noise
    img = img.rotate(
        rng.uniform(-0.8, 0.8),
        resample=Image.BILINEAR,
        fillcolor=255,
        translate=tuple(rng.integers(-4, 5, 2).tolist()),
    )
    a = np.asarray(img, np.float32) * rng.uniform(0.9, 1.0) + rng.normal(0, 4, (h, w))
    return Image.fromarray(a.clip(0, 255).astype(np.uint8), "L")


def write_forms(root: Path, per_kind: int = 120) -> Path:
    """Write the forms set, ``per_kind`` PNGs of each of FORM_KINDS under ``root/<kind>/`` (seed
    0); written to a temporary folder and renamed, so an existing ``root`` is complete."""
    root = Path(root)
    if root.is_dir():
        return root
    tmp = root.with_name(root.name + ".tmp")
    rng = np.random.default_rng(0)
    for kind in range(len(FORM_KINDS)):
        folder = tmp / FORM_KINDS[kind]
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_kind):
            _form(kind, rng).save(folder / f"{i:04d}.png")
    tmp.rename(root)
    return root


def _readable(path: Path) -> bool:
    try:
        with Image.open(path) as img:
            img.load()
        return img.format in ("JPEG", "PNG")  # hymenoptera's GIF placeholder is not a photo
    except Exception:  # noqa: BLE001
        return False


def _copy(src: Path, kind: str, dst: Path) -> None:
    """Write ``src`` changed as ``kind`` says to ``dst`` (exact: the same bytes)."""
    if dst.exists():  # written by an earlier run: the same bytes, and its cache rows still valid
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    if kind == "exact":
        shutil.copyfile(src, dst)
        return
    with Image.open(src) as img:
        img = img.convert("RGB")
    w, h = img.size
    if kind == "half":
        img = img.resize((max(1, w // 2), max(1, h // 2)), Image.BILINEAR)
    elif kind in ("crop90", "zoom150", "crop70"):
        side = {"crop90": 0.9, "zoom150": 1 / 1.5, "crop70": 0.7}[kind]
        cw, ch = max(1, round(w * side)), max(1, round(h * side))
        # crop90 and zoom150 centred; crop70 wherever a seed of the file's name puts it
        at = np.random.default_rng(zlib.crc32(dst.name.encode())).random(2)
        fx, fy = at if kind == "crop70" else (0.5, 0.5)
        left, top = round((w - cw) * fx), round((h - ch) * fy)
        img = img.crop((left, top, left + cw, top + ch))
        if kind == "zoom150":  # the centre two thirds blown up to the original size
            img = img.resize((w, h), Image.BICUBIC)
    elif kind == "mirror":
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=60 if kind == "jpeg60" else 90)
    dst.write_bytes(buf.getvalue())


def prepare(name: str, work: Path) -> dict:
    """Write WORK/NAME/{clean,corrupt}.csv and the new files; return the seeded truth."""
    rng = np.random.default_rng(0)
    rows = _source_rows(name, work)
    classes = sorted({c for _, c, _ in rows})
    folder = work / name
    n = len(rows)
    picks = rng.permutation(n)
    k = int(round(FRACTION * n))
    truth = {"copies": [], "flipped": [], "foreign": []}
    extra = []
    for j, kind in enumerate(COPY_KINDS):
        for i in picks[j * k : (j + 1) * k]:
            src, cls, split = rows[i]
            other = "train" if split != "train" else ("test" if name != "hymenoptera" else "val")
            dst = folder / "copies" / kind / f"{i:05d}{'.jpg' if kind != 'exact' else src.suffix}"
            _copy(src, kind, dst)
            extra.append((dst, cls, other))
            truth["copies"].append((str(src), str(dst), kind))
    train = [i for i in range(n) if rows[i][2] == "train"]
    flipped = rng.choice(train, int(round(FRACTION * len(train))), replace=False)
    labels = [c for _, c, _ in rows]
    for i in flipped:
        labels[i] = classes[
            (classes.index(labels[i]) + rng.integers(1, len(classes))) % len(classes)
        ]
        truth["flipped"].append(str(rows[i][0]))
    foreign = _source_rows(FOREIGN[name], work)
    for i in rng.choice(len(foreign), max(1, int(round(FOREIGN_FRACTION * n))), replace=False):
        dst = folder / "foreign" / f"{i:05d}{foreign[i][0].suffix}"
        _copy(foreign[i][0], "exact", dst)
        extra.append((dst, classes[rng.integers(len(classes))], "train"))
        truth["foreign"].append(str(dst))
    _manifest(folder / "clean.csv", rows)
    _manifest(
        folder / "corrupt.csv",
        [(p, lab, s) for (p, _, s), lab in zip(rows, labels, strict=True)] + extra,
    )
    return truth


def _manifest(path: Path, rows: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "split"])
        w.writerows([str(p), c, s] for p, c, s in rows)


def extract_both(name: str, work: Path) -> tuple[Path, Path]:
    """The clean and the corrupted cache (the corrupted one reuses the clean rows)."""
    folder = work / name
    kw = {"backbone": "efficientnet_lite0", "weights": "DEFAULT", "image_size": SETS[name][1]}
    clean, corrupt = folder / "clean.h5", folder / "corrupt.h5"
    extract(folder / "clean.csv", out=clean, **kw)
    if not corrupt.exists():
        shutil.copyfile(clean, corrupt)
    extract(folder / "corrupt.csv", out=corrupt, **kw)
    return clean, corrupt


THRESHOLDS = (0.80, 0.82, 0.84, 0.86, 0.88, 0.90, 0.92, 0.94, 0.96)
PIXEL_THRESHOLDS = (0.75, 0.8, 0.83, 0.85, 0.87, 0.9, 0.95, 0.99)
ZS = (3.0, 3.5, 4.0, 5.0, 6.0, 8.0)


def _pairs(rows: list[dict]) -> set[frozenset]:
    return {frozenset((r["path_a"], r["path_b"])) for r in rows}


def _pr(found: set, true: set) -> dict:
    hit = len(found & true)
    return {
        "found": len(found),
        "true": len(true),
        "hits": hit,
        "precision": hit / len(found) if found else None,
        "recall": hit / len(true) if true else None,
    }


def _copy_similarity(corrupt: Path, copies: list) -> dict[str, list[float]]:
    """Cosine similarity of every seeded copy to its original, by kind."""
    with open_cache(corrupt) as c:
        rows = {p: (s, i) for s in c.splits for i, p in enumerate(c.paths(s))}
        feats = {s: c.features(s)[:].astype(np.float32) for s in c.splits}
    unit = {s: f / np.linalg.norm(f, axis=1, keepdims=True) for s, f in feats.items()}
    out: dict[str, list[float]] = {k: [] for k in COPY_KINDS}
    for src, dst, kind in copies:
        (sa, ia), (sb, ib) = rows[src], rows[dst]
        out[kind].append(float(unit[sa][ia] @ unit[sb][ib]))
    return out


def _unit_and_thumbnails(cache: Path) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """Paths, unit features, pixel codes and thumbnails of every row (train, val, test)."""
    from embedcache.auditing.findings import pixel_codes

    with open_cache(cache) as c:
        paths = [p for s in c.splits for p in c.paths(s)]
        f = np.concatenate([c.features(s)[:].astype(np.float32) for s in c.splits])
        thumbs = np.concatenate([c.thumbnails(s)[:] for s in c.splits])
    return paths, f / np.linalg.norm(f, axis=1, keepdims=True), pixel_codes(thumbs), thumbs


def _candidates(unit: np.ndarray, codes: np.ndarray, k: int = 10) -> tuple[np.ndarray, ...]:
    """The pairs the audit compares: each image with its k nearest by features and by pixel
    codes (once each)."""
    n = len(unit)
    found = []
    for x in (unit, codes):
        sim = x @ x.T
        np.fill_diagonal(sim, -np.inf)
        found.append(np.argsort(-sim, axis=1)[:, :k])
    a = np.concatenate([np.repeat(np.arange(n), k)] * 2)
    b = np.concatenate([f.ravel() for f in found])
    keys = np.unique(np.minimum(a, b) * n + np.maximum(a, b))
    return keys // n, keys % n


def _pixel_sweep(clean: Path, corrupt: Path, copies: list, confirmed: float) -> dict:
    """Per pixel threshold, with the feature cosine at least ``confirmed``: recall of the seeded
    copies and share of clean images paired (among the pairs the audit compares); the copies'
    pixel similarity to their originals."""
    from embedcache.auditing.findings import pixel_similarity

    paths, unit, _, thumbs = _unit_and_thumbnails(corrupt)
    at = {p: i for i, p in enumerate(paths)}
    pairs = [(at[a], at[b], k) for a, b, k in copies if k != "exact"]
    a, b = (np.array([p[i] for p in pairs], np.int64) for i in (0, 1))
    pix = pixel_similarity(thumbs, a, b) if pairs else np.zeros(0, np.float32)
    feat = (unit[a] * unit[b]).sum(1)
    _, cu, cc, ct = _unit_and_thumbnails(clean)
    ca, cb = _candidates(cu, cc)
    agree = (cu[ca] * cu[cb]).sum(1) >= confirmed
    ca, cb = ca[agree], cb[agree]
    cp = pixel_similarity(ct, ca, cb)
    rows = []
    for t in PIXEL_THRESHOLDS:
        hit = (pix >= t) & (feat >= confirmed)
        paired = np.zeros(len(cu), bool)
        paired[ca[cp >= t]] = paired[cb[cp >= t]] = True
        rows.append(
            {
                "pixel_threshold": t,
                "copies_recall": float(hit.mean()),
                **{k: float(hit[[q == k for *_, q in pairs]].mean()) for k in COPY_KINDS[1:]},
                "clean_paired": float(paired.mean()),
            }
        )
    by_kind = {k: _quantiles(pix[[q == k for *_, q in pairs]].tolist()) for k in COPY_KINDS[1:]}
    return {"confirmed": confirmed, "sweep": rows, "copy_pixel_similarity": by_kind}


def _sweeps(copy_sims: dict, clean, foreign: set, corrupt) -> dict:
    """Recall of the copies and share of clean images paired per threshold; outliers per z."""
    near = np.array([v for k, vs in copy_sims.items() if k != "exact" for v in vs])
    per_t = [
        {
            "threshold": t,
            "copies_recall": float(np.mean(near >= t)),
            "clean_paired": float(np.mean(clean.nearest >= t)),
        }
        for t in THRESHOLDS
    ]
    per_z = []
    for z in ZS:
        flagged_clean = _flagged(clean.distance, z)
        flagged = {corrupt.paths[i] for i in np.flatnonzero(_flagged(corrupt.distance, z))}
        per_z.append(
            {"z": z, "clean_flagged": float(np.mean(flagged_clean)), **_pr(flagged, foreign)}
        )
    return {"near_threshold": per_t, "outlier_z": per_z}


def _flagged(distance: np.ndarray, z: float) -> np.ndarray:
    med = np.median(distance)
    return (distance - med) / max(1.4826 * np.median(np.abs(distance - med)), 1e-12) > z


def score(name: str, truth: dict, clean: Path, corrupt: Path, work: Path) -> dict:
    from embedcache import audit

    truth = _as_cached(truth, (work / name).resolve())
    r = audit(corrupt, out=work / name / "audit", progress=False)
    rc = audit(clean, out=work / name / "audit_clean", progress=False)
    copies = {
        kind: {frozenset((a, b)) for a, b, k in truth["copies"] if k == kind} for kind in COPY_KINDS
    }
    exact, near = _pairs(r.tables["exact_duplicates"]), _pairs(r.tables["near_duplicates"])
    pre_exact = _pairs(rc.tables["exact_duplicates"])
    flipped, foreign = set(truth["flipped"]), set(truth["foreign"])
    labelled = len(r.ranking)
    top = set(r.ranking[: int(round(0.1 * labelled))])
    flagged = {row["path"] for row in r.tables["label_errors"]}
    seeded = set().union(*copies.values())
    result = {
        "images": {"clean": len(rc.paths), "corrupted": len(r.paths)},
        "exact_duplicates": {
            **_pr(exact, copies["exact"] | pre_exact),
            "seeded_recall": _pr(exact, copies["exact"])["recall"],
            "false_pairs": sum(not _same_bytes(p, truth["root"]) for p in exact),
        },
        "near_duplicates": {
            kind: _pr(near | exact, copies[kind])["recall"] for kind in COPY_KINDS[1:]
        },
        "leaks": _pr(_pairs(r.tables["leaks"]), seeded),
        "label_errors": {
            **_pr(flagged, flipped),
            "recall_top_10pct": len(top & flipped) / len(flipped),
        },
        "outliers": _pr({row["path"] for row in r.tables["outliers"]}, foreign),
    }
    near_seeded = set().union(*(copies[k] for k in COPY_KINDS[1:]))
    result["near_duplicates"] |= {
        "precision": _pr(near, near_seeded)["precision"],
        "found": len(near),
    }
    result["clean"] = _clean_alarms(rc)
    if rc.tables["near_duplicates"]:
        result["clean"]["pairs_sheet"] = _pairs_sheet(name, rc.tables["near_duplicates"], truth)
    result["copy_similarity"] = {
        k: _quantiles(v) for k, v in _copy_similarity(corrupt, truth["copies"]).items()
    }
    result["clean_nearest_similarity"] = _quantiles(rc.nearest.tolist())
    result["sweeps"] = _sweeps(_copy_similarity(corrupt, truth["copies"]), rc, foreign, r)
    result["pixel"] = _pixel_sweep(
        clean, corrupt, truth["copies"], r.summary["settings"]["near_confirmed"]
    )
    return result


def _pairs_sheet(name: str, rows: list[dict], truth: dict, side: int = 96) -> str:
    """Every near pair the audit reports on the clean set, side by side, lowest pixel
    similarity first (the doubtful ones up top), to be looked at: results/audit_clean_pairs_
    NAME.png (the first 60 pairs)."""
    from common import RESULTS
    from PIL import ImageDraw

    rows = sorted(rows, key=lambda r: float(r["pixel_similarity"] or 0))[:60]
    cols = 3
    sheet = Image.new("RGB", (cols * (2 * side + 24), -(-len(rows) // cols) * (side + 16)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, r in enumerate(rows):
        x, y = (i % cols) * (2 * side + 24), (i // cols) * (side + 16)
        for j, key in enumerate(("path_a", "path_b")):
            with Image.open(Path(truth["root"]) / r[key]) as img:
                sheet.paste(img.convert("RGB").resize((side, side)), (x + j * (side + 2), y))
        draw.text((x, y + side + 1), f"px {r['pixel_similarity']} f {r['similarity']}", "black")
    out = RESULTS / f"audit_clean_pairs_{name}.png"
    sheet.quantize(256).save(out, optimize=True)  # 256 colours: under 2 MB, enough to judge
    return out.name


def _as_cached(truth: dict, root: Path) -> dict:
    """The truth with paths as the cache records them: relative to the manifest's folder when
    inside it (the new files), absolute otherwise (the user's images)."""

    def cached(p: str) -> str:
        return (
            Path(p).resolve().relative_to(root).as_posix()
            if Path(p).resolve().is_relative_to(root)
            else p
        )

    return {
        "copies": [(cached(a), cached(b), k) for a, b, k in truth["copies"]],
        "flipped": [cached(p) for p in truth["flipped"]],
        "foreign": [cached(p) for p in truth["foreign"]],
        "root": root,
    }


def _same_bytes(pair: frozenset, root: Path) -> bool:
    a, b = sorted(pair)
    return (root / a).read_bytes() == (root / b).read_bytes()


def _quantiles(values: list[float]) -> dict:
    v = np.array(values)
    qs = {
        "min": v.min(),
        "p01": np.quantile(v, 0.01),
        "p05": np.quantile(v, 0.05),
        "median": np.median(v),
        "p99": np.quantile(v, 0.99),
        "max": v.max(),
    }
    return {k: round(float(x), 4) for k, x in qs.items()}


def _clean_alarms(rc) -> dict:
    """What the audit reports on the clean data (false alarms, but for what the data holds)."""
    t = rc.tables
    paired = {p for row in t["near_duplicates"] for p in (row["path_a"], row["path_b"])}
    n = len(rc.paths)
    return {
        "exact_pairs": len(t["exact_duplicates"]),
        "near_pairs": len(t["near_duplicates"]),
        "images_near_paired": len(paired) / n,
        "leaks": len(t["leaks"]),
        "label_errors_flagged": len(t["label_errors"]) / max(1, len(rc.ranking)),
        "outliers": len(t["outliers"]) / n,
    }


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def markdown(results: dict) -> str:
    """Per set: precision and recall of each finding on the corrupted data, false alarms on the
    clean data, then the threshold sweeps the defaults were chosen on."""
    lines = [
        "| set | finding | precision | recall | notes |",
        "|---|---|---:|---:|---|",
    ]
    for name, r in results.items():
        e, n, lk, lab, o = (
            r[k]
            for k in ("exact_duplicates", "near_duplicates", "leaks", "label_errors", "outliers")
        )
        near = ", ".join(f"{k} {_pct(n[k])}" for k in COPY_KINDS[1:])
        lines += [
            f"| {name} | exact duplicates | {_pct(e['precision'])} | {_pct(e['recall'])} | "
            f"{e['found']} pairs, {e['false_pairs']} not byte-identical; "
            f"seeded recall {_pct(e['seeded_recall'])} |",
            f"| {name} | near duplicates | {_pct(n['precision'])} | {near} | "
            f"{n['found']} pairs (precision counts seeded pairs only: "
            "the data's own look-alikes and copies count as false) |",
            f"| {name} | leaks | {_pct(lk['precision'])} | {_pct(lk['recall'])} | "
            f"{lk['found']} pairs |",
            f"| {name} | label errors (flagged) | {_pct(lab['precision'])} | "
            f"{_pct(lab['recall'])} | "
            f"recall within the top 10% ranked: {_pct(lab['recall_top_10pct'])} |",
            f"| {name} | outliers | {_pct(o['precision'])} | {_pct(o['recall'])} | "
            f"{o['found']} flagged, {o['true']} foreign images seeded |",
        ]
    lines += ["", "Clean data (what the audit reports on the unchanged set):", ""]
    lines += [
        "| set | images | exact pairs | near pairs | images near-paired | leaks "
        "| flagged labels | outliers |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        c = r["clean"]
        lines.append(
            f"| {name} | {r['images']['clean']} | {c['exact_pairs']} | {c['near_pairs']} | "
            f"{_pct(c['images_near_paired'])} | {c['leaks']} | "
            f"{_pct(c['label_errors_flagged'])} | {_pct(c['outliers'])} |"
        )
    lines += [
        "",
        "Threshold sweeps (copies recall: share of seeded JPEG/0.5x/crop copies at or above it; "
        "clean paired: share of clean images whose nearest neighbour is). near threshold: the "
        "features alone (what a cache without thumbnails gets); pixel threshold: the rule of "
        "caches with thumbnails, every pair compared:",
        "",
    ]
    for name, r in results.items():
        sims = r["copy_similarity"]
        lines.append(
            f"- {name}: copy similarity medians "
            + ", ".join(
                f"{k} {v['median']} (min {v['min']})" for k, v in sims.items() if k != "exact"
            )
            + f"; clean nearest-neighbour median {r['clean_nearest_similarity']['median']}, "
            f"p99 {r['clean_nearest_similarity']['p99']}"
        )
        lines.append(
            "  - near threshold: "
            + "; ".join(
                f"{t['threshold']}: {_pct(t['copies_recall'])} / {_pct(t['clean_paired'])}"
                for t in r["sweeps"]["near_threshold"]
            )
        )
        px = r["pixel"]
        lines.append(
            f"  - pixel threshold (feature cosine >= {px['confirmed']}; copies recall, per kind, "
            "/ clean paired): "
            + "; ".join(
                f"{t['pixel_threshold']}: {_pct(t['copies_recall'])} ("
                + ", ".join(f"{k} {_pct(t[k])}" for k in COPY_KINDS[1:])
                + f") / {_pct(t['clean_paired'])}"
                for t in px["sweep"]
            )
        )
        lines.append(
            "  - copies' pixel-code similarity: "
            + ", ".join(
                f"{k} median {v['median']} (min {v['min']})"
                for k, v in px["copy_pixel_similarity"].items()
            )
        )
        lines.append(
            "  - outlier z: "
            + "; ".join(
                f"{z['z']}: recall {_pct(z['recall'])}, clean flagged {_pct(z['clean_flagged'])}"
                for z in r["sweeps"]["outlier_z"]
            )
        )
    return "\n".join(lines)


def screenshot(cache: Path, work: Path) -> Path:
    """Render an audit report of ``cache`` (3 entries per finding) in headless Chromium to
    results/audit_report_flowers12.png."""
    import sys

    from common import RESULTS

    from embedcache import audit

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    from chromium import screenshot as render

    audit(cache, out=work / "audit_shot", progress=False, report_rows=3)
    page = work / "audit_shot" / "report.html"
    return render(page, RESULTS / "audit_report_flowers12.png", width=1280, height=2400)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/audit_work"))
    p.add_argument("--only", action="append", choices=sorted(SETS))
    p.add_argument("--extract-only", action="store_true")
    args = p.parse_args()
    names = args.only or list(SETS)
    results = {}
    for name in names:
        truth = prepare(name, args.work)
        clean, corrupt = extract_both(name, args.work)
        if args.extract_only:
            continue
        results[name] = score(name, truth, clean, corrupt, args.work)
    if not args.extract_only:
        save("audit_quality", {"sets": results}, markdown(results))
    if "flowers12" in names and shutil.which("chromium"):
        screenshot(args.work / "flowers12" / "corrupt.h5", args.work / "flowers12")


if __name__ == "__main__":
    main()
