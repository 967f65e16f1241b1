"""mkdocs hook: every relative link of a page must name a file that exists in the repository.

mkdocs.yml lets links that leave docs/ (to benchmarks/results/, where each figure comes from)
pass mkdocs' own check, which then lets a broken link between pages pass too. This hook puts
the check back, on disk: a strict build fails on a link to a page or results file that is not
there.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

log = logging.getLogger("mkdocs.hooks.links")

LINK = re.compile(r"\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
CODE = re.compile(r"`[^`\n]*`")


def on_page_markdown(markdown, page, config, files):
    here = Path(page.file.abs_src_path).parent
    for target in LINK.findall(CODE.sub("", FENCE.sub("", markdown))):
        if "://" in target or target.startswith(("#", "mailto:")):
            continue
        path = target.split("#", 1)[0]
        if path and not (here / path).exists():
            log.warning(f"Doc file '{page.file.src_uri}' links to '{target}', which does not exist")
    return markdown
