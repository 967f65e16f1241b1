"""Run one peer tool of `audit_peers.py` on a list of images; write what it found as JSON.

    PEERS_PYTHON benchmarks/audit_peers_runner.py TOOL SPEC.json OUT.json

Executed by the peers' own interpreter (their virtual environment, not the project's), so it
imports neither embedcache nor anything of the benchmarks. SPEC.json holds ``files`` (absolute
image paths, in the order of the cache's rows), ``keys`` (the same images as the cache names
them), ``cache`` (the HDF5 cache, read with h5py for cleanlab's features and labels),
``work`` (a scratch folder of this run) and the tool's settings. OUT.json gets:

- ``groups``: every duplicate set or pair the tool reported, as lists of indices into
  ``files`` (a pair is a list of two), untouched: scoring is the benchmark's business;
- ``ranking``: indices of the labelled images, likeliest label error first, or null where the
  tool has no label check;
- ``cpu_s`` and ``wall_s`` of the tool's own work (imports and the reading of SPEC left
  out): ``time.process_time`` (every thread of this process) plus the CPU seconds of the child
  processes it waited for (``resource.getrusage(RUSAGE_CHILDREN)``: cleanvision's pool);
- ``version``, ``notes`` and anything tool-specific (``steps``: the parts of the time).

TOOL is one of fastdup, cleanvision, cleanlab.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path


class Clock:
    """CPU seconds (this process's threads and its waited-for children) and wall seconds."""

    def __enter__(self):
        self.wall = time.perf_counter()
        self.cpu = time.process_time()
        self.kids = _children_cpu()
        return self

    def __exit__(self, *exc):
        self.wall_s = time.perf_counter() - self.wall
        self.cpu_s = time.process_time() - self.cpu + _children_cpu() - self.kids
        return False


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_fastdup(spec: dict) -> dict:
    """fastdup.run on the list of files, defaults but for ``threshold`` (similarity pairs at or
    above it, nearest_neighbors_k=2) and ``ccthreshold`` (its connected components; default
    0.96). Reported: every pair of similarity.csv and every component of two or more."""
    os.environ.setdefault("SENTRY_OPT_OUT", "1")  # no telemetry
    os.environ.setdefault("FASTDUP_PRODUCTION", "1")  # no version check against PyPI at import
    import csv

    import fastdup

    files = spec["files"]
    work = Path(spec["work"])
    listing = work / "files.txt"
    listing.write_text("\n".join(files) + "\n")
    wd = work / "fastdup"
    shutil.rmtree(wd, ignore_errors=True)  # fastdup refuses a folder holding an earlier run
    kwargs = {"threshold": spec["threshold"], "turi_param": f"ccthreshold={spec['ccthreshold']}"}
    with Clock() as clock:
        rc = fastdup.run(input_dir=str(listing), work_dir=str(wd), **kwargs)
    if rc != 0:
        raise RuntimeError(f"fastdup.run returned {rc}")
    at = {f: i for i, f in enumerate(files)}
    with open(wd / "atrain_features.dat.csv") as f:
        index = {int(r["index"]): r["filename"] for r in csv.DictReader(f)}
    with open(wd / "atrain_features.bad.csv") as f:
        bad = [r["filename"] for r in csv.DictReader(f)]
    groups = []
    with open(wd / "similarity.csv") as f:
        for r in csv.DictReader(f):
            groups.append([at[r["from"]], at[r["to"]]])
    components: dict[str, list[int]] = {}
    with open(wd / "connected_components.csv") as f:
        for r in csv.DictReader(f):
            if int(r["count"]) > 0:  # count 0: a singleton
                components.setdefault(r["component_id"], []).append(at[index[int(r["__id"])]])
    groups += [g for g in components.values() if len(g) > 1]
    return {
        "groups": groups,
        "ranking": None,
        "cpu_s": clock.cpu_s,
        "wall_s": clock.wall_s,
        "version": fastdup.__version__,
        "settings": kwargs,
        "similarity_rows": len(groups) - len(components),
        "components": len([g for g in components.values() if len(g) > 1]),
        "unread": bad,
        "notes": "similarity.csv lists each pair in both directions",
    }


def run_cleanvision(spec: dict) -> dict:
    """Imagelab(filepaths).find_issues({"near_duplicates": {}}): perceptual-hash (phash 8x8)
    equality; cleanvision computes its exact (md5) sets on the way and drops those from the
    near sets, so both are reported."""
    from cleanvision import Imagelab, __version__

    files = spec["files"]
    at = {f: i for i, f in enumerate(files)}
    with Clock() as clock:
        lab = Imagelab(filepaths=files)
        lab.find_issues({"near_duplicates": {}}, verbose=False)
    exact = lab.info["exact_duplicates"]["sets"]
    near = lab.info["near_duplicates"]["sets"]
    return {
        "groups": [[at[p] for p in s] for s in exact + near],
        "ranking": None,
        "cpu_s": clock.cpu_s,
        "wall_s": clock.wall_s,
        "version": __version__,
        "settings": getattr(lab._issue_managers.get("duplicate"), "params", None),
        "exact_sets": len(exact),
        "near_sets": len(near),
    }


def read_cache(path: str, keys: list[str]):
    """(features float32, labels) of the cache's rows in the order of ``keys``."""
    import h5py
    import numpy as np

    feats, labels, paths = [], [], []
    with h5py.File(path, "r") as f:
        for split in ("train", "val", "test"):
            if split not in f or "features" not in f[split]:
                continue
            g = f[split]
            feats.append(g["features"][:].astype(np.float32))
            labels.append(g["labels"][:])
            paths += [p.decode() if isinstance(p, bytes) else str(p) for p in g["paths"][:]]
    row = {p: i for i, p in enumerate(paths)}
    order = np.array([row[k] for k in keys])
    return np.concatenate(feats)[order], np.concatenate(labels)[order]


def run_cleanlab(spec: dict) -> dict:
    """cleanlab's standard recipe on the cache's own features: out-of-fold pred_probs from a
    scikit-learn LogisticRegression (cross_val_predict, 5 stratified folds), then
    Datalab.find_issues(features, pred_probs) for the "label" and "near_duplicate" issue types
    at their defaults. The time includes the pred_probs step (reported apart in ``steps``)."""
    import cleanlab
    import numpy as np
    from cleanlab import Datalab
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    x, y = read_cache(spec["cache"], spec["keys"])
    labelled = np.flatnonzero(y >= 0)
    if len(labelled) != len(y):
        raise ValueError("cleanlab's run here expects every image labelled")
    _, y = np.unique(y, return_inverse=True)  # classes present only, numbered 0..k-1
    steps = {}
    with Clock() as clock:
        with Clock() as fit:
            model = LogisticRegression(max_iter=spec.get("max_iter", 1000))
            folds = StratifiedKFold(5, shuffle=True, random_state=0)
            probs = cross_val_predict(model, x, y, cv=folds, method="predict_proba")
        with Clock() as find:
            lab = Datalab(data={"label": y}, label_name="label", verbosity=0)
            lab.find_issues(
                features=x, pred_probs=probs, issue_types={"label": {}, "near_duplicate": {}}
            )
    steps = {
        "pred_probs": {"cpu_s": fit.cpu_s, "wall_s": fit.wall_s},
        "datalab": {"cpu_s": find.cpu_s, "wall_s": find.wall_s},
    }
    sets = lab.get_info("near_duplicate")["near_duplicate_sets"]
    groups = [[i, int(j)] for i, s in enumerate(sets) for j in s if i < int(j)]
    scores = lab.get_issues("label")["label_score"].to_numpy()
    return {
        "groups": groups,
        "ranking": [int(i) for i in np.argsort(scores, kind="stable")],
        "cpu_s": clock.cpu_s,
        "wall_s": clock.wall_s,
        "version": cleanlab.__version__,
        "steps": steps,
        "label_issues_flagged": int(lab.get_issues("label")["is_label_issue"].sum()),
        "out_of_fold_accuracy": float((probs.argmax(1) == y).mean()),
        "notes": "near_duplicate_sets is one list per image (its neighbours within the "
        "radius); each is taken as pairs (image, neighbour), once per pair",
    }


RUNNERS = {"fastdup": run_fastdup, "cleanvision": run_cleanvision, "cleanlab": run_cleanlab}


def main() -> None:
    tool, spec_path, out_path = sys.argv[1:4]
    spec = json.loads(Path(spec_path).read_text())
    Path(spec["work"]).mkdir(parents=True, exist_ok=True)
    result = RUNNERS[tool](spec)
    result["tool"] = tool
    result["python"] = sys.version.split()[0]
    Path(out_path).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
