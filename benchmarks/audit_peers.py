"""`audit` beside its peers: fastdup, cleanvision and cleanlab on the same seeded corruptions.

    python benchmarks/audit_peers.py --peers-python /work/peers_venv/bin/python \\
        --work /tmp/audit_peers_work --sets flowers12,grocery81

The data are audit_quality.py's: each set with 5% of the training labels flipped, 5% of the
images copied into another split per copy kind (exact, jpeg60, half, crop90, mirror, zoom150,
crop70; see that file) and 1% foreign images (`prepare`), extracted with efficientnet_lite0 and
its offline weights (`extract_both`). Every tool sees the corrupted set whole, all splits
together, at its default settings:

- embedcache: `embedcache.audit(cache, out=..., progress=False)`, in this process; its pairs
  are those of exact_duplicates.csv and near_duplicates.csv, its ranking `AuditResult.ranking`;
  at its defaults, and again stricter (`pixel_threshold=0.95`), as fastdup runs at two
  thresholds: the side of the trade between copies found and other pairs each user may want;
- fastdup: `fastdup.run` on the image files at its default threshold (0.9) and at 0.96, the
  connected components at its default ccthreshold (0.96) in both; its pairs are those of
  similarity.csv, its groups the components of two or more images;
- cleanvision: `Imagelab.find_issues({"near_duplicates": {}})`; its groups are the
  near_duplicates sets and the exact_duplicates sets it computes on the way (phash, md5);
- cleanlab: its standard recipe on embedcache's own features (read from the cache with h5py):
  out-of-fold pred_probs of a scikit-learn LogisticRegression (5 stratified folds), then
  `Datalab.find_issues(features, pred_probs)` for the "label" and "near_duplicate" issue types;
  its pairs are (image, neighbour) of each image's near_duplicate_sets, its ranking the label
  quality score, lowest first. Its time includes the pred_probs step.

The peers run in their own virtual environment (`--peers-python`), one subprocess each, through
audit_peers_runner.py, which never imports embedcache. The one the results come from:

    python3.11 -m venv /work/peers_venv
    /work/peers_venv/bin/pip install fastdup cleanvision "cleanlab[datalab]" h5py numpy pandas \
        scikit-learn "datasets<4" "pyarrow<20"

(fastdup 2.54 pins numpy 1.26; the newest pyarrow wants numpy 2, so pyarrow 19 and a datasets
that accepts it, for Datalab.) The runner turns off fastdup's telemetry and its version check
against PyPI at import (SENTRY_OPT_OUT, FASTDUP_PRODUCTION); fastdup's default model ships in
its wheel, nothing is downloaded.

Scoring, the same for every tool. A tool reports groups: a pair is a group of two, a cluster or
duplicate set a group of its size.

- Recall per copy kind: a seeded pair (original, copy) is found when one reported group holds
  both (the pair itself, or both in one cluster). Chains of pairs are not joined for recall.
- Unseeded pairs: the reported groups are joined into clusters (union-find over every pair and
  group: a pair tool and a cluster tool that link the same images get the same clusters). A
  cluster of m images stands for m - 1 links (the images one would drop to keep one), and those
  the seeded pairs inside it explain are taken off: m - 1 minus the rank of the seeded pairs
  whose both images lie in it (so {original, copy} counts 0, {original, copy, stranger} 1, and
  three strangers 2). This counts the data's own look-alikes too (flowers12 holds many
  near-identical photos of its own), the same for every tool.
- Label-flip recall in the top 10%: the share of the flipped labels among the first 10% of the
  tool's ranking of the labelled images (all splits); "n/a" for a tool without a label check.
- CPU s and wall s: the tool's own call, imports and result reading left out. CPU is
  `time.process_time` (all threads of the process) plus waited-for child processes
  (`RUSAGE_CHILDREN`: cleanvision's pool). embedcache's time is the audit alone (the features
  were extracted before), as is cleanlab's (it starts from the same features); fastdup and
  cleanvision read the pixels within their time.

The load average at the start, and before each tool, is recorded: the 2-core machines this runs
on are shared, so compare CPU seconds before wall seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import save

RUNNER = Path(__file__).resolve().with_name("audit_peers_runner.py")
TOP_SHARE = 0.1
# name -> embedcache.audit's options
OURS = {"embedcache": {}, "embedcache (pixel threshold 0.95)": {"pixel_threshold": 0.95}}
# name -> (runner tool, its settings)
PEERS = {
    "fastdup (threshold 0.9, default)": ("fastdup", {"threshold": 0.9, "ccthreshold": 0.96}),
    "fastdup (threshold 0.96)": ("fastdup", {"threshold": 0.96, "ccthreshold": 0.96}),
    "cleanvision": ("cleanvision", {}),
    "cleanlab (Datalab)": ("cleanlab", {}),
}


# --- scoring (pure) ---------------------------------------------------------------------------


class _UnionFind:
    def __init__(self):
        self.parent: dict = {}

    def find(self, x):
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a, b) -> bool:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return False
        self.parent[rb] = ra
        return True


def found_pairs(groups: list[list], seeded: list[tuple]) -> list[bool]:
    """For each seeded (a, b): does one reported group hold both?"""
    member: dict = {}
    for g, group in enumerate(groups):
        for x in group:
            member.setdefault(x, set()).add(g)
    return [bool(member.get(a, set()) & member.get(b, set())) for a, b in seeded]


def unseeded_pairs(groups: list[list], seeded: list[tuple]) -> int:
    """Links the reported groups make that the seeded pairs do not explain: the groups joined
    into clusters, m - 1 links per cluster of m images, less the rank of the seeded pairs
    inside each cluster (see the module's docstring)."""
    clusters = _UnionFind()
    for group in groups:
        for x in group[1:]:
            clusters.union(group[0], x)
    images = list(clusters.parent)
    links = len(images) - len({clusters.find(x) for x in images})
    explained = _UnionFind()
    for a, b in seeded:
        if a in clusters.parent and b in clusters.parent and clusters.find(a) == clusters.find(b):
            links -= explained.union(a, b)
    return links


def unseeded_set(groups: list[list], seeded: list[tuple]) -> set:
    """Every pair of images one reported group holds that the seeded pairs do not join (not two
    images of one original's copies), as sorted tuples: the unseeded pairs one by one."""
    explained = _UnionFind()
    for a, b in seeded:
        explained.union(a, b)

    def joined(a, b):
        known = explained.parent
        return a in known and b in known and explained.find(a) == explained.find(b)

    pairs = {tuple(sorted((g[i], g[j]))) for g in groups for i in range(len(g)) for j in range(i)}
    return {(a, b) for a, b in pairs if not joined(a, b)}


def linked(pairs: set, groups: list[list]) -> int:
    """How many of ``pairs`` another tool's ``groups``, joined into clusters, put together."""
    clusters = _UnionFind()
    for group in groups:
        for x in group[1:]:
            clusters.union(group[0], x)
    known = clusters.parent
    return sum(a in known and b in known and clusters.find(a) == clusters.find(b) for a, b in pairs)


def top_recall(ranking: list, flipped: set, share: float = TOP_SHARE) -> float | None:
    """Share of ``flipped`` among the first ``share`` of ``ranking`` (rounded)."""
    if not flipped:
        return None
    top = set(ranking[: int(round(share * len(ranking)))])
    return len(top & flipped) / len(flipped)


def score(groups: list[list], ranking: list | None, truth: dict, kinds=None) -> dict:
    """Recall per copy kind (``kinds``, in order; default: as they first appear in the truth),
    unseeded pairs and label-flip recall of one tool's findings (paths as the cache names them;
    ``truth`` as audit_quality._as_cached returns it)."""
    seeded = [(a, b) for a, b, _ in truth["copies"]]
    hit = found_pairs(groups, seeded)
    of = [k for *_, k in truth["copies"]]
    recall = {}
    for kind in kinds or dict.fromkeys(of):
        mine = [h for h, k in zip(hit, of, strict=True) if k == kind]
        recall[kind] = sum(mine) / len(mine) if mine else None
    return {
        "recall": recall,
        "recall_all": sum(hit) / len(hit) if hit else None,
        "found": int(sum(hit)),
        "seeded": len(hit),
        "unseeded_pairs": unseeded_pairs(groups, seeded),
        "groups_reported": len(groups),
        "label_recall_top_10pct": (
            None if ranking is None else top_recall(ranking, set(truth["flipped"]))
        ),
    }


# --- running the tools ------------------------------------------------------------------------


def _cpu() -> float:
    own = time.process_time()
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own + kids.ru_utime + kids.ru_stime


def run_embedcache(cache: Path, out: Path, options: dict) -> dict:
    """embedcache.audit with ``options`` (its defaults for the rest), timed; its pairs and
    ranking as cache paths."""
    from embedcache import audit

    shutil.rmtree(out, ignore_errors=True)
    wall, cpu = time.perf_counter(), _cpu()
    r = audit(cache, out=out, progress=False, **options)
    cpu_s, wall_s = _cpu() - cpu, time.perf_counter() - wall
    groups = [
        [row["path_a"], row["path_b"]]
        for t in ("exact_duplicates", "near_duplicates")
        for row in r.tables[t]
    ]
    return {
        "groups": groups,
        "ranking": list(r.ranking),
        "cpu_s": cpu_s,
        "wall_s": wall_s,
        "pairs": {t: len(r.tables[t]) for t in ("exact_duplicates", "near_duplicates", "leaks")},
        "label_errors_flagged": len(r.tables["label_errors"]),
    }


def cache_rows(cache: Path) -> tuple[list[str], list[str]]:
    """(keys, files): every row's path as the cache names it and as an absolute file."""
    from embedcache import open_cache

    with open_cache(cache) as c:
        keys = [p for s in c.splits for p in c.paths(s)]
        root = Path(str(c.attrs["source"]))
    files = [k if Path(k).is_absolute() else str(root / k) for k in keys]
    return keys, files


def run_peer(python: str, tool: str, settings: dict, spec: dict, work: Path, timeout: float):
    """One peer through the runner in the peers' interpreter; its JSON, with the keys mapped
    back, or {"error": ...}."""
    work.mkdir(parents=True, exist_ok=True)
    spec_path, out_path = work / "spec.json", work / "result.json"
    spec_path.write_text(json.dumps({**spec, **settings, "work": str(work)}))
    out_path.unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.pop("VIRTUAL_ENV", None)
    env |= {"SENTRY_OPT_OUT": "1", "FASTDUP_PRODUCTION": "1"}
    wall, kids = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    log = work / "log.txt"
    try:
        with open(log, "w") as f:
            p = subprocess.run(
                [python, str(RUNNER), tool, str(spec_path), str(out_path)],
                cwd=work,
                env=env,
                stdout=f,
                stderr=subprocess.STDOUT,
                timeout=timeout,
            )
    except subprocess.TimeoutExpired:
        return {"error": f"did not finish in {timeout:.0f} s"}
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    process = {
        "wall_s": time.perf_counter() - wall,
        "cpu_s": after.ru_utime + after.ru_stime - kids.ru_utime - kids.ru_stime,
    }
    if p.returncode != 0 or not out_path.is_file():
        tail = log.read_text(errors="replace")[-600:]
        return {"error": f"exit {p.returncode}: {tail}"}
    r = json.loads(out_path.read_text())
    keys = spec["keys"]
    r["groups"] = [[keys[i] for i in g] for g in r["groups"]]
    if r.get("ranking") is not None:
        r["ranking"] = [keys[i] for i in r["ranking"]]
    r["process"] = process  # the whole subprocess: interpreter, imports and reading included
    return r


def run_set(name: str, args) -> dict:
    import audit_quality as aq  # embedcache and its imports: only when a set is run

    truth = aq.prepare(name, args.work)
    _, corrupt = aq.extract_both(name, args.work)
    truth = aq._as_cached(truth, (args.work / name).resolve())
    keys, files = cache_rows(corrupt)
    spec = {"files": files, "keys": keys, "cache": str(corrupt)}
    tools = {}
    print(f"{name}: {len(keys)} images", flush=True)
    for tool in [*OURS, *PEERS]:
        if args.tools and not any(t in tool for t in args.tools):
            continue
        load = os.getloadavg()[0]
        if tool in OURS:
            folder = "embedcache" + "".join(f"_{v}" for v in OURS[tool].values())
            r = run_embedcache(corrupt, args.work / name / "peers" / folder, OURS[tool])
        elif not args.peers_python:
            r = {"error": "not run: no --peers-python"}
        else:
            runner, settings = PEERS[tool]
            folder = args.work / name / "peers" / (tool.split()[0] + _suffix(settings))
            r = run_peer(args.peers_python, runner, settings, spec, folder, args.timeout)
        r["load_before"] = load
        if "error" not in r:
            r["score"] = score(r["groups"], r["ranking"], truth, aq.COPY_KINDS)
            shown = {k: r[k] for k in ("cpu_s", "wall_s")} | {
                k: r["score"][k] for k in ("recall_all", "unseeded_pairs")
            }
            print(f"  {tool}: {shown}", flush=True)
        else:
            print(f"  {tool}: {r['error']}", flush=True)
        r.pop("groups", None)
        r.pop("ranking", None)
        tools[tool] = r
    return {
        "images": len(keys),
        "seeded": {
            "copies": {k: sum(c[2] == k for c in truth["copies"]) for k in aq.COPY_KINDS},
            "flipped": len(truth["flipped"]),
        },
        "tools": tools,
    }


def _suffix(settings: dict) -> str:
    return f"_{settings['threshold']}" if "threshold" in settings else ""


# --- the report -------------------------------------------------------------------------------


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def _leads(r: dict) -> str:
    """Which tool leads on recall and on unseeded pairs; which peers are faster, by how much."""
    done = {t: v for t, v in r["tools"].items() if "score" in v}
    if not done:
        return "no tool finished"
    best = max(done.values(), key=lambda v: v["score"]["recall_all"])["score"]["recall_all"]
    fewest = min(v["score"]["unseeded_pairs"] for v in done.values())
    lines = [
        "near-duplicate recall over all seeded pairs: "
        + ", ".join(t for t, v in done.items() if v["score"]["recall_all"] == best)
        + f" leads ({_pct(best)}); fewest unseeded pairs: "
        + ", ".join(t for t, v in done.items() if v["score"]["unseeded_pairs"] == fewest)
        + f" ({fewest})"
    ]
    ours = done.get("embedcache")
    if ours:
        faster = [
            f"{t} {ours['cpu_s'] / v['cpu_s']:.2f}x less CPU"
            + (
                f", {ours['wall_s'] / v['wall_s']:.2f}x less wall"
                if v["wall_s"] < ours["wall_s"]
                else ""
            )
            for t, v in done.items()
            if t not in OURS and v["cpu_s"] < ours["cpu_s"]
        ]
        lines.append("faster than embedcache's audit: " + ("; ".join(faster) if faster else "none"))
    return "; ".join(lines)


def beaten(done: dict) -> str:
    """For each peer, the first embedcache row that finds more of the seeded copies with no more
    unseeded pairs; where none does, the two sides' figures."""

    def shown(tool):
        s = done[tool]["score"]
        return f"{tool} {_pct(s['recall_all'])} at {s['unseeded_pairs']}"

    ours = [t for t in done if t in OURS]
    parts = []
    for tool, v in done.items():
        if tool in OURS:
            continue
        s = v["score"]
        by = [
            t
            for t in ours
            if done[t]["score"]["recall_all"] > s["recall_all"]
            and done[t]["score"]["unseeded_pairs"] <= s["unseeded_pairs"]
        ]
        parts.append(
            f"{tool}: beaten by {by[0]}"
            if by
            else f"{tool}: not beaten on both ({', '.join(shown(t) for t in [*ours, tool])})"
        )
    return "more seeded copies found at no more unseeded pairs (recall at unseeded pairs): " + (
        "; ".join(parts) if parts else "no peer finished"
    )


def markdown(results: dict, load: tuple) -> str:
    lines = [
        f"Load average at the start: {load[0]:.2f} (1 min), {load[1]:.2f} (5 min), "
        f"{load[2]:.2f} (15 min); the 1-minute load before each tool is in the JSON "
        "(`load_before`). The machine was shared: compare CPU seconds first.",
        "",
        "Each tool at its defaults on the corrupted set, every split together (the rules: "
        "benchmarks/audit_peers.py's docstring). Recall per copy kind: the seeded "
        "(original, copy) pairs reported as a pair or within one group. Unseeded pairs: "
        "reported groups joined into clusters, m - 1 links per cluster of m, less those the "
        "seeded pairs inside explain (the data's own look-alikes count). Label flips: "
        "recall within the top 10% of the tool's ranking. CPU and wall: the tool's own call "
        "(embedcache and cleanlab start from the cached features, extract not included; fastdup "
        "and cleanvision read the pixels; cleanlab includes its pred_probs step).",
    ]
    for name, r in results.items():
        seeded = r["seeded"]
        kinds = list(seeded["copies"])
        lines += [
            "",
            f"### {name}: {r['images']} images, "
            f"{sum(seeded['copies'].values())} seeded copies "
            f"({seeded['copies'][kinds[0]]} per kind), {seeded['flipped']} flipped labels",
            "",
            "| tool | "
            + " | ".join(kinds)
            + " | unseeded pairs | label-flip recall top 10% | CPU s | wall s |",
            "|---|" + "---:|" * (len(kinds) + 4),
        ]
        notes = []
        for tool, v in r["tools"].items():
            if "score" not in v:
                lines.append(f"| {tool} | " + " | ".join(["-"] * (len(kinds) + 4)) + " |")
                notes.append(f"- {tool}: {' '.join(v['error'].split())[:300]}")
                continue
            s = v["score"]
            lines.append(
                f"| {tool} | "
                + " | ".join(_pct(s["recall"][k]) for k in kinds)
                + f" | {s['unseeded_pairs']} | {_pct(s['label_recall_top_10pct'])} "
                f"| {v['cpu_s']:.1f} | {v['wall_s']:.1f} |"
            )
        done = {t: v for t, v in r["tools"].items() if "score" in v}
        lines += ["", *notes, f"- {_leads(r)}", f"- {beaten(done)}"]
        cl = r["tools"].get("cleanlab (Datalab)", {})
        if "steps" in cl:
            st = cl["steps"]
            lines.append(
                f"- cleanlab's time: pred_probs (logistic regression, 5 folds) "
                f"{st['pred_probs']['cpu_s']:.1f} CPU s / {st['pred_probs']['wall_s']:.1f} wall "
                f"s, Datalab {st['datalab']['cpu_s']:.1f} / {st['datalab']['wall_s']:.1f}; "
                f"out-of-fold accuracy {_pct(cl['out_of_fold_accuracy'])}."
            )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/audit_peers_work"))
    p.add_argument("--sets", default="flowers12,grocery81")
    p.add_argument("--peers-python", help="the interpreter of the peers' virtual environment")
    p.add_argument("--tools", type=lambda s: s.split(","), help="only tools whose name has one")
    p.add_argument("--timeout", type=float, default=900, help="seconds a peer may take")
    p.add_argument("--name", default="audit_peers", help="results/NAME.md and .json")
    args = p.parse_args()
    args.work = args.work.resolve()
    repo = Path(__file__).resolve().parents[1]
    if args.work.is_relative_to(repo) or args.work.is_relative_to("/work/shared"):
        p.error("--work must lie outside the repository and outside /work/shared")
    load = os.getloadavg()
    results = {name: run_set(name, args) for name in args.sets.split(",")}
    versions = {
        t: v.get("version")
        for r in results.values()
        for t, v in r["tools"].items()
        if "version" in v
    }
    from embedcache import __version__

    versions["embedcache"] = __version__
    payload = {"load_at_start": load, "versions": versions, "sets": results}
    print(save(args.name, payload, markdown(results, load)))


if __name__ == "__main__":
    sys.exit(main())
