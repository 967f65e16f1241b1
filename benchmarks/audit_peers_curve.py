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

THRESHOLDS = (0.9, 0.92, 0.94, 0.95, 0.96, 0.97, 0.98, 0.99, 0.995, 0.999)
IDENTICAL = 0.999  # pixel similarity of pictures the same to the eye (re-encoded, resized)


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


def pair_by_pair(folder: Path, truth: dict, peers_dir: Path) -> dict:
    """Each tool's unseeded pairs one by one (audit_peers.unseeded_set) and how many of them
    the others' groups join too; of embedcache's default pairs, how many are the same picture to
    the pixel (similarity >= IDENTICAL, or exact duplicates)."""
    import audit_peers as ap

    seeded = [(a, b) for a, b, _ in truth["copies"]]
    exact = [[r["path_a"], r["path_b"]] for r in _rows(folder / "exact_duplicates.csv")]
    near = _rows(folder / "near_duplicates.csv")
    ours = exact + [[r["path_a"], r["path_b"]] for r in near]
    same = exact + [
        [r["path_a"], r["path_b"]] for r in near if float(r["pixel_similarity"]) >= IDENTICAL
    ]
    tools = {"embedcache": ours}
    for tool, (_runner, settings) in ap.PEERS.items():
        where = peers_dir / (tool.split()[0] + ap._suffix(settings))
        if (where / "result.json").is_file():
            keys = json.loads((where / "spec.json").read_text())["keys"]
            groups = json.loads((where / "result.json").read_text())["groups"]
            tools[tool] = [[keys[i] for i in g] for g in groups]
    mine = ap.unseeded_set(ours, seeded)
    out = {
        "embedcache": {"pairs": len(mine), "identical": len(mine & ap.unseeded_set(same, seeded))}
    }
    for tool, groups in tools.items():
        if tool != "embedcache":
            theirs = ap.unseeded_set(groups, seeded)
            out[tool] = {"pairs": len(theirs), "joined_by_embedcache": ap.linked(theirs, ours)}
            out["embedcache"][f"joined_by {tool}"] = ap.linked(mine, groups)
    return out


def markdown(results: dict, peers: dict, pairs: dict | None = None) -> str:
    pairs = pairs or {}
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
        lines += _pairs_table(pairs.get(name))
    return "\n".join(lines)


def _pairs_table(p: dict | None) -> list[str]:
    if not p:
        return []
    ours = p["embedcache"]
    lines = [
        "",
        "Pair by pair (every two images one reported group holds, less an original with its "
        f"copies): embedcache's default audit reports {ours['pairs']} unseeded pairs, "
        f"{ours['identical']} of them the same picture to the pixel (similarity >= {IDENTICAL}).",
        "",
        "| tool | unseeded pairs | of them, joined by embedcache's default audit too "
        "| embedcache's unseeded pairs this tool joins too |",
        "|---|---:|---:|---:|",
    ]
    for tool, v in p.items():
        if tool != "embedcache":
            lines.append(
                f"| {tool} | {v['pairs']} | {v['joined_by_embedcache']} "
                f"| {ours[f'joined_by {tool}']} |"
            )
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/audit_peers_work"))
    p.add_argument("--sets", default="flowers12,grocery81")
    results_dir = Path(__file__).with_name("results")
    p.add_argument("--peers", type=Path, default=results_dir / "audit_peers.json")
    args = p.parse_args()
    import audit_quality as aq  # embedcache and its imports

    peers = json.loads(args.peers.read_text())["sets"] if args.peers.exists() else {}
    results, pairs = {}, {}
    for name in args.sets.split(","):
        truth = aq._as_cached(aq.prepare(name, args.work), (args.work / name).resolve())
        ours = args.work / name / "peers" / "embedcache"
        results[name] = curve(ours, truth, aq.COPY_KINDS)
        pairs[name] = pair_by_pair(ours, truth, args.work / name / "peers")
        print(name, json.dumps(results[name]), json.dumps(pairs[name]), flush=True)
    tools = {n: peers.get(n, {}).get("tools", {}) for n in results}
    payload = {"curve": results, "pair_by_pair": pairs}
    print(save("audit_peers_curve", payload, markdown(results, tools, pairs)))


if __name__ == "__main__":
    sys.exit(main())
