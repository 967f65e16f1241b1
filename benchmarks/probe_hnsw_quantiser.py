"""Flat vs HNSW coarse quantiser of 16,384 cells on 256-d PCA projections of audit_scale rows:
coarse lookup time per query and the share of the flat top-16 cells the graph finds.

    python benchmarks/probe_hnsw_quantiser.py   # needs /tmp/longtail/grocery81.h5 (audit_scale.py)

400,000 rows made as audit_scale.py makes them, unit, projected on 256 principal components; a
k-means of 16,384 cells (4 iterations, on 327,680 of them: the lookup, not the cells' quality,
is what is timed); the last 50,000 rows looked up in both quantisers, one after the other.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from audit_scale import first_rows  # noqa: E402

from embedcache.auditing.index import _pca  # noqa: E402

ROWS, CELLS, PROBED, QUERIES = 400_000, 16_384, 16, 50_000


def main() -> None:
    x = first_rows(ROWS)
    p = _pca(faiss, x, np.arange(65536)).apply(x)
    t = time.time()
    km = faiss.Kmeans(256, CELLS, niter=4, seed=1234, max_points_per_centroid=20)
    km.train(p[: CELLS * 20])
    print(f"kmeans {time.time() - t:.1f}s", flush=True)
    flat, graph = faiss.IndexFlatL2(256), faiss.IndexHNSWFlat(256, 32)
    flat.add(km.centroids)
    t = time.time()
    graph.add(km.centroids)
    print(f"hnsw build {time.time() - t:.1f}s")
    q = p[-QUERIES:]
    t = time.time()
    _, ref = flat.search(q, PROBED)
    tf = time.time() - t
    print(f"flat: {tf / len(q) * 1e6:.1f} us/query")
    for ef in (32, 64, 128):
        graph.hnsw.efSearch = ef
        t = time.time()
        _, got = graph.search(q, PROBED)
        th = time.time() - t
        found = np.mean([len(np.intersect1d(a, b)) / PROBED for a, b in zip(ref, got, strict=True)])
        print(
            f"hnsw ef {ef}: {th / len(q) * 1e6:.1f} us/query ({tf / th:.2f}x faster), "
            f"top-{PROBED} cells found {found:.4f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
