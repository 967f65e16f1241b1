from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import blobs

import embedcache.feed as feed
import embedcache.train as train_mod
from embedcache import open_cache, train_head
from embedcache.errors import EmbedcacheError
from embedcache.probe import fit_logreg
from embedcache.train import load_head
from embedcache.train.sweep import _to_device

FAST = {"device": "cpu", "progress": False}
LINEAR = {**FAST, "head": "linear"}  # the AdamW-trained torch head, for what trains in epochs


def _val(cache):
    with open_cache(cache) as c:
        v = c["val"]
    return v.features.astype(np.float32), v.labels


@pytest.mark.parametrize("kind, extra", [("linear", {}), ("mlp", {"dropout": 0.0, "hidden": 8})])
def test_sweep_picks_the_same_head_as_separate_runs(blob_cache, kind, extra):
    lrs, wds = [1e-3, 3e-2], [0.0, 1e-1]
    sweep = train_head(
        blob_cache, head=kind, lr=lrs, weight_decay=wds, epochs=15, patience=15, **extra, **FAST
    )
    single = {}
    for lr in lrs:
        for wd in wds:
            single[(lr, wd)] = train_head(
                blob_cache,
                head=kind,
                lr=lr,
                weight_decay=wd,
                epochs=15,
                patience=15,
                **extra,
                **FAST,
            )
    for row in sweep.metrics["sweep"]:
        alone = single[(row["lr"], row["weight_decay"])].metrics["sweep"][0]
        assert row["best_epoch"] == alone["best_epoch"]
        assert row["best_val_acc"] == pytest.approx(alone["best_val_acc"])
        assert row["best_val_loss"] == pytest.approx(alone["best_val_loss"], rel=1e-4)
    best = sweep.metrics["best"]
    chosen = single[(best["lr"], best["weight_decay"])].head.state_dict()
    for k, v in sweep.head.state_dict().items():
        torch.testing.assert_close(v, chosen[k], rtol=1e-4, atol=1e-5)
    assert sweep.metrics["val_loss"] == pytest.approx(
        min(s.metrics["val_loss"] for s in single.values()), rel=1e-5
    )


def test_early_stopping_keeps_the_best_epoch(make_cache):
    x, y = blobs(40, seed=0, spread=2.5)
    xv, yv = blobs(15, seed=1, spread=2.5)
    yv = np.random.default_rng(0).permutation(
        yv
    )  # noisy validation: it peaks early, then the loss rises
    cache = make_cache(train=(x, y), val=(xv, yv))
    r = train_head(cache, lr=0.1, epochs=200, patience=4, **LINEAR)
    m = r.metrics
    best = m["best_epoch"] - 1
    # patience 4, or half the best epoch when that is more: a late improver waits longer
    assert m["epochs_run"] == m["best_epoch"] + max(4, best // 2) < 200
    assert m["history"]["val_loss"][best] == min(m["history"]["val_loss"])
    with torch.no_grad():
        pred = r.head(torch.from_numpy(xv.astype(np.float32))).argmax(1).numpy()
    assert (pred == yv).mean() == pytest.approx(m["history"]["val_acc"][best])
    assert m["val_acc"] == pytest.approx(m["history"]["val_acc"][best])


def test_checkpoint_round_trips_and_writes_reports(blob_cache, tmp_path):
    out = tmp_path / "head.pt"
    r = train_head(blob_cache, out=out, epochs=5, **LINEAR)
    head, ckpt = load_head(out)
    xv, yv = _val(blob_cache)
    with torch.no_grad():
        torch.testing.assert_close(head(torch.from_numpy(xv)), r.head(torch.from_numpy(xv)))
    assert ckpt.classes == ["a", "b", "c"] and ckpt.recorded.identity.backbone == "resnet18"
    assert ckpt.recorded.feature_dim == 16
    for name in ("head.metrics.json", "head.curves.png", "head.confusion.png", "head.report.txt"):
        assert (tmp_path / name).stat().st_size > 0
    assert "precision" in (tmp_path / "head.report.txt").read_text()


def test_standardisation_uses_train_statistics_at_train_and_predict_time(blob_cache, tmp_path):
    r = train_head(blob_cache, out=tmp_path / "h.pt", epochs=3, **LINEAR)
    with open_cache(blob_cache) as c:
        x = c["train"].features.astype(np.float64)
    head, _ = load_head(tmp_path / "h.pt")
    scale = np.sqrt(x.var(0).mean())  # one scale for every dimension
    np.testing.assert_allclose(head.norm.mean.numpy(), x.mean(0), rtol=1e-5)
    np.testing.assert_allclose(head.norm.std.numpy(), np.full(x.shape[1], scale), rtol=1e-5)
    xv, yv = _val(blob_cache)
    raw = torch.from_numpy(xv)
    with torch.no_grad():
        manual = head.classifier((raw - torch.from_numpy(x.mean(0)).float()) / float(scale))
        torch.testing.assert_close(head(raw), manual, rtol=1e-4, atol=1e-4)
    assert float((head(raw).argmax(1).numpy() == yv).mean()) == pytest.approx(r.metrics["val_acc"])


def test_one_scale_keeps_dead_features_from_drowning_the_signal(make_cache):
    rng = np.random.default_rng(0)
    x, y = blobs(60, dim=8, classes=2, seed=0, spread=0.3)
    xv, yv = blobs(60, dim=8, classes=2, seed=1, spread=0.3)

    def dead(n: int) -> np.ndarray:  # near-constant columns, like dead ReLU units
        return rng.normal(0, 1e-4, (n, 200))

    cache = make_cache(
        train=(np.hstack([x, dead(len(y))]).astype(np.float32), y),
        val=(np.hstack([xv, dead(len(yv))]).astype(np.float32), yv),
        classes=("a", "b"),
    )
    r = train_head(cache, epochs=50, **LINEAR)
    assert r.metrics["val_acc"] >= 0.95


def test_streaming_from_the_file_gives_the_same_head_as_in_memory(blob_cache, monkeypatch):
    monkeypatch.setattr(feed, "BLOCK_ROWS", 16)  # many blocks for 120 rows
    monkeypatch.setattr(feed, "SHUFFLE_ROWS", 48)
    kw = {"lr": [1e-2, 3e-2], "epochs": 6, "batch_size": 10, **LINEAR}
    memory = train_head(blob_cache, stream=False, **kw)
    streamed = train_head(blob_cache, max_memory=1000, **kw)  # 120 x 16 float32 is 7,680 bytes
    assert streamed.metrics["streamed"] and not memory.metrics["streamed"]
    assert streamed.metrics["history"] == memory.metrics["history"]
    for k, v in memory.head.state_dict().items():
        assert torch.equal(v, streamed.head.state_dict()[k]), k


def test_streamed_training_reads_ahead_as_the_runtime_decides(blob_cache, monkeypatch):
    seen = []
    real = feed.Rows.batches

    def batches(self, *a):
        seen.append(self.read_ahead)
        return real(self, *a)

    monkeypatch.setattr(feed.Rows, "batches", batches)
    for decided in (True, False):
        monkeypatch.setattr(train_mod, "read_ahead", lambda device, d=decided: d)
        train_head(blob_cache, max_memory=1000, epochs=1, **LINEAR)
    assert seen == [True, False]


def test_features_reach_the_cpu_without_a_copy():
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    t = _to_device(a, torch.device("cpu"))
    assert np.shares_memory(t.numpy(), a) and not t.is_pinned()


def test_resume_continues_as_if_never_stopped(blob_cache, tmp_path):
    kw = {"lr": [1e-2, 1e-1], "patience": 50, **LINEAR}
    straight = train_head(blob_cache, out=tmp_path / "a.pt", epochs=8, **kw)
    train_head(blob_cache, out=tmp_path / "b.pt", epochs=3, **kw)
    resumed = train_head(blob_cache, out=tmp_path / "b.pt", epochs=8, resume=True, **kw)
    assert resumed.metrics["history"] == straight.metrics["history"]
    with pytest.raises(EmbedcacheError, match="trained with another cache or configuration"):
        train_head(blob_cache, out=tmp_path / "b.pt", epochs=9, resume=True, **{**kw, "lr": [1e-3]})


@pytest.mark.parametrize("kind", ["logreg", "knn"])
def test_reference_heads(blob_cache, tmp_path, kind):
    r = train_head(blob_cache, out=tmp_path / f"{kind}.pt", head=kind, **FAST)
    assert r.metrics["val_acc"] >= 0.9
    head, _ = load_head(tmp_path / f"{kind}.pt")
    xv, yv = _val(blob_cache)
    with torch.no_grad():
        assert float((head(torch.from_numpy(xv)).argmax(1).numpy() == yv).mean()) == pytest.approx(
            r.metrics["val_acc"]
        )


def test_logreg_is_scikit_learns_multinomial_regression_at_the_same_strength(make_cache):
    from sklearn.linear_model import LogisticRegression

    x, y = blobs(30, classes=3, seed=0, spread=1.5)
    xv, yv = blobs(20, classes=3, seed=1, spread=1.5)
    cache = make_cache(train=(x, y), val=(xv, yv))
    r = train_head(cache, head="logreg", **FAST)
    x32, xv32 = x.astype(np.float32), xv.astype(np.float32)
    mu, sd = x32.mean(0), np.sqrt(x32.astype(np.float64).var(0).mean())
    C = 1.0 / (r.metrics["best"]["lam"] * len(y))  # mean loss + lam/2 |W|^2 is C * sum + |W|^2/2
    sk = LogisticRegression(C=C, tol=1e-8, max_iter=5000).fit((x32 - mu) / sd, y)
    with torch.no_grad():
        probs = torch.softmax(r.head(torch.from_numpy(xv32)), 1).numpy()
    np.testing.assert_allclose(probs, sk.predict_proba((xv32 - mu) / sd), atol=5e-3)


def test_no_val_split_holds_out_a_stratified_fraction(make_cache):
    cache = make_cache(train=blobs(20))
    r = train_head(cache, val_fraction=0.25, epochs=3, **LINEAR)
    assert (
        r.metrics["val_source"]
        == "no val split: held out 15 of 60 train images (25%, stratified, seed 0)"
    )
    assert r.metrics["train_images"] == 45 and r.metrics["val_images"] == 15


def test_training_errors(make_cache, tmp_path, blob_cache):
    from conftest import make_tree

    from embedcache.cache import PartialCache, partial_path
    from embedcache.data import scan

    x, y = blobs(5)
    with pytest.raises(
        EmbedcacheError, match="has a single class \\(a\\); a classifier needs at least two"
    ):
        train_head(make_cache("one.h5", train=(x[:5], y[:5]), val=(x[:5], y[:5])), **FAST)
    with pytest.raises(EmbedcacheError, match="has unlabelled train images"):
        train_head(make_cache("unl.h5", train=(x, np.full(len(y), -1))), **FAST)
    with pytest.raises(EmbedcacheError, match="has no train split \\(it has all\\)"):
        train_head(make_cache("all.h5", all=(x, y)), **FAST)
    with pytest.raises(EmbedcacheError, match="the train split of .* is empty"):
        train_head(make_cache("empty.h5", train=(x[:0], y[:0]), val=(x, y)), **FAST)
    with pytest.raises(EmbedcacheError, match="the val split of .* is empty"):
        train_head(make_cache("emptyval.h5", train=(x, y), val=(x[:0], y[:0])), **FAST)
    data = make_tree(tmp_path / "d", per_class=1)
    out = tmp_path / "inc.h5"
    attrs = {
        "format_version": 1,
        "backbone": "resnet18",
        "weights": "none",
        "transform": "{}",
        "dtype": "float16",
    }
    PartialCache.create(
        partial_path(out), attrs=attrs, images=scan(data), feature_dim=4, dtype="float16"
    ).close()
    with pytest.raises(
        EmbedcacheError, match="incomplete.*re-run the same `embedcache extract` command to resume"
    ):
        train_head(out, **FAST)
    with pytest.raises(EmbedcacheError, match="--lr must be at least 0.0, got -1.0"):
        train_head(blob_cache, lr=[-1.0], **FAST)


def test_logreg_searches_the_45_kornblith_strengths_and_keeps_the_lowest_val_loss(make_cache):
    x, y = blobs(30, classes=2, seed=0, spread=3)  # separable: many strengths tie on accuracy
    xv, yv = blobs(20, classes=2, seed=1, spread=3)
    r = train_head(
        make_cache(train=(x, y), val=(xv, yv), classes=("a", "b")), head="logreg", **FAST
    )
    rows = r.metrics["sweep"]
    lams = [row["lam"] for row in rows]
    assert len(rows) == 45 and lams == sorted(lams)
    assert lams[0] == pytest.approx(1e-6) and lams[-1] == pytest.approx(1e5)
    assert r.metrics["best"]["lam"] == min(rows, key=lambda row: row["val_loss"])["lam"]
    assert r.metrics["val_loss"] == pytest.approx(min(row["val_loss"] for row in rows), rel=1e-5)


def _spurious(n: int, seed: int, cue: bool, views: int = 0):
    """Two classes told apart weakly by dimension 0, and perfectly by dimension 1 when ``cue``
    (a cue the augmentation destroys: in views and in validation it is noise)."""
    rng = np.random.default_rng(seed)
    y = np.repeat([0, 1], n)
    x = rng.normal(0, 1, (2 * n, 6))
    x[:, 0] += np.where(y == 1, 1.0, -1.0)
    x[:, 1] = np.where(y == 1, 3.0, -3.0) if cue else rng.normal(0, 3, 2 * n)
    v = np.repeat(x[:, None], views, axis=1)
    v[:, :, 1] = rng.normal(0, 3, (2 * n, views))
    return x.astype(np.float32), y, v.astype(np.float32)


def test_views_teach_the_head_what_augmentation_leaves_unchanged(make_cache):
    x, y, v = _spurious(200, 0, cue=True, views=4)
    xv, yv, vv = _spurious(200, 1, cue=False, views=1)
    cache = make_cache(
        train=(x, y), val=(xv, yv), classes=("a", "b"), views={"train": v, "val": vv}
    )
    kw = {"epochs": 60, "lr": 1e-2, **LINEAR}
    used = train_head(cache, **kw)
    ignored = train_head(cache, views="ignore", **kw)
    assert used.metrics["views"] == {"stored": 4, "used": 4}
    assert ignored.metrics["views"] == {"stored": 4, "used": 0}
    assert used.metrics["val_acc"] >= ignored.metrics["val_acc"] + 0.1, (
        used.metrics["val_acc"],
        ignored.metrics["val_acc"],
    )
    logreg = train_head(cache, head="logreg", **FAST)  # a reference: the plain features only
    assert logreg.metrics["views"] == {"stored": 4, "used": 0}


def test_views_are_drawn_uniformly_per_image_and_epoch():
    from embedcache.feed import ViewRows

    plain = np.zeros((1000, 1), np.float32)
    views = np.arange(1, 4, dtype=np.float32)[None, :, None].repeat(1000, 0)  # view k holds k
    rows = ViewRows(plain, views, np.zeros(1000, np.int64), np.arange(1000))
    rows.pick(np.random.default_rng(0))
    first = rows.take(np.arange(1000))[:, 0]
    assert np.allclose(np.bincount(first.astype(int), minlength=4) / 1000, 0.25, atol=0.05)
    rows.pick(np.random.default_rng(1))
    assert (rows.take(np.arange(1000))[:, 0] != first).mean() > 0.5  # another draw each epoch


def test_tta_in_the_metrics_is_the_mean_of_the_image_and_mirror_logits(make_cache):
    (x, y), (xv, yv) = blobs(30, seed=0), blobs(10, seed=1)
    mirror = (xv + np.random.default_rng(2).normal(0, 3, xv.shape)).astype(np.float16)
    cache = make_cache(
        train=(x, y), val=(xv, yv), views={"train": x[:, None], "val": mirror[:, None]}
    )
    r = train_head(cache, epochs=5, **LINEAR)
    with torch.no_grad():
        z = (
            r.head(torch.from_numpy(xv.astype(np.float32)))
            + r.head(torch.from_numpy(mirror.astype(np.float32)))
        ) / 2
    assert r.metrics["val_acc_tta"] == pytest.approx(float((z.argmax(1).numpy() == yv).mean()))
    loss = torch.nn.functional.cross_entropy(z, torch.from_numpy(yv)).item()
    assert r.metrics["val_loss_tta"] == pytest.approx(loss, rel=1e-5)
    assert (
        "val_acc_tta"
        not in train_head(
            make_cache("plain.h5", train=(x, y), val=(xv, yv)), epochs=2, **LINEAR
        ).metrics
    )


def test_refit_trains_the_chosen_configuration_on_train_and_val(make_cache, tmp_path):
    (x, y), (xv, yv) = (
        blobs(30, classes=2, seed=0, spread=3),
        blobs(20, classes=2, seed=1, spread=3),
    )
    cache = make_cache(train=(x, y), val=(xv, yv), classes=("a", "b"))
    chosen = train_head(cache, head="logreg", **FAST)
    refit = train_head(cache, head="logreg", refit=True, **FAST)
    assert refit.metrics["refit"]["images"] == 100
    assert refit.metrics["refit"]["config"] == chosen.metrics["best"]
    assert refit.metrics["val_acc"] == chosen.metrics["val_acc"]  # the choice's, before the refit
    both = np.concatenate([x, xv]).astype(np.float32)
    mu, sd = both.mean(0), np.float32(np.sqrt(both.astype(np.float64).var(0).mean()))
    xs, yb = torch.from_numpy((both - mu) / sd), torch.from_numpy(np.r_[y, yv])
    fit = fit_logreg(xs, yb, 2, lam=chosen.metrics["best"]["lam"])
    expected = torch.softmax(xs @ fit.weight.T + fit.bias, 1)
    with torch.no_grad():
        probs = torch.softmax(refit.head(torch.from_numpy(both)), 1)
    # from another start, L-BFGS stops at GRAD_TOL elsewhere on the same optimum's plateau:
    # 2e-4 apart here, within the 2e-3 that tolerance leaves against scikit-learn (probe.py)
    torch.testing.assert_close(probs, expected, atol=1e-3, rtol=0)
    # started from the chosen fit, the refit reached it in fewer steps
    assert refit.metrics["refit"]["iterations"] < fit.iterations
    knn = train_head(cache, head="knn", refit=True, **FAST)  # val joins the bank
    k1 = knn.metrics["refit"]["config"]["k"] == 1
    assert (
        not k1
        or float((knn.head(torch.from_numpy(xv.astype(np.float32))).argmax(1).numpy() == yv).mean())
        == 1.0
    )
    sweep = train_head(
        cache,
        out=tmp_path / "h.pt",
        lr=[1e-3, 1e-2],
        weight_decay=[0, 1e-3],
        epochs=30,
        refit=True,
        **LINEAR,
    )
    m = sweep.metrics
    assert m["refit"]["images"] == 100 and m["refit"]["epochs"] == m["best_epoch"]
    assert m["refit"]["config"] == m["best"]
    assert (
        load_head(tmp_path / "h.pt")[1].metrics["refit"] == m["refit"]
    )  # the saved head is the refit one
    plain = train_head(cache, lr=[1e-3, 1e-2], weight_decay=[0, 1e-3], epochs=30, **LINEAR)
    assert not torch.equal(plain.head.classifier.weight, sweep.head.classifier.weight)


def test_a_refit_joins_val_rows_that_never_draw_a_view():
    from embedcache.feed import Rows, ViewRows, join_rows

    plain = np.zeros((6, 1), np.float32)
    views = np.ones((6, 2, 1), np.float32)
    train = ViewRows(plain, views, np.zeros(6, np.int64), np.arange(4))
    val = Rows(
        np.full((3, 1), -1.0, np.float32), np.ones(3, np.int64), np.arange(3), in_memory=True
    )
    both = join_rows(train, val)
    assert isinstance(both, ViewRows) and both.n == 7 and list(both.labels) == [0] * 4 + [1] * 3
    seen = set()
    for seed in range(20):
        both.pick(np.random.default_rng(seed))
        x = both.take(np.arange(7))[:, 0]
        assert np.all(x[4:] == -1.0)  # val rows: their plain features only
        seen |= set(x[:4].tolist())
    assert seen == {0.0, 1.0}  # train rows: plain and views


def _xor(n: int, seed: int):
    """Two classes that no linear head separates: the label is the sign of x0 * x1."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 1, (n, 8)).astype(np.float32)
    y = (x[:, 0] * x[:, 1] > 0).astype(np.int64)
    return x, y


def test_default_head_blends_probe_and_mlp_where_neither_is_better(blob_cache, tmp_path):
    r = train_head(blob_cache, out=tmp_path / "h.pt", refit=False, **FAST)
    auto = r.metrics["auto"]
    assert r.metrics["head"] == "auto" and auto["chosen"] == "blend"
    assert min(auto["mlp_p_value"], auto["linear_p_value"]) >= train_mod.MLP_P_VALUE
    assert "lam" in r.metrics["best"] and r.metrics["val_acc"] >= 0.9
    head, ckpt = load_head(tmp_path / "h.pt")
    assert ckpt.config["kind"] == "blend"
    linear, mlp = head.members
    assert isinstance(linear.classifier, torch.nn.Linear)
    assert isinstance(mlp.classifier, torch.nn.Sequential)
    with open_cache(blob_cache) as c:
        x = torch.from_numpy(c.features("val")[:])
    with torch.no_grad():  # the mean of the two heads' probabilities, as log-probabilities
        want = (linear(x).softmax(1) + mlp(x).softmax(1)) / 2
        torch.testing.assert_close(head(x).exp(), want)
        torch.testing.assert_close(head(x), r.head.eval()(x))  # saved as trained


def test_default_head_plots_the_probe_path_and_the_mlp_epochs_it_chose_from(
    blob_cache, tmp_path, monkeypatch
):
    """Issue 33: the README promises head.curves.png; the default head wrote none."""
    from matplotlib.figure import Figure

    figures, save = [], Figure.savefig

    def record(fig, *args, **kw):
        figures.append(fig)
        return save(fig, *args, **kw)

    monkeypatch.setattr(Figure, "savefig", record)
    r = train_head(blob_cache, out=tmp_path / "h.pt", refit=False, **FAST)
    assert r.files["curves"] == tmp_path / "h.curves.png" and r.files["curves"].stat().st_size
    auto = r.metrics["auto"]
    path, history = auto["linear"]["path"], auto["mlp"]["history"]
    assert auto["linear"]["lam"] in [row["lam"] for row in path]
    assert len(history["val_loss"]) >= auto["mlp"]["best_epoch"]
    (fig,) = [f for f in figures if any(ax.get_xlabel() == "epoch" for ax in f.axes)]
    probe = [ax for ax in fig.axes if ax.get_xscale() == "log"]  # along the L2 strengths
    mlp = [ax for ax in fig.axes if ax.get_xlabel() == "epoch"]
    assert len(probe) == len(mlp) == 2
    for ax in probe:
        line, chosen = ax.get_lines()[:2]
        assert list(line.get_xdata()) == sorted(row["lam"] for row in path)
        assert set(chosen.get_xdata()) == {auto["linear"]["lam"]}
        assert chosen.get_label().startswith("chosen")
    kept = auto["mlp"]["best_epoch"]
    for ax in mlp:
        marks = [line for line in ax.get_lines() if line.get_label() == f"kept: epoch {kept}"]
        assert len(marks) == 1 and set(marks[0].get_xdata()) == {kept}
        lo, hi = ax.get_xlim()
        ticks = ax.get_xticks()[(ax.get_xticks() >= lo) & (ax.get_xticks() <= hi)]
        assert np.array_equal(ticks, ticks.round())
    assert "blend" in fig.get_suptitle()


def test_a_refitted_blend_refits_both_of_its_heads_on_train_and_val(blob_cache):
    r = train_head(blob_cache, refit=True, **FAST)
    assert r.metrics["auto"]["chosen"] == "blend"
    done = r.metrics["refit"]
    assert done["config"] == r.metrics["best"]  # the probe at its chosen strength
    mlp = r.metrics["auto"]["mlp"]
    assert done["mlp"]["epochs"] == mlp["best_epoch"] and done["mlp"]["images"] == done["images"]
    assert done["mlp"]["config"] == {"lr": mlp["lr"], "weight_decay": mlp["weight_decay"]}


def test_default_head_takes_the_mlp_where_the_classes_are_not_linearly_separable(make_cache):
    cache = make_cache(train=_xor(300, 0), val=_xor(100, 1), classes=("a", "b"))
    r = train_head(cache, **FAST)
    auto = r.metrics["auto"]
    assert auto["chosen"] == "mlp" and auto["mlp_p_value"] < train_mod.MLP_P_VALUE
    assert auto["linear"]["val_acc"] < 0.7 < 0.85 < auto["mlp"]["val_acc"]
    assert r.metrics["val_acc"] == pytest.approx(auto["mlp"]["val_acc"])


def test_one_head_replaces_the_blend_only_where_it_wins_significantly():
    many, few = np.array([True] * 20 + [False] * 5), np.array([False] * 20 + [True] * 5)
    assert train_mod.auto_choice(many, few)[0] == "linear"  # 20 wins to 5
    assert train_mod.auto_choice(few, many)[0] == "mlp"
    one = np.array([True, False] + [True] * 23)  # one win each: nothing told apart
    assert train_mod.auto_choice(one, one[::-1].copy())[0] == "blend"
    assert train_mod.auto_choice(many, many)[0] == "blend"


def test_the_choice_is_told_with_the_p_value_behind_it():
    many, few = np.array([True] * 20 + [False] * 5), np.array([False] * 20 + [True] * 5)
    for linear, mlp, why in ((many, few, "probe better"), (few, many, "MLP better")):
        chosen, p_mlp, p_linear = train_mod.auto_choice(linear, mlp)
        auto = {"chosen": chosen, "mlp_p_value": p_mlp, "linear_p_value": p_linear}
        text = train_mod.describe_choice(auto)
        assert text.startswith(f"{chosen} ({why} on val") and f"{min(p_mlp, p_linear):.3f}" in text
    tie = {"chosen": "blend", "mlp_p_value": 0.5, "linear_p_value": 0.75}
    assert train_mod.describe_choice(tie) == (
        "blend (neither better on val: MLP p=0.500, probe p=0.750)"
    )


def test_mlp_must_beat_the_probe_significantly_on_the_same_images():
    right = np.array([True] * 5)
    assert train_mod.better_p_value(right, ~right) == pytest.approx(1 / 32)  # 5 wins, 0 losses
    a, b = np.array([True, False, True]), np.array([False, True, True])
    assert train_mod.better_p_value(a, b) == pytest.approx(3 / 4)  # 1 win, 1 loss
    assert train_mod.better_p_value(right, right) == 1.0  # never told apart


def test_default_refits_on_held_out_validation_only_and_records_what_it_saw(make_cache, tmp_path):
    from embedcache.checkpoint import HeadCheckpoint
    from embedcache.data import paths_digest

    held = make_cache("held.h5", train=blobs(40, seed=0))
    r = train_head(held, out=tmp_path / "a.pt", **FAST)
    assert r.metrics["refit"]["images"] == 120  # 96 trained on, then the 24 held out joined
    ckpt = HeadCheckpoint.load(tmp_path / "a.pt")
    train_paths = [f"train/{i}" + ".png" for i in range(120)]
    assert ckpt.trained.splits == {"train": paths_digest(train_paths)}
    assert ckpt.trained.holdout == {"fraction": 0.2, "seed": 0} and ckpt.trained.refit
    before = ckpt.module(selected=True).state_dict()
    assert before.keys() == ckpt.state_dict.keys()
    assert not any(torch.equal(before[k], ckpt.state_dict[k]) for k in before if "weight" in k)
    kept = train_head(held, out=tmp_path / "b.pt", refit=False, **FAST)
    assert "refit" not in kept.metrics and HeadCheckpoint.load(tmp_path / "b.pt").selected is None
    given = make_cache("given.h5", train=blobs(40, seed=0), val=blobs(15, seed=1))
    assert "refit" not in train_head(given, **FAST).metrics  # a val split of its own: no refit
    both = train_head(given, out=tmp_path / "c.pt", refit=True, **FAST)
    assert set(HeadCheckpoint.load(tmp_path / "c.pt").trained.splits) == {"train", "val"}
    assert both.metrics["refit"]["images"] == 165


def test_metrics_report_balanced_accuracy_and_top5_beyond_five_classes(make_cache):
    names = tuple("abcdefg")
    x, y = blobs(20, classes=7, seed=0, spread=4.0)
    xv, yv = blobs(6, classes=7, seed=1, spread=4.0)
    m = train_head(make_cache(train=(x, y), val=(xv, yv), classes=names), **FAST).metrics
    assert 0 < m["val_balanced_acc"] <= 1 and m["val_acc"] <= m["val_top5"] <= 1
    small = train_head(make_cache("b.h5", train=blobs(20), val=blobs(6, seed=1)), **FAST).metrics
    assert "val_top5" not in small and "val_balanced_acc" in small


def _linear_rows(n: int, seed: int, dim: int = 16, classes: int = 4):
    """Standardised rows whose labels are a noisy linear function of them."""
    rng = np.random.default_rng(seed)
    w = np.random.default_rng(99).normal(0, 1, (dim, classes))
    x = rng.normal(0, 1, (n, dim)).astype(np.float32)
    y = (x @ w + rng.gumbel(0, 1.5, (n, classes))).argmax(1)
    return torch.from_numpy(x), torch.from_numpy(y)


def test_the_sampled_path_chooses_on_a_sample_and_fits_every_row_at_the_scaled_strength():
    from embedcache.probe import DEFAULT_LAMBDAS, logreg_path, sampled_path

    (x, y), (xv, yv) = _linear_rows(4000, 0), _linear_rows(1000, 1)
    path = {"lambdas": DEFAULT_LAMBDAS, "grad_tol": 1e-4, "patience": 4}
    fit, rows, done = sampled_path(x, y, xv, yv, 4, rows=500, **path)
    small, _ = logreg_path(x[:500], y[:500], xv, yv, 4, **path)  # a sample of the same size
    assert done["sample_rows"] == 500 and done["sample_lam"] in DEFAULT_LAMBDAS
    assert fit.lam == pytest.approx(done["sample_lam"] * 500 / 4000) == done["lam"]
    assert all(r["rows"] == 500 for r in rows) and len(rows) < len(DEFAULT_LAMBDAS)
    # the one fit is the fit of every row at that strength, however it was started
    cold = fit_logreg(x, y, 4, lam=fit.lam, grad_tol=1e-6)
    with torch.no_grad():
        warm_p = torch.softmax(xv @ fit.weight.T + fit.bias, 1)
        cold_p = torch.softmax(xv @ cold.weight.T + cold.bias, 1)
    assert (warm_p - cold_p).abs().max() < 2e-2
    # and it predicts better than the sample's own fit
    acc = [float(((xv @ f.weight.T + f.bias).argmax(1) == yv).float().mean()) for f in (fit, small)]
    assert acc[0] > acc[1]
    # at or under the sample's size, it is the path itself
    same, same_rows, small_done = sampled_path(x[:400], y[:400], xv, yv, 4, rows=500, **path)
    ref, ref_rows = logreg_path(x[:400], y[:400], xv, yv, 4, **path)
    assert torch.equal(same.weight, ref.weight) and small_done["sample_rows"] == 400
    assert [r["lam"] for r in same_rows] == [r["lam"] for r in ref_rows]


def test_the_default_head_samples_its_path_past_path_rows_and_budgets_the_mlp(
    make_cache, monkeypatch
):
    x, y = blobs(200, classes=3, seed=0, spread=1.5)
    xv, yv = blobs(60, classes=3, seed=1, spread=1.5)
    cache = make_cache(train=(x, y), val=(xv, yv))
    monkeypatch.setitem(train_mod.AUTO_PATH, "rows", 150)
    monkeypatch.setattr(train_mod, "MLP_ROWS", 1200)  # 1,200 rows seen: 2 epochs of 600
    r = train_head(cache, refit=False, **{**FAST, "epochs": 50, "batch_size": 64})
    linear = r.metrics["auto"]["linear"]
    assert linear["sample_rows"] == 150 and linear["lam"] < linear["sample_lam"]
    assert len(r.metrics["auto"]["mlp"]["history"]["val_loss"]) <= 2
    # in one batch an epoch is one step: the budget leaves it alone
    whole = train_head(cache, refit=False, **{**FAST, "epochs": 50})
    assert len(whole.metrics["auto"]["mlp"]["history"]["val_loss"]) > 2


def test_a_sample_of_streamed_rows_is_the_same_rows_as_in_memory(monkeypatch):
    from embedcache.train.probes import sample_rows

    monkeypatch.setattr(feed, "BLOCK_ROWS", 16)  # the sample spans many blocks
    x = np.arange(200 * 3, dtype=np.float16).reshape(200, 3)
    labels = np.arange(200) % 7
    memory = sample_rows(feed.Rows(x, labels, np.arange(200), in_memory=True), 50, seed=3)
    streamed = sample_rows(feed.Rows(x, labels, np.arange(200), in_memory=False), 50, seed=3)
    assert streamed.in_memory and streamed.n == 50
    assert np.array_equal(streamed.all(), memory.all())
    assert np.array_equal(streamed.labels, memory.labels)
    rows = streamed.all()[:, 0].astype(np.int64) // 3  # each row's first value names it
    assert np.array_equal(streamed.labels, labels[rows]) and len(set(rows)) == 50


def test_the_streamed_probe_is_the_in_memory_one(monkeypatch):
    """Past --max-memory the default's probe reads the same sample, chooses the same strength
    and fits every row streamed in blocks: the head it gives is the in-memory one's."""
    from embedcache.train.probes import AUTO_PATH, fit_probe

    monkeypatch.setattr(feed, "BLOCK_ROWS", 64)
    (x, y), (xv, yv) = _linear_rows(1000, 0), _linear_rows(300, 1)
    x16, xv16 = x.numpy().astype(np.float16), xv.numpy().astype(np.float16)
    path = {**AUTO_PATH, "rows": 300}
    heads = {}
    for streamed in (False, True):
        train = feed.Rows(x16, y.numpy(), np.arange(1000), in_memory=not streamed)
        val = feed.Rows(xv16, yv.numpy(), np.arange(300), in_memory=not streamed)
        heads[streamed] = fit_probe(train, val, list("abcd"), torch.device("cpu"), path=path)
    (mem, mm), (st, sm) = heads[False], heads[True]
    assert sm["best"] == {**mm["best"], "val_rows": 300} and sm["best"]["sample_rows"] == 300
    assert [r["val_loss"] for r in sm["sweep"]] == pytest.approx(
        [r["val_loss"] for r in mm["sweep"]], rel=1e-4
    )
    with torch.no_grad():
        raw = torch.from_numpy(xv16.astype(np.float32))
        p_mem, p_st = torch.softmax(mem(raw), 1), torch.softmax(st(raw), 1)
    assert (p_mem - p_st).abs().max() < 1e-2
    assert bool((mem(raw).argmax(1) == yv).float().mean() > 0.6)
    # the reference, every strength on every row, still needs the rows in memory
    with pytest.raises(EmbedcacheError, match="--head logreg needs the features in memory"):
        fit_probe(train, val, list("abcd"), torch.device("cpu"), path={"lambdas": (1.0,)})


@pytest.mark.parametrize("kind", ["plain", "class weights", "multi-label"])
def test_the_streamed_fit_has_the_in_memory_objective(monkeypatch, kind):
    """Summed block by block, the loss is fit_logreg's: both fits reach the same optimum."""
    from embedcache.heads import Standardize
    from embedcache.probe import LinearFit
    from embedcache.train import probes

    monkeypatch.setattr(feed, "BLOCK_ROWS", 50)
    monkeypatch.setattr(probes, "STREAM_ITER", 200)
    x, y = _linear_rows(400, 0)
    weight = torch.tensor([0.5, 1.0, 2.0, 4.0]) if kind == "class weights" else None
    if kind == "multi-label":
        y = torch.nn.functional.one_hot(y, 4).float()
        y[::3, 0] = 1.0  # some images have two labels
    rows = feed.Rows(x.numpy(), y.numpy(), np.arange(400), in_memory=False)
    start = LinearFit(torch.zeros(4, x.shape[1]), torch.zeros(4), lam=0.0, iterations=0)
    norm = Standardize(torch.zeros(x.shape[1]), torch.ones(x.shape[1]))
    options = {"lam": 1e-2, "grad_tol": 1e-6, "class_weight": weight}
    streamed = probes.fit_streamed(rows, norm, 4, start=start, **options)
    memory = fit_logreg(x, y, 4, max_iter=200, **options)
    assert streamed.iterations > 1
    torch.testing.assert_close(streamed.weight, memory.weight, atol=2e-3, rtol=0)
    torch.testing.assert_close(streamed.bias, memory.bias, atol=2e-3, rtol=0)


def test_the_default_head_on_streamed_features_is_the_probe_or_the_mlp(make_cache, monkeypatch):
    x, y = blobs(200, classes=3, seed=0, spread=1.5)
    xv, yv = blobs(60, classes=3, seed=1, spread=1.5)
    cache = make_cache(train=(x, y), val=(xv, yv))
    monkeypatch.setitem(train_mod.AUTO_PATH, "rows", 150)
    monkeypatch.setattr(train_mod, "MLP_ROWS", 120)  # the MLP trains on 120 rows in memory
    seen = []
    real = train_mod.train_sweep

    def sweep(data, *a, **k):
        seen.append((data.train.n, data.train.in_memory))
        return real(data, *a, **k)

    monkeypatch.setattr(train_mod, "train_sweep", sweep)
    r = train_head(cache, max_memory=1000, refit=False, **FAST)
    assert r.metrics["streamed"] and r.metrics["auto"]["chosen"] in ("linear", "mlp", "blend")
    assert r.metrics["auto"]["linear"]["sample_rows"] == 150 and seen == [(120, True)]
    assert r.metrics["val_acc"] >= 0.9


def test_a_refit_starts_from_the_chosen_probe_with_masked_classes_brought_near():
    from embedcache.heads import Blend, Head, Standardize, make_head
    from embedcache.train.probes import warm_start

    linear = make_head("linear", 4, 3)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(3, 4))
        linear.bias.copy_(torch.tensor([0.5, -1e4, 0.1]))  # class 1 had no training image
    head = Head(Standardize(torch.zeros(4), torch.ones(4)), linear)
    start = warm_start(Blend([head, head]))
    assert torch.equal(start.weight, linear.weight.detach())
    assert start.bias.tolist() == pytest.approx([0.5, -30.0, 0.1])
    mlp = Head(Standardize(torch.zeros(4), torch.ones(4)), make_head("mlp", 4, 3))
    assert warm_start(mlp) is None
