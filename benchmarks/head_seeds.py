"""The default head against the others over many validation carves, not one.

    python benchmarks/head_seeds.py ../shared/data/hymenoptera --name hymenoptera --seeds 10
    python benchmarks/head_seeds.py ../shared/data/flowers12 --name flowers12 --seeds 10
    python benchmarks/head_seeds.py digits --image-size 64 --name digits --seeds 10

head_protocol.py scores each head once, on one seeded 20% of train held out for the choice;
on a small test set one image decides a row (hymenoptera: 153 test images, 0.65 points each).
This runs the same protocol (the same cache, test split and heads, through `train-head` and
`evaluate`) for ``--seeds`` seeds: each seed carves another validation set and initialises the
torch heads anew. Reported per head: mean and spread of test top-1 over the seeds, and against
the default, the mean paired difference (the same seed) and how many seeds it was above,
level and below. For sets without a val split (a set with one carves nothing).
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

import head_protocol as hp
from common import save

ROWS = [  # (name, train_head options): the default and the heads it must not fall behind
    ("default", {}),
    ("linear (AdamW, the old default)", {"head": "linear", "refit": False}),
    ("mlp", {"head": "mlp", "refit": False}),
    ("mlp --refit", {"head": "mlp", "refit": True}),
    ("4x4 linear sweep", {"head": "linear", "refit": False, **hp.SWEEP}),
    ("logreg (45 strengths)", {"head": "logreg", "refit": False}),
    ("logreg --refit", {"head": "logreg", "refit": True}),
]


def main() -> None:
    p = hp.parser(__doc__, "head_seeds")
    p.add_argument("--seeds", type=int, default=10)
    args = p.parse_args()
    acc: dict[str, list[float]] = {name: [] for name, _ in ROWS}
    chosen: list[str] = []
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        _, cache, sizes = hp.prepared(args, tmp)
        for seed in range(args.seeds):
            for name, options in ROWS:
                row = hp._row(name, cache, tmp, {**options, "seed": seed})
                acc[name].append(row["accuracy"])
                if name == "default":
                    chosen.append(row["chosen"].split(" ", 1)[0])
            print(f"seed {seed}: " + ", ".join(f"{n} {a[-1]:.4f}" for n, a in acc.items()))
    _save(args, acc, chosen, sizes)


def _save(args, acc: dict[str, list[float]], chosen: list[str], sizes: dict) -> None:
    n_test, base = sizes["test"], acc["default"]
    picks = ", ".join(f"{k} {chosen.count(k)}" for k in sorted(set(chosen)))
    md = [
        f"`{args.backbone}` on {args.name}: {sizes['train']} train images (20% held out for the "
        f"choice, another carve per seed), {n_test} test images (one = {100 / n_test:.2f} "
        f"points); {args.seeds} seeds. The default chose: {picks}.",
        "",
        "| head | mean test top-1 | sd | min | max | minus default (mean) | seeds above / "
        "level / below the default |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    rows = []
    for name, a in acc.items():
        diff = [x - b for x, b in zip(a, base, strict=True)]
        above = sum(d > 1e-9 for d in diff)
        below = sum(d < -1e-9 for d in diff)
        r = {
            "name": name,
            "accuracy": a,
            "mean": statistics.fmean(a),
            "sd": statistics.stdev(a) if len(a) > 1 else 0.0,
            "minus_default": statistics.fmean(diff),
            "above": above,
            "below": below,
        }
        rows.append(r)
        counts = "" if name == "default" else f"{above} / {len(a) - above - below} / {below}"
        delta = "" if name == "default" else f"{100 * r['minus_default']:+.2f}"
        md.append(
            f"| {name} | {r['mean']:.2%} | {100 * r['sd']:.2f} | {min(a):.2%} | {max(a):.2%} "
            f"| {delta} | {counts} |"
        )
    payload = {"rows": rows, "splits": sizes, "chosen": chosen, "seeds": args.seeds}
    print(save(f"head_seeds_{args.name}", payload, "\n".join(md)).read_text())


if __name__ == "__main__":
    main()
