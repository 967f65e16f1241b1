"""The findings of an audit, as tables: one row per pair of images or per image.

Every split of a cache is pooled into one table of rows (``Pool``); a finding refers to rows by
their position in it. Pairs are ordered so that ``a`` is the copy in the earlier split
(train, val, test) or, within a split, the earlier row.

Near duplicates are confirmed by pixels where the cache has them (format 4), from each
image's grey 32 x 32 thumbnail. Its *pixel code*, the 8 x 8 lowest-frequency DCT-II
coefficients less the mean, finds candidates whose features moved (a 0.5x copy); a candidate
pair is a near duplicate when its feature cosine and its *pixel similarity*
(:func:`pixel_similarity`: the correlation of the thumbnails' band-passed pixels, the best of a
few crops of either image, mirrored or not, and of a 70% window slid over the other) both reach
their thresholds (:func:`near_pairs`). Low frequencies alone pair different photos of one flower
on one background; the band keeps the detail a re-encoded, resized, cropped or mirrored copy
shares with its original and another photo does not. The pixel threshold rises where different
images are alike anyway (scans, digits, product shots on white): :func:`adapted_rule`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..cache import Cache, duplicate_groups
from ..data import SPLIT_ORDER
from .rows import DiskRows

CODE_SIDE = 8  # the low-frequency DCT block of a pixel code: 8 x 8 less the mean, 63 values
PAIR_ROWS = 65536  # candidate pairs scored at a time
MAD_SCALE = 1.4826  # median absolute deviation to the standard deviation of a normal
READ_ROWS = 65536  # rows read from the cache at a time


@dataclass
class Pool:
    """Every split of a cache in one table.

    features : (n, d) stored dtype, or :class:`.rows.DiskRows` (read from the file); split :
    (n,) index into ``splits``; labels : (n,) int64,
    -1 unlabelled; paths : n str, relative to the data root; hashes : (n, 16) uint8 or None
    (a cache written before format 3); codes : (n, 63) float32 pixel codes (:func:`pixel_codes`;
    all-zero rows unknown) or None (a cache written before format 4); label_sets : (n, C) bool,
    each image's labels in a multi-label cache (``labels`` then holds its first), else None
    """

    features: np.ndarray
    split: np.ndarray
    labels: np.ndarray
    paths: list[str]
    hashes: np.ndarray | None
    splits: list[str]
    classes: list[str]
    codes: np.ndarray | None = None
    thumbnails: np.ndarray | None = None
    label_sets: np.ndarray | None = None

    @property
    def multi_label(self) -> bool:
        """Whether images may have several labels (a multi-label cache)."""
        return self.label_sets is not None

    @classmethod
    def read(cls, cache: Cache, *, on_disk: bool = False) -> Pool:
        """Every split of ``cache``; ``on_disk``: the features left in the file, read as unit
        rows when asked (:class:`.rows.DiskRows`; the cache must stay open)."""
        names = [s for s in cache.splits if cache.num_images(s)]
        sizes = [cache.num_images(s) for s in names]
        if on_disk:
            features = DiskRows([cache.features(name) for name in names])
        else:
            features = _loaded(cache, names, sizes)
        hashes = [cache.hashes(s) for s in names]
        thumbnails = _read_thumbnails(cache, names)
        codes = None if thumbnails is None else _codes_of(thumbnails)
        return cls(
            features,
            np.repeat(np.arange(len(names)), sizes).astype(np.int64),
            np.concatenate([cache.labels(s) for s in names] or [np.zeros(0, np.int64)]),
            [p for s in names for p in cache.paths(s)],
            None if any(h is None for h in hashes) or not hashes else np.concatenate(hashes),
            names,
            cache.classes,
            codes,
            thumbnails,
            _label_sets(cache, names),
        )

    def __len__(self) -> int:
        return len(self.labels)

    def label_name(self, row: int) -> str:
        """The image's label, or in a multi-label cache its labels joined by | ("" for none)."""
        if self.label_sets is not None:
            return "|".join(self.classes[c] for c in np.flatnonzero(self.label_sets[row]))
        label = int(self.labels[row])
        return self.classes[label] if 0 <= label < len(self.classes) else ""

    def different_labels(self, a: int, b: int) -> bool:
        """Whether two labelled images disagree on the label (on the set, multi-label)."""
        if self.label_sets is not None:
            return not np.array_equal(self.label_sets[a], self.label_sets[b])
        return self.labels[a] >= 0 and self.labels[b] >= 0 and self.labels[a] != self.labels[b]

    def split_name(self, row: int) -> str:
        return self.splits[int(self.split[row])]

    def rank(self, row: int) -> tuple[int, int]:
        """Where a row comes in the usual order: its split's place, then the row."""
        return SPLIT_ORDER.index(self.split_name(row)), row

    def ordered(self, a: int, b: int) -> tuple[int, int]:
        """The pair with the row of the earlier split (then the earlier row) first."""
        return (a, b) if self.rank(a) <= self.rank(b) else (b, a)


def _loaded(cache: Cache, names: list[str], sizes: list[int]) -> np.ndarray:
    """The features of ``names`` in one array, filled in place (one copy)."""
    dtype = cache.features(names[0]).dtype if names else np.float16
    features = np.empty((sum(sizes), cache.feature_dim), dtype)
    at = 0
    for name, n in zip(names, sizes, strict=True):
        source = cache.features(name)
        for lo in range(0, n, READ_ROWS):
            features[at + lo : at + min(n, lo + READ_ROWS)] = source[lo : lo + READ_ROWS]
        at += n
    return features


def _label_sets(cache: Cache, names: list[str]) -> np.ndarray | None:
    """Every image's labels (n, C) bool in split order, for a multi-label cache; else None."""
    if not cache.multi_label:
        return None
    sets = [cache.label_matrix(s) for s in names]
    return np.concatenate(sets) if sets else np.zeros((0, len(cache.classes)), bool)


def _empty(dtype):
    return field(default_factory=lambda: np.zeros(0, dtype))


@dataclass
class Pairs:
    """Pairs of rows: ``a``, ``b`` (n,) int64, ``score`` (n,) float32 (feature cosine
    similarity) and ``pixel`` (n,) float32 (:func:`pixel_similarity`, NaN: not compared)."""

    a: np.ndarray = _empty(np.int64)
    b: np.ndarray = _empty(np.int64)
    score: np.ndarray = _empty(np.float32)
    pixel: np.ndarray = _empty(np.float32)

    def __len__(self) -> int:
        return len(self.a)

    def sorted(self) -> Pairs:
        order = np.lexsort((self.b, self.a, -self.score))
        return Pairs(self.a[order], self.b[order], self.score[order], self.pixel[order])


def _read_thumbnails(cache: Cache, names: list[str]) -> np.ndarray | None:
    """The grey thumbnails of every row of ``names`` (1 kB an image); None when a split has
    none (a cache written before format 4)."""
    sets = [cache.thumbnails(s) for s in names]
    if not names or any(ds is None for ds in sets):
        return None
    return np.concatenate([ds[:] for ds in sets])


def _codes_of(thumbnails: np.ndarray) -> np.ndarray:
    """:func:`pixel_codes` of many thumbnails, a block at a time."""
    blocks = range(0, len(thumbnails), READ_ROWS)
    parts = [pixel_codes(thumbnails[lo : lo + READ_ROWS]) for lo in blocks]
    return np.concatenate(parts) if parts else np.zeros((0, CODE_SIDE**2 - 1), np.float32)


# Pixel similarity: thumbnails compared in a band of spatial frequencies (a difference of
# Gaussians, sigmas in thumbnail pixels), the best over the whole image and these crops of
# either one: (side as a share of the thumbnail, left and top as shares of the margin).
BAND = (0.7, 4.0)
CROPS = tuple((side, x, y) for side in (0.9, 0.8) for x in (0.0, 0.5, 1.0) for y in (0.0, 0.5, 1.0))
PIXEL_PAIRS = 4096  # candidate pairs compared at a time (about 40 MB of float32 images)


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """A separable Gaussian blur of (n, 1, s, s) images, edges reflected: M x M^T with M the
    1-D blur as an s x s matrix (:func:`_blur_matrix`), two small batched matmuls. As 1-D
    convolutions it was most of the audit's time (1-channel convolutions are slow on CPU)."""
    m = _blur_matrix(sigma, x.shape[-1])
    return m @ x @ m.T


@functools.lru_cache(maxsize=32)
def _blur_matrix(sigma: float, side: int) -> torch.Tensor:
    """The 1-D Gaussian blur of ``side`` samples, edges reflected, as a (side, side) matrix:
    row i holds the weights of output i."""
    r = min(int(np.ceil(3 * sigma)), side - 1)
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    basis = F.pad(torch.eye(side).unsqueeze(1), (r, r), mode="reflect")  # input j is e_j
    return F.conv1d(basis, k.view(1, 1, -1)).squeeze(1).T.contiguous()


def _band(thumbnails: np.ndarray, side: int | None = None) -> torch.Tensor:
    """Thumbnails (n, s, s) band-passed, as (n, 1, s, s) float32; first shrunk to ``side``
    (antialiased) when given."""
    x = torch.from_numpy(np.ascontiguousarray(thumbnails)).float().unsqueeze(1)
    if side is not None and side != x.shape[-1]:
        x = F.interpolate(x, size=(side, side), mode="bilinear", antialias=True)
    return _band_passed(x)


def _band_passed(x: torch.Tensor) -> torch.Tensor:
    """(n, 1, s, s) float32 images in the band ``BAND``: a difference of Gaussian blurs."""
    return _blur(x, BAND[0]) - _blur(x, BAND[1])


def _crop(x: torch.Tensor, crop: tuple[float, float, float]) -> torch.Tensor:
    """The part of each image ``crop`` names, resampled (bilinear) to the full size."""
    side, left, top = crop
    cx, cy = -1 + 2 * left * (1 - side) + side, -1 + 2 * top * (1 - side) + side
    theta = torch.tensor([[side, 0.0, cx], [0.0, side, cy]]).expand(len(x), 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _unit(x: torch.Tensor) -> torch.Tensor:
    """Images as rows of zero mean and unit length; a flat one (its band only float error,
    far under any picture's grey levels) as a row of zero length."""
    x = x.flatten(1)
    x = x - x.mean(1, keepdim=True)
    norm = x.norm(dim=1, keepdim=True)
    return torch.where(norm > 1e-2, x / norm.clamp_min(1e-2), torch.zeros_like(x))


def pixel_similarity(
    thumbnails: np.ndarray, a: np.ndarray, b: np.ndarray, *, crops_from: float | None = None
) -> np.ndarray:
    """How alike the pixels of images ``a`` and ``b`` are, pair by pair: the correlation of
    their band-passed grey thumbnails (``BAND``), the best over the whole images and each of
    ``CROPS`` of either one set against the other whole, ``a`` as it is and mirrored left to
    right; and over every place of either one shrunk to ``WINDOW`` of its side inside the other
    (a zoomed or a 70% re-crop, :func:`_window_match`). 1 for the same picture; JPEG q60, 0.5x
    and mirrored copies keep about 0.99, a 90% crop 0.95, and different photos of one flower on
    one background stay under 0.81 (benchmarks/results/audit_quality.md); 0 against a flat image.

    crops_from : search the crops only for pairs whose coarse score (the whole images, either
        mirrored, and either shrunk to 0.9, 0.8 and 0.7 anywhere in the other) reaches it; the
        others keep the whole images' and the 70% window's best. Most different images fall
        under 0.7 there (92% of flowers12's candidate pairs, before the window was placed
        between pixels). At the default 0.9 (crops from 0.75) no seeded copy of the four sets of
        benchmarks/results/audit_quality.md scored less for it, and every copy on the photo sets
        scored 0.936 or more in all (grocery81's 90% crops the lowest).
    thumbnails : (n, s, s) uint8; a, b : (p,) int64 rows. Returns (p,) float32.
    """
    out = np.empty(len(a), np.float32)
    for lo in range(0, len(a), PIXEL_PAIRS):
        ta, tb = (thumbnails[r[lo : lo + PIXEL_PAIRS]] for r in (a, b))
        x, y = _band(ta), _band(tb)
        ux, uy = _unit(x), _unit(y)
        best = torch.maximum((ux * uy).sum(1), (_unit(torch.flip(x, dims=[-1])) * uy).sum(1))
        side = thumbnails.shape[-1]
        best = torch.maximum(best, _windows(x, y, ta, tb, round(WINDOW * side), refine=True))
        if crops_from is None:
            crop = torch.ones(len(x), dtype=torch.bool)
        else:  # the coarse score: wider windows too, searched but not kept
            probe = torch.maximum(best, _windows(x, y, ta, tb, round(0.9 * side)))
            crop = torch.maximum(probe, _windows(x, y, ta, tb, round(0.8 * side))) >= crops_from
        if crop.any():
            best[crop] = torch.maximum(best[crop], _best_crop(x[crop], y[crop]))
        out[lo : lo + len(x)] = best.numpy()
    return out


def _windows(
    x, y, ta: np.ndarray, tb: np.ndarray, side: int, *, refine: bool = False
) -> torch.Tensor:
    """The best of b shrunk to ``side`` inside a and of a inside b (band-passed ``x``, ``y``);
    with ``refine``, each best place searched again between whole pixels (:func:`_refined`)."""
    best = []
    for big, raw, other in ((x, ta, tb), (y, tb, ta)):
        small = _band(other, side=side)
        score, place = _window_match(big, small)
        if refine:
            score = torch.maximum(score, _refined(raw, small, place))
        best.append(score)
    return torch.maximum(*best)


def _best_crop(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The best correlation of each of ``CROPS`` of x (as it is and mirrored) with y whole, and
    of y with x whole (mirrored or not)."""
    uy = _unit(y)
    best = torch.full((len(x),), -1.0)
    for view in (x, torch.flip(x, dims=[-1])):  # a mirrored copy: x flipped matches y
        ux = _unit(view)
        for crop in CROPS:
            best = torch.maximum(best, (_unit(_crop(view, crop)) * uy).sum(1))
            best = torch.maximum(best, (_unit(_crop(y, crop)) * ux).sum(1))
    return best


WINDOW = 0.7  # the share of a side a zoomed or re-cropped copy may keep of its original
# The best whole-pixel window, searched again: its side times each of WINDOW_SCALES (a 1.5x zoom
# keeps 21.3 of 32 pixels, not 22) and its centre moved by each of WINDOW_SHIFTS pixels both
# ways. Whole pixels alone left 4 of flowers12's 48 zoomed copies under 0.85, the fine band
# being half a pixel out; placed exactly they correlate at 0.985 or more.
WINDOW_SCALES, WINDOW_SHIFTS = (0.97, 1.0), (-0.5, 0.0, 0.5)
CROP_MARGIN = 0.15  # crops are searched from the pixel threshold less this (coarse score)


def _window_match(big: torch.Tensor, small: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The best correlation of each ``small`` (p, 1, t, t) with a t x t window of its ``big``
    (p, 1, s, s), over every whole-pixel place: one grouped convolution, the windows' means and
    norms from box sums. Finds a copy zoomed 1.5x or re-cropped to 70% anywhere in the frame,
    which a fixed grid of crops misses between its places (benchmarks/results/audit_quality.md).
    Returns the best correlations (p,) and their places (p,) int64: the flat index of each best
    window's top-left corner among the (s - t + 1)^2 places."""
    p, _, t, _ = small.shape
    if not p:
        return torch.zeros(0), torch.zeros(0, dtype=torch.long)
    small = small - small.mean((2, 3), keepdim=True)
    # floors well above float error and far below any picture's (grey levels): a flat window
    # or image correlates 0 with anything
    small = small / small.flatten(1).norm(dim=1).clamp_min(1e-2).view(p, 1, 1, 1)
    dots = F.conv2d(big.reshape(1, p, *big.shape[2:]), small, groups=p).view(p, -1)
    mean = F.avg_pool2d(big, t, stride=1).view(p, -1)
    square = F.avg_pool2d(big * big, t, stride=1).view(p, -1)
    norm = ((square - mean * mean).clamp_min(0) * t * t).sqrt().clamp_min(1e-2)
    best = (dots / norm).max(1)
    return best.values, best.indices


def _refined(raw: np.ndarray, small: torch.Tensor, place: torch.Tensor) -> torch.Tensor:
    """The best correlation of each band-passed ``small`` (p, 1, t, t) with windows of its
    thumbnail in ``raw`` (p, s, s) uint8 near the whole-pixel ``place`` that
    :func:`_window_match` found (the flat index of the window's corner): the window's side
    scaled by each of ``WINDOW_SCALES``, its centre moved by ``WINDOW_SHIFTS`` both ways, each
    sampled (bilinear) to t x t and band-passed like ``small``."""
    p, _, t, _ = small.shape
    if not p:
        return torch.zeros(0)
    side = raw.shape[-1]
    img = torch.from_numpy(np.ascontiguousarray(raw)).float().unsqueeze(1)
    row, col = place // (side - t + 1), place % (side - t + 1)
    target = _unit(small)
    best = torch.full((p,), -1.0)
    theta = torch.zeros(p, 2, 3)
    for scale in WINDOW_SCALES:
        theta[:, 0, 0] = theta[:, 1, 1] = scale * t / side
        for dx in WINDOW_SHIFTS:
            for dy in WINDOW_SHIFTS:  # the centre in [-1, 1] (align_corners=False)
                theta[:, 0, 2] = (2 * (col + t / 2 + dx) / side - 1).float()
                theta[:, 1, 2] = (2 * (row + t / 2 + dy) / side - 1).float()
                grid = F.affine_grid(theta, [p, 1, t, t], align_corners=False)
                window = F.grid_sample(
                    img, grid, mode="bilinear", padding_mode="border", align_corners=False
                )
                best = torch.maximum(best, (_unit(_band_passed(window)) * target).sum(1))
    return best


def _dct_rows(side: int, keep: int) -> np.ndarray:
    """The first ``keep`` rows of the orthonormal DCT-II matrix of size ``side``, float32."""
    k, x = np.arange(keep)[:, None], np.arange(side)[None, :]
    basis = np.cos(np.pi * (2 * x + 1) * k / (2 * side)) * np.sqrt(2.0 / side)
    basis[0] /= np.sqrt(2.0)
    return basis.astype(np.float32)


def pixel_codes(thumbnails: np.ndarray) -> np.ndarray:
    """Pixel codes of grey thumbnails: the ``CODE_SIDE`` x ``CODE_SIDE`` lowest-frequency 2-D
    DCT-II coefficients less the first (the mean), scaled to unit length.

    thumbnails : ndarray of shape (n, s, s), uint8 (a cache's ``thumbnails``)
    Returns ndarray of shape (n, CODE_SIDE**2 - 1), float32; all zeros for a flat thumbnail
    (one grey level: nothing to compare, or unknown, as a row reused from an older cache is).
    """
    c = _dct_rows(thumbnails.shape[-1], CODE_SIDE)
    low = np.einsum("ij,njk,lk->nil", c, thumbnails.astype(np.float32), c, optimize=True)
    codes = low.reshape(len(thumbnails), -1)[:, 1:]
    norm = np.linalg.norm(codes, axis=1, keepdims=True)
    flat = thumbnails.reshape(len(thumbnails), -1)
    known = (flat.max(1) > flat.min(1))[:, None]
    return np.where(known, codes / np.maximum(norm, 1e-12), 0.0).astype(np.float32)


def exact_pairs(pool: Pool) -> tuple[Pairs, int]:
    """Byte-identical files: each group's first copy paired with every other; and the groups."""
    if pool.hashes is None:
        return Pairs(), 0
    pairs = []
    for group in duplicate_groups(pool.hashes):
        first = min(group.tolist(), key=pool.rank)
        pairs += [(first, int(r)) for r in group if r != first]
    a, b = (
        (np.array(c, np.int64) for c in zip(*pairs, strict=True))
        if pairs
        else (np.zeros(0, np.int64),) * 2
    )
    ones, unknown = np.ones(len(a), np.float32), np.full(len(a), np.nan, np.float32)
    return Pairs(a, b, ones, unknown).sorted(), len(duplicate_groups(pool.hashes))


@dataclass(frozen=True)
class NearRule:
    """When two images are near duplicates: feature cosine >= ``confirmed`` and pixel
    similarity (:func:`pixel_similarity`) >= ``pixel`` where both have thumbnails; feature
    cosine >= ``alone`` where either has none (a cache written before format 4, a row reused
    from one, a flat image)."""

    alone: float
    confirmed: float
    pixel: float


# The pixel threshold of a cache: raised to the NULL_QUANTILE of the pixel similarity of up to
# NULL_SAMPLE images (seeded) to their farthest searched neighbour by features (the 10th by
# default). Copies come first among an image's neighbours; the 10th is another image unless it
# has ten copies, as alike as the data makes different images. The 2nd was not enough: where a
# third of the images had a seeded copy besides the data's own twins, its 99th percentile was a
# copy's (0.98-1.0). On photos the 10th stays under the floor (0.62-0.75); on 8x8 digits 0.95.
NULL_SAMPLE, NULL_QUANTILE, NULL_RANK_MIN = 2000, 0.99, 2
PIXEL_CEILING = 0.98  # above it thumbnails of 32 x 32 cannot tell copies from other images


def adapted_rule(
    pool: Pool, neighbours: np.ndarray, rule: NearRule, *, seed: int
) -> tuple[NearRule, dict | None]:
    """``rule`` with its pixel threshold raised to what different images of this cache reach
    (``NULL_QUANTILE`` of their similarity to their k-th neighbour), at most to
    ``PIXEL_CEILING`` and never lowered; and the record of it (None: no thumbnails to measure).

    neighbours : (n, k) int64 feature neighbours, nearest first.
    """
    if pool.codes is None or neighbours.shape[1] < NULL_RANK_MIN or not len(pool):
        return rule, None
    rows = np.arange(len(pool))
    other = neighbours[:, -1]
    keep = pool.codes.any(1) & pool.codes[other].any(1) & ~_same_bytes(pool, rows, other)
    rows = rows[keep]
    rows = np.random.default_rng(seed).permutation(rows)[:NULL_SAMPLE]
    if not len(rows):
        return rule, None
    # the crops only near the top: a quantile above the floor less CROP_MARGIN is exact
    alike = pixel_similarity(
        pool.thumbnails, rows, other[rows], crops_from=rule.pixel - CROP_MARGIN
    )
    quantile = float(np.quantile(alike, NULL_QUANTILE))
    pixel = min(max(rule.pixel, quantile), max(rule.pixel, PIXEL_CEILING))
    record = {
        "pixel_threshold": round(pixel, 4),
        "floor": rule.pixel,
        "different_images_p99": round(quantile, 4),
        "neighbour": int(neighbours.shape[1]),
        "sample": int(len(rows)),
        "raised": pixel > rule.pixel,
    }
    return NearRule(rule.alone, rule.confirmed, pixel), record


def _same_bytes(pool: Pool, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Whether rows ``a`` and ``b`` are byte copies (same content hash), pair by pair."""
    if pool.hashes is None:
        return np.zeros(len(a), bool)
    ha, hb = pool.hashes[a], pool.hashes[b]
    return (ha == hb).all(1) & ha.any(1)


def near_pairs(
    pool: Pool,
    unit: np.ndarray,
    neighbours: list[np.ndarray],
    rule: NearRule,
    exact: Pairs,
    sims: list[np.ndarray | None] | None = None,
) -> Pairs:
    """Near duplicates among each row's neighbours, decided by ``rule``; pairs of byte copies
    left out (they are exact duplicates).

    unit : (n, d) unit rows of the features; neighbours : (n, k) int64 index arrays from
    :func:`embedcache.auditing.search.nearest`, one per space searched (features, pixel codes),
    whose pairs are the candidates; sims : their feature cosines where known (the features'
    search), each (n, k) float32, or None
    """
    n = len(pool)
    # a pair under every rule's feature cosine cannot pass: left out before the pairs are made
    floor = rule.alone if pool.codes is None else min(rule.alone, rule.confirmed)
    keys = _candidate_keys(n, neighbours, sims or [None] * len(neighbours), floor - 1e-5)
    same = np.minimum(exact.a, exact.b) * n + np.maximum(exact.a, exact.b)
    keys = keys[~np.isin(keys, same) & (keys // n != keys % n)]
    lo, hi = keys // n, keys % n
    # the copies exact_pairs left unpaired (each is paired with its group's first only)
    lo, hi = (x[~_same_bytes(pool, lo, hi)] for x in (lo, hi))
    score = _row_dots(unit, lo, hi)
    if pool.codes is None:
        pixel, keep = np.full(len(lo), np.nan, np.float32), score >= rule.alone
    else:
        known = pool.codes[lo].any(1) & pool.codes[hi].any(1)
        pixel = np.full(len(lo), np.nan, np.float32)
        asked = known & (score >= rule.confirmed)  # only these can pass: the others cost nothing
        pixel[asked] = pixel_similarity(
            pool.thumbnails, lo[asked], hi[asked], crops_from=rule.pixel - CROP_MARGIN
        )
        keep = np.where(
            known, (score >= rule.confirmed) & (pixel >= rule.pixel), score >= rule.alone
        )
    lo, hi, score, pixel = lo[keep], hi[keep], score[keep], pixel[keep]
    ordered = [pool.ordered(int(x), int(y)) for x, y in zip(lo, hi, strict=True)]
    a = np.array([p[0] for p in ordered], np.int64)
    b = np.array([p[1] for p in ordered], np.int64)
    return Pairs(a, b, score, pixel).sorted()


def _candidate_keys(n: int, neighbours: list, sims: list, floor: float) -> np.ndarray:
    """The unique pairs (lo * n + hi, lo < hi or a row with itself) of the neighbour lists,
    where a list's feature cosine is known only those at ``floor`` or above; made PAIR_ROWS
    rows at a time, so that no (n, k) temporaries are held."""
    keys = []
    for index, sim in zip(neighbours, sims, strict=True):
        for lo in range(0, n, PAIR_ROWS):
            block = index[lo : lo + PAIR_ROWS]
            keep = np.ones(block.shape, bool) if sim is None else sim[lo : lo + PAIR_ROWS] >= floor
            r, c = np.nonzero(keep)
            a, b = r + lo, block[r, c]
            keys.append(np.unique(np.minimum(a, b) * n + np.maximum(a, b)))
    return np.unique(np.concatenate(keys)) if keys else np.zeros(0, np.int64)


def _row_dots(x: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(x[a] * x[b]).sum(1) in float32, ``PAIR_ROWS`` pairs at a time."""
    out = np.empty(len(a), np.float32)
    for lo in range(0, len(a), PAIR_ROWS):
        xa = x[a[lo : lo + PAIR_ROWS]].astype(np.float32)
        out[lo : lo + len(xa)] = np.einsum("ij,ij->i", xa, x[b[lo : lo + PAIR_ROWS]])
    return out


@dataclass
class Leaks:
    """Duplicate pairs (exact or near) across splits or with different labels."""

    pairs: Pairs
    kind: list[str]  # exact or near
    reason: list[str]  # cross-split, different labels, or both


def leaks(pool: Pool, exact: Pairs, near: Pairs) -> Leaks:
    """The exact and near duplicates that straddle splits or whose copies disagree on the label."""
    a, b, score, pixel, kind, reason = [], [], [], [], [], []
    for name, pairs in (("exact", exact), ("near", near)):
        rows = (pairs.a.tolist(), pairs.b.tolist(), pairs.score.tolist(), pairs.pixel.tolist())
        for x, y, s, px in zip(*rows, strict=True):
            why = []
            if pool.split[x] != pool.split[y]:
                why.append("cross-split")
            if pool.different_labels(x, y):
                why.append("different labels")
            if why:
                a.append(x), b.append(y), score.append(s), pixel.append(px), kind.append(name)
                reason.append(", ".join(why))
    ab = (np.array(a, np.int64), np.array(b, np.int64))
    pairs = Pairs(*ab, np.array(score, np.float32), np.array(pixel, np.float32))
    return Leaks(pairs, kind, reason)


@dataclass
class Outliers:
    """Rows far from their neighbours: ``rows`` by decreasing ``score`` (mean cosine distance
    to the k nearest), their robust z-scores, and the threshold they exceed."""

    rows: np.ndarray
    score: np.ndarray
    z: np.ndarray
    threshold: float


def outliers(sims: np.ndarray, *, z: float) -> tuple[Outliers, np.ndarray]:
    """Rows whose mean kNN distance is more than ``z`` robust standard deviations (median
    absolute deviation x 1.4826) above the median; and every row's distance (n,) float32."""
    distance = (
        (1.0 - sims).mean(1).astype(np.float32)
        if sims.shape[1]
        else np.zeros(len(sims), np.float32)
    )
    median = float(np.median(distance)) if len(distance) else 0.0
    spread = MAD_SCALE * float(np.median(np.abs(distance - median))) if len(distance) else 0.0
    robust = (distance - median) / max(spread, 1e-12)
    threshold = median + z * spread
    rows = np.flatnonzero(robust > z)
    rows = rows[np.argsort(-distance[rows], kind="stable")]
    return Outliers(rows, distance[rows], robust[rows].astype(np.float32), threshold), distance
