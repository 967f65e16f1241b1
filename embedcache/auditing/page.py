"""``report.html``: the audit for people, one self-contained file that opens offline.

The summary counts come first, then each finding's entries by score, with thumbnails
embedded as JPEG data URIs (pairs side by side; the largest duplicate groups one row each; the
given and the suggested label of a likely label error). Every thumbnail links to its image
file, by a path relative to the report.
"""

from __future__ import annotations

import base64
import html
import io
import os
from pathlib import Path
from urllib.parse import quote

from PIL import Image

THUMB_PX = 160  # longest side of an embedded thumbnail
THUMB_QUALITY = 80

STYLE = """
body{font:14px/1.4 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;\
color:#222;background:#fafafa}
h1{font-size:22px;margin:0 0 4px} \
h2{font-size:18px;margin:28px 0 6px;border-bottom:1px solid #ddd;padding-bottom:4px}
.meta{color:#666;margin-bottom:12px} .note{color:#555;margin:4px 0 10px}
table.counts{border-collapse:collapse;margin:8px 0 4px} \
table.counts td,table.counts th{border:1px solid #ddd;padding:4px 10px;text-align:left}
table.counts td.n{text-align:right;font-variant-numeric:tabular-nums}
.cards{display:flex;flex-wrap:wrap;gap:12px}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px;max-width:360px}
.card .score{font-weight:600;margin-bottom:6px} .pair{display:flex;gap:8px}
figure{margin:0;width:160px} \
figure img{width:160px;height:160px;object-fit:contain;background:#eee;border-radius:3px;\
display:block}
figcaption{font-size:12px;color:#444;margin-top:3px} .path{word-break:break-all;color:#666}
.missing{width:160px;height:160px;background:#eee;color:#999;display:flex;align-items:center;\
justify-content:center;font-size:12px}
.given{color:#b00020;font-weight:600} .suggested{color:#1b7f3b;font-weight:600} \
.tag{font-size:12px;color:#fff;background:#777;border-radius:3px;padding:1px 5px;margin-left:6px}
.groups{display:flex;flex-direction:column;gap:12px} .groups .card{max-width:none} \
.strip{display:flex;gap:8px;align-items:flex-start} \
.strip figure,.strip figure img,.strip .missing{width:120px} \
.strip figure img,.strip .missing{height:120px}
.keep{color:#1b7f3b;font-weight:600} \
.more{width:90px;height:120px;display:flex;align-items:center;justify-content:center;\
background:#eee;border-radius:3px;color:#555;font-weight:600}
"""


def thumbnail(path: Path) -> str | None:
    """A data URI of a small JPEG of the image at ``path``, or None if it cannot be read."""
    try:
        with Image.open(path) as img:
            img.draft("RGB", (THUMB_PX, THUMB_PX))
            img = img.convert("RGB")
            img.thumbnail((THUMB_PX, THUMB_PX))
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=THUMB_QUALITY)
    except Exception:  # noqa: BLE001 - a report shows what it can; a broken file is a placeholder
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


class Images:
    """Thumbnails and links of the images of one cache, each made once."""

    def __init__(self, root: Path | None, report_dir: Path):
        self.root, self.report_dir, self._thumbs = root, report_dir, {}

    def file(self, path: str) -> Path | None:
        if self.root is None and not Path(path).is_absolute():
            return None
        return Path(path) if Path(path).is_absolute() else self.root / path

    def figure(self, path: str, caption: str) -> str:
        f = self.file(path)
        if path not in self._thumbs:
            self._thumbs[path] = thumbnail(f) if f is not None else None
        uri = self._thumbs[path]
        img = (
            f'<img src="{uri}" alt="{html.escape(path)}">'
            if uri
            else '<div class="missing">image not found</div>'
        )
        if f is not None:
            href = quote(Path(os.path.relpath(f.resolve(), self.report_dir.resolve())).as_posix())
            img = f'<a href="{href}">{img}</a>'
        path_html = f'<span class="path">{html.escape(path)}</span>'
        return f"<figure>{img}<figcaption>{caption}<br>{path_html}</figcaption></figure>"


def _card(score: str, body: str) -> str:
    return f'<div class="card"><div class="score">{score}</div>{body}</div>'


def pair_cards(images: Images, rows: list[dict], shown: int) -> str:
    """Cards of pair findings: ``rows`` are CSV rows with path_a/b, split_a/b, label_a/b."""
    cards = []
    for r in rows[:shown]:
        figs = "".join(
            images.figure(
                r[f"path_{s}"],
                f"{html.escape(r[f'split_{s}'])} &middot; "
                f"{html.escape(r[f'label_{s}'] or 'unlabelled')}",
            )
            for s in "ab"
        )
        tag = "".join(
            f'<span class="tag">{html.escape(t)}</span>'
            for t in (r.get("kind"), r.get("reason"))
            if t
        )
        score = (
            f"similarity {float(r['similarity']):.3f}" if "similarity" in r else "identical bytes"
        )
        if r.get("pixel_similarity", "") != "":
            score += f", pixels {float(r['pixel_similarity']):.3f}"
        cards.append(_card(score + tag, f'<div class="pair">{figs}</div>'))
    return f'<div class="cards">{"".join(cards)}</div>'


def label_cards(images: Images, rows: list[dict], shown: int) -> str:
    cards = []
    for r in rows[:shown]:
        caption = (
            f"{html.escape(r['split'])} &middot; "
            f'given <span class="given">{html.escape(r["given"])}</span>'
            f' &rarr; suggested <span class="suggested">{html.escape(r["suggested"])}</span>'
            f" ({float(r['suggested_probability']):.2f})"
        )
        score = f"#{r['rank']} &middot; p(given) {float(r['self_confidence']):.2g}"
        cards.append(_card(score, images.figure(r["path"], caption)))
    return f'<div class="cards">{"".join(cards)}</div>'


def outlier_cards(images: Images, rows: list[dict], shown: int) -> str:
    cards = []
    for r in rows[:shown]:
        caption = f"{html.escape(r['split'])} &middot; {html.escape(r['label'] or 'unlabelled')}"
        score = f"distance {float(r['score']):.3f} &middot; z {float(r['robust_z']):.1f}"
        cards.append(_card(score, images.figure(r["path"], caption)))
    return f'<div class="cards">{"".join(cards)}</div>'


GROUP_THUMBS = 8  # thumbnails shown per duplicate group; the others are "+N more"


def group_cards(images: Images, rows: list[dict], shown: int) -> str:
    """One card per duplicate group, the first ``shown`` groups, each group's images in one
    row: ``rows`` are groups.csv rows (group, size, image, split, label, keep), group by group,
    the kept image first."""
    groups: dict[int, list[dict]] = {}
    for r in rows:
        if r["group"] not in groups and len(groups) == shown:
            break
        groups.setdefault(r["group"], []).append(r)
    cards = []
    for gid, members in groups.items():
        splits = sorted({m["split"] for m in members})
        labels = {m["label"] for m in members if m["label"]}
        tags = [", ".join(splits)] + (["labels disagree"] if len(labels) > 1 else [])
        tag = "".join(f'<span class="tag">{html.escape(t)}</span>' for t in tags)
        figs = "".join(
            images.figure(
                m["image"],
                f"{html.escape(m['split'])} &middot; {html.escape(m['label'] or 'unlabelled')}"
                + (' &middot; <span class="keep">keep</span>' if m["keep"] == "true" else ""),
            )
            for m in members[:GROUP_THUMBS]
        )
        if len(members) > GROUP_THUMBS:
            figs += f'<div class="more">+{len(members) - GROUP_THUMBS} more</div>'
        head = f"group {gid} &middot; {len(members)} images{tag}"
        cards.append(_card(head, f'<div class="strip">{figs}</div>'))
    return f'<div class="groups">{"".join(cards)}</div>'


def page(
    title: str, meta: str, counts: list[tuple[str, str, str]], sections: list[tuple[str, str, str]]
) -> str:
    """The whole document: ``counts`` (finding, count, how) rows, ``sections`` (id, heading and
    note as HTML, cards as HTML)."""
    table = "".join(
        f'<tr><td><a href="#{html.escape(sid)}">{html.escape(name)}</a></td>'
        f'<td class="n">{n}</td><td>{how}</td></tr>'
        for (name, n, how), (sid, _, _) in zip(counts, sections, strict=True)
    )
    body = "".join(f'<section id="{sid}">{head}{cards}</section>' for sid, head, cards in sections)
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head>"
        f'<body><h1>{html.escape(title)}</h1><div class="meta">{meta}</div>'
        f'<table class="counts"><tr><th>finding</th><th>count</th><th>how</th></tr>{table}</table>'
        f"{body}</body></html>\n"
    )
