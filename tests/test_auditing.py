"""embedcache.audit: content hashes at extract, each finding, the CSVs, summary and HTML report."""

from __future__ import annotations

import csv
import json
import shutil
import tempfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import make_image, make_tree, tool
from PIL import Image

import embedcache
from embedcache import audit, extract, open_cache, write_cache
from embedcache.auditing import search
from embedcache.auditing.labels import label_issues, out_of_fold_probabilities
from embedcache.cache.schema import identity_digest
from embedcache.cli import main
from embedcache.config import AuditConfig
from embedcache.errors import EmbedcacheError


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _separated(n_per_class: int, classes: int = 3, dim: int = 64, seed: int = 0, scale=1.0):
    """Classes far apart on the sphere, images of one class far from each other too."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).normal(0, 1, (classes, dim))
    labels = np.repeat(np.arange(classes), n_per_class)
    return (centres[labels] * scale + rng.normal(0, 1, (len(labels), dim))).astype(
        np.float32
    ), labels


@pytest.fixture
def planted(tmp_path):
    """A cache with one near copy across splits, one flipped label and one far-away image."""
    xt, yt = _separated(40)
    xv, yv = _separated(15, seed=1)
    xv[0] = xt[3] + np.random.default_rng(5).normal(0, 0.01, xt.shape[1])  # val/0 copies train/3
    yt[7] = (yt[7] + 1) % 3  # train/7 mislabelled
    xt[11] = np.random.default_rng(6).normal(0, 1, xt.shape[1]) * 0.1 - 40  # train/11 far away
    path = write_cache(
        tmp_path / "planted.h5",
        {
            "train": (xt, yt, [f"train/{i}.png" for i in range(len(yt))]),
            "val": (xv, yv, [f"val/{i}.png" for i in range(len(yv))]),
        },
        classes=["a", "b", "c"],
        backbone="resnet18",
        weights="none",
        transform='{"crop": 64}',
    )
    return path, int(_separated(40)[1][7])


def test_audit_finds_the_planted_copy_flipped_label_and_outlier(planted, tmp_path):
    cache, true_label = planted
    r = audit(cache, out=tmp_path / "audit", progress=False, device="cpu")
    near = r.tables["near_duplicates"]
    assert [(p["path_a"], p["path_b"]) for p in near] == [("train/3.png", "val/0.png")]
    assert [(p["kind"], p["reason"], p["path"]) for p in r.tables["leaks"]] == [
        ("near", "cross-split", "train/3.png")
    ]
    errors = {e["path"]: e for e in r.tables["label_errors"][:2]}  # with the far-away image
    assert errors["train/7.png"]["suggested"] == "abc"[true_label]
    assert "train/7.png" in r.ranking[:2]
    assert [o["path"] for o in r.tables["outliers"]] == ["train/11.png"]
    # a cache from arrays records no content hashes: the audit says so instead of counting
    assert r.summary["exact_duplicates"]["count"] is None
    assert "re-extract" in r.summary["exact_duplicates"]["how"]
    summary = json.loads((tmp_path / "audit" / "summary.json").read_text())
    assert summary["near_duplicates"]["count"] == 1 and summary["leaks"]["cross_split"] == 1
    assert _rows(tmp_path / "audit" / "leaks.csv")[0]["path_b"] == "val/0.png"


def test_the_label_check_ranks_probabilities_calibrated_by_one_recorded_temperature(
    planted, tmp_path, monkeypatch
):
    import embedcache.auditing as auditing
    from embedcache.calibration import fit_temperature, softmax

    seen = []
    real = auditing.out_of_fold_logits
    monkeypatch.setattr(
        auditing,
        "out_of_fold_logits",
        # the audit turns the logits into probabilities in place: it gets a copy
        lambda x, y, **kw: seen.append((real(x, y, **kw), y)) or seen[-1][0].copy(),
    )
    r = audit(planted[0], out=tmp_path / "audit", progress=False, device="cpu")
    ((logits, labels),) = seen
    t = fit_temperature(logits, labels)
    summary = json.loads((tmp_path / "audit" / "summary.json").read_text())
    assert summary["label_errors"]["calibration"]["temperature"] == pytest.approx(t) != 1.0
    assert f"temperature of {t:.3g}" in summary["label_errors"]["how"]
    row = r.tables["label_errors"][0]
    i = next(k for k, p in enumerate(r.paths) if p == row["path"])  # labelled rows: every row
    probs = softmax(logits, t)
    suggested = ["a", "b", "c"].index(row["suggested"])
    assert row["suggested_probability"] == pytest.approx(probs[i, suggested], abs=1e-4)
    assert abs(row["suggested_probability"] - softmax(logits)[i, suggested]) > 1e-3  # not T = 1


def test_blocked_search_equals_brute_force(monkeypatch):
    monkeypatch.setattr(search, "QUERY_ROWS", 7)
    monkeypatch.setattr(search, "KEY_ROWS", 5)
    x = search.unit_rows(np.random.default_rng(0).normal(size=(53, 12)).astype(np.float32))
    index, sims = search.nearest(x, k=4, device=torch.device("cpu"))
    full = x @ x.T
    np.fill_diagonal(full, -np.inf)
    expected = np.argsort(-full, axis=1)[:, :4]
    np.testing.assert_array_equal(index, expected)
    np.testing.assert_allclose(sims, np.take_along_axis(full, expected, 1), rtol=1e-5)


@pytest.mark.parametrize("stored", [np.float16, np.float32])
def test_bf16_search_rescored_equals_float32_brute_force(monkeypatch, stored):
    # bf16 similarities can only tell these near copies apart to ~4e-3; the float32 re-score
    # must give numpy's order and values
    monkeypatch.setattr(search, "QUERY_ROWS", 16)
    monkeypatch.setattr(search, "KEY_ROWS", 50)
    monkeypatch.setattr(search, "MARGIN", 6)
    rng = np.random.default_rng(1)
    base = rng.normal(size=(40, 24))
    x = np.concatenate([base + rng.normal(0, 0.02, base.shape) for _ in range(5)])
    x = search.unit_rows(x.astype(stored))
    index, sims = search.nearest(x, k=2, device=torch.device("cpu"), dtype=torch.bfloat16)
    full = x.astype(np.float64) @ x.astype(np.float64).T
    np.fill_diagonal(full, -np.inf)
    expected = np.argsort(-full, axis=1, kind="stable")[:, :2]
    assert sims.dtype == np.float32 and index.dtype == np.int64
    np.testing.assert_array_equal(index, expected)
    np.testing.assert_allclose(sims, np.take_along_axis(full, expected, 1), rtol=1e-6)


def test_out_of_fold_probabilities_rank_flipped_labels_first():
    x, y = _separated(30, classes=4, dim=32, scale=2.0)
    noisy = y.copy()
    flipped = np.array([0, 35, 70, 100])
    noisy[flipped] = (y[flipped] + 1) % 4
    probs = out_of_fold_probabilities(x, noisy, folds=5, seed=0)
    assert probs.shape == (120, 4) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
    issues = label_issues(probs, noisy)
    assert set(issues.order[:4]) == set(flipped)
    assert issues.flagged[flipped].sum() >= 3 and issues.flagged.sum() <= 8
    np.testing.assert_array_equal(issues.suggested[flipped], y[flipped])


def test_probes_train_on_capped_rows_keeping_every_row_of_a_rare_class(monkeypatch):
    from embedcache.auditing import labels as lab

    y = np.repeat([0, 1, 2, 3], [900, 6, 400, 40])
    kept = lab.capped(y, np.arange(len(y)), 300, seed=0)
    assert len(kept) <= 300 and (np.diff(kept) > 0).all()
    per_class = np.bincount(y[kept], minlength=4)
    assert per_class[1] == 6 and per_class[3] == 40  # under the quota: all of them
    assert per_class[0] == per_class[2] >= 120  # the rest shared out
    assert (lab.capped(y, np.arange(50), 300, seed=0) == np.arange(50)).all()
    # the cap holds the label check's training copies, and the flips still rank first
    x, clean = _separated(30, classes=4, dim=32, scale=2.0)
    noisy = clean.copy()
    noisy[[0, 35, 70, 100]] = (clean[[0, 35, 70, 100]] + 1) % 4
    seen = []
    real = lab._standardised
    monkeypatch.setattr(lab, "PROBE_ROWS", 40)
    monkeypatch.setattr(lab, "PROBE_PER_CLASS", 5)
    monkeypatch.setattr(lab, "_standardised", lambda f, r: seen.append(len(r)) or real(f, r))
    issues = label_issues(lab.out_of_fold_probabilities(x, noisy, folds=5, seed=0), noisy)
    assert len(seen) == 6 and max(seen[1:]) <= 40 < 96  # a fold's 96 training rows capped
    assert set(issues.order[:4]) == {0, 35, 70, 100}


@pytest.fixture
def extracted(tmp_path, extract_kw):
    """A real extraction with a byte-for-byte copy of a train image in val."""
    root = make_tree(tmp_path / "data", per_class=4)
    shutil.copyfile(root / "train/cat/cat_000.png", root / "val/dog/copy.png")
    result = extract(root, out=tmp_path / "c.h5", **extract_kw)
    return root, tmp_path / "c.h5", result


def test_extract_records_content_hashes_and_warns_of_copies_across_splits(extracted):
    root, cache, result = extracted
    with open_cache(cache) as c:
        assert c.attrs["format_version"] == 4
        thumbs = c.thumbnails("train")[:]
        assert thumbs.shape == (8, 32, 32) and thumbs.dtype == np.uint8
        assert (thumbs.reshape(8, -1).std(1) > 0).all()  # every image drawn, none unknown
        train, val = c.hashes("train"), c.hashes("val")
        copy = c.paths("val").index("val/dog/copy.png")
        assert train.shape == (8, 16) and train.dtype == np.uint8
        np.testing.assert_array_equal(
            val[copy], train[c.paths("train").index("train/cat/cat_000.png")]
        )
        assert len({bytes(h) for h in np.concatenate([train, val])}) == 16  # one pair alike
    assert result.leaks == 1
    assert "1 file(s) are byte-identical to a file in another split" in result.summary()


def test_audit_of_an_extracted_cache_pairs_the_copy_and_writes_a_report(extracted, tmp_path):
    root, cache, _ = extracted
    out = tmp_path / "audit"
    r = audit(cache, out=out, progress=False, device="cpu")
    exact = r.tables["exact_duplicates"]
    assert [(e["path_a"], e["path_b"], e["label_a"], e["label_b"]) for e in exact] == [
        ("train/cat/cat_000.png", "val/dog/copy.png", "cat", "dog")
    ]
    leak = [row for row in r.tables["leaks"] if row["kind"] == "exact"]
    assert leak[0]["reason"] == "cross-split, different labels"
    page = (out / "report.html").read_text()
    assert "Exact duplicates (1)" in page
    assert page.count("data:image/jpeg;base64,") >= 2  # both copies shown inline
    href = Path("..") / "data" / "val" / "dog" / "copy.png"
    assert f'href="{href.as_posix()}"' in page  # and each links to its file
    assert (out / href).resolve() == (root / "val/dog/copy.png").resolve()


def test_report_shows_given_and_suggested_labels(planted, tmp_path):
    cache, true_label = planted
    audit(cache, out=tmp_path / "a", progress=False, device="cpu", report_rows=5)
    page = (tmp_path / "a" / "report.html").read_text()
    assert '<span class="given">b</span>' in page or '<span class="given">c</span>' in page
    assert f'<span class="suggested">{"abc"[true_label]}</span>' in page
    assert "image not found" in page  # the arrays cache points at no files: placeholders


@pytest.mark.skipif(
    shutil.which("chromium") is None, reason="chromium is not installed (apt-get install chromium)"
)
def test_report_renders_in_headless_chromium(extracted, tmp_path):
    _, cache, _ = extracted
    audit(cache, out=tmp_path / "audit", progress=False, device="cpu")
    page = tmp_path / "audit" / "report.html"
    shot = tool("chromium").screenshot(page, tmp_path / "shot.png", width=1000, height=900)
    pixels = np.asarray(Image.open(shot).convert("RGB"), np.float32)
    assert pixels.shape[:2] == (900, 1000)
    # the thumbnails are drawn: the class colours of the test images (red cat, blue dog) appear
    red = (pixels[..., 0] > 150) & (pixels[..., 1] < 110) & (pixels[..., 2] < 110)
    assert red.sum() > 2000


def test_cli_audit_prints_counts_and_refuses_a_file_as_out(tmp_path, planted):
    cache, _ = planted
    runner = CliRunner()
    r = runner.invoke(
        main, ["audit", str(cache), "--out", str(tmp_path / "o"), "-q", "--device", "cpu"]
    )
    assert r.exit_code == 0, r.output
    assert ", 1 near-duplicate group (2 images), " in r.output.splitlines()[0], r.output
    assert "report.html" in r.output
    (tmp_path / "f").write_text("x")
    r = runner.invoke(main, ["audit", str(cache), "--out", str(tmp_path / "f")])
    assert r.exit_code != 0


def test_audit_out_must_be_a_folder(planted, tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(EmbedcacheError, match="is a file; pass a folder"):
        audit(planted[0], out=tmp_path / "file", progress=False)


def test_audit_is_in_the_public_api():
    assert embedcache.audit is audit and "AuditConfig" in embedcache.__all__


def test_extract_of_a_new_image_keeps_the_hashes_of_reused_rows(extracted, extract_kw):
    root, cache, _ = extracted
    make_image(root / "train/dog/new.png", 1, 77)
    extract(root, out=cache, **extract_kw)
    with open_cache(cache) as c:
        assert c.hashes("train").any(axis=1).all()
        thumbs = c.thumbnails("train")[:]
        assert len(thumbs) == 9 and (thumbs.reshape(9, -1).std(1) > 0).all()  # kept, and new


def _blobs(path: Path, seed: int, size=(96, 80), fmt=None, scale=1.0, quality=95) -> Path:
    """A smooth picture of a few soft discs on a red ground: the same red in every one, as
    images of one class look alike; ``scale`` < 1 writes it resized (a 0.5x copy)."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    img = np.zeros((h, w))
    for _ in range(4):
        cx, cy, r = rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.7), rng.uniform(0.08, 0.2)
        img += np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))
    rgb = np.stack([180 + 60 * img, 40 + 90 * img, 40 + 30 * img], -1).clip(0, 255)
    pic = Image.fromarray(rgb.astype(np.uint8), "RGB")
    if scale != 1.0:
        pic = pic.resize((round(w * scale), round(h * scale)), Image.BILINEAR)
    path.parent.mkdir(parents=True, exist_ok=True)
    pic.save(path, format=fmt, quality=quality)
    return path


@pytest.fixture
def blob_tree(tmp_path):
    """train/cat: 6 pictures; val/cat: a 0.5x JPEG q60 copy of train's first, and a new one."""
    root = tmp_path / "blobs"
    for i in range(6):
        _blobs(root / f"train/cat/{i}.png", seed=i)
        _blobs(root / f"train/dog/{i}.png", seed=100 + i)
    _blobs(root / "val/cat/copy.jpg", seed=0, fmt="JPEG", scale=0.5, quality=60)
    _blobs(root / "val/cat/other.png", seed=50)
    return root


def test_pixel_codes_keep_a_resized_copy_and_tell_another_picture():
    from embedcache.auditing.findings import pixel_codes
    from embedcache.data import grey_thumbnail

    with tempfile.TemporaryDirectory() as d:
        thumbs = np.stack(
            [
                grey_thumbnail(_blobs(Path(d) / "a.png", seed=0)),
                grey_thumbnail(_blobs(Path(d) / "b.jpg", seed=0, scale=0.5, quality=60)),
                grey_thumbnail(_blobs(Path(d) / "c.png", seed=1)),
                np.full((32, 32), 7, np.uint8),  # flat: nothing to compare
            ]
        )
    codes = pixel_codes(thumbs)
    assert codes.shape == (4, 63) and codes.dtype == np.float32
    assert codes[0] @ codes[1] > 0.99 and codes[0] @ codes[2] < 0.85
    assert not codes[3].any()


def _scene(
    path: Path, detail: int, crop=None, scale=1.0, quality=95, size=(120, 96), mirror=False
) -> Path:
    """A grey picture: the same layout of three large soft discs in every one, and the detail
    of 60 small ones drawn by ``detail``; written cropped (side, left, top as shares of the
    margin), resized, mirrored and JPEG-encoded as asked."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    img = np.zeros((h, w))
    drawn = (
        (0, 3, (0.2, 0.8), (0.2, 0.6), (0.15, 0.25), 1.0),
        (detail, 60, (0, 1), (0, 0.8), (0.015, 0.04), 0.6),
    )
    for seed, count, xs, ys, radii, amp in drawn:
        rng = np.random.default_rng(seed)
        for _ in range(count):
            cx, cy, r = rng.uniform(*xs), rng.uniform(*ys), rng.uniform(*radii)
            img += amp * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))
    pic = Image.fromarray((40 + 100 * img).clip(0, 255).astype(np.uint8), "L").convert("RGB")
    if crop:
        side, left, top = crop
        cw, ch = round(w * side), round(h * side)
        x, y = int((w - cw) * left), int((h - ch) * top)
        pic = pic.crop((x, y, x + cw, y + ch))
    if scale != 1.0:
        pic = pic.resize((round(pic.width * scale), round(pic.height * scale)), Image.BILINEAR)
    if mirror:
        pic = pic.transpose(Image.FLIP_LEFT_RIGHT)
    pic.save(path, format="JPEG", quality=quality)
    return path


def test_pixel_similarity_keeps_copies_and_crops_and_tells_apart_one_layout_with_other_detail():
    from embedcache.auditing.findings import pixel_codes, pixel_similarity
    from embedcache.config import AuditConfig
    from embedcache.data import grey_thumbnail

    made = [  # (detail, crop, scale, quality)
        (1,),
        (1, None, 1.0, 60),  # re-encoded
        (1, None, 0.5),  # resized
        (1, (0.9, 0.0, 0.0)),  # a 90% crop from a corner
        (1, (0.8, 0.5, 0.5)),  # an 80% crop from the centre
        (1, (0.7, 0.3, 0.8)),  # a 70% re-crop off the grid of fixed crops
        (1, (2 / 3, 0.5, 0.5), 1.5),  # zoomed 1.5x: the centre two thirds blown up
        (1, None, 1.0, 90, (120, 96), True),  # mirrored
        (2,),  # another picture of the same layout
        (3,),
    ]
    with tempfile.TemporaryDirectory() as d:
        thumbs = np.stack(
            [grey_thumbnail(_scene(Path(d) / f"{i}.jpg", *m)) for i, m in enumerate(made)]
        )
    a, b = np.zeros(len(made) - 1, np.int64), np.arange(1, len(made))
    sim = pixel_similarity(thumbs, a, b)
    threshold = AuditConfig().pixel_threshold
    assert sim.dtype == np.float32 and np.all(sim[:7] >= threshold), sim
    assert np.all(sim[7:] < threshold - 0.05), sim
    codes = pixel_codes(thumbs)  # low frequencies alone pair them (the rule before: >= 0.8)
    assert np.all((codes[a] * codes[b]).sum(1)[7:] > 0.8)
    assert pixel_similarity(thumbs, b, a) == pytest.approx(sim)  # either way round
    flat = np.concatenate([thumbs[:1], np.full((1, 32, 32), 9, np.uint8)])
    assert pixel_similarity(flat, np.array([0]), np.array([1]))[0] == pytest.approx(0.0, abs=1e-3)


def test_a_zoomed_copy_is_placed_between_whole_pixels_of_its_original():
    from embedcache.auditing import findings
    from embedcache.data import grey_thumbnail

    # detailed pictures zoomed 1.5x: the copy's 32 pixels hold 21.3 of the original's
    with tempfile.TemporaryDirectory() as d:
        kw = {"size": (240, 192)}
        thumbs = np.stack(
            [
                grey_thumbnail(_scene(Path(d) / f"{s}_{z}.jpg", s, *zoom, **kw))
                for s in range(1, 9)
                for z, zoom in enumerate([(), ((2 / 3, 0.5, 0.5), 1.5)])
            ]
        )
    a, b = np.arange(0, 16, 2), np.arange(1, 16, 2)
    x, y = findings._band(thumbs[a]), findings._band(thumbs[b])
    whole = findings._windows(x, y, thumbs[a], thumbs[b], 22).numpy()
    refined = findings._windows(x, y, thumbs[a], thumbs[b], 22, refine=True).numpy()
    assert whole.mean() < 0.95 and whole.min() < 0.9, whole  # half a pixel out
    assert refined.min() > 0.99, refined
    assert np.all(findings.pixel_similarity(thumbs, a, b) >= refined - 1e-6)


def test_audit_pairs_a_resized_copy_by_pixels_not_a_look_alike(blob_tree, tmp_path, extract_kw):
    extract(blob_tree, out=tmp_path / "b.h5", **extract_kw)
    # random-init features find every picture alike: the pixel codes must tell them apart
    r = audit(tmp_path / "b.h5", out=tmp_path / "a", progress=False, device="cpu", near_confirmed=0)
    near = [(p["path_a"], p["path_b"]) for p in r.tables["near_duplicates"]]
    assert ("train/cat/0.png", "val/cat/copy.jpg") in near
    assert all("other.png" not in p for pair in near for p in pair)
    row = r.tables["near_duplicates"][near.index(("train/cat/0.png", "val/cat/copy.jpg"))]
    assert row["pixel_similarity"] > 0.95
    threshold = AuditConfig().pixel_threshold
    assert f"pixel similarity >= {threshold:.4g}" in r.summary["near_duplicates"]["how"]
    leaks = _rows(tmp_path / "a" / "leaks.csv")
    assert any(x["path_b"] == "val/cat/copy.jpg" and x["pixel_similarity"] for x in leaks)


def test_a_format_3_cache_audits_by_features_alone_and_says_so(extracted, tmp_path):
    _, cache, _ = extracted
    with h5py.File(cache, "r+") as h5:  # as a format 3 cache was written: no thumbnails
        for split in ("train", "val"):
            del h5[split]["thumbnails"]
        h5.attrs["format_version"] = 3
        h5.attrs["identity_digest"] = identity_digest(h5.attrs)
    r = audit(cache, out=tmp_path / "a", progress=False, device="cpu")
    how = r.summary["near_duplicates"]["how"]
    assert "no thumbnails (cache written before format 4)" in how and "re-extract" in how
    assert all(row["pixel_similarity"] == "" for row in r.tables["near_duplicates"])
    assert len(r.tables["exact_duplicates"]) == 1  # the hashes still count


def test_extract_takes_the_thumbnails_from_its_own_decode_not_a_second_one(
    tmp_path, extract_kw, monkeypatch
):
    """The CPU decoder records each image's thumbnail as it decodes it; extract reads a file
    again for its thumbnail only where that decoder did not run. Either way the same pixels."""
    import embedcache.extraction as ex
    from embedcache.data import grey_thumbnail

    root = tmp_path / "d"
    for i in range(3):
        _blobs(root / "train" / "a" / f"{i}.jpg", i, fmt="JPEG")
        _blobs(root / "val" / "a" / f"{i}.jpg", 10 + i, fmt="JPEG")

    def second_decode(path):
        raise AssertionError(f"{path} decoded twice")

    monkeypatch.setattr(ex, "grey_thumbnail", second_decode)
    extract(root, out=tmp_path / "c.h5", **extract_kw)
    with open_cache(tmp_path / "c.h5") as c:
        paths, thumbs = c.split("train").paths, c.thumbnails("train")[:]
    for p, t in zip(paths, thumbs, strict=True):
        assert np.abs(t.astype(int) - grey_thumbnail(root / p)).max() <= 2


def _pool_of(thumbs: np.ndarray, features: np.ndarray):
    from embedcache.auditing.findings import Pool, pixel_codes

    n = len(thumbs)
    return Pool(
        features.astype(np.float32),
        np.zeros(n, np.int64),
        np.zeros(n, np.int64),
        [f"{i}.png" for i in range(n)],
        None,
        ["train"],
        ["x"],
        pixel_codes(thumbs),
        thumbs,
    )


def test_pixel_threshold_rises_where_different_images_are_alike_and_stays_on_photos():
    from sklearn.datasets import load_digits

    from embedcache.auditing.findings import NearRule, adapted_rule
    from embedcache.auditing.search import nearest, unit_rows

    rule = NearRule(0.85, 0.6, 0.85)
    digits = load_digits().images[:400]  # scans of handwriting: every 3 alike another 3
    thumbs = np.stack(
        [
            np.asarray(Image.fromarray((d * 15).astype(np.uint8)).resize((32, 32), Image.BILINEAR))
            for d in digits
        ]
    )
    unit = unit_rows(digits.reshape(len(digits), -1).astype(np.float32))
    index, _ = nearest(unit, k=10, device=torch.device("cpu"))
    raised, record = adapted_rule(_pool_of(thumbs, unit), index, rule, seed=0)
    assert record["raised"] and 0.9 < raised.pixel <= 0.98, record
    assert raised.confirmed == rule.confirmed and raised.alone == rule.alone
    # distinct pictures (smooth random fields): the floor holds
    rng = np.random.default_rng(0)
    fields = torch.nn.functional.interpolate(
        torch.from_numpy(rng.normal(size=(200, 1, 8, 8))).float(), size=(32, 32), mode="bicubic"
    )
    thumbs = (128 + 40 * fields[:, 0]).clamp(0, 255).numpy().astype(np.uint8)
    unit = unit_rows(thumbs.reshape(200, -1).astype(np.float32) - 128)
    index, _ = nearest(unit, k=10, device=torch.device("cpu"))
    kept, record = adapted_rule(_pool_of(thumbs, unit), index, rule, seed=0)
    assert kept == rule and not record["raised"] and record["different_images_p99"] < 0.85


def test_neighbours_under_every_rule_are_left_out_before_pairs_are_made():
    from embedcache.auditing.findings import NearRule, Pairs, near_pairs
    from embedcache.auditing.search import nearest, unit_rows

    rng = np.random.default_rng(5)
    x = rng.normal(size=(300, 16)).astype(np.float32)
    x[150:200] = x[:50] + rng.normal(0, 0.45, (50, 16))  # 50 copies, at cosines either side of 0.9
    unit = unit_rows(x)
    thumbs = rng.integers(0, 255, (300, 32, 32), dtype=np.uint8)
    thumbs[150:200] = thumbs[:50]  # their pixels agree
    pool = _pool_of(thumbs, unit)
    index, sims = nearest(unit, k=8, device=torch.device("cpu"), dtype=torch.float32)
    rule = NearRule(alone=0.95, confirmed=0.9, pixel=0.85)
    full = near_pairs(pool, unit, [index], rule, Pairs())
    quick = near_pairs(pool, unit, [index], rule, Pairs(), [sims])
    assert 0 < len(full) < 50  # some copies under the feature cosine: the rule matters here
    assert (quick.a == full.a).all() and (quick.b == full.b).all()
    np.testing.assert_array_equal(quick.score, full.score)
