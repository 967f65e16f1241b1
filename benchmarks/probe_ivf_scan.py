"""The scan of the probed cells: the audit's SQ8 codes against 4-bit PQ fast scan, at 1M rows.

    python benchmarks/probe_ivf_scan.py   # needs /tmp/longtail/grocery81.h5 (audit_scale.py)

1,000,000 rows made as audit_scale.py makes them, unit, projected on 256 principal components
(the audit's `_pca`); each index trained on 163,840 of them (4,096 cells, 40 rows a cell, as the
audit trains) and filled with all. Search time: 20,000 rows at 16 cells probed, 121 neighbours,
one index after the other in one process. Recall@10: 1,000 seeded rows, their 120 candidates
re-scored on the whole rows (as the audit re-scores them), against exact search.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import faiss
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from audit_scale import first_rows  # noqa: E402

from embedcache.auditing.index import _pca, exact_sample, recall_at_k  # noqa: E402

ROWS, CELLS, PROBED, KEPT, QUERIES = 1_000_000, 4096, 16, 120, 1000
SPECS = ("IVF4096,SQ8", "IVF4096,PQ64x4fs", "IVF4096,PQ128x4fs")


def _recall(x: torch.Tensor, rows: np.ndarray, found: np.ndarray, exact: torch.Tensor) -> float:
    """recall@10 of ``found`` candidates of ``rows`` re-scored on the whole rows of ``x``."""
    c = torch.from_numpy(np.where(found < 0, 0, found))
    s = torch.einsum("nd,nkd->nk", x[rows], x[c])
    s[c == torch.from_numpy(rows)[:, None]] = -2
    return recall_at_k(s.topk(10, 1).values, exact)


def main() -> None:
    x = first_rows(ROWS)
    rng = np.random.default_rng(0)
    rows = np.sort(rng.choice(ROWS, QUERIES, replace=False))
    xt = torch.from_numpy(x)
    exact10 = exact_sample(xt, rows, 10)  # the audit's own recall check
    p = _pca(faiss, x, rng.choice(ROWS, 65536, replace=False)).apply(x)
    train, queries = p[rng.choice(ROWS, CELLS * 40, replace=False)], p[-20000:]
    for spec in SPECS:
        t = time.time()
        index = faiss.index_factory(256, spec)
        index.train(train)
        for lo in range(0, ROWS, 65536):
            index.add(p[lo : lo + 65536])
        built = time.time() - t
        index.nprobe = PROBED
        t = time.time()
        index.search(queries, KEPT + 1)
        per = (time.time() - t) / len(queries) * 1e6
        recall = _recall(xt, rows, index.search(p[rows], KEPT + 1)[1], exact10)
        print(
            f"{spec}: build {built:.0f}s, search {per:.0f} us/query, "
            f"recall@10 after re-scoring {KEPT}: {recall:.4f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
