"""embedcache's side of audit_peers.py at stricter pixel thresholds, read from its default run.

    python benchmarks/audit_peers_curve.py --work /tmp/audit_peers_work --sets flowers12,grocery81

After audit_peers.py: its default embedcache audit of each set (WORK/SET/peers/embedcache)
wrote every near pair with its pixel similarity, so the pairs a stricter --pixel-threshold
would keep are those at or above it (the adaptive threshold only ever raises the floor; a set
where it rose says so). Each threshold's pairs, with the exact duplicates, are scored by
audit_peers.py's rule: recall over all seeded copies and unseeded pairs, beside the peers'
figures of the same run (--peers: results/audit_peers.json).
No audit is run again, so there are no times here.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from common import save

THRESHOLDS = (0.9, 0.92, 0.94, 0.95, 0.96, 0.97, 0.98, 0.99)


def _rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def curve(folder: Path, truth: dict, kinds) -> list[dict]:
    """Recall and unseeded pairs of the default audit's pairs cut at each of THRESHOLDS."""
    import audit_peers as ap

    exact = [[r["path_a"], r["path_b"]] for r in _rows(folder / "exact_duplicates.csv")]
    near = _rows(folder / "near_duplicates.csv")
    summary = json.loads((folder / "summary.json").read_text())
    floor = summary["near_duplicates"].get("pixel_rule", "the default, not raised")
    out = []
    for t in THRESHOLDS:
        kept = [[r["path_a"], r["path_b"]] for r in near if float(r["pixel_similarity"]) >= t]
        s = ap.score(exact + kept, None, truth, kinds)
        out.append({"threshold": t, "recall_all": s["recall_all"], "recall": s["recall"]})
        out[-1]["unseeded_pairs"] = s["unseeded_pairs"]
    return [{"pixel_rule": floor}, *out]


def markdown(results: dict, peers: dict) -> str:
    lines = [
        "embedcache's near pairs of its default audit (audit_peers.py's run), kept at or above "
        "each pixel threshold, with the exact duplicates; scored as audit_peers.md scores "
        "every tool. The peers' rows are from the same run (audit_peers.json)."
    ]
    for name, r in results.items():
        rule, *rows = r
        lines += ["", f"### {name}", "", f"The audit's pixel rule: `{rule['pixel_rule']}`", ""]
        lines += ["| tool | recall, all seeded copies | unseeded pairs |", "|---|---:|---:|"]
        lines += [
            f"| embedcache, pixel >= {x['threshold']} | {100 * x['recall_all']:.1f}% "
            f"| {x['unseeded_pairs']} |"
            for x in rows
        ]
        for tool, v in peers.get(name, {}).items():
            if "score" in v and not tool.startswith("embedcache"):
                s = v["score"]
                lines.append(f"| {tool} | {100 * s['recall_all']:.1f}% | {s['unseeded_pairs']} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/audit_peers_work"))
    p.add_argument("--sets", default="flowers12,grocery81")
    results_dir = Path(__file__).with_name("results")
    p.add_argument("--peers", type=Path, default=results_dir / "audit_peers.json")
    args = p.parse_args()
    import audit_quality as aq  # embedcache and its imports

    peers = json.loads(args.peers.read_text())["sets"] if args.peers.exists() else {}
    results = {}
    for name in args.sets.split(","):
        truth = aq._as_cached(aq.prepare(name, args.work), (args.work / name).resolve())
        results[name] = curve(args.work / name / "peers" / "embedcache", truth, aq.COPY_KINDS)
        print(name, json.dumps(results[name]), flush=True)
    tools = {n: peers.get(n, {}).get("tools", {}) for n in results}
    print(save("audit_peers_curve", results, markdown(results, tools)))


if __name__ == "__main__":
    sys.exit(main())
