"""The scoring rule of benchmarks/audit_peers.py: pairs and groups counted alike for every tool.

Pure logic, no peer tools or embedcache run: the benchmark module is imported from its folder.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import audit_peers as ap  # noqa: E402

SEEDED = [("a", "a2"), ("b", "b2"), ("c", "c2")]


def test_a_seeded_pair_is_found_as_a_pair_or_inside_one_group_but_not_through_a_chain():
    groups = [["a2", "a"], ["b", "x", "b2"], ["c", "y"], ["y", "c2"]]
    assert ap.found_pairs(groups, SEEDED) == [True, True, False]


def test_unseeded_links_are_m_minus_1_per_cluster_less_the_seeded_ones_inside():
    assert ap.unseeded_pairs([["a", "a2"]], SEEDED) == 0
    assert ap.unseeded_pairs([["a", "a2", "x"]], SEEDED) == 1
    assert ap.unseeded_pairs([["x", "y", "z"]], SEEDED) == 2
    # two seeded pairs joined by a stranger: 4 links, 2 explained
    assert ap.unseeded_pairs([["a", "a2", "x", "b", "b2"]], SEEDED) == 2


def test_a_pair_tool_and_a_cluster_tool_linking_the_same_images_count_the_same():
    pairs = [["a", "a2"], ["a2", "x"], ["a", "x"], ["x", "y"]]  # every edge, in both orders too
    cluster = [["x", "a", "y", "a2"]]
    both_ways = pairs + [[b, a] for a, b in pairs]
    assert ap.unseeded_pairs(pairs, SEEDED) == ap.unseeded_pairs(cluster, SEEDED) == 2
    assert ap.unseeded_pairs(both_ways, SEEDED) == 2
    assert ap.found_pairs(pairs, SEEDED) == ap.found_pairs(cluster, SEEDED)


def test_top_recall_takes_the_rounded_share_of_the_ranking():
    ranking = [f"r{i}" for i in range(20)]
    assert ap.top_recall(ranking, {"r0", "r1", "r5"}) == pytest.approx(2 / 3)
    assert ap.top_recall(ranking, set()) is None


def test_score_gives_recall_per_kind_in_the_order_asked_and_n_a_without_a_ranking():
    truth = {
        "copies": [("a", "a2", "exact"), ("b", "b2", "half"), ("c", "c2", "half")],
        "flipped": ["a"],
    }
    s = ap.score([["a", "a2"], ["b", "b2", "z"]], None, truth, ("exact", "half", "mirror"))
    assert list(s["recall"]) == ["exact", "half", "mirror"]
    assert s["recall"] == {"exact": 1.0, "half": 0.5, "mirror": None}
    assert (s["unseeded_pairs"], s["found"], s["label_recall_top_10pct"]) == (1, 2, None)


def test_a_peer_is_beaten_only_by_more_copies_found_at_no_more_unseeded_pairs():
    def tool(recall, unseeded):
        return {"score": {"recall_all": recall, "unseeded_pairs": unseeded}}

    done = {
        "embedcache": tool(0.99, 80),
        "embedcache (pixel threshold 0.95)": tool(0.97, 40),
        "fastdup (threshold 0.96)": tool(0.5, 93),  # beaten by the defaults
        "cleanvision": tool(0.4, 59),  # by the stricter row only
        "tied": tool(0.97, 40),  # as many found: not beaten
    }
    said = ap.beaten(done).split(": ", 1)[1].split("; ")
    assert said[0] == "fastdup (threshold 0.96): beaten by embedcache"
    assert said[1] == "cleanvision: beaten by embedcache (pixel threshold 0.95)"
    assert said[2] == (
        "tied: not beaten on both (embedcache 99.0% at 80, "
        "embedcache (pixel threshold 0.95) 97.0% at 40, tied 97.0% at 40)"
    )
    assert len(said) == 3


def test_the_curve_keeps_near_pairs_at_or_above_each_threshold_and_every_exact_pair(tmp_path):
    import audit_peers_curve as apc

    def write(name, header, rows):
        lines = [",".join(header), *(",".join(map(str, r)) for r in rows)]
        (tmp_path / name).write_text("\n".join(lines) + "\n")

    write("exact_duplicates.csv", ["path_a", "path_b"], [("a", "a2")])
    near = [("b", "b2", 0.91), ("c", "c2", 0.97), ("x", "y", 0.99)]
    write("near_duplicates.csv", ["path_a", "path_b", "pixel_similarity"], near)
    (tmp_path / "summary.json").write_text('{"near_duplicates": {}}')
    truth = {"copies": [(a, b, "k") for a, b in SEEDED], "flipped": []}
    rule, *rows = apc.curve(tmp_path, truth, ["k"])
    at = {r["threshold"]: r for r in rows}
    assert rule["pixel_rule"] == "the default, not raised"
    assert at[0.9]["recall_all"] == 1.0 and at[0.9]["unseeded_pairs"] == 1
    assert at[0.92]["recall_all"] == 2 / 3  # b~b2 (0.91) dropped, a~a2 is exact
    assert at[0.98]["recall_all"] == 1 / 3 and at[0.98]["unseeded_pairs"] == 1


def test_unseeded_pairs_one_by_one_leave_out_an_original_with_its_copies():
    groups = [["a", "a2", "x"], ["y", "z"]]
    assert ap.unseeded_set(groups, SEEDED) == {("a", "x"), ("a2", "x"), ("y", "z")}
    # another tool's clusters join a pair through a chain of its groups
    assert ap.linked({("a", "x"), ("y", "z")}, [["a", "q"], ["q", "x"]]) == 1
    assert ap.linked({("y", "z")}, [["y", "q"], ["z", "r"]]) == 0
