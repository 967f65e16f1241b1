"""Would temperatures fitted on validation make the default head's blend better? Measured: no.

    python benchmarks/blend_temperature.py digits --image-size 64 --name digits --seeds 10
    python benchmarks/blend_temperature.py ../shared/data/hymenoptera --name hymenoptera --seeds 10
    python benchmarks/blend_temperature.py ../shared/data/flowers12 --name flowers12 --seeds 10
    python benchmarks/blend_temperature.py ../shared/data/grocery81 --name grocery81 --seeds 3

The default head blends a linear probe and an MLP by the plain mean of their class
probabilities. The MLP trains with label smoothing and dropout and is the less confident of
the two, so where they disagree the mean leans to the probe (on the digits, where the MLP is
the better head, the blend scored below the MLP alone). Temperature scaling (Guo et al. 2017)
on validation is the textbook fix. Each seed trains the default head once (head_protocol's
cache and test split, another validation carve and MLP initialisation per seed, `--no-refit`
so that validation is unseen), fits the temperatures on its validation logits, and scores on
test, paired on the very same two heads:

- plain: the mean of the raw probabilities (what the default saves);
- each alone: each head's temperature fitted on its own validation loss;
- jointly: both fitted on the blend's validation loss (L-BFGS from T = 1);
- each head alone.

Temperatures are searched in 0.25-4 (where validation has no error the loss falls with T, to
the range's edge). A seed where the default kept one head alone is counted apart.
"""

from __future__ import annotations

import math
import statistics
import tempfile
from pathlib import Path

import head_protocol as hp
import numpy as np
import torch
import torch.nn.functional as F
from common import save

from embedcache import open_cache, train_head

T_RANGE = (0.25, 4.0)
COLUMNS = ("plain", "each", "joint", "probe", "mlp")
LABELS = {
    "plain": "blend, plain mean (the default)",
    "each": "blend, T each alone",
    "joint": "blend, T jointly",
    "probe": "probe alone",
    "mlp": "MLP alone",
}


def _blend_loss(z: list[torch.Tensor], y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    logp = torch.stack([torch.log_softmax(x / t[i], 1) for i, x in enumerate(z)])
    return F.nll_loss(torch.logsumexp(logp, 0) - math.log(len(z)), y)


def fit_temperatures(z: list[torch.Tensor], y: torch.Tensor) -> list[float]:
    """Temperatures (bounded to T_RANGE via tanh on log T) minimising the blend's validation
    loss, by L-BFGS from T = 1; with one head, its temperature scaling."""
    edge = math.log(T_RANGE[1])
    v = torch.zeros(len(z), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([v], max_iter=200, tolerance_grad=1e-9, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        out = _blend_loss(z, y, torch.exp(edge * torch.tanh(v)))
        out.backward()
        return out

    opt.step(closure)
    return torch.exp(edge * torch.tanh(v)).tolist()


def _logits(module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return module(x).double()


def _seed(cache: Path, seed: int, val, test) -> dict:
    r = train_head(cache, seed=seed, refit=False, device="cpu", progress=False)
    auto, head = r.metrics["auto"], r.head.eval()
    row = {
        "seed": seed,
        "chosen": auto["chosen"],
        "p": [auto["mlp_p_value"], auto["linear_p_value"]],
    }
    if auto["chosen"] != "blend":
        right = _logits(head, test[0]).argmax(1).numpy() == test[1]
        return {**row, **dict.fromkeys(COLUMNS, float(right.mean()))}
    (xv, yv), (xt, yt) = val, test
    zv = [_logits(m, xv) for m in head.members]
    zt = [_logits(m, xt) for m in head.members]
    yv = torch.from_numpy(yv.astype(np.int64))
    temps = {
        "plain": [1.0, 1.0],
        "each": [fit_temperatures([z], yv)[0] for z in zv],
        "joint": fit_temperatures(zv, yv),
    }
    for name, t in temps.items():
        p = sum(torch.softmax(z / t[i], 1) for i, z in enumerate(zt))
        row[name] = float((p.argmax(1).numpy() == yt).mean())
    row["probe"], row["mlp"] = (float((z.argmax(1).numpy() == yt).mean()) for z in zt)
    row["temperature"] = {k: [round(x, 3) for x in v] for k, v in temps.items() if k != "plain"}
    return row


def main() -> None:
    p = hp.parser(__doc__, "blend_temperature")
    p.add_argument("--seeds", type=int, default=10)
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as t:
        _, cache, sizes = hp.prepared(args, Path(t))
        for seed in range(args.seeds):
            val = _val_rows(cache, seed)  # the rows this seed carves (or the val split)
            with open_cache(cache) as c:
                test = (torch.from_numpy(c.features("test")[:]).float(), c.labels("test"))
            rows.append(_seed(cache, seed, val, test))
            print(rows[-1], flush=True)
    _save(args, rows, sizes)


def _val_rows(cache: Path, seed: int):
    """(features, labels) of the validation rows train_head uses for ``seed``."""
    from embedcache.config import HeadConfig
    from embedcache.train.features import read_splits

    with open_cache(cache) as c:
        data = read_splits(c, HeadConfig.build(None, seed=seed))
        return torch.from_numpy(data.val.all()).float(), data.val.labels


def _save(args, rows: list[dict], sizes: dict) -> None:
    n_test = sizes["test"]
    blends = [r for r in rows if r["chosen"] == "blend"]
    md = [
        f"`{args.backbone}` on {args.name}: {sizes['train']} train images, {n_test} test images "
        f"(one = {100 / n_test:.2f} points); {len(rows)} seeds, heads not refit, the blend "
        f"kept in {len(blends)}.",
        "",
        "| seed | chosen | T each (probe, MLP) | T jointly (probe, MLP) | "
        + " | ".join(LABELS[k] for k in COLUMNS)
        + " |",
        "| ---: | --- | --- | --- |" + " ---: |" * len(COLUMNS),
    ]
    for r in rows:
        t = r.get("temperature", {})
        ts = " | ".join(", ".join(f"{x:.2f}" for x in t.get(k, [])) for k in ("each", "joint"))
        accs = " | ".join(f"{r[k]:.2%}" for k in COLUMNS)
        md.append(f"| {r['seed']} | {r['chosen']} | {ts} | {accs} |")
    means = " | ".join(f"**{statistics.fmean(r[k] for r in rows):.2%}**" for k in COLUMNS)
    md.append(f"| mean | | | | {means} |")
    if blends:
        md += ["", f"Where the blend was kept ({len(blends)} seeds), minus the plain mean:", ""]
        for k in ("each", "joint"):
            diff = [r[k] - r["plain"] for r in blends]
            md.append(
                f"- {LABELS[k]}: mean {100 * statistics.fmean(diff):+.2f} points; above in "
                f"{sum(d > 1e-9 for d in diff)}, level in {sum(abs(d) <= 1e-9 for d in diff)}, "
                f"below in {sum(d < -1e-9 for d in diff)} seeds."
            )
    payload = {"rows": rows, "splits": sizes, "seeds": args.seeds}
    print(save(f"blend_temperature_{args.name}", payload, "\n".join(md)).read_text())


if __name__ == "__main__":
    main()
